"""
Evaluate a model: likelihoods with their standard errors on held-out windows, pictures of the run, and the
sampling grid (sample quality against cost).

    python evaluate.py --out_dir=out                                    # a checkpoint of train.py
    python evaluate.py --out_dir=out --orders 1 16 --windows=256 --alpha0=1
    python evaluate.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-1 --alpha0=1 --dataset=owt   # a GPT-2 dataset
    python evaluate.py --out_dir=out --grid --scorer=out_ar --alpha0s 1 0.25 --steps 16 64 128 \
        --grid_orders random subcontext --baselines out_mdlm out_ar     # the speed-quality grid

Prints, per token and as perplexity, mean +- standard error over the windows:
- the NELBO (one draw of the noise per window; an upper bound on -log p(x));
- the "exact" likelihood of the sampler decoding one token per call, for K generation orders per window: K = 1 is
  the exact -log p(x | order) of one random order, and log-mean-exp over K orders is an importance-weighted bound
  on -log p(x) that tightens as K grows (variant B only: the clean tokens of (A) see each other both ways);
- the difference of each "exact" estimate and the NELBO on the same windows (a paired standard error).
With matplotlib installed it also draws <out_dir>/curves.png (the training curves of log.jsonl: loss, its MDM and
AR terms, validation NELBO) and <out_dir>/decoding.png (the network call that decoded each position of a sample,
at alpha0 = 1, 0.25 and 0).
--grid instead samples the model in every cell of alpha0 x T x order (subcontext cells use S = T, or
--subcontext_len), and each of --baselines (other checkpoints) at the alpha0 it trained with, and reports per cell:
NFE, wall seconds per batch, generative perplexity under --scorer (another checkpoint, best an alpha0 = 0 run: an AR
model), mean unigram entropy, the corpus word rate (byte-level data), the number of samples and the seed; a cell
that cannot run is reported and skipped. Writes grid.json and, with matplotlib, grid.png (generative perplexity
against NFE, a line per model, alpha0 and order: the paper's speed-quality picture). The scoring rules used here and
by sweep.py (`generative_nll`, `unigram_entropy`, `corpus_word_rate`) are defined in this file.
"""
import argparse
import itertools
import json
import math
import os
import re

import time

import numpy as np
import torch
import torch.nn.functional as F

import prepare_data
from esolm import SettingError
from runtime import autocast, check_args, load_model

# -----------------------------------------------------------------------------------------------------------
# the pieces sample.py and sweep.py use


def held_out_windows(data_dir, dataset, L, n):
    """(n, L) token windows evenly spaced over the validation split: the same windows for every model."""
    meta = prepare_data.load_meta(data_dir, dataset)
    tokens = np.concatenate([prepare_data.read_shard(os.path.join(data_dir, dataset, f)) for f in meta["val_shards"]])
    if len(tokens) < L:
        raise ValueError(f"the validation split of {dataset} has {len(tokens)} tokens, fewer than L = {L}")
    starts = np.linspace(0, len(tokens) - L, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + L] for s in starts]).astype(np.int64))


@torch.no_grad()
def per_token(fn, x, batch=32):
    """fn(rows) -> (rows,) nats per sequence, over x in batches: the values per token of every window, as numpy."""
    return torch.cat([fn(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)]).numpy() / x.size(1)


def mean_se(values):
    """Mean and standard error of the mean."""
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def words(text):
    """The words of a text for the corpus word rate: runs of ASCII letters and apostrophes, lowercased, 2+ long."""
    return [w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 2]


def training_words(data_dir, dataset):
    """The set of words of a byte-level dataset's training split."""
    meta = prepare_data.load_meta(data_dir, dataset)
    if meta["tokenizer"] != "bytes":
        raise ValueError("the corpus word rate is defined for byte-level datasets only")
    shards = [prepare_data.read_shard(os.path.join(data_dir, dataset, f)) for f in meta["train_shards"]]
    return set(words(np.concatenate(shards).astype(np.uint8).tobytes().decode("utf-8", errors="replace")))


