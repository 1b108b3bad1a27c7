"""
Speed of the samplers and of the training step, side by side, in one process. Random weights: speed does not
depend on them.

    python bench.py                                  # CPU: sampling and training at L = 256
    python bench.py --lengths                        # whole-sampler time against L (CPU: 256 .. 2048)
    python bench.py --throughput                     # the paper's speed table, measured the official way
    python bench.py --device=cuda --throughput --compile   # ... 12 x 768, bf16, the cached calls as CUDA graphs
    python bench.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-1 --device=cuda --throughput   # the paper's network

Three modes; BENCHMARKS.md says which mode each number comes from.
- default: whole sampling runs at one L (token sampling included), cached against uncached at T = L, L/4, L/16,
  and the training step (forward + backward of model.loss at alpha0 = 1, 0.25 and 0).
- --lengths: whole sampling runs against L, T = L as in the paper's table (NFE = L for AR, about 0.63 L for MDLM and
  Eso-LM (B)): MDLM (its bidirectional forward, one per call, no cache), Eso-LM (B) (alpha0 = 1), AR (alpha0 = 0
  through the same cached sampler) and Eso-LM (A) (alpha0 = 0.25). Medians of --repeats; the configurations
  alternate within each repeat, so that drifts in machine speed hit all of them alike.
- --throughput: as the official code's profile_throughput: the schedule and orders are drawn before the timer, the
  timer covers only the loop of network calls (each with its output layer) between two device synchronizations,
  token sampling is skipped, and the first batch is a warm-up, left out. The rows: AR, MDLM, Eso-LM (B), Eso-LM (A),
  and BD3-LM with blocks of 4, 8 and 16: a cost model through this backbone (L / b blocks, one token revealed per
  call so NFE = L, each call feeds its block's b tokens, bidirectional among themselves, against the cached earlier
  blocks), not a trained BD3-LM. Batch: the paper's on a GPU (512 at L = 1024, 256 at 2048, 64 at 8192), 4 on CPU.
--uncached_calls > 0 times that many of MDLM's calls and multiplies by its NFE (every such call is the same full
forward; on a CPU the whole loop takes minutes): the row says so.
"""
import json
import platform
import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch.nn.attention import sdpa_kernel

from esolm import SAMPLER_ATTENTION, EsoLM, EsoLMConfig, KVCache, adaptive_score, random_plan, subcontext_plan
from pretrained import from_pretrained
from runtime import H100_BF16_FLOPS, autocast, configure, die, loss_flops, need, resolve_device, setting
from runtime import sync as device_sync
from static_cache import StaticCalls

PAPER_BATCH = {1024: 512, 2048: 256, 8192: 64}  # the official throughput scripts' batch sizes
ROWS = ("AR", "MDLM", "B", "adaptive", "A", "BD3")


