"""
The paper's Table 1 at small scale: train Eso-LM (B) at several alpha0, and the MDLM baseline, on the same data,
model, seed and token budget, then compare likelihoods and sample quality. Resumable: each finished run is one row
of <out>/results.json, and a rerun skips what is done.

    python sweep.py                                  # train.py's defaults (the CPU preset without a GPU)
    python sweep.py --alpha0s=0,0.25,1 --mdlm=False  # a subset
    python sweep.py --train_args="--max_iters=2000 --block_size=512"   # any train.py settings, for every run

For each run, on the same held-out windows with the same noise (mean +- standard error over the windows): the
NELBO, and for Eso-LM (B) the "exact" likelihood of the sampler with one token per call for K = 1 and K = 16
generation orders (metrics.likelihoods), and their paired differences. For alpha0 in --gen_alpha0s and the MDLM run:
samples at several numbers of diffusion steps T (metrics.sample_cell), scored by the alpha0 = 0 run (a pure AR model
trained on the same data: generative perplexity), their mean unigram entropy, and for byte-level data their corpus
word rate. Writes results.json, results.csv and, with matplotlib installed, sweep.png.
"""
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from data import get_tokenizer, held_out_windows
from metrics import likelihoods, mean_se, sample_cell, training_words
from runtime import autocast, configure, load_model, need, num_params, pyplot, resolve_device, setting


@dataclass
class Settings:
    out: str = setting("sweep", "folder for the runs and the results", rule="writable")
    alpha0s: tuple[float, ...] = setting((0.0, 0.125, 0.25, 0.5, 1.0), "the Eso-LM (B) runs", rule="alpha0")
    mdlm: bool = setting(True, "the MDLM baseline's row")
    gen_alpha0s: tuple[float, ...] = setting((1.0, 0.25), "runs whose samples are scored", rule="alpha0")
    gen_steps: tuple[int, ...] = setting((16, 64, 128), "T; only T <= L are used", rule="steps")
    eval_windows: int = setting(128, "held-out windows for the likelihoods; at least 2")
    num_samples: int = setting(32, "samples per (run, steps) for generative perplexity; at least 2")
    train_args: str = setting("", "more train.py settings for every run, last, as one string")
    device: str = setting("auto", "auto, cpu, cuda, ...", rule="device")

    def __post_init__(self):
        for key in ("eval_windows", "num_samples"):
            need(self, getattr(self, key) >= 2, key, "must be at least 2 (for a standard error)")


cfg = configure(Settings, doc=__doc__)
device = resolve_device(cfg.device)
amp, _ = autocast(device)  # as sample.py: bfloat16 on a GPU that has it
os.makedirs(cfg.out, exist_ok=True)
results_path = os.path.join(cfg.out, "results.json")
results = json.load(open(results_path)) if os.path.exists(results_path) else []
# the runs: (name, alpha0, variant). The AR model (alpha0 = 0) is always trained: it scores the samples of the others
RUNS = [(f"alpha0_{a:g}", a, "B") for a in sorted(set(cfg.alpha0s) | {0.0})] + [("mdlm", 1.0, "MDLM")] * cfg.mdlm


def run_name(row):
    return "mdlm" if row["variant"] == "MDLM" else f"alpha0_{row['alpha0']:g}"


def train(name, alpha0, variant):
    """train.py in a subprocess, resumed if a checkpoint is there; returns its wall time in seconds."""
    out_dir = os.path.join(cfg.out, name)
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), f"--alpha0={alpha0}",
           f"--variant={variant}", f"--out_dir={out_dir}", *shlex.split(cfg.train_args), *resume]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


# -----------------------------------------------------------------------------------------------------------
# train every run not yet in results.json (the README's default, alpha0 = 0.25, first), then evaluate each

done = {run_name(r) for r in results}
walls = {}
for name, alpha0, variant in sorted(RUNS, key=lambda r: r[1] != 0.25):
    if name not in done or (name == "alpha0_0" and not os.path.exists(os.path.join(cfg.out, name, "ckpt.pt"))):
        walls[name] = train(name, alpha0, variant)
scorer, _ = load_model(os.path.join(cfg.out, "alpha0_0"), device=device)
for name, alpha0, variant in RUNS:
    if name in done:
        continue
    model, ckpt = load_model(os.path.join(cfg.out, name), device=device)  # its EMA weights if saved
    L, data = model.config.block_size, (ckpt["train_config"]["data_dir"], ckpt["train_config"]["dataset"])
    tokenizer = get_tokenizer(ckpt["dataset_meta"]["tokenizer"])
    x = held_out_windows(*data, L, cfg.eval_windows).to(device)
    row = {"alpha0": alpha0, "variant": variant, "train_seconds": walls.get(name), "params": num_params(model),
           "block_size": L, "windows": len(x)}
    with amp:  # the same noise and orders for every run (seed 0)
        for key, values in likelihoods(model, x, orders=(1, 16)).items():
            row[key], row[key + "_se"] = mean_se(values)
    if alpha0 in cfg.gen_alpha0s or alpha0 == 0.0 or variant == "MDLM":
        words = training_words(*data) if tokenizer.name == "bytes" else None
        for steps in (s for s in cfg.gen_steps if s <= L):
            cell = sample_cell(model, cfg.num_samples, cfg.num_samples, 0, amp, scorer, tokenizer.eot_id, words,
                               steps=steps)
            row[f"gen_seconds_T{steps}"], row[f"entropy_T{steps}"] = cell["seconds_per_batch"], cell["entropy"]
            row[f"gen_nll_T{steps}"], row[f"gen_nll_T{steps}_se"] = cell["gen_nll"], cell["gen_nll_se"]
            if words is not None:
                row[f"word_rate_T{steps}"] = cell["word_rate"]
    print(json.dumps(row), flush=True)
    results.append(row)
    with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(results_path + ".tmp", results_path)