@torch.no_grad()
def token_nll(scorer, x):
    """-log p of each token of x (B, L) under a model read as a left-to-right AR model (the sequential forward with
    every position masked: what an alpha0 = 0 model is trained for)."""
    B, L = x.shape
    order = torch.arange(L, device=x.device).expand(B, L)
    h, _, _ = scorer.sequential_forward(x, order, torch.zeros(B, dtype=torch.long, device=x.device))
    return F.cross_entropy(scorer.lm_head(h).float().transpose(1, 2), x, reduction="none")


def generative_nll(scorer, samples, eot_id, batch=32):
    """(mean, standard error) of -log p per scored token of the samples under the scorer: generative perplexity is
    exp of it. The official rule for end-of-text: every token is scored except end-of-text tokens, and each sample's
    first end-of-text token is scored too (the text after it is not cut). The mean is over all scored tokens of all
    samples together (token-weighted); its standard error is the ratio estimate's, over samples. Unlike the
    official GPT-2 scorer, which has no start token, the first token of a sample is scored as well."""
    nll, count = [], []
    for x in samples.split(batch):
        eot = x == eot_id
        scored = ~eot | (eot & (eot.cumsum(1) == 1))
        nll.append((token_nll(scorer, x) * scored).sum(1).double().cpu())
        count.append(scored.sum(1).double().cpu())
    nll, count = torch.cat(nll), torch.cat(count)
    mean = float(nll.sum() / count.sum())
    n = len(nll)
    se = float(((nll - mean * count) ** 2).sum().sqrt() / count.sum() * math.sqrt(n / (n - 1))) if n > 1 else 0.0
    return mean, se


def unigram_entropy(row):
    """Entropy in nats of the token frequencies of one sample (a repetitive sample scores low), as the official
    code; the grid reports its mean over samples."""
    counts = np.bincount(row)
    p = counts[counts > 0] / len(row)
    return float(-(p * np.log(p)).sum())


def byte_texts(samples):
    """The rows of byte-level samples (B, L) as text, for the corpus word rate."""
    return [bytes(row).decode("utf-8", errors="replace") for row in samples.tolist()]


def corpus_word_rate(texts, vocabulary):
    """The fraction of the words of the texts (samples, prompt excluded) that occur in `vocabulary` (the words of
    the training text): a cheap, model-free check that samples read like the corpus. NaN if there are no words."""
    found = [w in vocabulary for text in texts for w in words(text)]
    return sum(found) / len(found) if found else math.nan


# -----------------------------------------------------------------------------------------------------------
# pictures


