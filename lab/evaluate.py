"""Evaluate checkpoints: likelihoods with standard errors on held-out windows, or the sampling grid
(sample quality against cost), with the same windows, noise and draws for every model (--seed).

    python -m lab.evaluate --out_dir=out                       # NELBO, "exact" likelihoods, figures
    python -m lab.evaluate --out_dir=out --grid --scorer=out_ar --alpha0s=1,0.25 --steps=16,128 \\
        --grid_orders=random,subcontext,confidence --thresholds=0.5,0.9 --baselines=out_mdlm

Likelihoods, per token, mean +- standard error: the NELBO and, for (B), the "exact" likelihood
over K orders and its paired difference (eval.json, curves.png, decoding.png). --grid: a cell's
NFE, seconds, generative perplexity under --scorer (an alpha0 = 0 model), entropy and corpus word
rate (grid.json, grid.png); baselines at their own alpha0. docs/sampling.md has the details.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from configurator import check, configure, fail
from data import get_tokenizer
from lab.common import (autocast, device_ok, held_out, load_model, mean_se, nfe_figure, perplexity,
                        pyplot)
from lab.metrics import likelihoods, sample_cell, training_words
from lab.orders import subcontext_plan

ORDERS = ("random", "subcontext", "confidence", "margin")


@dataclass
class Settings:
    out_dir: str = "out"  # the folder of ckpt.pt (and log.jsonl)
    alpha0: float | None = None  # default: the model's
    data_dir: str | None = None  # default: the checkpoint's
    dataset: str | None = None  # default: the checkpoint's
    windows: int = 128  # held-out windows of L tokens
    orders: tuple[int, ...] = (1, 16)  # K of the exact likelihood
    batch_size: int = 32  # rows a forward (likelihoods), samples a generate call (grid)
    seed: int = 0  # the noise, orders and samples: the same for every model
    ema: bool = True  # the EMA weights, if saved
    plots: bool = True  # curves.png and decoding.png
    device: str = "cpu"
    dtype: str = "float32"  # or bfloat16, or auto
    grid: bool = False  # the sampling grid instead of the likelihoods
    scorer: str = ""  # grid: the out_dir of the model that scores the samples
    baselines: tuple[str, ...] = ()  # grid: more out_dirs, each at its own alpha0
    alpha0s: tuple[float, ...] = ()  # grid: the model's alpha0s (default: --alpha0)
    steps: tuple[int, ...] = (16, 64, 128)  # grid: T, and S of subcontext cells
    grid_orders: tuple[str, ...] = ("random",)  # grid: of random, subcontext, confidence, margin
    thresholds: tuple[float, ...] = ()  # grid: the adaptive orders at these tau too
    subcontext_len: int = 0  # grid: S of the subcontext cells (0: S = T)
    subcontext_shuffle: bool = False
    num_samples: int = 32  # grid: samples a cell
    temperature: float = 1.0
    top_p: float = 1.0


def cells(runs, cfg, run_cell):
    """Every cell of model x alpha0 x T x order (x tau), run by run_cell(model, **generate's kw).
    At alpha0 = 0 the order is left to right whatever T and the order: one cell."""
    out = []
    for name, model, alpha0s in runs:
        for alpha0 in alpha0s:
            orders = cfg.grid_orders if alpha0 > 0 else ["left to right"]
            taus = [(o, None) for o in orders]
            taus += [(o, t) for o in orders if o in ORDERS[2:] for t in cfg.thresholds]
            for order, tau in taus:
                for steps in cfg.steps[:None if alpha0 else 1]:
                    cell = dict(model=name, alpha0=alpha0, order=order, threshold=tau, steps=steps)
                    kw = dict(alpha0=alpha0, steps=steps, temperature=cfg.temperature,
                              top_p=cfg.top_p)
                    head = f"{name[-20:]:20s} {order:13s} {tau!s:4} {alpha0:5g} {steps:5d}"
                    try:
                        if order == "subcontext":  # a plan a batch: (rows, seed) -> Plan
                            S = cell["subcontext_len"] = cfg.subcontext_len or steps
                            subcontext_plan(model, 1, alpha0, S)  # an S that does not divide L
                            kw["plan"] = lambda n, s, m=model, S=S, a=alpha0: subcontext_plan(
                                m, n, a, S, cfg.subcontext_shuffle, s)
                        elif order in ORDERS[2:]:
                            kw |= {"adaptive": order, "threshold": tau}
                        cell |= run_cell(model, **kw)
                    except ValueError as e:
                        print(f"{head}  skipped: {e}", flush=True)
                        out.append({**cell, "skipped": str(e)})
                        continue
                    print(head, *(f"{k} {v:.4g}" for k, v in cell.items() if isinstance(v, float)
                                  and k not in ("alpha0", "threshold")), sep="  ", flush=True)
                    out.append(cell)
    return out


def plot_grid(grid, png, title):  # generative perplexity against NFE, a line per model and order
    lines = {}
    for c in (c for c in grid if "gen_nll" in c):
        label = f"{c['model']}: alpha0 = {c['alpha0']:g}, {c['order']}" + (
            f", tau {c['threshold']}" if c["threshold"] is not None else "")
        lines.setdefault(label, []).append((c["nfe"], *perplexity(c["gen_nll"], c["gen_nll_se"])))
    nfe_figure(png, lines, "generative perplexity", title)


def plot_training(cfg, model, amp, plt):
    """curves.png: the training log; decoding.png: each position's call at alpha0 = 1, 0.25, 0."""
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.endswith("\n")]  # not one a crash cut
    fig, ax = plt.subplots(figsize=(7, 4), layout="tight")
    for key, label in (("loss", "training loss"), ("mdm", "MDM"), ("ar", "AR"), ("val", "val")):
        rows = list({r["iter"]: r for r in log if key in r}.values())  # a resume logs again
        ax.plot([r["iter"] for r in rows], [r[key] for r in rows], label=label)
    ax.set(xlabel="iteration", ylabel="nats per token (val: the NELBO)", title=cfg.out_dir)
    ax.legend()
    fig.savefig(os.path.join(cfg.out_dir, "curves.png"), dpi=120)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True, layout="tight")
    for ax, alpha0 in zip(axes, (1.0, 0.25, 0.0)):
        with amp:
            call = model.generate(1, alpha0, seed=cfg.seed).decoded_by[0].cpu()
        ax.scatter(np.arange(len(call)), call.numpy(), s=4)
        ax.set(title=f"alpha0 = {alpha0:g}: {int(call.max())} calls", xlabel="position")
    axes[0].set_ylabel("the network call that decoded it")
    fig.savefig(os.path.join(cfg.out_dir, "decoding.png"), dpi=120)
    plt.close("all")


