"""
Speed of the sampler and of the training step, side by side, in one process.

    python bench.py                       # CPU: sampling and training at L = 256, about 4 minutes on 2 cores
    python bench.py --lengths             # the paper's speed table: sampling time against L (CPU: 256 .. 2048)
    python bench.py --device=cuda         # bf16, 12 x 768, GPT-2 vocabulary, L = 1024, plus training MFU
    python bench.py --device=cuda --lengths              # L = 1024 .. 8192
    python bench.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-1 --device=cuda --lengths   # the paper's network

Samplers: (a) the uncached reference, a full L-token forward per call (what a standard MDM such as MDLM pays);
(b) Eso-LM (B) with its KV cache; (c) alpha0 = 0 through the same cached sampler (an AR decoder with a KV cache);
and Eso-LM (A), which caches its sequential phase only. Training: forward + backward of model.loss at alpha0 = 1,
0.25 and 0. Each row is the median of --repeats timed runs after a warm-up; the configurations alternate within
each repeat so that drifts in machine speed hit all of them alike. Random weights: speed does not depend on them.
"""
import argparse
import json
import platform
import statistics
import sys
import time

import torch

from esolm import EsoLM, EsoLMConfig
from runtime import H100_BF16_FLOPS, autocast, check_args

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
parser.add_argument("--init_from", default="", help="time a published model's network (hub id or folder)")
parser.add_argument("--n_layer", type=int, default=None, help="default: 4 on CPU, 12 on CUDA")
parser.add_argument("--n_embd", type=int, default=None, help="default: 256 on CPU, 768 on CUDA")
parser.add_argument("--n_head", type=int, default=None, help="default: 4 on CPU, 12 on CUDA")
parser.add_argument("--block_size", type=int, default=None, help="L; default: 256 on CPU, 1024 on CUDA")
parser.add_argument("--vocab_size", type=int, default=None, help="default: 256 on CPU (bytes), 50257 on CUDA (GPT-2)")
parser.add_argument("--lengths", type=int, nargs="*", default=None,
                    help="sampling time against L; with no values: 256 512 1024 2048 on CPU, 1024 .. 8192 on CUDA")
parser.add_argument("--uncached_calls", type=int, default=16,
                    help="--lengths times this many uncached calls and multiplies by the NFE (0: full runs)")
parser.add_argument("--sample_batch", type=int, default=None, help="default: 4 on CPU, 8 on CUDA")
parser.add_argument("--train_batch", type=int, default=None, help="default: 16 on CPU, 8 on CUDA")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--compile", action="store_true", help="torch.compile the cached sampler's calls")
parser.add_argument("--peak_flops", type=float, default=H100_BF16_FLOPS, help="for MFU on CUDA (default: H100 SXM)")
parser.add_argument("--skip_sampling", action="store_true")
parser.add_argument("--skip_training", action="store_true")
parser.add_argument("--json", default="", help="also write the results to this file")
parser.add_argument("--png", default="", help="--lengths: draw the speedups against L (needs matplotlib)")
args = parser.parse_args()
cuda = args.device.startswith("cuda")  # the defaults below depend on it; check_args checks the device
defaults = dict(n_layer=(4, 12), n_embd=(256, 768), n_head=(4, 12), block_size=(256, 1024), vocab_size=(256, 50257),
                sample_batch=(4, 8), train_batch=(16, 8))
for key, (cpu_default, cuda_default) in defaults.items():
    if getattr(args, key) is None:
        setattr(args, key, cuda_default if cuda else cpu_default)
if args.lengths == []:
    args.lengths = [1024, 2048, 4096, 8192] if cuda else [256, 512, 1024, 2048]
try:  # every setting, and the model's own checks, before any work
    device = check_args(args, (
        ("sample_batch", args.sample_batch >= 1, "must be at least 1"),
        ("train_batch", args.train_batch >= 2, "must be at least 2 (alpha0 = 0.25 splits the batch)"),
        ("repeats", args.repeats >= 1, "must be at least 1"),
        ("uncached_calls", args.uncached_calls >= 0, "must be at least 0 (0: full runs)"),
        ("lengths", all(n >= 2 for n in args.lengths or [2]), "each L must be at least 2"),
        ("peak_flops", args.peak_flops > 0, "must be positive")))
    EsoLMConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                n_embd=args.n_embd)
except ValueError as e:
    sys.exit(f"bench.py: {e}")
amp, dtype = autocast(device)  # bfloat16 on a GPU that has it, else float32


def sync():
    if cuda:
        torch.cuda.synchronize()