def plot_curves(log_path, png):
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "training loss (MDM + AR)"), ("mdm", "MDM term"), ("ar", "AR term")):
        if train and key in train[0]:
            ax.plot([r["iter"] for r in train], [r[key] for r in train], label=label, lw=1)
    ax.plot([r["iter"] for r in evals], [r["val"] for r in evals], "o-", label="validation NELBO")
    ax.set(xlabel="iteration", ylabel="nats per token", title=os.path.dirname(log_path) or ".")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_decoding(model, png, alpha0s=(1.0, 0.25, 0.0), seed=0):
    """For each alpha0: one sample's network call at which each position was decoded (steps T = L)."""
    import matplotlib.pyplot as plt
    L = model.config.block_size
    fig, axes = plt.subplots(1, len(alpha0s), figsize=(4 * len(alpha0s), 3.6), sharey=True)
    for ax, alpha0 in zip(np.atleast_1d(axes), alpha0s):
        generator = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
        call = model.generate(1, alpha0, L, generator=generator).calls[0].cpu().numpy()
        ax.scatter(np.arange(L), call, s=4)
        ax.set(title=f"alpha0 = {alpha0:g}: {call.max()} calls", xlabel="position in the sequence")
    np.atleast_1d(axes)[0].set_ylabel("network call that decoded it")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_grid(cells, png, title):
    """Generative perplexity against NFE, one line per model, alpha0 and order: the speed-quality picture."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for setting in dict.fromkeys((c["model"], c["order"], c["alpha0"]) for c in cells if "gen_nll" in c):
        run = sorted((c for c in cells if (c["model"], c["order"], c["alpha0"]) == setting and "gen_nll" in c),
                     key=lambda c: c["nfe"])
        ppl = np.exp([c["gen_nll"] for c in run])
        ax.errorbar([c["nfe"] for c in run], ppl, yerr=ppl * np.array([c["gen_nll_se"] for c in run]), fmt="o-",
                    capsize=3, label=f"{setting[0]}: alpha0 = {setting[2]:g}, {setting[1]} order")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="network calls per sample (NFE)", ylabel="generative perplexity (scorer)", title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------------------------------------
# the sampling grid


def sample_cell(model, args, alpha0, steps, S, device, amp):
    """The samples of one grid cell, in batches from one seeded generator, with each batch's NFE and wall time."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    xs, nfes, seconds = [], [], []
    for first in range(0, args.num_samples, args.batch_size):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            out = model.generate(min(args.batch_size, args.num_samples - first), alpha0, steps,
                                 temperature=args.temperature, top_p=args.top_p, subcontext_len=S,
                                 subcontext_shuffle=args.subcontext_shuffle, generator=generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        nfes.append(out.nfe)
        xs.append(out.x)
    return torch.cat(xs), nfes, seconds


def sampling_grid(runs, args, scorer, tokenizer, vocabulary, device, amp):
    """Every cell of model x alpha0 x T x order: samples, then their cost and quality. runs: (name, model, alpha0s).
    At alpha0 = 0 the plan does not depend on T or the order (all sequential), so it gets one cell. A cell a model
    cannot sample (alpha0 < 1 for MDLM, an S that does not divide L) is reported as skipped, and the grid goes on."""
    cells = []
    print(f"{'model':20s} {'order':18s} {'alpha0':>6s} {'T':>5s} {'NFE':>7s} {'s/batch':>8s}  {'gen. perplexity':16s} "
          f"{'entropy':>7s} {'words':>6s}")
    for name, model, alpha0s in runs:
        for order, alpha0, steps in itertools.product(args.grid_orders, alpha0s, args.steps):
            if alpha0 == 0 and (order, steps) != ("random", args.steps[0]):
                continue
            S = (args.subcontext_len or steps) if order == "subcontext" else 0
            cell = {"model": name, "order": order + (" shuffled" if S and args.subcontext_shuffle else ""),
                    "alpha0": alpha0, "steps": steps, "subcontext_len": S, "num_samples": args.num_samples,
                    "seed": args.seed, "temperature": args.temperature, "top_p": args.top_p}
            head = f"{name[-20:]:20s} {cell['order']:18s} {alpha0:6g} {steps:5d}"
            try:
                samples, nfes, seconds = sample_cell(model, args, alpha0, steps, S, device, amp)
            except SettingError as e:
                cells.append({**cell, "skipped": str(e)})
                print(f"{head}  skipped: {e}")
                continue
            cell |= {"nfe": float(np.mean(nfes)), "seconds_per_batch": float(np.mean(seconds)),
                     "batch_size": min(args.batch_size, args.num_samples),
                     "entropy": float(np.mean([unigram_entropy(r) for r in samples.cpu().numpy()]))}
            if scorer is not None:
                cell["gen_nll"], cell["gen_nll_se"] = generative_nll(scorer, samples, tokenizer.eot_id)
            if vocabulary is not None:
                cell["word_rate"] = corpus_word_rate(byte_texts(samples), vocabulary)
            cells.append(cell)
            ppl = (f"{math.exp(cell['gen_nll']):7.2f} +- {math.exp(cell['gen_nll']) * cell['gen_nll_se']:5.2f}"
                   if "gen_nll" in cell else "")
            print(f"{head} {cell['nfe']:7.1f} {cell['seconds_per_batch']:8.3f}  {ppl:16s} {cell['entropy']:7.3f} "
                  f"{cell.get('word_rate', math.nan):6.1%}", flush=True)
    return cells


# -----------------------------------------------------------------------------------------------------------


def die(msg):
    raise SystemExit(f"evaluate.py: {msg}")


def run_grid(args, model, ckpt, scorer, alpha0, data_dir, dataset, device):
    """--grid: the table, grid.json (in out_dir, or the working folder for a published model) and grid.png."""
    if not args.alpha0s and alpha0 is None:
        die("--alpha0s: needed for a published model")
    tokenizer = prepare_data.get_tokenizer(ckpt["dataset_meta"]["tokenizer"] if ckpt else "gpt2")
    vocabulary = training_words(data_dir, dataset) if tokenizer.name == "bytes" and dataset else None
    amp, dtype = autocast(device, args.dtype)
    source = f"{args.out_dir}/ckpt.pt (iter {ckpt['iter_num']})" if ckpt else args.init_from
    runs = [(args.out_dir if ckpt else args.init_from, model, args.alpha0s or [alpha0])]
    for out_dir in args.baselines:  # other checkpoints, each at the alpha0 it trained with (an MDLM run, an AR run)
        baseline, baseline_ckpt = load_model(out_dir, device=device)
        runs.append((out_dir, baseline, [baseline_ckpt["train_config"]["alpha0"]]))
    print(f"{source}: variant {model.config.variant}, L = {model.config.block_size}; {args.num_samples} samples a "
          f"cell, batch {args.batch_size}, seed {args.seed}, temperature {args.temperature}, top_p {args.top_p}, "
          f"{dtype}; scored by {args.scorer or 'nothing (no --scorer)'}")
    cells = sampling_grid(runs, args, scorer, tokenizer, vocabulary, device, amp)
    folder = args.out_dir if ckpt else "."
    with open(os.path.join(folder, "grid.json"), "w") as f:
        json.dump({"source": source, "baselines": args.baselines, "scorer": args.scorer, "dtype": dtype,
                   "device": device, "cells": cells}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print(f"wrote {folder}/grid.json (matplotlib is not installed: no grid.png)")
        return cells
    if scorer is not None:
        plot_grid(cells, os.path.join(folder, "grid.png"), f"scored by {args.scorer}")
    print(f"wrote {folder}/grid.json" + (" and grid.png" if scorer is not None else ""))
    return cells


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (and log.jsonl)")
    parser.add_argument("--init_from", default="", help="a published model instead: hub id or folder")
    parser.add_argument("--alpha0", type=float, default=None, help="default: the value the model trained with")
    parser.add_argument("--data_dir", default=None, help="default: the checkpoint's")
    parser.add_argument("--dataset", default=None, help="default: the checkpoint's")
    parser.add_argument("--windows", type=int, default=128, help="held-out windows of L tokens")
    parser.add_argument("--orders", type=int, nargs="*", default=[1, 16], help="K values for the exact likelihood")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="the noise and orders: the same for every model")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights if saved")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="curves.png, decoding.png")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or auto")
    grid = parser.add_argument_group("the sampling grid")
    grid.add_argument("--grid", action="store_true", help="sample every cell instead of the likelihoods")
    grid.add_argument("--scorer", default="", help="out_dir of the model that scores the samples (an alpha0 = 0 run)")
    grid.add_argument("--baselines", nargs="*", default=[], help="more out_dirs (an MDLM run, an AR run), each sampled "
                      "at its own alpha0, in the same table and figure")
    grid.add_argument("--alpha0s", type=float, nargs="+", default=None, help="default: --alpha0")
    grid.add_argument("--steps", type=int, nargs="+", default=[16, 64, 128], help="T (and S of subcontext cells)")
    grid.add_argument("--grid_orders", nargs="+", default=["random"], help="random and/or subcontext")
    grid.add_argument("--subcontext_len", type=int, default=0, help="S of the subcontext cells (0: S = T)")
    grid.add_argument("--subcontext_shuffle", action="store_true", help="the offsets, and each call, in random order")
    grid.add_argument("--num_samples", type=int, default=32, help="samples per cell")
    grid.add_argument("--temperature", type=float, default=1.0)
    grid.add_argument("--top_p", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:  # every setting is checked here, before the model is read
        device = check_args(args, (
            ("windows", args.windows >= 2, "must be at least 2 (for a standard error)"),
            ("orders", all(k >= 1 for k in args.orders), "each K must be at least 1"),
            ("batch_size", args.batch_size >= 1, "must be at least 1"),
            ("alpha0s", all(0 <= a <= 1 for a in args.alpha0s or []), "each must be in [0, 1]"),
            ("steps", all(s >= 1 for s in args.steps), "each must be at least 1"),
            ("grid_orders", set(args.grid_orders) <= {"random", "subcontext"}, "each must be random or subcontext"),
            ("subcontext_len", args.subcontext_len >= 0, "must be at least 1, or 0 for S = T"),
            ("num_samples", args.num_samples >= 2, "must be at least 2 (for a standard error)"),
            ("temperature", args.temperature >= 0, "must be at least 0"),
            ("top_p", 0 < args.top_p <= 1, "must be in (0, 1]")))
        model, ckpt = load_model(args.out_dir, args.init_from, device, args.ema)
        trained = ckpt["train_config"] if ckpt else {}
        alpha0 = args.alpha0 if args.alpha0 is not None else trained.get("alpha0")
        data_dir, dataset = args.data_dir or trained.get("data_dir", "data"), args.dataset or trained.get("dataset")
        if args.grid:
            scorer = load_model(args.scorer, device=device)[0] if args.scorer else None
            return run_grid(args, model, ckpt, scorer, alpha0, data_dir, dataset, device)
        if alpha0 is None or dataset is None:
            die("--alpha0 and --dataset are needed for a published model")
        x = held_out_windows(data_dir, dataset, model.config.block_size, args.windows).to(device)
    except (ValueError, OSError) as e:
        die(e)
    source = f"{args.out_dir}/ckpt.pt (iter {ckpt['iter_num']})" if ckpt else args.init_from
    amp, dtype = autocast(device, args.dtype)
    print(f"{source}: variant {model.config.variant}, L = {model.config.block_size}; alpha0 = {alpha0}; "
          f"{len(x)} held-out windows of {dataset}; {dtype}")

    def generator():
        return torch.Generator(device=device).manual_seed(args.seed)

    def report(name, values, what="perplexity"):
        mean, se = mean_se(values)
        print(f"  {name:24s} {mean:.4f} +- {se:.4f} nats/token   {what} {math.exp(mean):.3f} "
              f"+- {math.exp(mean) * se:.3f}")
        return {"mean": mean, "se": se}

    results = {"source": source, "alpha0": alpha0, "windows": len(x)}
    with amp:
        gen = generator()
        nelbo = per_token(lambda b: model.nelbo(b, alpha0, gen), x, args.batch_size)
        results["nelbo"] = report("NELBO", nelbo)
        for k in args.orders if model.config.variant == "B" else []:
            gen = generator()
            exact = per_token(lambda b: model.exact_nll(b, alpha0, k, gen), x, args.batch_size)
            results[f"exact_k{k}"] = report(f"exact, K = {k}", exact)
            results[f"exact_k{k}_minus_nelbo"] = report("  minus the NELBO", exact - nelbo, "perplexity ratio")
    if model.config.variant != "B":
        print("  exact likelihood: variant B only (the clean tokens of (A) see each other both ways)")
    with open(os.path.join(args.out_dir, "eval.json") if not args.init_from else os.devnull, "w") as f:
        json.dump(results, f, indent=1)
    if args.plots and not args.init_from:
        try:
            import matplotlib
            matplotlib.use("Agg")
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)")
            return results
        if os.path.exists(os.path.join(args.out_dir, "log.jsonl")):
            plot_curves(os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "curves.png"))
        with amp:
            plot_decoding(model, os.path.join(args.out_dir, "decoding.png"), seed=args.seed)
        print(f"wrote {args.out_dir}/eval.json, curves.png and decoding.png")
    return results


if __name__ == "__main__":
    main()
