"""
Time single network calls of the sampler, for .ci/gpu_check.py: the eager cached call against the uncached (MDLM)
one, each with and without cuDNN attention (the sampler keeps it off: esolm.SAMPLER_ATTENTION), then the compiled
call (lab.compiled: static shapes, a CUDA graph each on a GPU) per bucket and over a whole plan. Random weights;
12 x 768, GPT-2 vocabulary, L = 1024, batch 8, bf16 on a GPU.

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
from lab.common import autocast, sync  # noqa: E402
from lab.compiled import bucket, compiled  # noqa: E402

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
masks = torch.full((B, L), L and models["B"].mask_id, device=device)
plan = esolm.random_plan(masks > 0, 1.0, L, torch.rand(2, B, L, device=device))
results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": dtype, "batch": B, "L": L, "size": size, "nfe": plan.ks.size(1)}


def no_sampling(logits, rows, pos):
    return torch.full((logits.size(0),), logits.size(1), device=logits.device)


def ms_per_call(model, kv_cache, net=None, calls=None):
    """Milliseconds a network call over the plan's loop (no token sampling), after a warm-up loop."""
    ks = plan.ks[:, :calls] if calls else plan.ks  # alpha0 = 1: no sequential calls

    def loop():
        with amp, torch.no_grad():
            model.decode(masks.clone(), esolm.Plan(plan.order.clone(), ks), no_sampling, kv_cache=kv_cache, net=net)

    loop()
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        loop()
        sync(device)
        times.append((time.perf_counter() - t0) / ks.size(1) * 1000)
    return statistics.median(times)


# 1. eager calls, with and without cuDNN attention: esolm.SAMPLER_ATTENTION is read at every call
keep = esolm.SAMPLER_ATTENTION
for name, backends in (("without cuDNN", keep), ("with cuDNN", [SDPBackend.CUDNN_ATTENTION, *keep])):
    esolm.SAMPLER_ATTENTION = backends
    results[f"eager cached (B), {name}"] = ms_per_call(models["B"], True)
    results[f"uncached MDLM, {name}"] = ms_per_call(models["MDLM"], False, calls=16)
    print(f"{name}: eager cached (B) {results[f'eager cached (B), {name}']:.3f} ms a call, uncached (MDLM) "
          f"{results[f'uncached MDLM, {name}']:.3f} ms a call", flush=True)
esolm.SAMPLER_ATTENTION = keep

# 2. the compiled call over the whole loop (the first loop compiles a graph a bucket), then bucket by bucket
model, net = models["B"], compiled(models["B"])
t0 = time.perf_counter()
results["compiled (B), whole loop"] = ms_per_call(model, True, net=net)
results["compiled, first loop and 3 more, seconds"] = time.perf_counter() - t0
print(f"compiled (B), the plan's whole loop: {results['compiled (B), whole loop']:.3f} ms a call", flush=True)
results["compiled, by bucket"] = {}
slots = torch.arange(L + 1, device=device)
for P in sorted({bucket(int(w)) for w in plan.ks[:, 1:].max(0).values + plan.ks[:, :-1].max(0).values}):
    idx, s = torch.full((B, P), model.mask_id, device=device), (L // 2 + slots[:P]).expand(B, P)
    mask = esolm.visible(s, slots, 0).unsqueeze(1)  # half the cache in use
    with amp, torch.no_grad(), torch.nn.attention.sdpa_kernel(esolm.SAMPLER_ATTENTION):
        for _ in range(3):
            net(idx, s, mask, s)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(50):
            net(idx, s, mask, s)
        sync(device)
    results["compiled, by bucket"][P] = (time.perf_counter() - t0) / 50 * 1000
    print(f"compiled call, bucket {P}: {results['compiled, by bucket'][P]:.3f} ms a call", flush=True)
with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