def make_model(variant, L):
    torch.manual_seed(0)
    if args.init_from:
        try:
            return EsoLM.from_pretrained(args.init_from, block_size=L, variant=variant).to(device)
        except (ValueError, OSError) as e:
            sys.exit(f"bench.py: --init_from={args.init_from}: {e}")
    config = EsoLMConfig(vocab_size=args.vocab_size, block_size=L, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, variant=variant)
    return EsoLM(config).to(device)


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def median_times(cases):
    """cases: {name: fn}: `repeats` rounds over all cases; the median seconds of each, and what its last run
    returned."""
    times, outs = {name: [] for name in cases}, {}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            seconds, outs[name] = timed(fn)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def sampler(model, alpha0, steps, kv_cache=True, prompt=None):
    """A function that generates one batch (the same schedule and orders every run) and returns its NFE."""
    def fn():
        g = torch.Generator(device=device).manual_seed(0)
        with amp:
            return model.generate(args.sample_batch, alpha0, steps, prompt=prompt, kv_cache=kv_cache, generator=g,
                                  compile=args.compile and kv_cache).nfe
    return fn


def uncached_calls(model, n):
    """n uncached calls, each a full L-token forward: alpha0 = 0 with a prompt that leaves n positions to decode."""
    prompt = torch.zeros(model.config.block_size - n, dtype=torch.long, device=device)
    return sampler(model, 0.0, 1, kv_cache=False, prompt=prompt)


machine = torch.cuda.get_device_name(device) if cuda else \
    f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
size = args.init_from or f"{args.n_layer} x {args.n_embd} ({args.n_head} heads), vocab {args.vocab_size}"
print(f"machine: {machine}; torch {torch.__version__}; {dtype}; model {size}")
results = {"machine": machine, "torch": torch.__version__, "dtype": dtype, "args": vars(args)}

# -----------------------------------------------------------------------------------------------------------
# the speed table: sampling time against L, NFE = L (alpha0 = 1, T = L for (a) and (b))

if args.lengths:
    rows = []
    for L in args.lengths:
        models = {v: make_model(v, L).eval() for v in "AB"}
        cases = {"(b) Eso-LM (B)": sampler(models["B"], 1.0, L), "(c) AR": sampler(models["B"], 0.0, L),
                 "Eso-LM (A) a0=0.25": sampler(models["A"], 0.25, L)}
        n_calls = min(args.uncached_calls, L)
        if n_calls:
            cases["(a) uncached, per call"] = uncached_calls(models["B"], n_calls)
        if not n_calls or L == args.lengths[0]:  # once, to check that calls x NFE is the cost of a full run
            cases["(a) MDLM-style uncached"] = sampler(models["B"], 1.0, L, kv_cache=False)
        for model in models.values():  # warm-up: a few calls of each path
            uncached_calls(model, 4)()
            sampler(model, 1.0, L, prompt=torch.zeros(L - 8, dtype=torch.long, device=device))()
        for fn in cases.values() if args.compile else ():  # compiled: a whole run, so that no timed run compiles
            fn()
        secs, nfe = median_times(cases)
        row = {"L": L, "nfe": nfe["(b) Eso-LM (B)"], "nfe_ar": nfe["(c) AR"], "nfe_A": nfe["Eso-LM (A) a0=0.25"],
               "b": secs["(b) Eso-LM (B)"], "c": secs["(c) AR"], "A": secs["Eso-LM (A) a0=0.25"]}
        if n_calls:
            row["a_estimated"] = secs["(a) uncached, per call"] / n_calls * row["nfe"]
        if "(a) MDLM-style uncached" in secs:
            row["a_full"] = secs["(a) MDLM-style uncached"]
        row["a"] = row.get("a_full", row.get("a_estimated"))
        rows.append(row)
        note = f" (full run {row['a_full']:.2f} s, estimate {row['a_estimated']:.2f} s: " \
               f"{row['a_estimated'] / row['a_full'] - 1:+.1%})" if "a_full" in row and "a_estimated" in row else ""
        print(f"L = {L:5d}: NFE {row['nfe']:5d}  (a) {row['a']:9.2f} s  (b) {row['b']:7.2f} s  (c) {row['c']:7.2f} s "
              f" (A) {row['A']:7.2f} s  (a)/(b) {row['a'] / row['b']:6.1f}x  (b)/(c) {row['b'] / row['c']:5.2f}x"
              + note, flush=True)
        del models
    results["lengths"] = {"batch": args.sample_batch, "uncached_calls": args.uncached_calls, "rows": rows}
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no figure (pip install matplotlib)")
        else:
            Ls = [r["L"] for r in rows]
            fig, ax = plt.subplots(figsize=(5.5, 4))
            ax.plot(Ls, [r["a"] / r["b"] for r in rows], "o-", label="(a) uncached / (b) cached: the cache's gain")
            ax.plot(Ls, [r["b"] / r["c"] for r in rows], "s-", label="(b) cached / (c) AR decoder: its cost")
            ax.set(xscale="log", yscale="log", xlabel="sequence length L (T = L diffusion steps)",
                   ylabel="ratio of sampling times", title=f"{machine}, batch {args.sample_batch}")
            ax.set_xticks(Ls, [str(L) for L in Ls])
            low, high = ax.get_ylim()
            ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if low <= t <= high]
            ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
            ax.minorticks_off()
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.png, dpi=120)
            print(f"wrote {args.png}")

