"""
Speed of the cached sampler and of the training step, side by side, in one process.

    python bench.py                       # CPU, small sizes, a few minutes on 2 cores
    python bench.py --device=cuda         # bf16, 12 x 768, L = 1024 (and --block_size=2048), plus training MFU

Sampling: (a) Eso-LM (B) with its KV cache, (b) the uncached reference (a full L-token forward per call: what a
standard MDM such as MDLM pays), (c) alpha0 = 0 through the same sampler (an AR model with a KV cache), and
Eso-LM (A) cached vs uncached. Training: forward + backward of model.loss at alpha0 = 0.25 vs alpha0 = 1 (an
L-token causal pass, the cost of an AR step). Each row is the median of --repeats timed runs after a warm-up;
the configurations alternate within each repeat so that drifts in machine speed hit all of them alike.
"""
import argparse
import json
import platform
import statistics
import time

import torch

from esolm import EsoLM, EsoLMConfig

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--device", default="cpu")
p.add_argument("--n_layer", type=int, default=None, help="default: 4 on CPU, 12 on CUDA")
p.add_argument("--n_embd", type=int, default=None, help="default: 256 on CPU, 768 on CUDA")
p.add_argument("--n_head", type=int, default=None, help="default: 4 on CPU, 12 on CUDA")
p.add_argument("--block_size", type=int, default=None, help="L; default: 256 on CPU, 1024 on CUDA")
p.add_argument("--vocab_size", type=int, default=None, help="default: 256 on CPU (bytes), 50257 on CUDA (GPT-2)")
p.add_argument("--sample_batch", type=int, default=None, help="default: 4 on CPU, 8 on CUDA")
p.add_argument("--train_batch", type=int, default=None, help="default: 16 on CPU, 8 on CUDA")
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--peak_flops", type=float, default=989e12, help="for MFU on CUDA (H100 SXM dense bf16)")
p.add_argument("--skip_sampling", action="store_true")
p.add_argument("--skip_training", action="store_true")
p.add_argument("--json", default="", help="also write the results to this file")
args = p.parse_args()
cuda = args.device.startswith("cuda")
defaults = dict(n_layer=(4, 12), n_embd=(256, 768), n_head=(4, 12), block_size=(256, 1024),
                vocab_size=(256, 50257), sample_batch=(4, 8), train_batch=(16, 8))
for k, (cpu_default, cuda_default) in defaults.items():
    if getattr(args, k) is None:
        setattr(args, k, cuda_default if cuda else cpu_default)
L = args.block_size
dtype = torch.bfloat16 if cuda else torch.float32
autocast = torch.autocast("cuda", dtype=dtype) if cuda else torch.autocast("cpu", enabled=False)


def sync():
    if cuda:
        torch.cuda.synchronize()


def make_model(variant):
    torch.manual_seed(0)
    config = EsoLMConfig(vocab_size=args.vocab_size, block_size=L, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, variant=variant)
    return EsoLM(config).to(args.device)


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def median_times(cases):
    """cases: {name: fn}, each already run once (the warm-up): `repeats` rounds over all cases; medians in seconds."""
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn)[0])
    return {name: statistics.median(t) for name, t in times.items()}


machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
if cuda:
    machine = torch.cuda.get_device_name(args.device)
print(f"machine: {machine}; torch {torch.__version__}; {dtype}; model {args.n_layer} x {args.n_embd} "
      f"({args.n_head} heads), vocab {args.vocab_size}, L = {L}")
results = {"machine": machine, "torch": torch.__version__, "dtype": str(dtype), "args": vars(args)}

# -----------------------------------------------------------------------------------------------------------
# sampling