@dataclass
class Settings:
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...", rule="device")
    init_from: str = setting("", "time a published model's network (hub id or folder)")
    n_layer: int | None = setting(None, "default: 4 on CPU, 12 on CUDA", rule="count")
    n_embd: int | None = setting(None, "default: 256 on CPU, 768 on CUDA", rule="count")
    n_head: int | None = setting(None, "default: 4 on CPU, 12 on CUDA", rule="count")
    block_size: int | None = setting(None, "L; default: 256 on CPU, 1024 on CUDA", rule="count")
    vocab_size: int | None = setting(None, "default: 256 on CPU (bytes), 50257 on CUDA (GPT-2)", rule="count")
    lengths: tuple[int, ...] | None = setting(None, "--lengths or --throughput at these L (empty: 256 .. 2048 on "
                                              "CPU, 1024 .. 8192 on CUDA)")
    throughput: bool = setting(False, "the official way of timing: see above")
    uncached_calls: int | None = setting(None, "time this many MDLM calls and scale by its NFE (0: the whole loop; "
                                         "default 16 on CPU, 0 on CUDA)", rule="nonnegative")
    sample_batch: int | None = setting(None, "default: 4 on CPU; on CUDA 8, and with --throughput the paper's "
                                       "(512, 256, 64)", rule="count")
    train_batch: int | None = setting(None, "default: 16 on CPU, 8 on CUDA")
    repeats: int = setting(3, "timed runs (batches) of each row", rule="count")
    compile: bool = setting(False, "the cached calls as static-shape compiled graphs (static_cache.py)")
    subcontext_len: int = setting(0, "Eso-LM (B) in the structured order of this S", rule="subcontext_len")
    subcontext_shuffle: bool = setting(False, "the offsets, and each call, in random order")
    bd3_blocks: tuple[int, ...] = setting((4, 8, 16), "--throughput: BD3-LM block sizes", rule="count")
    rows: tuple[str, ...] = setting(ROWS, "--throughput: the rows to time (adaptive: Eso-LM (B) in the confidence "
                                    "order, every mask left fed and scored at each call)")
    peak_flops: float = setting(H100_BF16_FLOPS, "for MFU on CUDA (default: H100 SXM)")
    skip_sampling: bool = setting(False, "default mode: leave out the whole sampling runs")
    skip_training: bool = setting(False, "default mode: leave out the training step")
    json: str = setting("", "also write the results to this file")
    png: str = setting("", "--lengths: draw the speedups against L (needs matplotlib)")

    def __post_init__(self):
        """Defaults that depend on the device, then the rules that span settings (the model's: EsoLMConfig's)."""
        cuda = self.device.startswith("cuda")
        defaults = dict(n_layer=(4, 12), n_embd=(256, 768), n_head=(4, 12), block_size=(256, 1024),
                        vocab_size=(256, 50257), train_batch=(16, 8), uncached_calls=(16, 0))
        for key, (cpu_default, cuda_default) in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, cuda_default if cuda else cpu_default)
        if self.lengths == () or (self.throughput and self.lengths is None):
            self.lengths = (1024, 2048, 4096, 8192) if cuda else (256, 512, 1024, 2048)
        need(self, self.train_batch >= 2, "train_batch", "must be at least 2 (alpha0 = 0.25 splits the batch)")
        need(self, all(n >= 2 for n in self.lengths or [2]), "lengths", "must each be at least 2")
        for L in self.lengths or [self.block_size]:
            need(self, self.subcontext_len == 0 or L % self.subcontext_len == 0, "subcontext_len",
                 "must divide every L (0: random order)")
            need(self, all(L % b == 0 for b in self.bd3_blocks), "bd3_blocks", "must each divide every L")
        need(self, set(self.rows) <= set(ROWS), "rows", f"must each be one of {' '.join(ROWS)}")
        need(self, self.peak_flops > 0, "peak_flops", "must be positive")
        EsoLMConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                    n_head=self.n_head, n_embd=self.n_embd)


args = configure(Settings, doc=__doc__)
device = resolve_device(args.device)
cuda = device.startswith("cuda")
amp, dtype = autocast(device)  # bfloat16 on a GPU that has it, else float32


def sample_batch(L):
    if args.sample_batch:
        return args.sample_batch
    return PAPER_BATCH.get(L, 64) if cuda and args.throughput else (8 if cuda else 4)


def sync():
    device_sync(device)


def make_model(variant, L, alpha0=1.0):
    torch.manual_seed(0)
    if args.init_from:
        try:
            return from_pretrained(args.init_from, block_size=L, variant=variant, alpha0=alpha0).to(device).eval()
        except (ValueError, OSError) as e:
            die(f"--init_from={args.init_from}: {e}")
    config = EsoLMConfig(vocab_size=args.vocab_size, block_size=L, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, variant=variant, alpha0=alpha0)
    return EsoLM(config).to(device).eval()


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


