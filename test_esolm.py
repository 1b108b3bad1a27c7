"""
The method's identities, each checked against an independent statement of it (README.md).

    python -m pytest -q test_esolm.py
"""
import dataclasses
import itertools
import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import esolm
from esolm import (
    EPS,
    EsoLM,
    EsoLMConfig,
    Plan,
    adaptive_score,
    alpha_t,
    apply_rope,
    diffusion_mask,
    mdm_weight,
    random_plan,
    rope_tables,
    sample_tokens,
    sequential_mask,
    stratified_t,
)

V, L = 13, 12
TIMEOUT = 300  # seconds a test may take (the slowest takes about 13 on 2 CPU cores)
CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(autouse=True)
def watchdog():
    """A test that hangs (say, a decode loop whose rows stop advancing) fails after 5 minutes, with
    the traceback of where it was, and the others run on."""
    def stop(signum, frame):
        raise TimeoutError(f"the test ran past {TIMEOUT} s")

    if hasattr(signal, "SIGALRM"):  # not on Windows
        signal.signal(signal.SIGALRM, stop)
        signal.alarm(TIMEOUT)
    yield
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)


def sharp_model(variant="B", dtype=torch.float64, vocab_size=V, block_size=L, seed=0, alpha0=None):
    """A tiny model with large random weights: attention is peaked, so a wrong mask or a stale cache
    entry moves the logits far beyond any tolerance (at GPT-2's init every row is nearly
    uniform)."""
    torch.manual_seed(seed)
    alpha0 = alpha0 if alpha0 is not None else 1.0 if variant == "MDLM" else 0.25
    model = EsoLM(EsoLMConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                              variant=variant, alpha0=alpha0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.35)
    return model.to(dtype).eval()


def gen(model, **kw):
    """(Samples, the logits each call hands to sample_tokens) of model.generate(**kw)."""
    logits, sample = [], esolm.sample_tokens

    def spy(lg, *args):
        logits.append(lg.to(torch.promote_types(lg.dtype, torch.float32)))
        return sample(lg, *args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(esolm, "sample_tokens", spy)
        return model.generate(**kw), logits


def draws(seed, B, L_=L):
    """The sampler's documented streams: row b's uniforms come from a generator seeded seed + b."""
    return torch.stack([torch.rand(3, L_, generator=torch.Generator().manual_seed(seed + b)) for b in range(B)], 1)


def assert_same_run(a, b, tol):
    (out1, logits1), (out2, logits2) = a, b
    assert torch.equal(out1.x, out2.x) and torch.equal(out1.decoded_by, out2.decoded_by)
    assert [t.shape for t in logits1] == [t.shape for t in logits2]
    for x, y in zip(logits1, logits2):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)


M = V  # the mask id of the tiny models
PROMPTS = {
    "none": None,
    "prefix": torch.tensor([3, 1, 4, 1]),
    "infill": torch.tensor([2, 7, M, M, 1, M, 8, M, M, M, 0, M]),
    "mixed": torch.tensor([[2, 7, M, M, 1, 4, 8, 5], [M, M, M, M, M, M, M, M], [3, 1, 4, 1, 5, 9, 2, 6]]),
}  # "mixed": rows that leave 10, 12 and 4 positions to generate, in one batch
MODES = {"planned": {}, "confidence": {"adaptive": "confidence"},
         "margin_tau": {"adaptive": "margin", "threshold": 0.3}, "confidence_tau": {"adaptive": "confidence",
                                                                                    "threshold": 0.9}}


# ---------------------------------------------------------------------------------------------------------------
# RoPE: a score depends on the offset between original positions only

def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(64, 8, 10000.0)
    q, k = torch.randn(2, 1, 1, 8)

    def score(p, p2):
        return (apply_rope(q, cos[p], sin[p]) * apply_rope(k, cos[p2], sin[p2])).sum()

    torch.testing.assert_close(score(3, 10), score(40, 47))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(3, 10), score(3, 11))


# ---------------------------------------------------------------------------------------------------------------
# The cache is exact: cached and uncached sampling give the same tokens and logits, in every mode

@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("alpha0,steps", [(0, 4), (0.25, 8), (1, 12), (0.7, 3)])
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_cached_equals_uncached(variant, alpha0, steps, prompt, mode):
    model, p = sharp_model(variant), PROMPTS[prompt]
    kw = dict(num_samples=3, alpha0=alpha0, steps=steps, prompt=p, seed=5, **MODES[mode])
    cached, uncached = gen(model, **kw), gen(model, kv_cache=False, **kw)
    assert_same_run(cached, uncached, 1e-10)
    if (alpha0, steps, mode) == (0.7, 3, "planned"):  # calls that decode several tokens
        assert max(t.size(0) for t in cached[1]) > 3


@pytest.mark.parametrize("device", ["cpu"] + CUDA)
@pytest.mark.parametrize("variant", ["A", "B"])
def test_cached_equals_uncached_in_float32(variant, device):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # full float32 matmuls
    model = sharp_model(variant, torch.float32).to(device)
    kw = dict(num_samples=3, alpha0=0.5, steps=4, prompt=PROMPTS["mixed"].to(device), seed=2)
    assert_same_run(gen(model, **kw), gen(model, kv_cache=False, **kw), 1e-4)


def test_feeding_a_row_more_than_it_needs_stays_exact():
    """The exactness conditions of a batched window, checked by a decoding loop written here: each
    call of (B) feeds, besides what the row needs ([n_cached, d + k)), e1 tokens before its frontier
    (clean and final: fed again) and e2 masks after it (later in its order, fed again before they
    are cached). Every call's logits must be the uncached reference's, which a stale cache entry
    would break."""
    model, B = sharp_model("B"), 2
    out = model.generate(B, 0.5, 3, seed=7, kv_cache=False)
    plan = random_plan(torch.ones(B, L, dtype=torch.bool), 0.5, 3, draws(7, B)[:2])
    order = plan.order.gather(1, out.decoded_by.gather(1, plan.order).argsort(dim=1, stable=True))  # as decoded
    xs, calls = out.x.gather(1, order), out.decoded_by.gather(1, order)
    for e1, e2 in [(0, 0), (1, 2), (3, 5)]:
        for a in (block.attn for block in model.blocks):
            a.k_cache = torch.full((B, L + 1, 2, 16), 1e3, dtype=torch.float64)  # garbage until written
            a.v_cache = torch.full_like(a.k_cache, -1e3)
        d_prev = torch.zeros(B, dtype=torch.long)
        for j in range(1, int(calls.max()) + 1):
            d, k = (calls < j).sum(1), (calls == j).sum(1)
            lo, hi = (d_prev - e1).clamp(min=0), (d + k + e2).clamp(max=L)
            W = int((hi - lo).max())
            s = torch.where(torch.arange(W) < (hi - lo)[:, None], lo[:, None] + torch.arange(W), L)
            zs = torch.where(torch.arange(L) < d[:, None], xs, model.mask_id)
            g = s.clamp(max=L - 1)
            mask = (torch.arange(L + 1) <= s[..., None]).unsqueeze(1)
            with torch.no_grad():
                h = model(zs.gather(1, g).masked_fill(s == L, model.mask_id), order.gather(1, g), mask, s)
                ref = model.diffusion_forward(zs, order, torch.zeros(B, dtype=torch.long))
            for b in range(B):
                got = h[b, d[b] - lo[b]:d[b] - lo[b] + k[b]]
                torch.testing.assert_close(got, ref[b, d[b]:d[b] + k[b]], atol=1e-10, rtol=0)
            d_prev = d