if not args.skip_sampling:
    models = {v: make_model(v).eval() for v in "AB"}
    B = args.sample_batch

    def sampler(variant, alpha0, steps, kv_cache):
        def fn():
            g = torch.Generator(device=args.device).manual_seed(0)  # the same schedule and orders every run
            with autocast:
                return len(models[variant].generate(B, alpha0, steps, kv_cache=kv_cache, generator=g,
                                                    return_logits=True)[1])
        return fn

    cases, nfe = {}, {}
    for steps in (L, L // 4, L // 16):
        cases[f"B cached a0=1 T={steps}"] = sampler("B", 1.0, steps, True)
        cases[f"B uncached a0=1 T={steps}"] = sampler("B", 1.0, steps, False)
    cases["B cached a0=0 (AR)"] = sampler("B", 0.0, 1, True)
    for alpha0 in (1.0, 0.25):
        cases[f"A cached a0={alpha0} T={L}"] = sampler("A", alpha0, L, True)
        cases[f"A uncached a0={alpha0} T={L}"] = sampler("A", alpha0, L, False)
    nfe = {name: fn() for name, fn in cases.items()}  # the warm-up
    secs = median_times(cases)
    print(f"\nsampling, batch {B}: seconds per batch (median of {args.repeats}), NFE, tokens/s")
    for name in cases:
        print(f"  {name:28s} {secs[name]:9.3f} s  NFE {nfe[name]:5d}  {B * L / secs[name]:10,.0f} tok/s")
    ar = secs["B cached a0=0 (AR)"]
    ratios = {}
    for steps in (L, L // 4, L // 16):
        c, u = secs[f"B cached a0=1 T={steps}"], secs[f"B uncached a0=1 T={steps}"]
        ratios[f"T={steps}: uncached / cached (B)"] = u / c
        ratios[f"T={steps}: cached (B) / AR"] = c / ar
    for alpha0 in (1.0, 0.25):
        ratios[f"(A) a0={alpha0}: uncached / cached"] = secs[f"A uncached a0={alpha0} T={L}"] / secs[
            f"A cached a0={alpha0} T={L}"]
    for name, r in ratios.items():
        print(f"  {name:36s} {r:7.2f}x")
    results["sampling"] = {"batch": B, "seconds": secs, "nfe": nfe, "ratios": ratios}
    del models

# -----------------------------------------------------------------------------------------------------------
# training step


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward during fn(): the activation memory of a step."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


if not args.skip_training:
    model = make_model("B").train()
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.train_batch, L), device=args.device)

    def step(alpha0):
        def fn():
            with autocast:
                loss = model.loss(x, alpha0, batch_split=0.5)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return fn

    cases = {"a0=1 (MDM, L-token causal pass)": step(1.0), "a0=0.25 (batch_split 0.5)": step(0.25),
             "a0=0 (AR through the 2L layout)": step(0.0)}
    for fn in cases.values():  # the warm-up
        fn()
    secs = median_times(cases)
    n_params = model.num_params() - model.wte.weight.numel()
    print(f"\ntraining, batch {args.train_batch} x L = {L}: forward + backward of model.loss (median of {args.repeats})")
    train = {}
    for (name, fn), alpha0 in zip(cases.items(), (1.0, 0.25, 0.0)):
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
            fn()
            memory = torch.cuda.max_memory_allocated(args.device)
        else:
            memory = saved_bytes(lambda: model.loss(x, alpha0).backward())
            model.zero_grad(set_to_none=True)
        # tokens fed per row: L for an MDM row, L + about (1 - alpha0) L for an AR row
        mdm = 1.0 if alpha0 == 1 else 0.0 if alpha0 == 0 else 0.5
        fed = args.train_batch * L * (mdm + (1 - mdm) * (2 - alpha0))
        flops = (6 * n_params + 12 * args.n_layer * args.n_embd * L) * fed
        mfu = flops / secs[name] / args.peak_flops if cuda else None
        train[name] = {"seconds": secs[name], "tokens_per_s": args.train_batch * L / secs[name],
                       "memory_bytes": memory, "mfu": mfu}
        print(f"  {name:34s} {secs[name] * 1000:8.1f} ms  {args.train_batch * L / secs[name]:9,.0f} tok/s  "
              f"{'peak' if cuda else 'saved activations'} {memory / 2**20:7.1f} MiB" + (f"  MFU {mfu:.1%}" if cuda else ""))
    names = list(cases)
    ratio = secs[names[1]] / secs[names[0]]
    print(f"  a0=0.25 / a0=1: {ratio:.2f}x")
    results["training"] = {"batch": args.train_batch, "steps": train, "ratio_0.25_over_1": ratio}

if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