def sampler(model, alpha0, steps, kv_cache=None, prompt=None, structured=False, adaptive=None):
    """A function that generates one batch (the same schedule and orders every run) and returns its NFE."""
    order = dict(subcontext_len=args.subcontext_len, subcontext_shuffle=args.subcontext_shuffle) if structured else {}
    calls = StaticCalls if args.compile and kv_cache is not False else None

    def fn():
        g = torch.Generator(device=device).manual_seed(0)
        with amp:
            return model.generate(sample_batch(model.config.block_size), alpha0, steps, prompt=prompt,
                                  adaptive=adaptive, kv_cache=kv_cache, generator=g, calls=calls, **order).nfe
    return fn


machine = torch.cuda.get_device_name(device) if cuda else \
    f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
size = args.init_from or f"{args.n_layer} x {args.n_embd} ({args.n_head} heads), vocab {args.vocab_size}"
print(f"machine: {machine}; torch {torch.__version__}; {dtype}; model {size}" + (", compiled" if args.compile else ""))
results = {"machine": machine, "torch": torch.__version__, "dtype": dtype, "args": vars(args)}

# -----------------------------------------------------------------------------------------------------------
# --throughput: the network calls only, as the official code times them


def network_calls(model, plan, kv_cache, n_calls=None, adaptive=None):
    """A function that runs the network calls of a plan (order, ks, n_seq) drawn beforehand, without sampling tokens
    (the canvas keeps its masks' ids, as the official timing skips the writes too), and returns the calls made. With
    adaptive, each diffusion call also scores every mask it is fed (the choice is the adaptive order's own cost)."""
    if n_calls:  # the first n_calls calls only
        plan = plan._replace(ks=plan.ks[:n_calls], n_seq=max(0, plan.n_seq - (len(plan.ks) - n_calls)))
    score = adaptive and (lambda logits: adaptive_score(logits, 1.0, adaptive))

    def fn():
        zs, order = torch.full_like(plan.order, model.mask_id), plan.order.clone()  # decode rearranges an adaptive one
        with amp, torch.no_grad():
            model.decode(zs, plan._replace(order=order), lambda logits: model.mask_id, kv_cache,
                         StaticCalls if args.compile and kv_cache else None, score)
        return len(plan.ks)
    return fn


