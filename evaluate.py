"""
Evaluate models: likelihoods with their standard errors on held-out windows, the sampling grid (sample quality against
cost), or Sudoku (the share of held-out puzzles solved).

    python evaluate.py --out_dir=out                                    # a checkpoint of train.py
    python evaluate.py --out_dir=out --orders=1,16 --windows=256 --alpha0=1
    python evaluate.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-1 --dataset=owt   # a GPT-2 dataset
    python evaluate.py --out_dir=out --grid --scorer=out_ar --alpha0s=1,0.25 --steps=16,64,128 \\
        --grid_orders=random,subcontext,confidence --baselines=out_mdlm,out_ar     # the speed-quality grid
    python evaluate.py --sudoku --out_dir=out_b1 --baselines=out_mdlm,out_b05 --alpha0s=0   # Sudoku, every order

Likelihoods (the default), per token and as perplexity, mean +- standard error over the windows:
- the NELBO (one draw of the noise per window; a bound on -log p(x) up to the schedule's floor);
- the "exact" likelihood of the sampler decoding one token per call, for K generation orders per window: K = 1 is
  the exact -log p(x | order) of one random order, and log-mean-exp over K orders is an importance-weighted bound
  on -log p(x) that tightens as K grows (variant B only: the clean tokens of (A) see each other both ways);
- the difference of each "exact" estimate and the NELBO on the same windows (a paired standard error);
and, with matplotlib, <out_dir>/curves.png (the training curves of log.jsonl) and <out_dir>/decoding.png (the network
call that decoded each position of a sample, at alpha0 = 1, 0.25 and 0).
--grid samples every cell of model x alpha0 x T x order: the model at --alpha0s (default its own), each of
--baselines at its own alpha0. Orders: random, subcontext (S = T, or --subcontext_len), and the adaptive confidence
and margin. Per cell: NFE, wall seconds per batch, generative perplexity under --scorer (best an alpha0 = 0 run: an AR
model), mean unigram entropy, the corpus word rate (byte-level data). A cell that cannot run is reported and skipped.
Writes grid.json and, with matplotlib, grid.png (generative perplexity against NFE).
--sudoku solves --puzzles held-out puzzles (metrics.solve_sudoku) for every model x alpha0 x order: each model at its
own alpha0 and at --alpha0s, in --grid_orders (default random, confidence, margin; at alpha0 = 0 the order is left to
right), T = --steps (default 1024: about one cell per call). Writes sudoku.json.
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from data import get_tokenizer, held_out_windows
from esolm import SettingError
from metrics import likelihoods, mean_se, sample_cell, solve_sudoku, training_words
from runtime import as_flag, autocast, configure, die, load_model, need, pyplot, resolve_device, setting

ORDERS = ("random", "subcontext", "confidence", "margin")  # the plans, and the adaptive orders


@dataclass
class Settings:
    out_dir: str = setting("out", "folder holding ckpt.pt (and log.jsonl)")
    init_from: str = setting("", "a published model instead: hub id or folder")
    alpha0: float | None = setting(None, "default: the alpha0 the model was trained for", rule="alpha0")
    data_dir: str | None = setting(None, "default: the checkpoint's")
    dataset: str | None = setting(None, "default: the checkpoint's")
    windows: int = setting(128, "held-out windows of L tokens; at least 2, for a standard error")
    orders: tuple[int, ...] = setting((1, 16), "K values for the exact likelihood", rule="count")
    batch_size: int = setting(32, "rows per forward (likelihoods), samples per generate (grid, Sudoku)", rule="count")
    seed: int = setting(0, "the noise and orders: the same for every model", rule="seed")
    ema: bool = setting(True, "use the EMA weights if saved")
    plots: bool = setting(True, "curves.png and decoding.png")
    device: str = setting("auto", "auto, cpu, cuda, ...", rule="device")
    dtype: str = setting("float32", "float32, bfloat16 or auto", rule="dtype")
    grid: bool = setting(False, "sample every cell of the grid instead of the likelihoods")
    sudoku: bool = setting(False, "solve held-out Sudoku puzzles instead of the likelihoods")
    puzzles: int = setting(1000, "Sudoku: the first this many held-out puzzles", rule="count")
    scorer: str = setting("", "grid: out_dir of the model that scores the samples (an alpha0 = 0 run)")
    baselines: tuple[str, ...] = setting((), "more out_dirs (an MDLM run, an AR run), each at its own alpha0")
    alpha0s: tuple[float, ...] = setting((), "grid: default --alpha0; Sudoku: more alpha0 beside each model's own",
                                         rule="alpha0")
    steps: tuple[int, ...] = setting((), "T (and S of subcontext cells); default 16,64,128 (Sudoku: 1024)", "steps")
    grid_orders: tuple[str, ...] = setting((), f"of {', '.join(ORDERS)}; default random (Sudoku: random, confidence, "
                                           "margin)")
    subcontext_len: int = setting(0, "S of the subcontext cells (0: S = T)", rule="subcontext_len")
    subcontext_shuffle: bool = setting(False, "the offsets, and each call, in random order")
    num_samples: int = setting(32, "grid: samples per cell; at least 2, for a standard error")
    temperature: float = setting(1.0, "grid and Sudoku", rule="temperature")
    top_p: float = setting(1.0, "grid and Sudoku", rule="top_p")

    def __post_init__(self):
        for key in ("windows", "num_samples"):
            need(self, getattr(self, key) >= 2, key, "must be at least 2 (for a standard error)")
        need(self, set(self.grid_orders) <= set(ORDERS), "grid_orders", f"must each be one of {', '.join(ORDERS)}")
        need(self, not (self.grid and self.sudoku), "sudoku", "and --grid: one at a time")
        self.steps = self.steps or ((1024,) if self.sudoku else (16, 64, 128))
        self.grid_orders = self.grid_orders or (("random", "confidence", "margin") if self.sudoku else ("random",))


def order_args(order, steps, cfg):
    """generate's arguments for one cell: the plan (random or subcontext, S = T by default) and the adaptive order."""
    if order == "subcontext":
        return {"subcontext_len": cfg.subcontext_len or steps, "subcontext_shuffle": cfg.subcontext_shuffle}
    return {"adaptive": None if order == "random" else order}


