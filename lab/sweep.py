"""
The paper's Table 1 at small scale: Eso-LM (B) at several alpha0 and the MDLM baseline, trained on
the same data, model, seed and tokens, then compared. Resumable: a finished run is a row of
<out>/results.json, and a rerun skips what is done.

    python -m lab.sweep                                 # train.py's defaults (the CPU preset)
    python -m lab.sweep --alpha0s=0,0.25,1 --mdlm=False  # a subset
    python -m lab.sweep --train_args="--max_iters=2000 --block_size=512"   # for every run

Each run on the same held-out windows and noise, mean +- standard error: the NELBO and, for (B),
the "exact" likelihood with K = 1 and 16 orders. For --gen_alpha0s, MDLM and the AR run: samples at
several T (lab.metrics.sample_cell) scored by the alpha0 = 0 run (an AR model of the same data:
generative perplexity), their entropy and, for bytes, their corpus word rate. Writes
results.json, results.csv and, with matplotlib, sweep.png.
"""
import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from configurator import check, configure
from data import get_tokenizer
from lab.common import autocast, device_ok, held_out, load_model, mean_se, pyplot
from lab.metrics import likelihoods, sample_cell, training_words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def train(cfg, name, alpha0, variant):  # train.py in a subprocess, resumed if it has a checkpoint
    out_dir = os.path.join(cfg.out, name)
    resume = ["--init_from=resume"] * os.path.exists(os.path.join(out_dir, "ckpt.pt"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--alpha0={alpha0}",
           f"--variant={variant}", f"--out_dir={out_dir}", *shlex.split(cfg.train_args), *resume]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


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
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        check(cfg, "out", False, f"cannot be a folder to write in ({e.strerror})")
    path = os.path.join(cfg.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    # the AR run (alpha0 = 0) is always trained: it scores the others' samples
    runs = [(f"alpha0_{a:g}", a, "B") for a in sorted(set(cfg.alpha0s) | {0.0})]
    runs += [("mdlm", 1.0, "MDLM")] * cfg.mdlm
    done = {"mdlm" if r["variant"] == "MDLM" else f"alpha0_{r['alpha0']:g}" for r in results}
    walls = {n: train(cfg, n, a, v) for n, a, v in sorted(runs, key=lambda r: r[1] != 0.25)
             if n not in done or not os.path.exists(os.path.join(cfg.out, n, "ckpt.pt"))}
    scorer, _ = load_model(os.path.join(cfg.out, "alpha0_0"), cfg.device)
    for name, alpha0, variant in (r for r in runs if r[0] not in done):
        results.append(evaluate(cfg, name, alpha0, variant, scorer, walls.get(name)))
        print(json.dumps(results[-1]), flush=True)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
    results.sort(key=lambda r: (r["alpha0"] != 0, r["variant"] != "MDLM", r["alpha0"]))
    with open(os.path.join(cfg.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in results for k in r)))
        writer.writeheader()
        writer.writerows(results)
    table(results, cfg.out)
    return results


def ppl(r, key):  # exp of a per-token value with its standard error (delta method), or blanks
    if key not in r:
        return " " * 14
    return f"{math.exp(r[key]):6.2f} +- {math.exp(r[key]) * r[key + '_se']:4.2f}"


def errorbar(ax, xs, rows, key, **kw):  # perplexities, one standard error either side
    ys = np.exp([r[key] for r in rows])
    ax.errorbar(xs, ys, ys * np.array([r[key + "_se"] for r in rows]), capsize=3, **kw)


def table(results, out):
    """The table in the paper's order (the AR run, MDLM, Eso-LM (B) by alpha0), and sweep.png."""
    steps = sorted({int(k[9:]) for r in results for k in r if re.fullmatch(r"gen_nll_T\d+", k)})
    print("\nrun     NELBO ppl         exact K=1         K=16          "
          + "".join(f"  gen ppl T={s:<6d}" for s in steps))
    for r in results:
        name = "MDLM" if r["variant"] == "MDLM" else f"{r['alpha0']:g}"
        print(f"{name:6s}  {ppl(r, 'nelbo')}  {ppl(r, 'exact_k1')}  {ppl(r, 'exact_k16')}"
              + "".join(f"  {ppl(r, f'gen_nll_T{s}')}" for s in steps))
    plt = pyplot("sweep.png")
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for key, label in (("nelbo", "NELBO"), ("exact_k1", "exact K = 1"), ("exact_k16", "K = 16")):
        rows = [r for r in results if r["variant"] == "B" and key in r]
        errorbar(ax1, [r["alpha0"] for r in rows], rows, key, fmt="o-", label=label)
    mdlm = [r for r in results if r["variant"] == "MDLM"]
    errorbar(ax1, [1.0] * len(mdlm), mdlm, "nelbo", fmt="D", color="k", label="MDLM, NELBO")
    ax1.set(xlabel="alpha0 (0: AR, 1: MDM)", ylabel="validation perplexity", title="Likelihood")
    ax1.legend()
    for r in (r for r in results if r["alpha0"] > 0):
        s = [t for t in steps if f"gen_nll_T{t}" in r]
        rows = [{"x": r[f"gen_nll_T{t}"], "x_se": r[f"gen_nll_T{t}_se"]} for t in s]
        label = "MDLM" if r["variant"] == "MDLM" else f"alpha0 = {r['alpha0']:g}"
        errorbar(ax2, s, rows, "x", fmt="o-", label=label)
    ax2.set(xscale="log", xlabel="diffusion steps T", ylabel="generative perplexity")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=120)
    print(f"wrote {out}/results.json, results.csv, sweep.png")


if __name__ == "__main__":
    main()
