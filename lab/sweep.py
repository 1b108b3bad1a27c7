"""The paper's Table 1 at small scale: Eso-LM (B) at several alpha0 and the MDLM baseline, trained
alike (data, model, seed, tokens), then scored alike (docs/sampling.md): the NELBO, (B)'s "exact"
likelihood (K = 1, 16 orders) and, for --gen_alpha0s and MDLM, samples at several T scored by the AR
run (alpha0 = 0, always trained). Writes <out>/results.json (resumable), results.csv, sweep.png.

    python -m lab.sweep                                 # train.py's defaults (the CPU preset)
    python -m lab.sweep --alpha0s=0,0.25,1 --mdlm=False  # a subset
    python -m lab.sweep --train_args="--max_iters=2000 --block_size=512"   # for every run
"""
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from configurator import check, configure, fail
from data import get_tokenizer
from lab.common import autocast, device_ok, held_out, load_model, mean_se, perplexity, pyplot
from lab.metrics import likelihoods, sample_cell, training_words

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


@dataclass
class Settings:
    out: str = "sweep"  # the runs and the results
    alpha0s: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0)  # the Eso-LM (B) runs
    mdlm: bool = True  # the MDLM baseline too
    gen_alpha0s: tuple[float, ...] = (1.0, 0.25)  # the runs whose samples are scored
    gen_steps: tuple[int, ...] = (16, 64, 128)  # T; only T <= L
    eval_windows: int = 128  # held-out windows for the likelihoods
    num_samples: int = 32  # samples a (run, T)
    train_args: str = ""  # more train.py settings for every run, as one string
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(cfg, name, alpha0, variant, scorer, wall):  # a row: likelihoods, then samples
    amp, _ = autocast(cfg.device)
    model, ckpt = load_model(os.path.join(cfg.out, name), cfg.device)  # the EMA weights if saved
    L, data = model.config.block_size, [ckpt["train_config"][k] for k in ("data_dir", "dataset")]
    x = held_out(*data, L, cfg.eval_windows).to(cfg.device)
    row = dict(alpha0=alpha0, variant=variant, train_seconds=wall, block_size=L, windows=len(x))
    with amp:  # the same noise and orders for every run
        for key, values in likelihoods(model, x, orders=(1, 16)).items():
            row[key], row[key + "_se"] = mean_se(values)
    if alpha0 in cfg.gen_alpha0s or alpha0 == 0 or variant == "MDLM":
        tok = get_tokenizer(ckpt["dataset_meta"]["tokenizer"])
        words = training_words(*data) if tok.name == "bytes" else None
        for T in (s for s in cfg.gen_steps if s <= L):
            cell = sample_cell(model, cfg.num_samples, cfg.num_samples, 0, amp, scorer, tok.eot_id,
                               words, steps=T)
            row |= {f"{k}_T{T}": v for k, v in cell.items() if k not in ("nfe", "batch_size")}
    return row


