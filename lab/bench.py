"""Speed of the samplers and of the training step (BENCHMARKS.md: what each mode measures).

    python -m lab.bench                  # whole sampling runs, cached or not; the training step
    python -m lab.bench --lengths        # whole sampling runs against L
    python -m lab.bench --throughput     # the paper's speed table, timed the official way
    python -m lab.bench --device=cuda --throughput --compile   # 12 x 768, bf16, CUDA graphs
"""
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from torch.nn.attention import sdpa_kernel

from configurator import check, configure, fail
from esolm import SAMPLER_ATTENTION, EsoLM, EsoLMConfig, adaptive_score, random_plan
from lab.common import autocast, device_ok, load_model, sync
from lab.compiled import compiled

PAPER_BATCH = {1024: 512, 2048: 256, 8192: 64}  # the official scripts' batch sizes
CUDA = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257,
        "train_batch": 8, "uncached_calls": 0}  # the paper's (the defaults: a CPU's)
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


@dataclass
class Settings:
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    init_from: str = ""  # a checkpoint folder to time, at its L
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256  # L
    vocab_size: int = 256
    lengths: tuple[int, ...] | None = None  # bare: 256..2048 (CUDA: 1024..8192)
    throughput: bool = False  # the official timing, at --lengths
    compile: bool = False  # the cached calls through lab.compiled
    uncached_calls: int = 16  # MDLM: this many calls, times its NFE (0: all)
    sample_batch: int | None = None  # 4 on CPU, 8 on CUDA; --throughput: the paper's
    train_batch: int = 16
    repeats: int = 3
    threshold: float = 0.9  # of the adaptive rows with one
    peak_flops: float = 989e12  # for MFU on CUDA: an H100 SXM's dense bf16
    json: str = ""  # write the results here


def timings(cases, cfg, stat=statistics.median):  # a warm-up each, then --repeats rounds
    outs, times = {k: fn() for k, fn in cases.items()}, {k: [] for k in cases}
    for _ in range(cfg.repeats):  # rounds over all cases: drifts hit all alike
        for k, fn in cases.items():
            sync(cfg.device)  # the device's work, timed
            t0 = time.perf_counter()
            outs[k] = fn()
            sync(cfg.device)
            times[k].append(time.perf_counter() - t0)
    return {k: stat(t) for k, t in times.items()}, outs


def table(rows, ratios):  # print a mode's results
    for name, row in rows.items():
        print(f"  {name:24s}" + "".join(f"  {k} {v:,.4g}" for k, v in row.items() if v is not None))
    print("  " + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items()), flush=True)
    return {"rows": rows, "ratios": ratios}


def whole_run(model, B, net, *args, **options):  # the same run every time: its NFE
    return lambda: int(model.generate(B, *args, net=net, **options).nfe.max())


def bd3_calls(model, B, b, net=None):  # BD3-LM's cost: L / b blocks, b calls each (NFE = L)
    L, dev = model.config.block_size, model.wte.weight.device
    slot, idx = torch.arange(L + 1, device=dev), torch.full((B, b), model.mask_id, device=dev)
    model.generate(B, prompt=torch.zeros(L).long())  # no masks, no call: the cache, L + 1 slots

    def fn():  # a call feeds a block's b tokens: they see each other and the cache
        for start in range(0, L, b):
            s, mask = (start + slot[:b]).expand(B, b), (slot < start + b).expand(1, 1, b, L + 1)
            for _ in range(b):
                with sdpa_kernel(SAMPLER_ATTENTION):
                    model.lm_head((net or model)(idx, s, mask, s))
        return L
    return fn


def memory(fn, cuda):  # MiB of a step: what autograd saves for backward, and CUDA's peak
    seen = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.update(
            {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()}) or t, lambda t: t):
        fn()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"saved_MiB": sum(seen.values()) / 2**20, "peak_MiB": peak}