# ---------------------------------------------------------------------------------------------------------------
# Each row its own schedule: a row samples the same alone as in any batch

@pytest.mark.parametrize("variant", ["A", "B", "MDLM"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_row_samples_the_same_alone_as_in_a_batch(variant, mode):
    model, p = sharp_model(variant), PROMPTS["mixed"]
    together, logits = gen(model, num_samples=3, steps=5, prompt=p, seed=11, **MODES[mode])
    rows = [0] * 3
    for b in range(3):
        alone, alone_logits = gen(model, num_samples=1, steps=5, prompt=p[b:b + 1], seed=11 + b, **MODES[mode])
        assert torch.equal(alone.x[0], together.x[b]) and torch.equal(alone.decoded_by[0], together.decoded_by[b])
        assert alone.nfe.tolist() == [together.nfe[b]]
        for j, lg in enumerate(alone_logits):  # its logits: its slice of the batch's at the same call
            n = [int((together.decoded_by[r] == j + 1).sum()) for r in range(3)]
            torch.testing.assert_close(lg, logits[j][sum(n[:b]):sum(n[:b + 1])], atol=1e-10, rtol=0)
            rows[b] += 1
    assert len(set(together.nfe.tolist())) > 1 and rows == together.nfe.tolist()  # rows that end apart


# ---------------------------------------------------------------------------------------------------------------
# Adaptive orders and the threshold

def test_a_threshold_above_every_score_decodes_one_token_a_call():
    """tau above every score: each diffusion call decodes the single best mask, as the adaptive
    order does with a plan of one token a call, for the same diffusion budget and order."""
    model, B = sharp_model("B"), 3
    z = torch.full((B, L), model.mask_id)
    plan = random_plan(z == model.mask_id, 0.5, 4, draws(3, B)[:2])
    budget = plan.ks.sum(1)
    ones = (torch.arange(int(budget.max())) < budget[:, None]).long()
    a = model.generate(B, 0.5, plan=Plan(plan.order, ones), adaptive="margin", seed=3)
    b = model.generate(B, 0.5, plan=plan, adaptive="margin", threshold=1.01, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.decoded_by, b.decoded_by)
    assert b.nfe.tolist() == (L * torch.ones(B, dtype=torch.long)).tolist()


def test_the_threshold_is_inclusive_and_bounded_by_the_diffusion_budget():
    """A model whose logits are all equal scores every mask 1/V exactly: tau = 1/V decodes the whole
    diffusion budget in its first call, and the next representable tau above it one token a call."""
    model = sharp_model("B")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    plan = random_plan(torch.ones(2, L, dtype=torch.bool), 0.5, 4, draws(0, 2)[:2])
    budget = plan.ks.sum(1).tolist()
    for tau, first in [(1 / V, budget), (math.nextafter(1 / V, 1), [1, 1])]:
        out = model.generate(2, 0.5, plan=plan, adaptive="confidence", threshold=tau, seed=0)
        assert [int((row == 1).sum()) for row in out.decoded_by] == first
        n_seq = [L - b for b in budget]  # then the sequential phase: one a call, left to right
        for row, b, n in zip(out.decoded_by.tolist(), budget, n_seq):
            seq = sorted(range(L), key=lambda i: row[i])[b:]
            assert [row[i] for i in sorted(seq)] == sorted(row[i] for i in seq) and len(set(row[i] for i in seq)) == n


def independent_score(logits, temperature, rule):
    """The adaptive scores written again: the top probability of softmax(logits / T), or the top
    two's gap."""
    p = (logits.double() / (temperature or 1)).softmax(-1).sort(-1, descending=True).values
    return p[..., 0] - p[..., 1] if rule == "margin" else p[..., 0]


@pytest.mark.parametrize("rule", ["confidence", "margin"])
@pytest.mark.parametrize("threshold", [None, 0.6])
def test_adaptive_mdlm_decodes_what_an_independent_forward_scores_best(rule, threshold):
    """MDLM sees everything both ways, so the order changes no forward: each call must decode the k
    best masks of an independent forward over the canvas before it (with a threshold: every mask
    that scores it or more, the best one at least), scored at temperature 0.7 by rules written again
    here. (Given tokens in every row: over all masks RoPE alone leaves the scores nearly tied.)"""
    model, p = sharp_model("MDLM"), torch.tensor([[2, 7, M, M, 1, 4, 8], [M, M, 3, M, M, M, 6], [3, M, 4, 1, 5, 9, 2]])
    out = model.generate(3, 1.0, 5, prompt=p, adaptive=rule, threshold=threshold, temperature=0.7, seed=2)
    pos = torch.arange(L).expand(3, L)
    for c in range(1, int(out.nfe.max()) + 1):
        canvas = torch.where(out.decoded_by < c, out.x, model.mask_id)
        with torch.no_grad():
            score = independent_score(model.lm_head(model(canvas, pos)), 0.7, rule)
        score = score.masked_fill(canvas != model.mask_id, -1)  # only the masks compete
        for b in range(3):
            chosen = set((out.decoded_by[b] == c).nonzero()[:, 0].tolist())
            if not chosen:
                continue
            k = len(chosen) if threshold is None else max(1, int((score[b] >= threshold).sum()))
            top = score[b].sort(descending=True).values
            assert k == int((canvas[b] == M).sum()) or top[k - 1] - top[k] > 1e-9  # no tie at the cut
            assert chosen == set(score[b].topk(k).indices.tolist()), (c, b)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_adaptive_score_against_its_statement(temperature):
    logits = torch.randn(4, 6, V) * 3
    for rule in ("confidence", "margin"):
        torch.testing.assert_close(adaptive_score(logits, temperature, rule),
                                   independent_score(logits, temperature, rule))
    assert not torch.allclose(adaptive_score(logits, temperature, "margin"), independent_score(logits, 1, "margin"))
    torch.testing.assert_close(adaptive_score(logits, 0, "margin"), independent_score(logits, 1, "margin"))


# ---------------------------------------------------------------------------------------------------------------
# Token draws and the sampling settings

def test_sample_tokens_draws_the_filtered_distribution_exactly():
    """Over an even grid of N values of u, inverse-CDF sampling gives each token its probability to
    1/N: unsorted logits, temperature 0.7, and a nucleus that cuts the distribution in the
    middle."""
    logits = torch.tensor([0.2, 2.0, -1.0, 1.1, 0.7, -0.3])
    p = (logits.double() / 0.7).softmax(-1)
    top = p.argsort(descending=True)
    mass = p[top].cumsum(0)
    keep = top[:int((mass < 0.8).sum()) + 1]  # the fewest likeliest tokens whose mass reaches 0.8
    assert 1 < len(keep) < len(p)
    want = torch.zeros_like(p)
    want[keep] = p[keep] / p[keep].sum()
    N = 100_000
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    tokens = sample_tokens(logits.expand(N, -1), u, 0.7, 0.8)
    freq = torch.bincount(tokens, minlength=len(p)).double() / N
    assert (freq - want).abs().max() < 2 / N, (freq, want)
    freq = torch.bincount(sample_tokens(logits.expand(N, -1), u, 0.7, 1.0), minlength=len(p)).double() / N
    assert (freq - p).abs().max() < 2 / N  # no nucleus: the softmax itself
    assert sample_tokens(logits.expand(3, -1), u[:3], 0.0, 0.5).eq(1).all()  # temperature 0: the argmax
    # u = 0 exactly (torch.rand can draw it): the first token of positive probability, never one cut
    assert sample_tokens(logits[None], torch.zeros(1, dtype=torch.float64), 0.7, 0.8).item() in keep
    # a mass that reaches top_p exactly stops there: of 4 equal tokens, top_p = 0.5 keeps 2
    tie = torch.bincount(sample_tokens(torch.zeros(N, 4), u, 1.0, 0.5), minlength=4)
    assert sorted(tie.tolist()) == [0, 0, N // 2, N // 2]


def test_generate_hands_the_model_logits_and_each_positions_draw_to_the_samplers():
    """The settings reach the draws unchanged: sample_tokens gets the output layer's logits of
    exactly the masks each call decodes, each with its position's uniform from its row's stream, and
    the temperature and nucleus given; adaptive_score gets the same logits and the temperature (all
    at non-defaults)."""
    model, seen = sharp_model("B"), {"head": [], "sample": [], "score": []}
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen["head"].append(out))
    sample, score = esolm.sample_tokens, esolm.adaptive_score
    with pytest.MonkeyPatch.context() as m:
        m.setattr(esolm, "sample_tokens", lambda *a: seen["sample"].append(a) or sample(*a))
        m.setattr(esolm, "adaptive_score", lambda *a: seen["score"].append(a) or score(*a))
        out = model.generate(2, 0.5, 3, prompt=PROMPTS["prefix"], temperature=0.7, top_p=0.8,
                             adaptive="margin", threshold=0.4, seed=9)
    hook.remove()
    u = draws(9, 2)[2].double()
    assert len(seen["sample"]) == len(seen["head"]) == int(out.nfe.max())
    for j, (head, (logits, uj, t, top_p), sc) in enumerate(zip(seen["head"], seen["sample"], seen["score"]), 1):
        assert (t, top_p) == (0.7, 0.8) and sc[1:] == (0.7, "margin") and sc[0] is head
        rows = [(out.decoded_by[b] == j).nonzero()[:, 0] for b in range(2)]
        assert sorted(uj.tolist()) == sorted(torch.cat([u[b, r] for b, r in enumerate(rows)]).tolist())
        heads = [head[b].double() for b in range(2) for _ in rows[b]]
        for lg in logits:  # each row handed over is one of the output layer's rows for this call
            assert any(torch.equal(lg.double(), h) for hb in heads for h in hb)
        assert torch.equal(sample(logits, uj, 0.7, 0.8), torch.cat([out.x[b, r] for b, r in enumerate(rows)])[
            torch.cat([u[b, r] for b, r in enumerate(rows)]).argsort()][uj.argsort().argsort()])


def test_given_tokens_come_in_a_random_order_but_left_to_right_at_alpha0_zero():
    """The given tokens are z0's clean tokens: in a random order (about half of all pairs inverted),
    and left to right at alpha0 = 0, where the model is an AR model reading its prompt."""
    to_gen = torch.ones(400, L, dtype=torch.bool)
    to_gen[:, :8] = False  # 8 given tokens a row
    for alpha0, share in [(0.5, 0.5), (0.0, 0.0)]:
        order = random_plan(to_gen, alpha0, 4, draws(0, 400)[:2]).order[:, :8]
        inverted = sum(a > b for row in order.tolist() for a, b in itertools.combinations(row, 2))
        assert abs(inverted / (400 * 28) - share) < 0.02
        assert set(order.flatten().tolist()) == set(range(8))


def test_rows_draw_their_own_schedules_and_orders():
    plan = random_plan(torch.ones(6, L, dtype=torch.bool), 0.5, 4, draws(0, 6)[:2])
    assert len({tuple(r) for r in plan.order.tolist()}) == 6 and len({tuple(r) for r in plan.ks.tolist()}) > 1
    assert torch.equal(plan.order.sort(1).values, torch.arange(L).expand(6, L))  # each a permutation
    k = plan.ks.tolist()
    assert all(x > 0 for row in k for x in row[:sum(1 for v in row if v)]) and all(
        row[sum(1 for v in row if v):] == [0] * (len(row) - sum(1 for v in row if v)) for row in k)


def test_the_schedule_reveals_about_alpha0():
    for alpha0 in (0.1, 0.5, 0.9):
        plan = random_plan(torch.ones(2000, 100, dtype=torch.bool), alpha0, 16, draws(1, 2000, 100)[:2])
        p = (alpha0 - alpha0 * EPS) / (1 - alpha0 * EPS)  # the chance a mask is revealed by t = 0
        got = plan.ks.sum().item() / 200_000
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / 200_000), (got, p)
    plan = random_plan(torch.ones(3, 50, dtype=torch.bool), 1.0, 1, draws(0, 3, 50)[:2])
    assert plan.ks.tolist() == [[50]] * 3  # one step at alpha0 = 1 unmasks everything at once


# ---------------------------------------------------------------------------------------------------------------
# Sampler invariants

@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("alpha0,steps", [(0.0, 3), (0.5, 4), (1.0, 5)])
def test_sampler_invariants(variant, alpha0, steps):
    model, p = sharp_model(variant), PROMPTS["mixed"]
    out, logits = gen(model, num_samples=3, alpha0=alpha0, steps=steps, prompt=p, seed=7)
    canvas = F.pad(p, (0, L - p.size(1)), value=M)
    assert out.x.shape == (3, L) and ((out.x >= 0) & (out.x < V)).all()  # never the mask
    assert torch.equal(out.x[canvas != M], canvas[canvas != M]) and (out.decoded_by[canvas != M] == 0).all()
    assert sum(t.size(0) for t in logits) == int((canvas == M).sum())
    plan = random_plan(canvas == M, alpha0, steps, draws(7, 3)[:2])
    for b in range(3):  # diffusion calls as planned, then the sequential phase left to right, a token a call
        row, ks = out.decoded_by[b], [k for k in plan.ks[b].tolist() if k]
        assert [int((row == j + 1).sum()) for j in range(len(ks))] == ks
        seq = (row > len(ks)).nonzero()[:, 0]
        assert row[seq].tolist() == list(range(len(ks) + 1, len(ks) + 1 + len(seq))) == sorted(row[seq].tolist())
        assert out.nfe[b] == len(ks) + len(seq)
    if alpha0 == 0:
        assert plan.ks.numel() == 0


@pytest.mark.parametrize("prompt", ["prefix", "infill"])
def test_alpha0_zero_reads_the_prompt_as_an_ar_model(prompt):
    """At alpha0 = 0 the given tokens go left to right, then each mask, each the greedy token of a
    causal forward over that order (the reference: one full forward a token)."""
    model, p = sharp_model("B", alpha0=0.0), PROMPTS[prompt]
    out, logits = gen(model, num_samples=2, temperature=0, prompt=p)
    canvas = F.pad(p, (0, L - len(p)), value=M).expand(2, L).clone()
    order = torch.cat([(canvas[0] != M).nonzero()[:, 0], (canvas[0] == M).nonzero()[:, 0]]).expand(2, L)
    n_given = int((canvas[0] != M).sum())
    assert len(logits) == L - n_given
    for i, lg in enumerate(logits):
        with torch.no_grad():
            ref = model.lm_head(model(canvas.gather(1, order), order))[:, n_given + i]
        torch.testing.assert_close(lg, ref, rtol=0, atol=1e-10)
        canvas[:, order[0, n_given + i]] = ref.argmax(-1)
    assert torch.equal(out.x, canvas)


def test_the_cache_is_preallocated_and_written_in_place():
    """The cache is allocated once, L + 1 slots a row, and written in place; without a net (whose
    shapes must stay) the rows done leave the batch once they are half of it: the cache is then
    cut to the rows left, a few times at most, and the samples are the same."""
    model, ptrs = sharp_model("B"), []
    forward = EsoLM.forward

    def spy(self, *args, **kw):
        ptrs.append((len(args[0]), *(b.attn.k_cache.data_ptr() for b in self.blocks)))
        return forward(self, *args, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(EsoLM, "forward", spy)
        kw = dict(num_samples=8, alpha0=0.5, steps=4, prompt=PROMPTS["mixed"][[0, 1, 2, 0, 1, 2, 1, 1]], seed=0)
        fixed = model.generate(**kw, net=model)
        assert len(ptrs) > 2 and len(set(ptrs)) == 1 and model.blocks[0].attn.k_cache.shape == (8, L + 1, 2, 16)
        ptrs.clear()
        cut = model.generate(**kw)
    rows = [p[0] for p in ptrs]
    assert rows[0] == 8 and rows[-1] <= 4 and 2 <= len(set(ptrs)) == len(set(rows)) <= 4  # 8, <= 4, ..
    assert all(b <= a for a, b in zip(rows, rows[1:])) and torch.equal(cut.x, fixed.x)
    assert torch.equal(cut.decoded_by, fixed.decoded_by) and torch.equal(cut.nfe, fixed.nfe)


def test_a_cached_call_computes_only_the_tokens_it_feeds():
    """A batched call pads its rows to one width with the sink slot L; the padding costs no work
    outside the attention: every MLP sees exactly the tokens fed (slot < L), no more."""
    model, fed, mlp = sharp_model("B"), [], []
    forward = EsoLM.forward

    def spy(self, idx, pos, mask=None, slots=None, *args, **kw):
        fed.append(None if slots is None else (int((slots < L).sum()), slots.numel()))
        return forward(self, idx, pos, mask, slots, *args, **kw)

    for block in model.blocks:
        block.c_fc.register_forward_hook(lambda m, args, out: mlp.append(args[0].shape[:-1].numel()))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(EsoLM, "forward", spy)
        model.generate(3, prompt=PROMPTS["mixed"], adaptive="margin", threshold=0.3, seed=1)
    assert len(fed) > 2 and any(n < width for n, width in fed)  # calls with padding
    assert mlp == [n for n, _ in fed for _ in model.blocks]


@pytest.mark.parametrize("variant, mode", [("A", "planned"), ("B", "planned"), ("A", "confidence"),
                                           ("B", "margin_tau")])
def test_each_call_feeds_each_row_its_slots_from_its_cache_frontier(variant, mode):
    """README, "why exact": a call feeds a row the slots [n_cached, d + n), the tokens decoded since
    they were last fed, then the n masks it reads (planned: the k it decodes; adaptive: all left, in
    the diffusion phase). n_cached is d before the last call; (A) caches nothing before its
    sequential phase. Each call's fed counts, from a spy, against those of the decoding record."""
    model, fed, p = sharp_model(variant), [], PROMPTS["mixed"]
    forward = EsoLM.forward

    def spy(self, idx, pos, mask=None, slots=None, *args, **kw):
        fed.append(sorted(n for n in (slots < L).sum(1).tolist() if n))
        return forward(self, idx, pos, mask, slots, *args, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(EsoLM, "forward", spy)
        out = model.generate(3, 0.5, 6, prompt=p, seed=2, **MODES[mode])
    z = F.pad(p, (0, L - p.size(1)), value=M)
    switch = (z != M).sum(1) + random_plan(z == M, 0.5, 6, draws(2, 3)[:2]).ks.sum(1)
    want = []
    for j in range(1, int(out.nfe.max()) + 1):  # d: slots decoded before call j, given ones first
        d, d_prev, k = ((out.decoded_by < i).sum(1) for i in (j, j - 1, j + 1))
        k = k - d
        n = torch.where((d < switch) & ("adaptive" in MODES[mode]), L - d, k)
        n_cached = d_prev if variant == "B" else torch.where(d_prev >= switch, d_prev, 0)
        want.append(sorted((d + n - n_cached)[d < L].tolist()))
    assert fed == want and any(a != b for a, b in zip(fed, fed[1:]))


def test_the_sampler_keeps_cudnn_attention_off(monkeypatch):
    """cuDNN attention makes a plan for every new shape (9x slower on an H200 with a growing
    cache)."""
    model, seen = sharp_model("B", torch.float32), []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(esolm.F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(torch.backends.cuda.cudnn_sdp_enabled()) or sdpa(*a, **k))
    for kv_cache in (True, False):
        model.generate(2, 0.5, 4, kv_cache=kv_cache)
    assert seen and not any(seen) and torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("training", [True, False])
def test_generate_samples_in_eval_mode_and_restores_the_callers_mode(training):
    model = sharp_model("B")
    model.config = dataclasses.replace(model.config, dropout=0.5)
    for block in model.blocks:
        block.dropout.p = 0.5
    model.train(training)
    a, b = model.generate(2, 0.5, 3, seed=1), model.generate(2, 0.5, 3, seed=1, kv_cache=False)
    assert torch.equal(a.x, b.x) and {m.training for m in model.modules()} == {training}


def test_all_given_needs_no_call():
    full = torch.randint(0, V, (L,))
    out, logits = gen(sharp_model("B"), num_samples=2, prompt=full)
    assert logits == [] and torch.equal(out.x, full.expand(2, L)) and out.nfe.tolist() == [0, 0]


@pytest.mark.parametrize("variant", ["A", "B"])
def test_under_bf16_autocast_the_cache_takes_its_dtype(variant):
    """The GPU's precision, on the CPU as a stand-in: the cache is bf16, prompts are kept, and the
    first call's logits (the same tokens in both paths) differ from float32 by bf16 rounding
    only."""
    model, p = sharp_model(variant, torch.float32), PROMPTS["mixed"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = gen(model, num_samples=3, alpha0=0.5, steps=4, prompt=p, seed=3)
    _, reference = gen(model, num_samples=3, alpha0=0.5, steps=4, prompt=p, seed=3, kv_cache=False)
    assert model.blocks[0].attn.k_cache.dtype == torch.bfloat16
    canvas = F.pad(p, (0, L - p.size(1)), value=M)
    assert ((out.x >= 0) & (out.x < V)).all() and torch.equal(out.x[canvas != M], canvas[canvas != M])
    torch.testing.assert_close(logits[0], reference[0], atol=0.5, rtol=0)  # ~10 roundings of 2^-9 on logits ~10


# ---------------------------------------------------------------------------------------------------------------
# Masks against brute force, written from the method's text (README, "The two attention masks")

def brute_diffusion(L_, c, variant):
    return [[j <= q if variant == "B" else (j < c if q < c else j < c or j <= q) for j in range(L_)]
            for q in range(L_)]


def brute_sequential(L_, c, variant):
    """The 2L layout [z ; x]: z rows/cols 0..L-1, x L..2L-1."""
    A = [[False] * (2 * L_) for _ in range(2 * L_)]
    for i in range(L_):
        A[i][i] = True  # a z-query sees itself and the x-keys before it
        for j in range(i):
            A[i][L_ + j] = True
        for j in range(L_):  # x: causal ((A): its clean block both ways), never z
            A[L_ + i][L_ + j] = j <= i or (variant == "A" and i < c and j < c)
    return A


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("L_", [1, 2, 3, 5])
def test_masks_equal_brute_force(variant, L_):
    n_clean = torch.arange(L_ + 1)
    got = diffusion_mask(n_clean, L_, variant)
    for b, c in enumerate(n_clean.tolist()):
        assert got[b, 0].tolist() == brute_diffusion(L_, c, variant)
    assert diffusion_mask(n_clean, L_, "MDLM").all()
    Mz = L_ - int(n_clean.min())
    z_mask, x_mask = sequential_mask(n_clean, Mz, L_, variant)
    x_mask = torch.ones(L_, L_, dtype=torch.bool).tril().expand(L_ + 1, 1, L_, L_) if x_mask is None else x_mask
    for b, c in enumerate(n_clean.tolist()):
        full = brute_sequential(L_, c, variant)
        for r in range(L_ - c):  # the z-query of sorted index c + r
            assert z_mask[b, 0, r].tolist() == [k == r for k in range(Mz)] + full[c + r][L_:]
        for r in range(L_ - c, Mz):  # padding: unread, but it must see something, or SDPA gives NaN
            assert z_mask[b, 0, r, r]
        assert x_mask[b, 0].tolist() == [row[L_:] for row in full[L_:]]


def test_mdlm_attends_both_ways_everywhere():
    model = sharp_model("MDLM")
    idx, pos = torch.randint(0, V + 1, (2, L)), torch.stack([torch.randperm(L) for _ in range(2)])
    with torch.no_grad():
        h = model(idx, pos)
        torch.testing.assert_close(h, model(idx, pos, torch.ones(L, L, dtype=torch.bool)), atol=1e-12, rtol=0)
        changed = model(torch.cat([idx[:, :-1], (idx[:, -1:] + 1) % V], 1), pos)
    assert (h[:, 0] - changed[:, 0]).abs().max() > 1e-3  # an early position sees a later token


@pytest.mark.parametrize("variant", ["A", "B"])
def test_the_ar_terms_forward_is_the_samplers_sequential_phase(variant):
    """The AR term's training forward (the compact layout), the method's full 2L layout with a
    brute-force mask, and the cached sampler give the same logits to the sequential phase's
    tokens."""
    model = sharp_model(variant)
    out, logits = gen(model, num_samples=1, alpha0=0.5, steps=3, seed=11)
    plan = random_plan(torch.ones(1, L, dtype=torch.bool), 0.5, 3, draws(11, 1)[:2])
    c = int(plan.ks.sum())  # the slot where the sequential phase starts
    order = plan.order.gather(1, out.decoded_by.gather(1, plan.order).argsort(dim=1, stable=True))
    sampler, xs = torch.stack(logits[-(L - c):], 1), out.x.gather(1, order)
    with torch.no_grad():
        h, s, valid = model.sequential_forward(xs, order, torch.tensor([c]))
        zs = xs.clone()
        zs[:, c:] = model.mask_id
        full_mask = torch.tensor(brute_sequential(L, c, variant))[None, None]
        full = model.lm_head(model(torch.cat([zs, xs], 1), torch.cat([order, order], 1), full_mask)[:, c:L])
    assert valid.all() and 0 < c < L and all(t.size(0) == 1 for t in logits[-(L - c):])
    for other in (model.lm_head(h), full):
        torch.testing.assert_close(sampler, other, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The loss and its estimators

def all_sequences(vocab, length):
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)))


@pytest.mark.parametrize("variant", ["A", "B"])
def test_alpha0_zero_is_exactly_an_ar_likelihood(variant):
    model = sharp_model(variant, vocab_size=3, block_size=4, alpha0=0.0)
    xs = all_sequences(3, 4)
    with torch.no_grad():
        a = model.nelbo(xs, 0.0, torch.Generator().manual_seed(1))
        b = model.nelbo(xs, 0.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # z0 is all masks and there is no t: deterministic
    torch.testing.assert_close(torch.exp(-a).sum(), torch.tensor(1.0, dtype=a.dtype), atol=1e-10, rtol=0)
    out, logits = gen(model, num_samples=5, alpha0=0.0, seed=3)  # ... the AR sampler's own log-probability
    logp = torch.cat(logits).view(4, 5, 3).transpose(0, 1).log_softmax(-1).gather(-1, out.x[..., None]).sum((1, 2))
    torch.testing.assert_close(model.nelbo(out.x, 0.0).detach(), -logp, atol=1e-10, rtol=0)
    torch.testing.assert_close(sum(model.loss(out.x)), -logp.mean() / 4, atol=1e-10, rtol=0)


def test_alpha0_one_has_no_ar_term_and_the_mdlm_weight():
    model = sharp_model("B")
    x = torch.randint(0, V, (6, L))
    assert torch.equal(model._ar_term(x, 1.0), torch.zeros(6))
    t = torch.rand(100) * 0.98 + 0.01
    torch.testing.assert_close(mdm_weight(1.0, t), 1 / t)
    for a0 in (0.25, 0.5):
        torch.testing.assert_close(mdm_weight(a0, t), a0 * (1 - EPS) / (1 - a0 * (1 - (1 - EPS) * t)))
    with torch.no_grad():  # nelbo at alpha0 = 1: (1/t) times the masked NLL, from the same draws
        got = model.nelbo(x, 1.0, torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        t = EPS + (1 - EPS) * torch.rand(6, generator=g)
        want = model._mdm_term(x, 1.0, t, g) / t
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # t is float32: 1/t and the weight round apart


def test_the_mdlm_nelbo_is_mdlms_bound_by_enumeration():
    """MDLM at alpha0 = 1: the NELBO estimator averages to MDLM's bound, computed independently.
    With bidirectional attention a masked set S's loss f(S) does not depend on the layout, so the
    bound is E_{t ~ U[EPS, 1)} [(1 - EPS) / (1 - alpha_t) sum_S P_t(S) f(S)], a polynomial in t:
    Gauss-Legendre quadrature is exact."""
    Lt, Vt = 3, 3
    model = sharp_model("MDLM", vocab_size=Vt, block_size=Lt, seed=1)
    x, f = torch.tensor([[2, 0, 1]]), {}
    with torch.no_grad():
        for S in itertools.chain.from_iterable(itertools.combinations(range(Lt), n) for n in range(1, Lt + 1)):
            z = x.clone()
            z[0, list(S)] = Vt
            logp = model.lm_head(model(z, torch.arange(Lt)[None])).log_softmax(-1)[0]
            f[S] = -sum(logp[i, x[0, i]].item() for i in S)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    t = EPS + (1 - EPS) * (nodes + 1) / 2
    a = 1 - (1 - EPS) * t
    integrand = sum((1 - EPS) / (1 - a) * (1 - a) ** len(S) * a ** (Lt - len(S)) * v for S, v in f.items())
    exact = float((weights * integrand).sum() / 2)
    with torch.no_grad():
        draws_ = torch.cat([model.nelbo(x.repeat(4000, 1), 1.0) for _ in range(5)])
    se = draws_.std().item() / math.sqrt(len(draws_))
    assert abs(draws_.mean().item() - exact) < 4 * se and se < 0.02 * exact, (draws_.mean().item(), exact, se)


def test_each_rows_nelbo_is_an_independent_draw():
    """nelbo draws each row's t on its own, so the standard error of a mean over rows (std /
    sqrt(n)) is the spread of that mean over repeated draws; with t stratified across the batch it
    would not be."""
    model = sharp_model("B", vocab_size=5, block_size=6)
    x = torch.randint(0, 5, (1, 6)).repeat(64, 1)
    with torch.no_grad():
        values = torch.stack([model.nelbo(x, 0.5) for _ in range(300)])  # (300 repeats, 64 rows)
    se = (values.std(1) / 8).mean()
    spread = values.mean(1).std()
    assert 0.85 < spread / se < 1.15, (spread, se)


def test_stratified_t_stays_in_eps_1_and_covers_every_slice():
    """Row i draws t uniformly in the i-th of n slices of [EPS, 1), each row its own draw (as the
    official code's antithetic t)."""
    for seed in range(20):
        torch.manual_seed(seed)
        t = stratified_t(8, "cpu")
        assert ((t >= EPS) & (t < 1)).all()
        slot = (t - EPS) / (1 - EPS) * 8
        assert torch.equal(slot.floor().long(), torch.arange(8)) and slot.frac().std() > 0.01


def test_the_two_terms_read_disjoint_rows_in_the_split_proportion(monkeypatch):
    model = sharp_model("B", alpha0=0.5)
    seen = {}
    mdm, ar = EsoLM._mdm_term, EsoLM._ar_term
    monkeypatch.setattr(EsoLM, "_mdm_term", lambda self, x, *a: seen.setdefault("mdm", x) is None or mdm(self, x, *a))
    monkeypatch.setattr(EsoLM, "_ar_term", lambda self, x, *a: seen.setdefault("ar", x) is None or ar(self, x, *a))
    for B, split, n_mdm in [(8, 0.5, 4), (8, 0.25, 2), (10, 0.7, 7), (8, 0.7, 6), (2, 0.9, 1)]:
        seen.clear()
        x = torch.arange(B)[:, None].repeat(1, L) % V  # row i is all i: which rows a term read shows
        model.loss(x, split)
        assert seen["mdm"][:, 0].tolist() == list(range(n_mdm)) and seen["ar"][:, 0].tolist() == list(range(n_mdm, B))


def test_the_loss_terms_are_each_averaged_over_their_own_rows_tokens(monkeypatch):
    """With known per-row sums, the terms are exactly: MDM sum_rows w(t) nll / (n_mdm L) (w = 1 for
    low_var), AR sum_rows nll / ((B - n_mdm) L); t stratified over the MDM rows."""
    model = sharp_model("B", alpha0=0.5)
    monkeypatch.setattr(EsoLM, "_mdm_term", lambda self, x, alpha0, t, g=None: torch.arange(len(x)) + 1.0)
    monkeypatch.setattr(EsoLM, "_ar_term", lambda self, x, alpha0, g=None: 10 * (torch.arange(len(x)) + 1.0))
    x = torch.zeros(8, L, dtype=torch.long)
    for loss_type, split, n in [("elbo", 0.5, 4), ("low_var", 0.25, 2), ("elbo", 0.75, 6)]:
        torch.manual_seed(0)
        mdm, ar = model.loss(x, split, loss_type)
        torch.manual_seed(0)
        w = mdm_weight(0.5, stratified_t(n, "cpu")) if loss_type == "elbo" else torch.ones(n)
        torch.testing.assert_close(mdm, (w * (torch.arange(n) + 1.0)).sum() / (n * L))
        torch.testing.assert_close(ar, 10 * (torch.arange(8 - n) + 1.0).sum() / ((8 - n) * L))


def test_the_loss_is_the_nelbo_per_token_in_expectation():
    model = sharp_model("B", vocab_size=5, block_size=6, alpha0=0.5)
    x = torch.randint(0, 5, (1, 6)).repeat(8, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        loss = torch.stack([sum(model.loss(x)) for _ in range(1500)])
        nelbo = torch.cat([model.nelbo(x) for _ in range(750)]) / 6
    se = math.hypot(loss.std() / math.sqrt(len(loss)), nelbo.std() / math.sqrt(len(nelbo)))
    assert abs(loss.mean() - nelbo.mean()) < 4 * se, (loss.mean(), nelbo.mean(), se)


def test_the_ar_term_sees_z0s_clean_tokens_in_a_random_order(monkeypatch):
    """(B)'s diffusion phase decodes in a random order and a clean token sees only those before it,
    so the AR term trains on random orders of z0's clean tokens (its masks: left to right)."""
    seen, forward = [], EsoLM.sequential_forward
    monkeypatch.setattr(EsoLM, "sequential_forward",
                        lambda self, xs, order, n: seen.append((order, n)) or forward(self, xs, order, n))
    torch.manual_seed(0)
    with torch.no_grad():
        sharp_model("B")._ar_term(torch.randint(0, V, (2000, L)), 0.5)
    (order, n_clean), = seen
    inversions = pairs = 0
    for row, c in zip(order.tolist(), n_clean.tolist()):
        assert row[c:] == sorted(row[c:])
        inversions += sum(a > b for a, b in itertools.combinations(row[:c], 2))
        pairs += c * (c - 1) // 2
    assert abs(inversions / pairs - 0.5) < 0.01


def test_the_mdm_term_masks_at_rate_one_minus_alpha_t_and_lays_clean_tokens_first(monkeypatch):
    """z_t sorted as (B) samples it: x's tokens at the positions of order, its clean ones first (the
    prefix (A) sees both ways), then its masks; mask rate 1 - alpha_t."""
    model, seen = sharp_model("B"), []
    forward = EsoLM.diffusion_forward
    monkeypatch.setattr(EsoLM, "diffusion_forward", lambda self, *a: seen.append(a) or forward(self, *a))
    x = torch.randint(0, V, (400, L))
    with torch.no_grad():
        model._mdm_term(x, 0.5, torch.full((400,), 0.5), torch.Generator().manual_seed(0))
    (zs, order, prefix), = seen
    masked = zs == model.mask_id
    assert abs(masked.double().mean() - (1 - alpha_t(0.5, 0.5))) < 0.02
    assert torch.equal(masked, torch.arange(L) >= prefix[:, None]) and torch.equal(prefix, L - masked.sum(1))
    assert torch.equal(order.sort(1).values, torch.arange(L).expand(400, L))
    assert torch.equal(zs[~masked], x.gather(1, order)[~masked])


@pytest.mark.parametrize("alpha0", [0.0, 0.25, 1.0])
def test_a_tiny_model_overfits_one_batch(alpha0):
    torch.manual_seed(0)
    model = EsoLM(EsoLMConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=48, alpha0=alpha0))
    x = torch.randint(0, V, (8, L))  # the best NELBO is about log(8) / L = 0.17 nats a token

    def nelbo_per_token():
        with torch.no_grad():
            return model.nelbo(x.repeat(16, 1), alpha0, torch.Generator().manual_seed(0)).mean().item() / L

    start, opt = nelbo_per_token(), torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = sum(model.loss(x.repeat(4, 1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = nelbo_per_token()
    assert abs(start - math.log(V)) < 0.2 and end < 0.8 * start and (alpha0 or end < 0.25), (start, end)


def test_a_training_step_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = EsoLM(EsoLMConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=32))
    x, losses, grads = torch.randint(0, V, (8, L)), [], []
    for on in (True, False):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            mdm, ar = model.loss(x)
        assert mdm.dtype == ar.dtype == torch.float32  # the cross-entropy in float32
        (mdm + ar).backward()
        losses.append((mdm + ar).item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad()
    assert torch.isfinite(grads[0]).all() and abs(losses[0] / losses[1] - 1) < 0.02
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


# ---------------------------------------------------------------------------------------------------------------
# The "exact" likelihood

def reference_order_nll(model, x, order):
    """-log p(x | order) decoding a token a call, by the uncached diffusion forward."""
    xs, nll = x[order], 0.0
    for s in range(len(x)):
        zs = torch.cat([xs[:s], torch.full((len(x) - s,), model.mask_id)])
        h = model.diffusion_forward(zs[None], order[None], torch.tensor([s]))
        nll -= model.lm_head(h[0, s]).log_softmax(-1)[xs[s]].item()
    return nll


def test_the_exact_likelihood_against_brute_force():
    """p(x) of the one-token-a-call sampler = sum over its orders of P(order) p(x | order):
    exact_nll scores each order exactly, sits above -log p(x) on average (Jensen), and closes in
    with many orders."""
    Lt, Vt, alpha0 = 3, 2, 0.5
    model = sharp_model("B", vocab_size=Vt, block_size=Lt, seed=3)
    p_diff = alpha0 * (1 - EPS) / (1 - alpha0 * EPS)
    orders = []
    for S in itertools.chain.from_iterable(itertools.combinations(range(Lt), n) for n in range(Lt + 1)):
        rest = [i for i in range(Lt) if i not in S]
        for perm in itertools.permutations(S):
            orders.append((p_diff ** len(S) * (1 - p_diff) ** len(rest) / math.factorial(len(S)),
                           torch.tensor(list(perm) + rest)))
    xs = all_sequences(Vt, Lt)
    with torch.no_grad():
        est = model.exact_nll(xs.repeat(32, 1), alpha0, 256, torch.Generator().manual_seed(0)).view(32, -1).mean(0)
    total = 0.0
    for x, est_x in zip(xs, est.tolist()):
        with torch.no_grad():
            nll = {tuple(o.tolist()): reference_order_nll(model, x, o) for _, o in orders}
            for _, o in orders:
                assert abs(model._sequential_nll(x[None], o[None], torch.tensor([0])).item()
                           - nll[tuple(o.tolist())]) < 1e-9
        p_x = sum(p * math.exp(-nll[tuple(o.tolist())]) for p, o in orders)
        mean_k1 = sum(p * nll[tuple(o.tolist())] for p, o in orders)
        total += p_x
        assert mean_k1 >= -math.log(p_x) - 1e-12 and -math.log(p_x) - 0.03 < est_x < mean_k1
    assert abs(total - 1) < 1e-9


def test_exact_nll_draws_diffusion_positions_as_the_sampler_does(monkeypatch):
    """The share of positions exact_nll puts in the diffusion phase is the schedule's, alpha0 (1 -
    EPS) / (1 - alpha0 EPS), not alpha0: EPS raised to 0.5 makes the two far apart."""
    monkeypatch.setattr(esolm, "EPS", 0.5)
    shares, first = [], esolm.clean_first_order
    monkeypatch.setattr(esolm, "clean_first_order", lambda c, s, g=None: shares.append(c.double().mean()) or first(c, s, g))
    sharp_model("B").exact_nll(torch.randint(0, V, (2000, L)), 0.5, 4, torch.Generator().manual_seed(0))
    got, want = sum(shares) / len(shares), 0.5 * 0.5 / (1 - 0.25)
    assert abs(got - want) < 4 * math.sqrt(0.25 / 96_000) and abs(got - 0.5) > 0.1


def test_the_exact_likelihood_at_alpha0_zero_is_the_ar_likelihood():
    model, x = sharp_model("B"), torch.randint(0, V, (4, L))
    torch.testing.assert_close(model.exact_nll(x, 0.0, 3), model.nelbo(x, 0.0).detach())


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments: a ValueError that names the argument

@pytest.mark.parametrize("call,match", [
    (lambda m, x: m.nelbo(x, -0.1), "nelbo: alpha0=-0.1"),
    (lambda m, x: m.exact_nll(x, 1.5), "exact_nll: alpha0=1.5"),
    (lambda m, x: m.nelbo(x[:, :-1]), r"nelbo: x must be \(B, 12\)"),
    (lambda m, x: m.nelbo(x.float()), "nelbo: x must be"),
    (lambda m, x: m.exact_nll(x + V), "exact_nll: x must be .* ids<13"),
    (lambda m, x: m.exact_nll(x, 0.5, 0), "num_orders"),
    (lambda m, x: m.loss(x[:1]), "loss: x has 1 row"),
    (lambda m, x: m.loss(x, 1.5), "loss: batch_split=1.5"),
    (lambda m, x: m.loss(x, 0.5, "mse"), "loss: loss_type='mse'"),
    (lambda m, x: m.generate(2, 0.5, 0), "generate: steps=0"),
    (lambda m, x: m.generate(0), "generate: num_samples=0"),
    (lambda m, x: m.generate(2, 2.0), "generate: alpha0=2.0"),
    (lambda m, x: m.generate(2, temperature=-1), "generate: temperature=-1"),
    (lambda m, x: m.generate(2, top_p=0), "generate: top_p=0"),
    (lambda m, x: m.generate(2, adaptive="best"), "generate: adaptive='best'"),
    (lambda m, x: m.generate(2, threshold=0.5), "generate: threshold=0.5 must be for an adaptive order"),
    (lambda m, x: m.generate(2, prompt=torch.zeros(L + 1, dtype=torch.long)), "generate: prompt="),
    (lambda m, x: m.generate(2, prompt=torch.tensor([V + 1])), "generate: prompt="),
    (lambda m, x: m.generate(2, prompt=torch.tensor([1.0])), "generate: prompt="),
    (lambda m, x: m.generate(2, prompt=torch.tensor([[1], [2], [3]])), "generate: prompt="),
    (lambda m, x: m.generate(2, plan=Plan(torch.zeros(2, 3, dtype=torch.long), None)), "plan.order"),
    (lambda m, x: sharp_model("MDLM").generate(2, 0.5), "generate: alpha0=0.5 .* 1 for MDLM"),
    (lambda m, x: sharp_model("MDLM", alpha0=0.25), "EsoLMConfig: alpha0=0.25"),
    (lambda m, x: sharp_model("A").exact_nll(x), "exact_nll: needs variant B"),
    (lambda m, x: EsoLMConfig(variant="C"), "variant='C'"),
    (lambda m, x: EsoLMConfig(n_embd=30, n_head=2), "n_embd / n_head = 30 / 2"),
    (lambda m, x: EsoLMConfig(dropout=1.0), "dropout=1.0"),
    (lambda m, x: EsoLMConfig(n_layer=0), "n_layer must be at least 1"),
    (lambda m, x: EsoLMConfig(gelu="fast"), "gelu='fast'"),
])
def test_bad_arguments_raise_a_value_error_that_names_them(call, match):
    with pytest.raises(ValueError, match=match):
        call(sharp_model("B"), torch.randint(0, V, (4, L)))


def test_the_config_switches_keep_our_models_as_they_were():
    keys = set(EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16)).state_dict())
    assert not any(k.endswith(".bias") for k in keys)
    with_bias = set(EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16, bias=True)).state_dict())
    assert with_bias - keys == {"blocks.0.ln_1.bias", "blocks.0.ln_2.bias", "blocks.0.c_fc.bias",
                                "blocks.0.c_proj.bias", "ln_f.bias", "lm_head.bias"}