def cells(runs, cfg, run_cell):
    """Every cell of model x alpha0 x T x order, run by run_cell(model, alpha0, **generate's arguments) -> dict. At
    alpha0 = 0 the plan does not depend on T or the order (all left to right): one cell. A cell a model cannot run
    (alpha0 < 1 for MDLM, an S that does not divide L) is reported as skipped, and the others go on."""
    out = []
    for name, model, alpha0s in runs:
        for alpha0 in alpha0s:
            for order in cfg.grid_orders if alpha0 > 0 else ["left to right"]:
                for steps in cfg.steps if alpha0 > 0 else cfg.steps[:1]:
                    cell = {"model": name, "alpha0": alpha0, "order": order, "steps": steps, "seed": cfg.seed,
                            "temperature": cfg.temperature, "top_p": cfg.top_p}
                    kw = order_args(order, steps, cfg) if alpha0 > 0 else {}
                    if kw.get("subcontext_len"):
                        cell |= {"subcontext_len": kw["subcontext_len"], "order": order + " shuffled" *
                                 cfg.subcontext_shuffle}
                    head = f"{name[-20:]:20s} {cell['order']:18s} {alpha0:6g} {steps:5d}"
                    try:
                        cell |= run_cell(model, alpha0, steps=steps, temperature=cfg.temperature, top_p=cfg.top_p, **kw)
                    except SettingError as e:
                        print(f"{head}  skipped: {as_flag(e)}", flush=True)
                        out.append({**cell, "skipped": as_flag(e)})
                        continue
                    print(head + "  " + "  ".join(f"{k} {v:.4g}" for k, v in cell.items() if k not in (
                        "model", "alpha0", "order", "steps", "seed", "temperature", "top_p", "subcontext_len")
                        and isinstance(v, float)), flush=True)
                    out.append(cell)
    return out