def sampling(cfg, L, B, m, run, net):  # whole runs at one L: (un)cached, (A), AR, adaptive
    res = {f"B {c}cached T={T}": run["B"](1.0, T, kv_cache=not c)
           for T in dict.fromkeys((L, max(1, L // 4), max(1, L // 16))) for c in ("", "un")}
    res |= {f"A {c}cached a0={a0}": run["A"](a0, kv_cache=not c)
            for a0 in (1.0, 0.25) for c in ("", "un")}
    res |= {f"B adaptive tau={tau}": run["B"](1.0, adaptive="confidence", threshold=tau)
            for tau in (None, cfg.threshold)} | {"AR": run["B"](0.0)}
    secs, nfe = timings(res, cfg)
    ratios = {f"{k} / cached": s / secs[k.replace("un", "")] for k, s in secs.items() if "un" in k}
    ratios |= {f"{k} / AR": s / secs["AR"] for k, s in secs.items() if k.startswith("B cached")}
    return table({k: {"seconds": secs[k], "nfe": nfe[k]} for k in res}, ratios)


def training(cfg, amp, model):  # forward + backward at alpha0 = 1, 0.25 (batch_split 0.5), 0
    B, L, cuda = cfg.train_batch, cfg.block_size, cfg.device.startswith("cuda")
    x, model = torch.randint(0, cfg.vocab_size, (B, L), device=cfg.device), model.train()

    def step(alpha0):
        model.config.alpha0 = alpha0  # what loss reads
        with amp:
            loss = sum(model.loss(x))
        loss.backward()
        model.zero_grad(set_to_none=True)
    cases = {a: partial(step, a) for a in (1.0, 0.25, 0.0)}
    secs, _ = timings(cases, cfg)
    # train.py's FLOPs: 6 a weight and fed token, plus attention's; an AR row feeds (2 - a0) L
    n_params = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel()
    flops = (6 * n_params + 12 * cfg.n_layer * cfg.n_embd * L) * B * L
    fed = {1.0: 1.0, 0.25: (1 + 1.75) / 2, 0.0: 2.0}  # at 0.25, half the rows AR's
    rows = {f"a0={a}": {"ms": secs[a] * 1e3, "tokens_per_s": B * L / secs[a],
                        "mfu": flops * fed[a] / secs[a] / cfg.peak_flops if cuda else None}
            | memory(fn, cuda) for a, fn in cases.items()}
    return table(rows, {"a0=0.25 / a0=1": secs[0.25] / secs[1.0]})


def against_length(cfg, L, B, m, run, net):  # whole runs, T = L: (B), AR, (A); MDLM estimated
    n = min(cfg.uncached_calls or L, L)
    cases = {"B": run["B"](1.0), "AR": run["B"](0.0), "A a0=0.25": run["A"](0.25),
             "MDLM": run["MDLM"](1.0, n, prompt=torch.zeros(L - n).long())}
    secs, nfe = timings(cases, cfg)  # (B) drew the plan MDLM would (the same seeds)
    rows = {k: {"seconds": secs[k], "nfe": nfe[k]} for k in cases}
    rows["MDLM"] = {"seconds": secs["MDLM"] / nfe["MDLM"] * nfe["B"], "nfe": nfe["B"],
                    "calls_timed": nfe["MDLM"]}
    ratios = {"MDLM / B": rows["MDLM"]["seconds"] / secs["B"], "B / AR": secs["B"] / secs["AR"]}
    return table(rows, ratios)


def throughput(cfg, L, B, m, run, net):  # as profile_throughput: plans drawn, calls timed
    dev, u = cfg.device, torch.rand(4, 2, B, L, device=cfg.device)
    masks = torch.full((B, L), m["B"].mask_id, device=dev)
    ar, eso, mdlm, a = (random_plan(masks > 0, a0, L, u[i]) for i, a0 in enumerate((0, 1, 1, .25)))
    nfe, n = mdlm.ks.size(1), min(cfg.uncached_calls or L, mdlm.ks.size(1))
    if n < nfe:  # an estimate: its first n calls, each the same full forward
        mdlm = mdlm._replace(ks=torch.ones(B, n, dtype=torch.long, device=dev))
    clean = torch.arange(L, device=dev) < L - mdlm.ks.sum(1, keepdim=True)

    def no_sampling(logits, rows, pos):  # the mask id (V, the logits' width): no sampling
        return torch.full((logits.size(0),), logits.size(1), device=logits.device)

    def calls(v, p, canvas=masks, **options):  # adaptive reorders p's order: a copy
        return lambda: int(m[v].decode(canvas, p._replace(order=p.order.clone()), no_sampling,
                                       net=net[v], **options).max())
    score = partial(adaptive_score, temperature=1.0, rule="confidence")
    cases = {"AR": calls("B", ar), "B": calls("B", eso), "A a0=0.25": calls("A", a),
             "MDLM": calls("MDLM", mdlm, masks.masked_fill(clean, 0), kv_cache=False),
             "adaptive": calls("B", eso, score=score),
             f"adaptive tau={cfg.threshold}": calls("B", eso, score=score, threshold=cfg.threshold)}
    cases |= {f"BD3 b={b}": bd3_calls(m["B"], B, b, net["B"]) for b in (4, 8, 16) if L % b == 0}
    secs, made = timings(cases, cfg, statistics.mean)
    rows = {k: {"seconds": s, "nfe": made[k]} for k, s in secs.items()}
    rows["MDLM"] = {"seconds": secs["MDLM"] * nfe / n, "nfe": nfe, "calls_timed": n}
    ratios = {f"{k} / B": r["seconds"] / secs["B"] for k, r in rows.items() if k != "B"}
    return table(rows, ratios)


def main(argv=None):
    argv = [a + "=" * (a == "--lengths") for a in (sys.argv[1:] if argv is None else argv)]
    cuda = any(a.startswith("--device=cuda") for a in argv)  # a bare --lengths: the defaults
    cfg = configure(Settings, __doc__, argv, CUDA if cuda else None)
    check(cfg, "device", device_ok(cfg.device), "is not here")
    for k in (*SHAPE, "repeats", "sample_batch"):
        check(cfg, k, getattr(cfg, k) is None or getattr(cfg, k) >= 1, "must be at least 1")
    check(cfg, "train_batch", cfg.train_batch >= 2, "must be at least 2")
    check(cfg, "uncached_calls", cfg.uncached_calls >= 0, "must be at least 0")
    check(cfg, "peak_flops", cfg.peak_flops > 0, "must be positive")
    check(cfg, "threshold", 0 <= cfg.threshold <= 1, "must be in [0, 1]")
    check(cfg, "json", not cfg.json or os.access(os.path.dirname(cfg.json) or ".", os.W_OK),
          "is not in a folder this process can write in")
    try:  # a checkpoint's network, or the settings'
        base = cfg.init_from and load_model(cfg.init_from, cfg.device)[0]
        conf = base.config if base else EsoLMConfig(**{k: getattr(cfg, k) for k in SHAPE})
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        fail(f"--{'init_from' if cfg.init_from else 'n_head'}: {e}")
    cfg.__dict__.update({k: getattr(conf, k) for k in SHAPE})
    big = (1024, 2048, 4096, 8192) if cuda else (256, 512, 1024, 2048)
    if cfg.lengths == () or cfg.throughput and cfg.lengths is None:
        cfg.lengths = (cfg.block_size,) if base else big
    check(cfg, "lengths", all(L >= 2 and (not base or L == cfg.block_size) for L in cfg.lengths
                              or ()), "must be >= 2 (--init_from: its L)")
    amp, dtype = autocast(cfg.device)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    results = {"machine": torch.cuda.get_device_name(cfg.device) if cuda else machine,
               "torch": torch.__version__, "dtype": dtype, "settings": asdict(cfg)}
    print("\n".join(f"{k}: {v}" for k, v in results.items()))
    mode = "throughput" if cfg.throughput else "lengths" if cfg.lengths else "sampling"
    for L in cfg.lengths or [cfg.block_size]:
        torch.manual_seed(0)  # one network as (A), (B) and MDLM: a variant changes only the masks
        m = {v: EsoLM(replace(conf, block_size=L, variant=v, alpha0=1.0)).to(cfg.device).eval()
             for v in ("A", "B", "MDLM")}
        for model in m.values():
            model.load_state_dict(base.state_dict() if base else m["B"].state_dict())
        B = cfg.sample_batch or ((PAPER_BATCH.get(L, 64) if cfg.throughput else 8) if cuda else 4)
        net = {v: compiled(model) if cfg.compile else None for v, model in m.items()}
        run = {v: partial(whole_run, model, B, net[v]) for v, model in m.items()}
        print(f"\n{mode}, L = {L}, batch {B}: seconds, {cfg.repeats} runs")
        with amp, torch.no_grad():
            row = {"throughput": throughput, "lengths": against_length}.get(mode, sampling)
            results.setdefault(mode, []).append(row(cfg, L, B, m, run, net) | {"L": L, "B": B})
    if mode == "sampling":
        print(f"\ntraining, batch {cfg.train_batch}")
        results |= {"sampling": results["sampling"][0], "training": training(cfg, amp, m["B"])}
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
