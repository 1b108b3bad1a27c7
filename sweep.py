"""
The paper's alpha0 story at small scale: train Eso-LM (B) at several alpha0 on the same data, model, seed and
token budget, then compare likelihoods and sample quality. Resumable: each finished run is one row of
<out>/results.json, and a rerun skips what is done.

    python sweep.py                          # CPU preset: train.py's CPU sizes, about an hour on 2 cores
    python sweep.py --preset=gpu             # bigger model, longer context, longer runs: one GPU
    python sweep.py --alpha0s 0 0.25 1       # a subset

For each run: NELBO perplexity on fixed validation windows (fixed noise), the "exact" perplexity of the
sampler with one token per call (K = 1 and K = 16 generation orders), and, for alpha0 in --gen_alpha0s, the
generative perplexity of samples at several step counts (scored by the alpha0 = 0 model, a pure AR model trained
on the same data) and their mean unigram entropy. Writes results.json, results.csv and, with matplotlib
installed, sweep.png.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

import prepare_data
from esolm import EsoLM, EsoLMConfig
from sample import load_checkpoint

PRESETS = {  # settings passed to train.py on top of its defaults (and, without a GPU, its CPU preset)
    "cpu": [],
    "gpu": ["--block_size=512", "--n_layer=8", "--n_head=8", "--n_embd=512", "--batch_size=64", "--max_iters=10000",
            "--eval_interval=1000", "--dropout=0.1"],
}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--preset", default="cpu", choices=PRESETS)
p.add_argument("--out", default="sweep", help="folder for the runs and the results")
p.add_argument("--alpha0s", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5, 1.0])
p.add_argument("--gen_alpha0s", type=float, nargs="+", default=[1.0, 0.25], help="runs whose samples are scored")
p.add_argument("--gen_steps", type=int, nargs="+", default=[16, 64, 256])
p.add_argument("--eval_windows", type=int, default=128, help="validation windows for the likelihoods")
p.add_argument("--num_samples", type=int, default=32, help="samples per (run, steps) for generative perplexity")
p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="more train.py settings, e.g. --max_iters=100")
args = p.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
os.makedirs(args.out, exist_ok=True)
results_path = os.path.join(args.out, "results.json")
results = json.load(open(results_path)) if os.path.exists(results_path) else []
if 0.0 not in args.alpha0s:
    args.alpha0s = [0.0] + args.alpha0s  # the AR model is the scorer of generative perplexity


def run_dir(alpha0):
    return os.path.join(args.out, f"alpha0_{alpha0:g}")


def train(alpha0):
    """train.py in a subprocess, resumed if a checkpoint is there; returns its wall time in seconds."""
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(run_dir(alpha0), "ckpt.pt")) else []
    cmd = [sys.executable, "train.py", f"--alpha0={alpha0}", f"--out_dir={run_dir(alpha0)}", *PRESETS[args.preset],
           *args.train_args, *resume]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def load(alpha0):
    ckpt = load_checkpoint(os.path.join(run_dir(alpha0), "ckpt.pt"), device)
    model = EsoLM(EsoLMConfig(**ckpt["model_config"])).to(device).eval()
    model.load_state_dict(ckpt["ema"] or ckpt["model"])
    return model, ckpt


def val_windows(meta, L):
    """The same held-out windows for every run: evenly spaced over the validation shards."""
    arrays = [prepare_data.read_shard(os.path.join(meta["data_dir"], f)) for f in meta["val_shards"]]
    tokens = np.concatenate(arrays)
    starts = np.linspace(0, len(tokens) - L - 1, args.eval_windows).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + L] for s in starts]).astype(np.int64)).to(device)


@torch.no_grad()
def per_token(fn, x, batch=32):
    """Mean of fn(rows) (nats per sequence) over x, per token."""
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)]).mean().item() / x.size(1)


def unigram_entropy(row):
    counts = np.bincount(row)
    p = counts[counts > 0] / len(row)
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------------------------------------
# train every alpha0 (the README's default, 0.25, first), then evaluate each run

done = {r["alpha0"]: r for r in results}
walls = {}
for alpha0 in sorted(args.alpha0s, key=lambda a: (a != 0.25, a)):
    if alpha0 not in done:
        walls[alpha0] = train(alpha0)
scorer, _ = load(0.0)  # the AR model scores the samples of the others
for alpha0 in sorted(args.alpha0s):
    if alpha0 in done:
        continue
    model, ckpt = load(alpha0)
    meta = {**ckpt["dataset_meta"], "data_dir": os.path.join(ckpt["train_config"]["data_dir"],
                                                             ckpt["train_config"]["dataset"])}
    x = val_windows(meta, model.config.block_size)
    g = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731  the same noise for every run
    row = {"alpha0": alpha0, "variant": model.config.variant, "train_seconds": walls.get(alpha0),
           "iters": ckpt["iter_num"], "params": model.num_params(), "block_size": model.config.block_size,
           "windows": len(x)}
    gen = g()
    row["nelbo"] = per_token(lambda b: model.nelbo(b, alpha0, gen), x)
    for k in (1, 16):
        gen = g()
        row[f"exact_k{k}"] = per_token(lambda b: model.exact_nll(b, alpha0, k, gen), x)
    if alpha0 in args.gen_alpha0s or alpha0 == 0.0:
        for steps in args.gen_steps:
            gen = g()
            t0 = time.time()
            samples = model.generate(args.num_samples, alpha0, steps, generator=gen)
            row[f"gen_seconds_T{steps}"] = time.time() - t0
            row[f"gen_nll_T{steps}"] = per_token(lambda b: scorer.nelbo(b, 0.0), samples)
            row[f"entropy_T{steps}"] = float(np.mean([unigram_entropy(r) for r in samples.cpu().numpy()]))
    print(json.dumps(row), flush=True)
    results.append(row)
    with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(results_path + ".tmp", results_path)

# -----------------------------------------------------------------------------------------------------------
# table, CSV, plot

results.sort(key=lambda r: r["alpha0"])
keys = sorted({k for r in results for k in r}, key=lambda k: list(results[-1]).index(k) if k in results[-1] else 99)
with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(results)
print("\nalpha0  NELBO ppl  exact ppl K=1  K=16   " + "  ".join(f"gen ppl T={s}" for s in args.gen_steps))
for r in results:
    gen = "  ".join(f"{math.exp(r[f'gen_nll_T{s}']):11.2f}" if f"gen_nll_T{s}" in r else " " * 11
                    for s in args.gen_steps)
    print(f"{r['alpha0']:6g}  {math.exp(r['nelbo']):9.3f}  {math.exp(r['exact_k1']):13.3f}  "
          f"{math.exp(r['exact_k16']):6.3f}   {gen}")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("sweep.py: matplotlib is not installed (pip install matplotlib): results.json and results.csv are "
             "written, the plot is not")
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
a = [r["alpha0"] for r in results]
for key, label in (("nelbo", "NELBO (bound)"), ("exact_k1", "exact, K = 1"), ("exact_k16", "exact, K = 16")):
    ax1.plot(a, [math.exp(r[key]) for r in results], "o-", label=label)
ax1.set(xlabel="alpha0 (0 = AR, 1 = MDM)", ylabel="validation perplexity (per token)", title="Likelihood vs alpha0")
ax1.legend()
for r in results:
    if r["alpha0"] in args.gen_alpha0s:
        nfe = [s for s in args.gen_steps if f"gen_nll_T{s}" in r]
        ax2.plot(nfe, [math.exp(r[f"gen_nll_T{s}"]) for s in nfe], "o-", label=f"alpha0 = {r['alpha0']:g}")
ax2.set(xscale="log", xlabel="diffusion steps T", ylabel="generative perplexity (AR scorer)",
        title="Sample quality vs steps")
ax2.legend()
fig.tight_layout()
fig.savefig(os.path.join(args.out, "sweep.png"), dpi=120)
print(f"wrote {args.out}/results.json, results.csv, sweep.png")
