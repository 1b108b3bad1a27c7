"""
Time single network calls of the sampler, for .ci/gpu_check.py: the eager cached call against the uncached one, each
with and without cuDNN attention (the sampler keeps it off: esolm.SAMPLER_ATTENTION), then the static compiled call
(static_cache.py) per bucket. Random weights; 12 x 768, GPT-2 vocabulary, L = 1024, batch 8, bf16 on a GPU.

    python .ci/time_calls.py --out=calls.json                # on a GPU
    python .ci/time_calls.py --out=calls.json --smoke        # a tiny model on any device: checks this script
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import esolm  # noqa: E402
import static_cache  # noqa: E402
from runtime import autocast  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", required=True, help="JSON file for the results")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--block_size", type=int, default=1024)
parser.add_argument("--smoke", action="store_true", help="a tiny model, on the CPU if there is no GPU")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
size = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=256) if args.smoke else \
    dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)
L, B = (64 if args.smoke else args.block_size), args.batch
torch.manual_seed(0)
models = {v: esolm.EsoLM(esolm.EsoLMConfig(block_size=L, variant=v, alpha0=1.0, **size)).to(device).eval()
          for v in ("B", "MDLM")}
amp, dtype = autocast(device)
plan = esolm.random_plan(torch.ones(B, L, dtype=torch.bool, device=device), 1.0, L,
                         torch.Generator(device=device).manual_seed(0))
results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": dtype, "batch": B, "L": L, "size": size, "nfe": len(plan.ks)}


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def ms_per_call(model, kv_cache, compile=False, calls=None):
    """Milliseconds per network call of the plan's loop (no token sampling), after a warm-up loop."""
    part = plan._replace(ks=plan.ks[:calls]) if calls else plan  # alpha0 = 1: no sequential calls

    def loop():
        zs = torch.full_like(plan.order, model.mask_id)
        with amp, torch.no_grad():
            model.decode(zs, part, lambda logits: model.mask_id, kv_cache,
                         static_cache.StaticCalls if compile else None)

    loop()
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        loop()
        sync()
        times.append((time.perf_counter() - t0) / len(part.ks) * 1000)
    return statistics.median(times)


# 1. eager calls, with and without cuDNN attention: esolm.SAMPLER_ATTENTION is read at every decode
keep = esolm.SAMPLER_ATTENTION
for name, backends in (("without cuDNN", keep), ("with cuDNN", [SDPBackend.CUDNN_ATTENTION, *keep])):
    esolm.SAMPLER_ATTENTION = backends
    results[f"eager cached (B), {name}"] = ms_per_call(models["B"], True)
    results[f"uncached MDLM, {name}"] = ms_per_call(models["MDLM"], False, calls=16)
    print(f"{name}: eager cached (B) {results[f'eager cached (B), {name}']:.3f} ms per call, uncached (MDLM) "
          f"{results[f'uncached MDLM, {name}']:.3f} ms per call", flush=True)
esolm.SAMPLER_ATTENTION = keep

# 2. the static compiled call, bucket by bucket: the first call compiles (and captures the CUDA graph)
model = models["B"]
step = static_cache.compiled_step(model, B, model.compute_dtype() if device == "cpu" else torch.bfloat16, device)
buckets = sorted({static_cache.bucket(f.d + f.n - f.n_cached) for f in model.feeds(plan)})
results["static"] = {}
for P in buckets:
    idx = torch.full((B, P), model.mask_id, device=device)
    pos = torch.arange(P, device=device).expand(B, P)
    params = torch.tensor([L // 2, P, 0], device=device)  # half the cache in use, P real tokens
    with amp, torch.no_grad(), torch.nn.attention.sdpa_kernel(esolm.SAMPLER_ATTENTION):
        sync()
        t0 = time.perf_counter()
        for _ in range(3):  # compile, then the graph's recording and its first replay
            torch.compiler.cudagraph_mark_step_begin()
            step(idx, pos, params)
        sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(50):
            torch.compiler.cudagraph_mark_step_begin()
            step(idx, pos, params)
        sync()
    results["static"][P] = {"ms_per_call": (time.perf_counter() - t0) / 50 * 1000, "first_calls_seconds": first}
    print(f"static compiled call, bucket {P}: {results['static'][P]['ms_per_call']:.3f} ms per call "
          f"(compiling and the first calls: {first:.1f} s)", flush=True)
results["static compiled (B), whole loop"] = ms_per_call(model, True, compile=True)
print(f"static compiled (B), the plan's whole loop: {results['static compiled (B), whole loop']:.3f} ms per call "
      f"({len(plan.ks)} calls)", flush=True)
with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
