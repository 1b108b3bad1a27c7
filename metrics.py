"""
What the scripts measure, shared by evaluate.py and sweep.py: likelihoods with standard errors, the sample-quality
cell (samples, their cost, generative NLL, entropy, word rate) and the Sudoku solve rate.
"""
import math
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from data import Windows, load_puzzles, valid_sudoku
from runtime import sync


def mean_se(values):
    """Mean and standard error of the mean."""
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


@torch.no_grad()
def per_token(fn, x, batch=32):
    """fn(rows) -> (rows,) nats per sequence, over x in batches: the values per token of every window, as numpy."""
    return torch.cat([fn(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)]).numpy() / x.size(1)


def likelihoods(model, x, alpha0=None, orders=(1, 16), seed=0, batch=32):
    """{name: per-token values over the windows x}: the NELBO (one draw of the noise per window), and for (B) the
    "exact" likelihood with K generation orders for each K in orders and its paired difference with the NELBO. Every
    estimate draws from a generator seeded `seed`: the same noise and orders for every model."""
    def generator():
        return torch.Generator(device=x.device).manual_seed(seed)

    gen = generator()
    out = {"nelbo": per_token(lambda b: model.nelbo(b, alpha0, gen), x, batch)}
    for k in orders if model.config.variant == "B" else ():
        gen = generator()
        out[f"exact_k{k}"] = per_token(lambda b: model.exact_nll(b, alpha0, k, gen), x, batch)
        out[f"exact_k{k}_minus_nelbo"] = out[f"exact_k{k}"] - out["nelbo"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Sample quality

def words(text):
    """The words of a text for the corpus word rate: runs of ASCII letters and apostrophes, lowercased, 2+ long."""
    return [w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 2]


def training_words(data_dir, dataset):
    """The set of words of a byte-level dataset's training split."""
    windows = Windows(data_dir, dataset, "train", 1)
    if windows.meta["tokenizer"] != "bytes":
        raise ValueError("the corpus word rate is defined for byte-level datasets only")
    return set(words(np.concatenate(windows.arrays).astype(np.uint8).tobytes().decode("utf-8", errors="replace")))


def corpus_word_rate(texts, vocabulary):
    """The fraction of the words of the texts (samples, prompt excluded) that occur in `vocabulary` (the words of
    the training text): a cheap, model-free check that samples read like the corpus. NaN if there are no words."""
    found = [w in vocabulary for text in texts for w in words(text)]
    return sum(found) / len(found) if found else math.nan


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


def timed_generate(model, n, batch_size, seed, amp, **kw):
    """(samples (n, L), NFE of each batch, wall seconds of each batch): model.generate in batches from one generator
    seeded `seed`, each batch timed between two device synchronizations (token sampling included)."""
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    xs, nfes, seconds = [], [], []
    for first in range(0, n, batch_size):
        sync(device)
        t0 = time.perf_counter()
        with amp:
            out = model.generate(min(batch_size, n - first), generator=generator, **kw)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        nfes.append(out.nfe)
        xs.append(out.x)
    return torch.cat(xs), nfes, seconds


def sample_cell(model, n, batch_size, seed, amp, scorer=None, eot_id=None, vocabulary=None, **kw):
    """One cell of a sampling grid: n samples of model.generate(**kw), and their cost and quality: mean NFE, wall
    seconds per batch, mean unigram entropy, generative NLL under `scorer` (with its standard error) and, for
    byte-level data (`vocabulary`: the training words), the corpus word rate."""
    samples, nfes, seconds = timed_generate(model, n, batch_size, seed, amp, **kw)
    cell = {"nfe": float(np.mean(nfes)), "seconds_per_batch": float(np.mean(seconds)), "batch_size": min(batch_size, n),
            "entropy": float(np.mean([unigram_entropy(r) for r in samples.cpu().numpy()]))}
    if scorer is not None:
        cell["gen_nll"], cell["gen_nll_se"] = generative_nll(scorer, samples, eot_id)
    if vocabulary is not None:
        texts = [bytes(row).decode("utf-8", errors="replace") for row in samples.tolist()]
        cell["word_rate"] = corpus_word_rate(texts, vocabulary)
    return cell


# ----------------------------------------------------------------------------------------------------------
# Sudoku

def solve_sudoku(model, data_dir, dataset, n, batch_size, amp, seed=0, bins=((30, 34), (35, 39), (40, 45)), **kw):
    """Sudoku as infilling: the first n held-out puzzles of a Sudoku dataset, the givens as the prompt, every other
    cell a mask, decoded by model.generate(**kw). The rows of a batch must leave the same number of cells to
    generate, so the puzzles are grouped by their number of givens. A puzzle is solved when its completed grid is a
    valid Sudoku and keeps every given. Returns {"all": {solved, se, n, nfe, seconds}, "givens a-b": ...}: the share
    solved with its standard error, the mean NFE, and the wall seconds of all batches."""
    puzzles = torch.from_numpy(load_puzzles(data_dir, dataset)[0][:n])  # unique solutions: solved = valid + givens
    device = model.wte.weight.device
    n_givens = (puzzles != model.mask_id).sum(1)
    solved, nfe, seconds = torch.zeros(len(puzzles), dtype=torch.bool), torch.zeros(len(puzzles)), {}
    for g in n_givens.unique().tolist():
        rows = (n_givens == g).nonzero().squeeze(1)
        for first in range(0, len(rows), batch_size):
            r = rows[first:first + batch_size]
            prompt = puzzles[r].to(device)
            x, nfes, secs = timed_generate(model, len(r), len(r), seed + first, amp, prompt=prompt, **kw)
            given = prompt != model.mask_id
            keeps = ((x == prompt) | ~given).all(1).cpu()
            solved[r] = torch.from_numpy(valid_sudoku(x.cpu().numpy())) & keeps
            nfe[r], seconds[(g, first)] = float(nfes[0]), secs[0]
    out = {}
    for name, lo, hi in [("all", 0, 81)] + [(f"givens {a}-{b}", a, b) for a, b in bins]:
        sel = (n_givens >= lo) & (n_givens <= hi)
        if sel.any():
            p, m = solved[sel].double().mean().item(), int(sel.sum())
            out[name] = {"solved": p, "se": math.sqrt(p * (1 - p) / m), "n": m, "nfe": nfe[sel].mean().item(),
                         "seconds": sum(s for (g, _), s in seconds.items() if lo <= g <= hi)}
    return out