# -----------------------------------------------------------------------------------------------------------
# table, CSV, plot: the AR model, then MDLM, then Eso-LM (B) by alpha0, as the paper's Table 1

results.sort(key=lambda r: (r["alpha0"] != 0, r["variant"] != "MDLM", r["alpha0"]))
keys = list(dict.fromkeys(k for r in results for k in r))
with open(os.path.join(cfg.out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(results)


def ppl(r, key):
    """exp of a per-token value, with its standard error (delta method), or blanks."""
    return f"{math.exp(r[key]):6.2f} +- {math.exp(r[key]) * r[key + '_se']:4.2f}" if key in r else " " * 14


def label(r):
    return "MDLM" if r["variant"] == "MDLM" else f"{r['alpha0']:g}"


steps_used = sorted({int(k[len("gen_nll_T"):]) for r in results for k in r if k.startswith("gen_nll_T")
                     and not k.endswith("_se")})
print("\nalpha0  NELBO ppl         exact ppl K=1     K=16              K=1 - NELBO (nats/token)  "
      + "  ".join(f"gen ppl T={s:<5d}   words" for s in steps_used))
for r in results:
    diff = f"{r['exact_k1_minus_nelbo']:+.4f} +- {r['exact_k1_minus_nelbo_se']:.4f}" if "exact_k1" in r else ""
    rates = [f"{r[f'word_rate_T{s}']:6.1%}" if f"word_rate_T{s}" in r else " " * 6 for s in steps_used]
    gen = "  ".join(f"{ppl(r, f'gen_nll_T{s}')}  {rate}" for s, rate in zip(steps_used, rates))
    print(f"{label(r):6s}  {ppl(r, 'nelbo')}  {ppl(r, 'exact_k1')}  {ppl(r, 'exact_k16')}  {diff:24s}  {gen}")
plt = pyplot("sweep.png (results.json and results.csv are written)")
if plt is None:
    sys.exit(0)


def errorbar(ax, xs, means, ses, **kw):
    """Perplexities exp(mean) with error bars of one standard error (delta method)."""
    ax.errorbar(xs, np.exp(means), yerr=np.exp(means) * np.array(ses), capsize=3, **kw)


fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
eso = [r for r in results if r["variant"] == "B"]
for key, name in (("nelbo", "NELBO (bound)"), ("exact_k1", "exact, K = 1"), ("exact_k16", "exact, K = 16")):
    rows = [r for r in eso if key in r]
    errorbar(ax1, [r["alpha0"] for r in rows], [r[key] for r in rows], [r[key + "_se"] for r in rows], fmt="o-",
             label=name)
for r in results:
    if r["variant"] == "MDLM":  # the baseline, beside alpha0 = 1
        errorbar(ax1, [1.0], [r["nelbo"]], [r["nelbo_se"]], fmt="D", color="black", label="MDLM, NELBO")
ax1.set(xlabel="alpha0 (0 = AR, 1 = MDM)", ylabel="validation perplexity (per token)", title="Likelihood vs alpha0")
ax1.legend()
for r in results:
    steps = [s for s in steps_used if f"gen_nll_T{s}" in r]
    if (r["alpha0"] in cfg.gen_alpha0s or r["variant"] == "MDLM") and steps and r["alpha0"] > 0:
        errorbar(ax2, steps, [r[f"gen_nll_T{s}"] for s in steps], [r[f"gen_nll_T{s}_se"] for s in steps], fmt="o-",
                 label="MDLM" if r["variant"] == "MDLM" else f"alpha0 = {r['alpha0']:g}")
ar = next((r for r in results if r["alpha0"] == 0.0 and f"gen_nll_T{steps_used[0]}" in r), None) if steps_used else None
if ar:  # the scorer's perplexity on its own samples: the floor an AR model of this size reaches
    ax2.axhline(math.exp(ar[f"gen_nll_T{steps_used[0]}"]), color="gray", ls="--", label="AR model (alpha0 = 0)")
ax2.set(xscale="log", xlabel="diffusion steps T (NFE is at most T plus the sequential tokens)",
        ylabel="generative perplexity (AR scorer)", title="Sample quality vs steps")
ax2.set_xticks(steps_used, [str(s) for s in steps_used])
ax2.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
fig.tight_layout()
fig.savefig(os.path.join(cfg.out, "sweep.png"), dpi=120)
print(f"wrote {cfg.out}/results.json, results.csv, sweep.png")