def plot_grid(grid, png, title):
    """Generative perplexity against NFE, one line per model, alpha0 and order: the speed-quality picture."""
    plt = pyplot("grid.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for setting_ in dict.fromkeys((c["model"], c["order"], c["alpha0"]) for c in grid if "gen_nll" in c):
        run = sorted((c for c in grid if (c["model"], c["order"], c["alpha0"]) == setting_ and "gen_nll" in c),
                     key=lambda c: c["nfe"])
        ppl = np.exp([c["gen_nll"] for c in run])
        ax.errorbar([c["nfe"] for c in run], ppl, yerr=ppl * np.array([c["gen_nll_se"] for c in run]), fmt="o-",
                    capsize=3, label=f"{setting_[0]}: alpha0 = {setting_[2]:g}, {setting_[1]} order")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="network calls per sample (NFE)", ylabel="generative perplexity (scorer)", title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_curves(log_path, png, plt):
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    train, evals = [r for r in records if "loss" in r], [r for r in records if "val" in r]
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


def plot_decoding(model, png, plt, alpha0s=(1.0, 0.25, 0.0), seed=0):
    """For each alpha0: one sample's network call at which each position was decoded (steps T = L)."""
    L = model.config.block_size
    fig, axes = plt.subplots(1, len(alpha0s), figsize=(4 * len(alpha0s), 3.6), sharey=True)
    for ax, alpha0 in zip(np.atleast_1d(axes), alpha0s):
        g = torch.Generator(model.wte.weight.device).manual_seed(seed)
        call = model.generate(1, alpha0, generator=g).decoded_by
        ax.scatter(np.arange(L), call[0].cpu().numpy(), s=4)
        ax.set(title=f"alpha0 = {alpha0:g}: {int(call.max())} calls", xlabel="position in the sequence")
    np.atleast_1d(axes)[0].set_ylabel("network call that decoded it")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main():
    cfg = configure(Settings, doc=__doc__)
    device = resolve_device(cfg.device)
    amp, dtype = autocast(device, cfg.dtype)
    try:  # every model, before any work
        model, ckpt = load_model(cfg.out_dir, cfg.init_from, device, cfg.ema, alpha0=cfg.alpha0)
        baselines = [(out_dir, load_model(out_dir, device=device, ema=cfg.ema)[0]) for out_dir in cfg.baselines]
        scorer = load_model(cfg.scorer, device=device)[0] if cfg.scorer else None
        trained = ckpt["train_config"] if ckpt else {}
        data_dir, dataset = cfg.data_dir or trained.get("data_dir", "data"), cfg.dataset or trained.get("dataset")
        tokenizer = get_tokenizer(ckpt["dataset_meta"]["tokenizer"] if ckpt else "gpt2")
    except SettingError as e:
        die(as_flag(e))
    except (ValueError, OSError) as e:
        die(e)
    name = cfg.out_dir if ckpt else cfg.init_from
    source = f"{cfg.out_dir}/ckpt.pt (iter {ckpt['iter_num']})" if ckpt else cfg.init_from
    alpha0 = model.config.alpha0 if cfg.alpha0 is None else cfg.alpha0
    print(f"{source}: variant {model.config.variant}, L = {model.config.block_size}, trained for alpha0 = "
          f"{model.config.alpha0}; {dtype}")
    folder = cfg.out_dir if ckpt else "."
    if cfg.grid or cfg.sudoku:
        own = [] if cfg.grid else [alpha0]  # Sudoku: each model at its own alpha0, and at --alpha0s
        more = list(cfg.alpha0s) if cfg.sudoku else []  # Sudoku: every model at --alpha0s too
        runs = [(name, model, list(dict.fromkeys(own + list(cfg.alpha0s or [alpha0]))))] + [
            (n, m, list(dict.fromkeys([m.config.alpha0] + more))) for n, m in baselines]
    if cfg.sudoku:
        results = cells(runs, cfg, lambda m, a0, **kw: {"sudoku": solve_sudoku(
            m, data_dir, dataset, cfg.puzzles, cfg.batch_size, amp, cfg.seed, alpha0=a0, **kw)})
        for c in results:
            if "sudoku" in c:
                print(f"{c['model'][-20:]:20s} {c['order']:14s} {c['alpha0']:5g}  " + "  ".join(
                    f"{k}: {100 * v['solved']:5.1f} +- {100 * v['se']:4.1f}% (n {v['n']}, NFE {v['nfe']:.1f}, "
                    f"{v['seconds']:.1f} s)" for k, v in c["sudoku"].items()))
        with open(os.path.join(folder, "sudoku.json"), "w") as f:
            json.dump({"source": source, "baselines": cfg.baselines, "dataset": dataset, "device": device,
                       "dtype": dtype, "cells": results}, f, indent=1)
        print(f"wrote {folder}/sudoku.json")
        return results
    if cfg.grid:
        vocabulary = training_words(data_dir, dataset) if tokenizer.name == "bytes" and dataset else None
        print(f"{cfg.num_samples} samples a cell, batch {cfg.batch_size}; scored by {cfg.scorer or 'nothing'}")
        grid = cells(runs, cfg, lambda m, a0, **kw: sample_cell(
            m, cfg.num_samples, cfg.batch_size, cfg.seed, amp, scorer, tokenizer.eot_id, vocabulary, alpha0=a0, **kw))
        for c in grid:
            c["num_samples"] = cfg.num_samples
        with open(os.path.join(folder, "grid.json"), "w") as f:
            json.dump({"source": source, "baselines": cfg.baselines, "scorer": cfg.scorer, "dtype": dtype,
                       "device": device, "cells": grid}, f, indent=1)
        if scorer is not None:
            plot_grid(grid, os.path.join(folder, "grid.png"), f"scored by {cfg.scorer}")
        print(f"wrote {folder}/grid.json")
        return grid
    if dataset is None:
        die("--dataset: needed for a published model")
    try:
        x = held_out_windows(data_dir, dataset, model.config.block_size, cfg.windows).to(device)
    except (ValueError, OSError) as e:
        die(e)
    print(f"alpha0 = {alpha0}; {len(x)} held-out windows of {dataset}")
    results = {"source": source, "alpha0": alpha0, "windows": len(x)}
    with amp:
        values = likelihoods(model, x, alpha0, cfg.orders, cfg.seed, cfg.batch_size)
    for key, v in values.items():
        mean, se = mean_se(v)
        label = "NELBO" if key == "nelbo" else "  minus the NELBO" if "minus" in key else f"exact, K = {key[7:]}"
        what = "perplexity ratio" if "minus" in key else "perplexity"
        print(f"  {label:24s} {mean:.4f} +- {se:.4f} nats/token   {what} {math.exp(mean):.3f} +- "
              f"{math.exp(mean) * se:.3f}")
        results[key] = {"mean": mean, "se": se}
    if model.config.variant != "B":
        print("  exact likelihood: variant B only (the clean tokens of (A) see each other both ways)")
    if ckpt:
        with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
    plt = pyplot("plots") if cfg.plots and ckpt else None
    if plt is not None:
        if os.path.exists(os.path.join(cfg.out_dir, "log.jsonl")):
            plot_curves(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "curves.png"), plt)
        with amp:
            plot_decoding(model, os.path.join(cfg.out_dir, "decoding.png"), plt, seed=cfg.seed)
        print(f"wrote {cfg.out_dir}/eval.json, curves.png and decoding.png")
    return results


if __name__ == "__main__":
    main()