def main(argv=None):
    cfg = configure(Settings, __doc__, argv)
    for key in ("alpha0s", "gen_alpha0s"):
        check(cfg, key, all(0 <= a <= 1 for a in getattr(cfg, key)), "must each be in [0, 1]")
    check(cfg, "gen_steps", all(s >= 1 for s in cfg.gen_steps), "must each be at least 1")
    for key in ("eval_windows", "num_samples"):
        check(cfg, key, getattr(cfg, key) >= 2, "must be at least 2, for a standard error")
    check(cfg, "device", device_ok(cfg.device), "is not a device here")
    check(cfg, "train_args", not any(a.split("=")[0] in ("--alpha0", "--variant", "--out_dir",
          "--init_from") for a in cfg.train_args.split()), "must leave each run's own to the sweep")
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        check(cfg, "out", False, f"cannot be a folder to write in ({e.strerror})")
    path = Path(cfg.out, "results.json")
    results = json.loads(path.read_text()) if path.exists() else []
    runs = [(f"alpha0_{a:g}", a, "B") for a in sorted(set(cfg.alpha0s) | {0.0})]
    runs += [("mdlm", 1.0, "MDLM")] * cfg.mdlm
    done = {"mdlm" if r["variant"] == "MDLM" else f"alpha0_{r['alpha0']:g}" for r in results}
    walls = {}  # train.py in a subprocess, alpha0 = 0.25 first, resumed from a checkpoint
    for name, alpha0, variant in sorted(runs, key=lambda r: r[1] != 0.25):
        resume = ["--init_from=resume"] * os.path.exists(f"{cfg.out}/{name}/ckpt.pt")
        if name not in done or not resume:
            cmd = [sys.executable, TRAIN, f"--alpha0={alpha0}", f"--variant={variant}",
                   f"--out_dir={cfg.out}/{name}", *cfg.train_args.split(), *resume]
            print(" ".join(cmd), flush=True)
            t0 = time.time()
            if subprocess.run(cmd).returncode:
                fail(f"train.py failed for {name} (above)")
            walls[name] = time.time() - t0
    scorer, _ = load_model(os.path.join(cfg.out, "alpha0_0"), cfg.device)
    for name, alpha0, variant in (r for r in runs if r[0] not in done):
        results.append(evaluate(cfg, name, alpha0, variant, scorer, walls.get(name)))
        print(json.dumps(results[-1]), flush=True)
        Path(f"{path}.tmp").write_text(json.dumps(results, indent=1))
        os.replace(f"{path}.tmp", path)  # results.json has a run whole or not at all
    results.sort(key=lambda r: (r["alpha0"] != 0, r["variant"] != "MDLM", r["alpha0"]))
    with open(os.path.join(cfg.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in results for k in r)))
        writer.writeheader()
        writer.writerows(results)
    table(results, cfg.out)
    return results


def ppl(r, key, se=None):  # a row's perplexity and its standard error
    return perplexity(r[key], r[se or key + "_se"])


def errorbar(ax, xs, ppls, fmt, **kw):  # (perplexity, standard error) pairs: one se either side
    ax.errorbar(xs, [p for p, _ in ppls], [se for _, se in ppls], fmt=fmt, capsize=3, **kw)


def table(results, out):
    """The table in the paper's order (the AR run, MDLM, Eso-LM (B) by alpha0), and sweep.png."""
    steps = sorted({int(k[9:]) for r in results for k in r if k[:9] == "gen_nll_T"})
    gen = {s: (f"gen_nll_T{s}", f"gen_nll_se_T{s}") for s in steps}  # a mean, its standard error
    cols = [("nelbo",), ("exact_k1",), ("exact_k16",), *gen.values()]
    print("\nrun     NELBO ppl         exact K=1         K=16          "
          + "".join(f"  gen ppl T={s:<6d}" for s in steps))
    for r in results:
        name = "MDLM" if r["variant"] == "MDLM" else f"{r['alpha0']:g}"
        cells = ("{:6.2f} +- {:4.2f}".format(*ppl(r, *c)) if c[0] in r else " " * 14 for c in cols)
        print(f"{name:6s}  " + "  ".join(cells))
    if (plt := pyplot("sweep.png")) is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), layout="tight")
    for key, label in (("nelbo", "NELBO"), ("exact_k1", "exact K = 1"), ("exact_k16", "K = 16")):
        rows = [r for r in results if r["variant"] == "B" and key in r]
        errorbar(ax1, [r["alpha0"] for r in rows], [ppl(r, key) for r in rows], "o-", label=label)
    mdlm = [ppl(r, "nelbo") for r in results if r["variant"] == "MDLM"]
    errorbar(ax1, [1.0] * len(mdlm), mdlm, "D", color="k", label="MDLM, NELBO")
    ax1.set(xlabel="alpha0 (0: AR, 1: MDM)", ylabel="validation perplexity", title="Likelihood")
    ax1.legend()
    for r in (r for r in results if r["alpha0"] > 0):
        s = [t for t in steps if gen[t][0] in r]
        label = "MDLM" if r["variant"] == "MDLM" else f"alpha0 = {r['alpha0']:g}"
        errorbar(ax2, s, [ppl(r, *gen[t]) for t in s], "o-", label=label)
    ax2.set(xscale="log", xlabel="diffusion steps T", ylabel="generative perplexity")
    ax2.legend(fontsize=8)
    fig.savefig(os.path.join(out, "sweep.png"), dpi=120)
    print(f"wrote {out}/results.json, results.csv, sweep.png")


if __name__ == "__main__":
    main()