def main(argv=None):
    cfg = configure(Settings, __doc__, argv)
    for key in ("windows", "num_samples"):
        check(cfg, key, getattr(cfg, key) >= 2, "must be at least 2, for a standard error")
    check(cfg, "batch_size", cfg.batch_size >= 1, "must be at least 1")
    check(cfg, "seed", cfg.seed >= 0, "must be at least 0")
    check(cfg, "orders", all(k >= 1 for k in cfg.orders), "must each be at least 1")
    check(cfg, "grid_orders", set(cfg.grid_orders) <= set(ORDERS), "must be of " + " ".join(ORDERS))
    check(cfg, "dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "is auto, bfloat16, float32")
    check(cfg, "device", device_ok(cfg.device), "is not a device here")
    check(cfg, "alpha0", cfg.alpha0 is None or 0 <= cfg.alpha0 <= 1, "must be in [0, 1]")
    amp, dtype = autocast(cfg.device, cfg.dtype)
    try:
        model, ckpt = load_model(cfg.out_dir, cfg.device, cfg.ema)
        baselines = [(d, load_model(d, cfg.device, cfg.ema)[0]) for d in cfg.baselines]
        scorer = load_model(cfg.scorer, cfg.device)[0] if cfg.scorer else None
        tokenizer = get_tokenizer(ckpt["dataset_meta"]["tokenizer"])
    except ValueError as e:
        fail(e)
    for key, m in [("scorer", scorer)] * bool(scorer) + [("baselines", m) for _, m in baselines]:
        check(cfg, key, m.config.vocab_size == model.config.vocab_size, "has another vocabulary")
    trained = ckpt["train_config"]  # a converted model was not trained here: --dataset
    data = cfg.data_dir or trained.get("data_dir", "data"), cfg.dataset or trained.get("dataset")
    alpha0 = model.config.alpha0 if cfg.alpha0 is None else cfg.alpha0
    print(f"{cfg.out_dir}/ckpt.pt (iter {ckpt['iter_num']}): variant {model.config.variant}, "
          f"L = {model.config.block_size}, trained for alpha0 = {model.config.alpha0}; {dtype}")
    if cfg.grid:
        words = training_words(*data) if tokenizer.name == "bytes" and data[1] else None
        runs = [(cfg.out_dir, model, list(cfg.alpha0s or [alpha0]))]
        runs += [(d, m, [m.config.alpha0]) for d, m in baselines]
        grid = cells(runs, cfg, lambda m, **kw: sample_cell(
            m, cfg.num_samples, cfg.batch_size, cfg.seed, amp, scorer, tokenizer.eot_id, words,
            **kw))
        check(cfg, "grid", any("skipped" not in c for c in grid), "skipped each cell: no grid.json")
        with open(os.path.join(cfg.out_dir, "grid.json"), "w") as f:
            json.dump({"settings": vars(cfg), "dtype": dtype, "cells": grid}, f, indent=1)
        if scorer is not None:
            plot_grid(grid, os.path.join(cfg.out_dir, "grid.png"), f"scored by {cfg.scorer}")
        print(f"wrote {cfg.out_dir}/grid.json")
        return grid
    check(cfg, "dataset", data[1], "is needed: the checkpoint does not say its dataset")
    try:
        x = held_out(*data, model.config.block_size, cfg.windows).to(cfg.device)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"alpha0 = {alpha0}; {len(x)} held-out windows of {data[1]}")
    results = {"out_dir": cfg.out_dir, "alpha0": alpha0, "windows": len(x)}
    with amp:
        values = likelihoods(model, x, alpha0, cfg.orders, cfg.seed, cfg.batch_size)
    for key, v in values.items():
        (mean, se), ratio = mean_se(v), "minus" in key
        label = "  minus the NELBO" if ratio else "NELBO" if key == "nelbo" else "exact K" + key[7:]
        print(f"  {label:24s} {mean:.4f} +- {se:.4f} nats/token   perplexity{' ratio' * ratio} "
              "{:.3f} +- {:.3f}".format(*perplexity(mean, se)))
        results[key] = {"mean": mean, "se": se}
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    logged = os.path.exists(os.path.join(cfg.out_dir, "log.jsonl"))
    if cfg.plots and logged and (plt := pyplot("plots")):
        plot_training(cfg, model, amp, plt)
        print(f"wrote {cfg.out_dir}/eval.json, curves.png and decoding.png")
    return results


if __name__ == "__main__":
    main()
