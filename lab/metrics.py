"""What the lab measures: likelihoods, and the quality and cost of samples."""
import math
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from data import Windows
from lab.common import sync


@torch.no_grad()
def likelihoods(model, x, alpha0=None, orders=(1, 16), seed=0, batch=32):
    """{name: per-token values of the windows x}: the NELBO (a draw of t and masks a window), for
    (B) the "exact" likelihood with K orders for each K in orders, and its paired difference with
    the NELBO. Each estimate draws from a generator seeded `seed`, the same for every model."""
    def per_token(fn):
        g = torch.Generator(x.device).manual_seed(seed)
        rows = [fn(x[i:i + batch], g).float().cpu() for i in range(0, len(x), batch)]
        return torch.cat(rows).numpy() / x.size(1)

    out = {"nelbo": per_token(lambda b, g: model.nelbo(b, alpha0, g))}
    for k in orders if model.config.variant == "B" else ():
        out[f"exact_k{k}"] = per_token(lambda b, g: model.exact_nll(b, alpha0, k, g))
        out[f"exact_k{k}_minus_nelbo"] = out[f"exact_k{k}"] - out["nelbo"]
    return out


def words(text):  # of the corpus word rate: ASCII letters and apostrophes, lowercased, 2+ long
    return [w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 2]


def training_words(data_dir, dataset):
    """The set of words of a byte-level dataset's training split."""
    windows = Windows(data_dir, dataset, "train", 1)
    if windows.meta["tokenizer"] != "bytes":
        raise ValueError("the corpus word rate is for byte-level datasets only")
    text = np.concatenate(windows.shards).astype(np.uint8).tobytes().decode(errors="replace")
    return set(words(text))


def corpus_word_rate(texts, vocabulary):
    """The share of the texts' words found in vocabulary (the training text's): a cheap, model-free
    check that samples read like the corpus. NaN if there are no words."""
    found = [w in vocabulary for text in texts for w in words(text)]
    return sum(found) / len(found) if found else math.nan


@torch.no_grad()
def generative_nll(scorer, samples, eot_id, batch=32):
    """(mean, standard error) of -log p per scored token of the samples under scorer (an alpha0 =
    0 model) read left to right; generative perplexity is its exp. The official end-of-text rule:
    every token but the end-of-text ones is scored, and each sample's first. A token-weighted mean,
    the ratio estimate's standard error over samples."""
    nll, count = [], []
    for x in samples.split(batch):
        order = torch.arange(x.size(1), device=x.device).expand_as(x)
        h, _, _ = scorer.sequential_forward(x, order, torch.zeros_like(x[:, 0]))
        token = F.cross_entropy(scorer.lm_head(h).float().transpose(1, 2), x, reduction="none")
        scored = (x != eot_id) | ((x == eot_id).cumsum(1) == 1)  # and each sample's first eot
        nll.append((token * scored).sum(1).double().cpu())
        count.append(scored.sum(1).double().cpu())
    nll, count = torch.cat(nll), torch.cat(count)
    mean, n = float(nll.sum() / count.sum()), len(nll)
    se = ((nll - mean * count) ** 2).sum().sqrt() / count.sum() * math.sqrt(n / max(n - 1, 1))
    return mean, float(se)


def unigram_entropy(row):  # nats, of one sample's token frequencies (the official code's diversity)
    counts = np.bincount(row)
    p = counts[counts > 0] / len(row)
    return float(-(p * np.log(p)).sum())


def timed_generate(model, n, batch_size, seed, amp, **kw):
    """(samples (n, L), each one's NFE, each batch's seconds between two device syncs): generate in
    batches (a prompt of n rows split with them), sample i from stream seed + i."""
    device, xs, nfes, seconds = model.wte.weight.device, [], [], []
    for first in range(0, n, batch_size):
        sync(device)
        t0 = time.perf_counter()
        b, plan, prompt = min(batch_size, n - first), kw.get("plan"), kw.get("prompt")
        batch = {"plan": plan(b, seed + first) if plan else None,  # a plan may be made a batch
                 "prompt": prompt[first:first + b] if getattr(prompt, "ndim", 0) == 2 else prompt}
        with amp:
            out = model.generate(b, seed=seed + first, **kw | batch)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        xs.append(out.x)
        nfes.append(out.nfe.cpu())
    return torch.cat(xs), torch.cat(nfes), seconds


def sample_cell(model, n, batch_size, seed, amp, scorer=None, eot_id=None, vocabulary=None, **kw):
    """A cell of a sampling grid: n samples of generate(**kw), their mean NFE, seconds a batch, mean
    entropy, NLL under scorer and its standard error, and the word rate (vocabulary: bytes')."""
    samples, nfe, seconds = timed_generate(model, n, batch_size, seed, amp, **kw)
    cell = {"nfe": float(nfe.float().mean()), "seconds_per_batch": float(np.mean(seconds)),
            "batch_size": min(batch_size, n),
            "entropy": float(np.mean([unigram_entropy(r) for r in samples.cpu().numpy()]))}
    if scorer is not None:
        cell["gen_nll"], cell["gen_nll_se"] = generative_nll(scorer, samples, eot_id)
    if vocabulary is not None:
        texts = [bytes(row).decode(errors="replace") for row in samples.tolist()]
        cell["word_rate"] = corpus_word_rate(texts, vocabulary)
    return cell