# -----------------------------------------------------------------------------------------------------------
# sampling at one length: cached against uncached at several step counts

L = args.block_size
if not args.skip_sampling and not args.lengths:
    models = {v: make_model(v, L).eval() for v in "AB"}
    cases = {}
    for steps in (L, L // 4, L // 16):
        cases[f"B cached a0=1 T={steps}"] = sampler(models["B"], 1.0, steps)
        cases[f"B uncached a0=1 T={steps}"] = sampler(models["B"], 1.0, steps, kv_cache=False)
    cases["B cached a0=0 (AR)"] = sampler(models["B"], 0.0, 1)
    for alpha0 in (1.0, 0.25):
        cases[f"A cached a0={alpha0} T={L}"] = sampler(models["A"], alpha0, L)
        cases[f"A uncached a0={alpha0} T={L}"] = sampler(models["A"], alpha0, L, kv_cache=False)
    for fn in cases.values():  # the warm-up
        fn()
    secs, nfe = median_times(cases)
    print(f"\nsampling, L = {L}, batch {args.sample_batch}: seconds per batch (median of {args.repeats}), NFE, "
          "tokens/s")
    for name in cases:
        print(f"  {name:28s} {secs[name]:9.3f} s  NFE {nfe[name]:5d}  {args.sample_batch * L / secs[name]:10,.0f} "
              "tok/s")
    ratios = {}
    for steps in (L, L // 4, L // 16):
        cached, uncached = secs[f"B cached a0=1 T={steps}"], secs[f"B uncached a0=1 T={steps}"]
        ratios[f"T={steps}: uncached / cached (B)"] = uncached / cached
        ratios[f"T={steps}: cached (B) / AR"] = cached / secs["B cached a0=0 (AR)"]
    for alpha0 in (1.0, 0.25):
        ratios[f"(A) a0={alpha0}: uncached / cached"] = secs[f"A uncached a0={alpha0} T={L}"] / secs[
            f"A cached a0={alpha0} T={L}"]
    for name, r in ratios.items():
        print(f"  {name:36s} {r:7.2f}x")
    results["sampling"] = {"batch": args.sample_batch, "seconds": secs, "nfe": nfe, "ratios": ratios}
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


if not args.skip_training and not args.lengths:
    model = make_model("B", L).train()
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (args.train_batch, L), device=device)

    def step(alpha0):
        def fn():
            with amp:
                loss = model.loss(x, alpha0, batch_split=0.5)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return fn

    alpha0s = {"a0=1 (MDM, L-token causal pass)": 1.0, "a0=0.25 (batch_split 0.5)": 0.25,
               "a0=0 (AR through the 2L layout)": 0.0}
    cases = {name: step(alpha0) for name, alpha0 in alpha0s.items()}
    for fn in cases.values():  # the warm-up
        fn()
    secs, _ = median_times(cases)
    print(f"\ntraining, batch {args.train_batch} x L = {L}: forward + backward of model.loss "
          f"(median of {args.repeats})")
    train = {}
    for name, fn in cases.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            memory = torch.cuda.max_memory_allocated(device)
        else:
            memory = saved_bytes(fn)
        mfu = model.loss_flops(args.train_batch, alpha0s[name]) / secs[name] / args.peak_flops if cuda else None
        train[name] = {"seconds": secs[name], "tokens_per_s": args.train_batch * L / secs[name],
                       "memory_bytes": memory, "mfu": mfu}
        print(f"  {name:34s} {secs[name] * 1000:8.1f} ms  {args.train_batch * L / secs[name]:9,.0f} tok/s  "
              f"{'peak' if cuda else 'saved activations'} {memory / 2**20:7.1f} MiB"
              + (f"  MFU {mfu:.1%}" if cuda else ""))
    ratio = secs["a0=0.25 (batch_split 0.5)"] / secs["a0=1 (MDM, L-token causal pass)"]
    print(f"  a0=0.25 / a0=1: {ratio:.2f}x")
    results["training"] = {"batch": args.train_batch, "steps": train, "ratio_0.25_over_1": ratio}

if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