def bd3_calls(model, B, b):
    """The BD3-LM cost model: L / b blocks one after the other, b calls per block (one token revealed per call), each
    feeding the block's b tokens, which see each other both ways and every cached earlier block; the finished
    block's keys and values stay in the cache."""
    L, nh, C = model.config.block_size, model.config.n_head, model.config.n_embd

    def fn():
        with amp, torch.no_grad(), sdpa_kernel(SAMPLER_ATTENTION):
            caches = [KVCache(B, nh, L, C // nh, model.compute_dtype(), device) for _ in model.blocks]
            idx = torch.full((B, b), model.mask_id, device=device)
            for start in range(0, L, b):
                pos = torch.arange(start, start + b, device=device).expand(B, b)
                mask = torch.ones(b, start + b, dtype=torch.bool, device=device)
                for _ in range(b):
                    model.lm_head(model(idx, pos, mask, caches, start))
        return L
    return fn


def throughput_row(fn, scale=1.0):
    """Seconds per batch: the mean of --repeats timed batches after one warm-up batch (the official code's mean over
    its batches but the first), times `scale` for a row estimated from part of its calls."""
    fn()
    times = [timed(fn)[0] for _ in range(args.repeats)]
    return statistics.mean(times) * scale, fn()


if args.throughput:
    rows = []
    for L in args.lengths:
        B, g = sample_batch(L), torch.Generator(device=device).manual_seed(0)
        models = {v: make_model(v, L) for v in ("B", "A", "MDLM")}
        to_gen = torch.ones(B, L, dtype=torch.bool, device=device)
        eso_plan = (subcontext_plan(to_gen, args.subcontext_len, 1.0, args.subcontext_shuffle, g)
                    if args.subcontext_len else random_plan(to_gen, 1.0, L, g))
        mdlm_plan = random_plan(to_gen, 1.0, L, g)
        row = {"L": L, "batch": B}
        cases = {}
        if "AR" in args.rows:
            cases["AR"] = (network_calls(models["B"], random_plan(to_gen, 0.0, L, g), True), 1.0)
        if "B" in args.rows:
            cases["Eso-LM (B)"] = (network_calls(models["B"], eso_plan, True), 1.0)
        if "adaptive" in args.rows:
            cases["Eso-LM (B) adaptive"] = (network_calls(models["B"], random_plan(to_gen, 1.0, L, g), True,
                                                          adaptive="confidence"), 1.0)
        if "A" in args.rows:
            cases["Eso-LM (A) alpha0=0.25"] = (network_calls(models["A"], random_plan(to_gen, 0.25, L, g), True), 1.0)
        if "MDLM" in args.rows:
            n_mdlm = min(args.uncached_calls, len(mdlm_plan.ks)) or len(mdlm_plan.ks)
            cases["MDLM"] = (network_calls(models["MDLM"], mdlm_plan, False, n_mdlm), len(mdlm_plan.ks) / n_mdlm)
        if "BD3" in args.rows:
            cases |= {f"BD3-LM b={b} (cost model)": (bd3_calls(models["B"], B, b), 1.0) for b in args.bd3_blocks}
        for name, (fn, scale) in cases.items():
            seconds, calls = throughput_row(fn, scale)
            row[name] = {"seconds": seconds, "nfe": round(calls * scale)} | (
                {"estimated_from_calls": calls} if scale != 1 else {})
            print(f"L = {L:5d}, batch {B}: {name:26s} NFE {row[name]['nfe']:5d}  {seconds:9.3f} s"
                  + (f"  (estimated from {calls} calls)" if scale != 1 else ""), flush=True)
        seconds = {name: r["seconds"] for name, r in row.items() if isinstance(r, dict)}
        b_sec = seconds.get("Eso-LM (B)")
        row["ratios"] = {f"{name.removesuffix(' (cost model)')} / Eso-LM (B)": s / b_sec for name, s in seconds.items()
                         if b_sec and name.startswith(("MDLM", "BD3", "Eso-LM (B) adaptive"))}
        if b_sec and "AR" in seconds:
            row["ratios"]["Eso-LM (B) / AR"] = b_sec / seconds["AR"]
        print("   " + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items()), flush=True)
        rows.append(row)
        del models
    results["throughput"] = rows

# -----------------------------------------------------------------------------------------------------------
# --lengths: whole sampling runs against L, T = L (alpha0 = 1 for MDLM and Eso-LM (B): NFE about 0.63 L)

if args.lengths and not args.throughput:
    rows = []
    for L in args.lengths:
        models = {v: make_model(v, L) for v in ("A", "B", "MDLM")}
        mdlm = sampler(models["MDLM"], 1.0, L)
        cases = {"(b) Eso-LM (B)": sampler(models["B"], 1.0, L, structured=True),
                 "(c) AR": sampler(models["B"], 0.0, L), "Eso-LM (A) a0=0.25": sampler(models["A"], 0.25, L)}
        n_calls = min(args.uncached_calls, L)
        if n_calls:  # calls of MDLM's sampler: a prompt that leaves n_calls positions, decoded one per call
            cases["(a) MDLM, per call"] = sampler(models["MDLM"], 1.0, n_calls,
                                                  prompt=torch.zeros(L - n_calls, dtype=torch.long, device=device))
        if not n_calls or L == args.lengths[0]:  # once, to check that calls x NFE is the cost of a whole run
            cases["(a) MDLM"] = mdlm
        for fn in cases.values():  # warm-up: a whole run each (compiled: no timed run compiles)
            fn()
        secs, nfe = median_times(cases)
        to_gen = torch.ones(1, L, dtype=torch.bool, device=device)  # MDLM's NFE: the plan its sampler draws first
        mdlm_nfe = len(random_plan(to_gen, 1.0, L, torch.Generator(device=device).manual_seed(0)).ks)
        row = {"L": L, "nfe": nfe["(b) Eso-LM (B)"], "nfe_mdlm": mdlm_nfe, "nfe_ar": nfe["(c) AR"],
               "nfe_A": nfe["Eso-LM (A) a0=0.25"], "b": secs["(b) Eso-LM (B)"], "c": secs["(c) AR"],
               "A": secs["Eso-LM (A) a0=0.25"]}
        if n_calls:
            row["a_estimated"] = secs["(a) MDLM, per call"] / nfe["(a) MDLM, per call"] * mdlm_nfe
        if "(a) MDLM" in secs:
            row["a_full"] = secs["(a) MDLM"]
        row["a"] = row.get("a_full", row.get("a_estimated"))
        rows.append(row)
        note = f" (full run {row['a_full']:.2f} s, estimate {row['a_estimated']:.2f} s: " \
               f"{row['a_estimated'] / row['a_full'] - 1:+.1%})" if "a_full" in row and "a_estimated" in row else ""
        print(f"L = {L:5d}: NFE {row['nfe']:5d}  (a) MDLM {row['a']:9.2f} s  (b) {row['b']:7.2f} s  "
              f"(c) {row['c']:7.2f} s  (A) {row['A']:7.2f} s  (a)/(b) {row['a'] / row['b']:6.1f}x  "
              f"(b)/(c) {row['b'] / row['c']:5.2f}x" + note, flush=True)
        del models
    results["lengths"] = {"batch": sample_batch(0), "uncached_calls": args.uncached_calls, "rows": rows}
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
            ax.plot(Ls, [r["a"] / r["b"] for r in rows], "o-", label="(a) MDLM / (b) Eso-LM (B): the cache's gain")
            ax.plot(Ls, [r["b"] / r["c"] for r in rows], "s-", label="(b) Eso-LM (B) / (c) AR decoder: its cost")
            ax.set(xscale="log", yscale="log", xlabel="sequence length L (T = L diffusion steps)",
                   ylabel="ratio of sampling times", title=f"{machine}, batch {sample_batch(0)}")
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
# sampling at one length: cached against the uncached reference at several step counts

L = args.block_size
if not args.skip_sampling and not args.lengths:
    models = {v: make_model(v, L) for v in "AB"}
    cases = {}
    for steps in (L, L // 4, L // 16):
        cases[f"B cached a0=1 T={steps}"] = sampler(models["B"], 1.0, steps)
        cases[f"B uncached a0=1 T={steps}"] = sampler(models["B"], 1.0, steps, kv_cache=False)
    cases["B cached a0=0 (AR)"] = sampler(models["B"], 0.0, 1)
    cases[f"B cached adaptive a0=1 T={L}"] = sampler(models["B"], 1.0, L, adaptive="confidence")
    for alpha0 in (1.0, 0.25):
        cases[f"A cached a0={alpha0} T={L}"] = sampler(models["A"], alpha0, L)
        cases[f"A uncached a0={alpha0} T={L}"] = sampler(models["A"], alpha0, L, kv_cache=False)
    for fn in cases.values():  # the warm-up
        fn()
    secs, nfe = median_times(cases)
    batch = sample_batch(L)
    print(f"\nsampling, L = {L}, batch {batch}: seconds per batch (median of {args.repeats}), NFE, tokens/s")
    for name in cases:
        print(f"  {name:28s} {secs[name]:9.3f} s  NFE {nfe[name]:5d}  {batch * L / secs[name]:10,.0f} tok/s")
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
    results["sampling"] = {"batch": batch, "seconds": secs, "nfe": nfe, "ratios": ratios}
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
    model = make_model("B", L).train()  # the same weights, trained for each alpha0 in turn
    torch.manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (args.train_batch, L), device=device)

    def step(alpha0):
        def fn():
            model.config = replace(model.config, alpha0=alpha0)
            with amp:
                loss = model.loss(x, batch_split=0.5)
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
        model.config = replace(model.config, alpha0=alpha0s[name])
        mfu = loss_flops(model, args.train_batch) / secs[name] / args.peak_flops if cuda else None
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
