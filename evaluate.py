"""
Evaluate a model: likelihoods with their standard errors on held-out windows, and pictures of the run.

    python evaluate.py --out_dir=out                                    # a checkpoint of train.py
    python evaluate.py --out_dir=out --orders 1 16 --windows=256 --alpha0=1
    python evaluate.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-1 --alpha0=1 --dataset=owt   # a GPT-2 dataset

Prints, per token and as perplexity, mean +- standard error over the windows:
- the NELBO (one draw of the noise per window; an upper bound on -log p(x));
- the "exact" likelihood of the sampler decoding one token per call, for K generation orders per window: K = 1 is
  the exact -log p(x | order) of one random order, and log-mean-exp over K orders is an importance-weighted bound
  on -log p(x) that tightens as K grows (variant B only: the clean tokens of (A) see each other both ways);
- the difference of each "exact" estimate and the NELBO on the same windows (a paired standard error).
With matplotlib installed it also draws <out_dir>/curves.png (the training curves of log.jsonl: loss, its MDM and
AR terms, validation NELBO) and <out_dir>/decoding.png (the network call that decoded each position of a sample,
at alpha0 = 1, 0.25 and 0).
The corpus word rate that sample.py and sweep.py print is defined here too (`corpus_word_rate`).
"""
import argparse
import json
import math
import os
import re

import numpy as np
import torch

import prepare_data
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


# -----------------------------------------------------------------------------------------------------------


def die(msg):
    raise SystemExit(f"evaluate.py: {msg}")


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
    args = parser.parse_args(argv)
    try:  # every setting is checked here, before the model is read
        device = check_args(args, (
            ("windows", args.windows >= 2, "must be at least 2 (for a standard error)"),
            ("orders", all(k >= 1 for k in args.orders), "each K must be at least 1"),
            ("batch_size", args.batch_size >= 1, "must be at least 1")))
        model, ckpt = load_model(args.out_dir, args.init_from, device, args.ema)
        trained = ckpt["train_config"] if ckpt else {}
        alpha0 = args.alpha0 if args.alpha0 is not None else trained.get("alpha0")
        data_dir, dataset = args.data_dir or trained.get("data_dir", "data"), args.dataset or trained.get("dataset")
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
