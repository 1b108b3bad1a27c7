"""Parity tests for esolm.py: each one checks the code against an independent statement of the method
(README, "The method, mapped to the code").
Run: python -m pytest -q"""
import dataclasses
import http.server
import itertools
import math
import os
import threading

import pytest
import torch
import torch.nn.functional as F

import esolm
import pretrained
import static_cache
from conftest import official_logits, official_state_dict, save_official
from esolm import (EPS, EsoLM, EsoLMConfig, KVCache, alpha_t, apply_rope, diffusion_mask, mdm_weight, random_plan,
                   reveal_schedule, rope_tables, sample_tokens, sequential_mask, stratified_t)
from static_cache import StaticCalls

V, L = 13, 12


def sharp_model(variant, dtype=torch.float64, vocab_size=V, block_size=L, seed=0, alpha0=None):
    """A tiny model with large random weights: attention is peaked, so a wrong mask or a stale cache entry
    changes the logits far beyond the tolerance (at GPT-2 init every attention row is nearly uniform). alpha0: what it
    is trained for (default 1 for MDLM, 0.25 otherwise)."""
    torch.manual_seed(seed)
    alpha0 = alpha0 if alpha0 is not None else 1.0 if variant == "MDLM" else 0.25
    model = EsoLM(EsoLMConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                              variant=variant, alpha0=alpha0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.35)
    return model.to(dtype).eval()


def gen(model, seed, **kw):
    """(x, the logits of each call) of a seeded generate: the logits sample_tokens is handed, in float32 or wider."""
    device, logits, pick = model.wte.weight.device, [], esolm.sample_tokens

    def spy(lg, *a):
        logits.append(lg.to(torch.promote_types(lg.dtype, torch.float32)))
        return pick(lg, *a)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(esolm, "sample_tokens", spy)
        out = model.generate(generator=torch.Generator(device).manual_seed(seed), **kw)
    return out.x, logits


def trained_for(model, alpha0):
    """The model, now trained for alpha0 (its loss is the NELBO at alpha0)."""
    model.config = dataclasses.replace(model.config, alpha0=alpha0)
    return model


# the parity tests run on every device there is: the CPU always, CUDA when this machine has it
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


@pytest.fixture
def no_tf32():
    """float32 matmuls in full float32 on CUDA (TF32 would round them to 10 bits of mantissa)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def replay_schedule(seed, model, n_gen, alpha0, steps, to_gen):
    """The reveal schedule and generation order that generate() draws first from a generator seeded `seed`."""
    order, ks, n_seq = random_plan(to_gen, alpha0, steps, torch.Generator().manual_seed(seed))
    assert int(to_gen[0].sum()) == n_gen
    return ks[:len(ks) - n_seq], n_seq, order


PROMPTS = {
    "none": None,
    "prefix": torch.tensor([3, 1, 4, 1]),
    "infill": torch.tensor([2, 7, V, V, 1, V, 8, V, V, V, 0, V]),  # V = mask_id: generate these
}
ORDERS = {"random": {}, "subcontext": {"subcontext_len": 4, "subcontext_shuffle": True}}  # generate's plans


# ----------------------------------------------------------------------------------------------------------
# RoPE: attention scores depend only on the offset between original positions

def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(64, 8, 10000.0)
    q, k = torch.randn(2, 1, 1, 8)

    def score(p, p2):
        return (apply_rope(q, cos[p], sin[p]) * apply_rope(k, cos[p2], sin[p2])).sum()

    torch.testing.assert_close(score(3, 10), score(40, 47))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(3, 10), score(3, 11))


# ----------------------------------------------------------------------------------------------------------
# The KV cache is exact

@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("alpha0,steps", [(0, 4), (0.25, 8), (1, 12), (0.7, 3)])
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("device", DEVICES)
def test_cached_equals_uncached(variant, alpha0, steps, prompt, order, dtype, tol, device, no_tf32):
    model = sharp_model(variant, dtype).to(device)
    p = PROMPTS[prompt]
    kw = dict(num_samples=3, alpha0=alpha0, steps=steps, prompt=None if p is None else p.to(device), **ORDERS[order])
    x1, logits1 = gen(model, 5, kv_cache=True, **kw)
    x2, logits2 = gen(model, 5, kv_cache=False, **kw)
    assert torch.equal(x1, x2)
    assert [t.shape for t in logits1] == [t.shape for t in logits2]
    for a, b in zip(logits1, logits2):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    if (alpha0, steps) == (0.7, 3):  # this case must decode several tokens in one call
        assert max(t.size(1) for t in logits1) > 1


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("adaptive", ["confidence", "margin"])
@pytest.mark.parametrize("alpha0,steps", [(1, 12), (1, 4), (0.5, 6)])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_adaptive_cached_equals_uncached(variant, adaptive, alpha0, steps, prompt):
    """Adaptive decoding: each diffusion call scores every mask left and decodes the best k. The cached path feeds
    every mask left after the new clean tokens; the reference runs the whole canvas. Same choices, tokens and logits,
    in float64 (and the static layout, run eagerly, too)."""
    model = sharp_model(variant)
    kw = dict(num_samples=3, alpha0=alpha0, steps=steps, prompt=PROMPTS[prompt], adaptive=adaptive)
    x1, logits1 = gen(model, 5, **kw)
    x2, logits2 = gen(model, 5, kv_cache=False, **kw)
    assert torch.equal(x1, x2) and len(logits1) == len(logits2)
    for a, b in zip(logits1, logits2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(static_cache.torch, "compile", lambda module, **kw: module)
        x3, logits3 = gen(model, 5, calls=StaticCalls, **kw)
    assert torch.equal(x1, x3)
    for a, b in zip(logits1, logits3, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    if steps == 4:  # calls of several tokens: the choice of k among many masks, not one
        assert max(t.size(1) for t in logits1) > 1


def independent_score(logits, rule):
    """The adaptive scores, written again from their statement: the top probability, or the top two's difference."""
    p = logits.double().softmax(-1).sort(-1, descending=True).values
    return p[..., 0] - p[..., 1] if rule == "margin" else p[..., 0]


@pytest.mark.parametrize("rule", ["confidence", "margin"])
@pytest.mark.parametrize("prompt", ["prefix", "infill"])
def test_adaptive_mdlm_decodes_the_top_k_of_a_full_forward(rule, prompt):
    """MDLM sees everything both ways, so the order does not change a forward: the positions each call decodes must
    be the k best-scored masks of an independent forward over the canvas before that call, in natural order. (Given
    tokens break the symmetry: over an all-mask canvas RoPE alone leaves the masks nearly tied.)"""
    model = sharp_model("MDLM")
    p = PROMPTS[prompt]
    out = model.generate(3, 1.0, 5, prompt=p, adaptive=rule, generator=torch.Generator().manual_seed(2))
    template = torch.full((L,), V) if p is None else torch.cat([p, torch.full((L - len(p),), V)])
    assert torch.equal(out.x[:, template != V], template[template != V].expand(3, -1)) and (out.x < V).all()
    assert out.decoded_by.max() == out.nfe and out.nfe >= 2
    pos = torch.arange(L).expand(3, L)
    for c in range(1, out.nfe + 1):
        canvas = torch.where(out.decoded_by < c, out.x, model.mask_id)
        with torch.no_grad():
            score = independent_score(model.lm_head(model(canvas, pos)), rule)
        score = score.masked_fill(canvas != model.mask_id, -1)  # only the masks compete
        k = int((out.decoded_by[0] == c).sum())
        top = score.sort(1, descending=True).values
        assert (top[:, k - 1] - top[:, k] > 1e-9).all() or k == int((canvas[0] == model.mask_id).sum())  # no tie
        for b in range(3):
            assert set(score[b].topk(k).indices.tolist()) == set((out.decoded_by[b] == c).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("variant", ["A", "B", "MDLM"])
@pytest.mark.parametrize("alpha0", [0.0, 0.5, 1.0])
def test_adaptive_keeps_the_given_tokens_and_the_schedule(variant, alpha0):
    """Whatever it chooses, an adaptive run keeps the prompt's tokens, leaves no mask, decodes each call's k as the
    plan says, and its sequential phase runs left to right over the masks the diffusion phase left."""
    if variant == "MDLM" and alpha0 < 1:
        return
    model, p = sharp_model(variant), PROMPTS["infill"]
    x, logits = gen(model, 3, num_samples=4, alpha0=alpha0, steps=4, prompt=p, adaptive="margin")
    given = p != V
    assert torch.equal(x[:, :len(p)][:, given], p[given].expand(4, -1)) and ((x >= 0) & (x < V)).all()
    k, n_seq, _ = replay_schedule(3, model, L - int(given.sum()), alpha0, 4, torch.cat(
        [~given, torch.ones(L - len(p), dtype=torch.bool)]).expand(4, L))
    assert [t.size(1) for t in logits] == k + [1] * n_seq
    out = model.generate(4, alpha0, 4, prompt=p, adaptive="margin", generator=torch.Generator().manual_seed(3))
    first_seq = len(k) + 1  # the sequential calls decode the positions left after the diffusion phase, left to right
    for row in out.decoded_by.tolist():
        seq = [i for i in range(L) if row[i] >= first_seq]
        assert [row[i] for i in seq] == list(range(first_seq, first_seq + n_seq))


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("device", DEVICES)
def test_sampler_under_bf16_autocast(variant, device):
    """The GPU's precision, also on the CPU as a stand-in: the KV cache takes autocast's dtype, the RoPE tables are
    cast to it, and the sampler still keeps the prompt and never emits the mask."""
    model = sharp_model(variant, torch.float32).to(device)
    prompt = PROMPTS["infill"].to(device)
    seen = []
    update = KVCache.update

    def spy(self, start, k, v):
        seen.append((self.k.dtype, k.dtype))
        return update(self, start, k, v)

    with pytest.MonkeyPatch.context() as m, torch.autocast(device, dtype=torch.bfloat16):
        m.setattr(KVCache, "update", spy)
        x, logits = gen(model, 3, num_samples=4, alpha0=0.5, steps=4, prompt=prompt)
    _, reference = gen(model, 3, num_samples=4, alpha0=0.5, steps=4, prompt=prompt, kv_cache=False)  # float32
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    given = prompt != V
    assert ((x >= 0) & (x < V)).all() and torch.equal(x[:, given], prompt[given].expand(4, -1))
    # The first call sees the same tokens in both paths, so its logits differ only by bf16 rounding: bf16 keeps 8
    # bits of mantissa (relative error 2^-9 = 0.002 per rounding), the 2-layer sharp model's logits are of size
    # about 10 and each passes through about 10 roundings (embedding, q/k/v, scores, softmax, MLP, head): a few
    # times 0.002 * 10 = 0.02 each; 0.5 leaves room and is still far below what a wrong mask or cache changes
    # (the logits of the sharp model move by several units then).
    torch.testing.assert_close(logits[0], reference[0], atol=0.5, rtol=0)


def test_training_step_under_cpu_bf16_autocast():
    """A stand-in for the GPU's bf16 training step: with the same masks, orders and t, the loss and the gradient
    under bf16 autocast are finite and match float32's up to bf16 rounding."""
    torch.manual_seed(0)
    model = EsoLM(EsoLMConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, V, (8, L))
    losses, grads = [], []
    for autocast in (True, False):
        torch.manual_seed(1)  # the same draws in both steps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            mdm, ar = model.loss_terms(x)  # the model is trained for alpha0 = 0.25, EsoLMConfig's default
        assert mdm.dtype == ar.dtype == torch.float32  # the cross-entropy runs in float32
        (mdm + ar).backward()
        losses.append((mdm + ar).item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad()
    assert torch.isfinite(grads[0]).all() and abs(losses[0] / losses[1] - 1) < 0.02, losses
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's own imports
@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sampler_equals_uncached(variant, device, no_tf32):
    """generate(calls=StaticCalls) runs each cached call as a static-shape compiled graph (inductor; on CUDA captured as
    CUDA graphs): the same tokens and logits as the uncached reference."""
    model = sharp_model(variant, torch.float32).to(device)
    kw = dict(num_samples=2, alpha0=0.5, steps=4, prompt=PROMPTS["infill"].to(device))
    x1, logits1 = gen(model, 5, calls=StaticCalls, **kw)
    x2, logits2 = gen(model, 5, kv_cache=False, **kw)
    assert torch.equal(x1, x2)
    for a, b in zip(logits1, logits2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_sampler_compiles_a_few_graphs():
    """The compiled sampler pads each call's fed tokens to a power of two and reads the whole cache: a few graphs
    serve both alpha0 (on a GPU box a graph takes ~30 s to compile)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=11))
    for alpha0 in (1.0, 0.25):
        model.generate(2, alpha0, 64, calls=StaticCalls, generator=torch.Generator().manual_seed(0))
    assert counters["stats"]["unique_graphs"] <= 4


# ----------------------------------------------------------------------------------------------------------
# The static-shape cached call (static_cache.py): the eager call's numbers, at a few shapes

def uncompiled_static_path(monkeypatch):
    """generate(calls=StaticCalls) with torch.compile left out: the static layout itself, run eagerly."""
    monkeypatch.setattr(static_cache.torch, "compile", lambda module, **kw: module)
    calls = []
    update = static_cache.SlotCache.update
    monkeypatch.setattr(static_cache.SlotCache, "update", lambda self, *a: calls.append(1) or update(self, *a))
    return calls


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("alpha0,steps", [(0.7, 3), (0.25, 12)])
def test_static_call_equals_eager(variant, prompt, order, alpha0, steps, monkeypatch):
    """All slots read with a mask from slot indices, fed tokens padded to a bucket, padding keys in a sink slot: the
    same tokens and logits as the eager call, in float64."""
    static_calls = uncompiled_static_path(monkeypatch)
    model = sharp_model(variant)
    kw = dict(num_samples=3, alpha0=alpha0, steps=steps, prompt=PROMPTS[prompt], **ORDERS[order])
    x1, logits1 = gen(model, 5, calls=StaticCalls, **kw)
    assert static_calls  # the static path ran
    x2, logits2 = gen(model, 5, **kw)
    assert torch.equal(x1, x2)
    for a, b in zip(logits1, logits2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's warning when the growing slice hits the recompile limit
def test_static_call_compiles_one_graph_per_bucket(monkeypatch):
    """A whole run at L = 1024, compiled with fullgraph=True and static shapes: one graph per bucket, none compiled
    again. The eager call, whose shapes grow, compiled the same way makes a graph per new shape until torch gives up.
    (dynamo's graphs are what is counted; the "eager" backend skips inductor's code generation.)"""
    from torch._dynamo.utils import counters
    compile = torch.compile
    monkeypatch.setattr(static_cache.torch, "compile", lambda module, **kw: compile(
        module, backend="eager", fullgraph=kw["fullgraph"], dynamic=kw["dynamic"]))
    model = EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16, block_size=1024, vocab_size=11))
    to_gen = torch.ones(2, 1024, dtype=torch.bool)
    plan = random_plan(to_gen, 1.0, 1024, torch.Generator().manual_seed(0))
    buckets = {static_cache.bucket(f.d + f.n - f.n_cached) for f in model.feeds(plan)}
    torch._dynamo.reset()
    counters.clear()
    out = model.generate(2, 1.0, 1024, calls=StaticCalls, generator=torch.Generator().manual_seed(0))
    assert out.nfe == len(plan.ks) and 2 <= len(buckets) <= 5
    assert counters["stats"]["unique_graphs"] == len(buckets), (buckets, counters["stats"])
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # dynamo's default; the static path raises it
    monkeypatch.setattr(model, "forward", compile(model.forward, backend="eager", fullgraph=True, dynamic=False))
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):  # fullgraph: the limit is an error
        model.generate(2, 1.0, 1024, generator=torch.Generator().manual_seed(0))


def test_sampler_keeps_cudnn_attention_off(monkeypatch):
    """Every attention call of the sampler, cached or not, runs with cuDNN attention disabled (see
    SAMPLER_ATTENTION: a plan per shape made the cached sampler 9x slower on an H200), and the setting is
    restored afterwards, also when generate fails."""
    model, seen = sharp_model("B", torch.float32), []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(esolm.F, "scaled_dot_product_attention", spy)
    for kv_cache in (True, False):
        gen(model, 5, num_samples=2, alpha0=0.5, steps=4, kv_cache=kv_cache)
    assert seen and not any(seen) and torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(ValueError):
        model.generate(2, 0.5, 4, prompt=torch.tensor([10**6]))
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_rows_use_different_orders():
    to_gen = torch.ones(4, L, dtype=torch.bool)
    order, _, n_seq = random_plan(to_gen, 0.5, 4, torch.Generator().manual_seed(0))
    n = L - n_seq  # the diffusion positions
    assert n >= 4 and n_seq >= 2
    assert len({tuple(r) for r in order[:, :n].tolist()}) == 4
    assert torch.equal(order[:, n:], order[:, n:].sort(1).values)  # the sequential phase goes left to right
    assert torch.equal(order.sort(1).values, torch.arange(L).expand(4, L))  # each row is a permutation


def test_cache_is_preallocated_and_written_in_place(monkeypatch):
    seen = []
    update = KVCache.update

    def spy(self, start, k, v):
        out = update(self, start, k, v)
        seen.append((id(self), self.k.data_ptr(), tuple(self.k.shape), k.size(2)))
        return out

    monkeypatch.setattr(KVCache, "update", spy)
    gen(sharp_model("B"), 0, num_samples=2, alpha0=0.5, steps=4)
    buffers = {}
    for cache, ptr, shape, _ in seen:
        assert buffers.setdefault(cache, ptr) == ptr and shape[2] == L  # one buffer of L slots, never regrown
    assert max(t for *_, t in seen) <= L and len(buffers) == 2  # one cache per layer


@pytest.mark.parametrize("variant", ["A", "B"])
def test_sequential_training_forward_matches_sampler(variant):
    """The AR term's training forward (sequential layout), the full 2L layout of the method with a loop-built mask, the
    uncached reference and the cached sampler give the same logits to the sequential-phase tokens, for the
    order and tokens the sampler used."""
    model = sharp_model(variant)
    alpha0, steps, B = 0.5, 3, 2
    x, logits = gen(model, 11, num_samples=B, alpha0=alpha0, steps=steps)
    _, ref_logits = gen(model, 11, num_samples=B, alpha0=alpha0, steps=steps, kv_cache=False)
    k, n_seq, order = replay_schedule(11, model, L, alpha0, steps, torch.ones(B, L, dtype=torch.bool))
    assert n_seq > 0 and len(logits) == len(k) + n_seq
    sampler = torch.cat(logits[len(k):], 1)  # (B, n_seq, V), decoded left to right
    reference = torch.cat(ref_logits[len(k):], 1)
    c = L - n_seq
    xs = x.gather(1, order)
    h, s, valid = model.sequential_forward(xs, order, torch.full((B,), c))
    assert valid.all() and torch.equal(s[0], torch.arange(c, L))
    compact = model.lm_head(h)
    # the method's full [z ; x] layout of length 2L, with the mask written from its text
    zs = xs.clone()
    zs[:, c:] = model.mask_id
    full_mask = torch.tensor(brute_sequential(L, c, variant))[None, None]
    full = model.lm_head(model(torch.cat([zs, xs], 1), torch.cat([order, order], 1), full_mask)[:, c:L])
    for other in (compact, full, reference):
        torch.testing.assert_close(sampler, other, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Masks against brute-force references written from the method's text (section 5)

def brute_diffusion(L, c, variant):
    A = [[False] * L for _ in range(L)]
    for q in range(L):
        for j in range(L):
            if variant == "B":
                A[q][j] = j <= q  # causal over the sorted order
            elif q < c:
                A[q][j] = j < c  # a clean token sees all clean tokens
            else:
                A[q][j] = j < c or j <= q  # a mask sees every clean token, earlier masks and itself
    return A


def brute_sequential(L, c, variant):
    """The 2L layout [z ; x]: z-part rows/cols 0..L-1, x-part L..2L-1."""
    A = [[False] * (2 * L) for _ in range(2 * L)]
    for i in range(L):
        A[i][i] = True  # z-query i sees z-key i
        for j in range(i):
            A[i][L + j] = True  # and the x-keys before it
        for j in range(L):  # x-part: causal, (A) bidirectional among the clean block; never the z-part
            A[L + i][L + j] = j <= i or (variant == "A" and i < c and j < c)
    return A


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("L_", [1, 2, 3, 5])
def test_masks_equal_brute_force(variant, L_):
    n_clean = torch.arange(L_ + 1)  # every possible clean count, one per row
    got = diffusion_mask(n_clean, L_, variant)
    for b, c in enumerate(n_clean.tolist()):
        assert got[b, 0].tolist() == brute_diffusion(L_, c, variant)
    M = L_ - int(n_clean.min())
    z_mask, x_mask = sequential_mask(n_clean, M, L_, variant)
    # the whole [z ; x] mask the forward applies: x-queries never see z, and (B)'s x_mask None is causal
    x_mask = torch.ones(L_, L_, dtype=torch.bool).tril().expand(L_ + 1, 1, L_, L_) if x_mask is None else x_mask
    got = torch.cat([z_mask, torch.cat([torch.zeros(L_ + 1, 1, L_, M, dtype=torch.bool), x_mask], 3)], 2)
    for b, c in enumerate(n_clean.tolist()):
        full = brute_sequential(L_, c, variant)
        for r in range(M):
            row = got[b, 0, r].tolist()
            if r < L_ - c:  # z-query of sorted index c + r: itself, then the x-part of the 2L row
                assert row[:M] == [k == r for k in range(M)] and row[M:] == full[c + r][L_:]
            else:  # padding query (fewer masks in this row): unread, but it must see something, or SDPA gives NaN
                assert row[r]
        for i in range(L_):
            assert got[b, 0, M + i].tolist() == [False] * M + full[L_ + i][L_:]


# ----------------------------------------------------------------------------------------------------------
# Loss identities

def all_sequences(vocab, length):
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)))


@pytest.mark.parametrize("variant", ["A", "B"])
def test_alpha0_zero_is_exact_autoregressive_likelihood(variant):
    model = sharp_model(variant, vocab_size=3, block_size=4)
    xs = all_sequences(3, 4)
    with torch.no_grad():
        a = model.nelbo(xs, 0.0, torch.Generator().manual_seed(1))
        b = model.nelbo(xs, 0.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # deterministic: z0 is all masks, no t
    torch.testing.assert_close(torch.exp(-a).sum(), torch.tensor(1.0, dtype=a.dtype), atol=1e-10, rtol=0)
    # ... and it is the log-probability that the AR sampler (alpha0 = 0) assigns to what it generates
    x, logits = gen(model, 3, num_samples=5, alpha0=0.0, steps=1)
    logp = torch.cat(logits, 1).log_softmax(-1).gather(-1, x[..., None]).squeeze(-1).sum(1)
    torch.testing.assert_close(model.nelbo(x, 0.0).detach(), -logp, atol=1e-10, rtol=0)
    assert torch.allclose(trained_for(model, 0.0).loss(x), -logp.mean() / 4)


def test_alpha0_one_has_no_ar_term_and_the_mdlm_weight():
    model = sharp_model("B")
    x = torch.randint(0, V, (6, L))
    assert torch.equal(model._ar_term(x, 1.0), torch.zeros(6))
    t = torch.rand(100) * 0.98 + 0.01
    torch.testing.assert_close(mdm_weight(1.0, t), 1 / t)  # the MDLM weight
    for a0 in (0.25, 0.5):  # alpha0 (1 - eps) / (1 - alpha_t), alpha_t = alpha0 (1 - (1 - eps) t)
        torch.testing.assert_close(mdm_weight(a0, t), a0 * (1 - EPS) / (1 - a0 * (1 - (1 - EPS) * t)))
    assert mdm_weight(0.0, t).eq(0).all()
    # nelbo at alpha0 = 1 is exactly (1/t) * the masked NLL, drawn from the same generator state
    with torch.no_grad():
        got = model.nelbo(x, 1.0, torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        t = stratified_t(6, "cpu", g)
        nll, n_masked = model._mdm_term(x, 1.0, t, g)
    torch.testing.assert_close(got, nll / t, rtol=1e-6, atol=0)  # t is float32: 1/t and the weight round apart


def test_mdlm_attends_both_ways_everywhere():
    """The MDLM baseline: its diffusion mask is all True, and its forward is that mask's forward, in which an early
    position's output depends on a later token (causal attention would not let it)."""
    assert diffusion_mask(torch.tensor([0, 3, 5]), 5, "MDLM").all()
    model = sharp_model("MDLM")
    idx, pos = torch.randint(0, V + 1, (2, L)), torch.stack([torch.randperm(L) for _ in range(2)])
    with torch.no_grad():
        h = model(idx, pos)
        torch.testing.assert_close(h, model(idx, pos, torch.ones(L, L, dtype=torch.bool)), atol=1e-12, rtol=0)
        changed = model(torch.cat([idx[:, :-1], (idx[:, -1:] + 1) % V], 1), pos)
    assert (h[:, 0] - changed[:, 0]).abs().max() > 1e-3


def test_mdlm_nelbo_is_the_mdlm_bound_by_enumeration():
    """At alpha0 = 1 the MDLM model's NELBO estimator must average to MDLM's bound, computed here independently: with
    bidirectional attention a masked set S's loss f(S) = sum_{l in S} -log p(x_l | x with S masked) does not depend
    on the layout, so E = E_{t ~ U[EPS, 1)} [ -alpha_t' / (1 - alpha_t) sum_S P_t(S) f(S) ], with
    P_t(S) = (1 - alpha_t)^|S| alpha_t^(L - |S|) and alpha_t = 1 - (1 - EPS) t; the integrand is a polynomial in t
    (the weight's 1/t cancels against (1 - alpha_t)^|S|), so Gauss-Legendre quadrature is exact."""
    import numpy as np
    Lt, Vt = 3, 3
    model = sharp_model("MDLM", vocab_size=Vt, block_size=Lt, seed=1)
    x = torch.tensor([[2, 0, 1]])
    f = {}
    with torch.no_grad():
        for S in itertools.chain.from_iterable(itertools.combinations(range(Lt), n) for n in range(1, Lt + 1)):
            z = x.clone()
            z[0, list(S)] = Vt
            logp = model.lm_head(model(z, torch.arange(Lt)[None])).log_softmax(-1)[0]
            f[S] = -sum(logp[i, x[0, i]].item() for i in S)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    t = EPS + (1 - EPS) * (nodes + 1) / 2  # [-1, 1] -> [EPS, 1]
    a = 1 - (1 - EPS) * t
    integrand = sum((1 - EPS) / (1 - a) * (1 - a) ** len(S) * a ** (Lt - len(S)) * v for S, v in f.items())
    exact = float((weights * integrand).sum() / 2)  # the mean over t ~ U[EPS, 1): (1 / (1 - EPS)) * the integral
    with torch.no_grad():
        draws = torch.cat([model.nelbo(x.repeat(4000, 1), 1.0) for _ in range(5)])
    se = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 4 * se and se < 0.02 * exact, (draws.mean().item(), exact, se)


def test_stratified_t_stays_in_eps_1_and_covers_every_slice():
    for seed in range(20):
        t = stratified_t(8, "cpu", torch.Generator().manual_seed(seed))
        assert ((t >= EPS) & (t < 1)).all()
        u = (t - EPS) / (1 - EPS)  # back on [0, 1): row i must fall in the i-th of 8 equal slices
        assert torch.equal((u * 8).floor().long(), torch.arange(8))


def test_loss_is_the_nelbo_per_token():
    """loss splits the batch between the terms; its expectation must still be E[nelbo] / L, the same scale for the
    MDM and AR terms. At alpha0 = 0 both are deterministic and equal exactly."""
    model = sharp_model("B", vocab_size=5, block_size=6)
    x = torch.randint(0, 5, (1, 6)).repeat(8, 1)  # one sequence: every row estimates the same NELBO
    torch.testing.assert_close(trained_for(model, 0.0).loss(x), model.nelbo(x).mean() / 6, atol=1e-12, rtol=0)
    torch.manual_seed(0)
    trained_for(model, 0.5)
    with torch.no_grad():
        loss = torch.stack([model.loss(x) for _ in range(1500)])  # each draw: 4 MDM rows, 4 AR rows
        nelbo = torch.cat([model.nelbo(x) for _ in range(750)]) / 6
        mdm_ar = torch.stack([torch.stack(model.loss_terms(x)) for _ in range(300)])
    se = math.hypot(loss.std() / math.sqrt(len(loss)), nelbo.std() / math.sqrt(len(nelbo)))
    assert abs(loss.mean() - nelbo.mean()) < 4 * se, (loss.mean(), nelbo.mean(), se)
    assert (mdm_ar > 0).all()  # both terms present, each on its own rows


def test_ar_term_sees_the_clean_tokens_of_z0_in_a_random_order(monkeypatch):
    """The (B) sampler decodes the diffusion positions in a random order and each clean token sees only those before
    it, so the AR term must train on random orders of the clean tokens of z0 (masked positions: left to right)."""
    seen = []
    forward = EsoLM.sequential_forward

    def spy(self, xs, order, n_clean):
        seen.append((order.clone(), n_clean.clone()))
        return forward(self, xs, order, n_clean)

    monkeypatch.setattr(EsoLM, "sequential_forward", spy)
    model = sharp_model("B")
    torch.manual_seed(0)
    with torch.no_grad():
        model._ar_term(torch.randint(0, V, (2000, L)), 0.5)
    (order, n_clean), = seen
    inversions, pairs = 0, 0
    for row, c in zip(order.tolist(), n_clean.tolist()):
        assert row[c:] == sorted(row[c:])  # the masked positions left to right
        inversions += sum(a > b for a, b in itertools.combinations(row[:c], 2))
        pairs += c * (c - 1) // 2
    assert abs(inversions / pairs - 0.5) < 0.01  # a uniformly random order inverts half of its pairs


def test_exact_nll_draws_diffusion_positions_as_the_sampler_does(monkeypatch):
    """The fraction of positions exact_nll puts in the diffusion set must be the fraction the sampler's schedule
    (reveal_schedule) leaves to the diffusion phase. With the real EPS the two candidates (alpha0 and the schedule's
    alpha0 (1 - eps) / (1 - alpha0 eps)) differ by 2e-4, so EPS is raised to 0.5 to make the difference large."""
    monkeypatch.setattr(esolm, "EPS", 0.5)
    alpha0, n = 0.5, 400_000
    k, n_seq = reveal_schedule(n, alpha0, 8, "cpu", torch.Generator().manual_seed(0))
    sampler = sum(k) / n
    fractions = []
    first_order = esolm.clean_first_order

    def spy(clean, shuffle, generator=None):
        fractions.append(clean.double().mean().item())
        return first_order(clean, shuffle, generator)

    monkeypatch.setattr(esolm, "clean_first_order", spy)
    sharp_model("B").exact_nll(torch.randint(0, V, (2000, L)), alpha0, 4, torch.Generator().manual_seed(0))
    got = sum(fractions) / len(fractions)  # 96,000 positions
    assert abs(got - sampler) < 4 * math.sqrt(0.25 / 96_000) and abs(got - alpha0) > 0.1, (got, sampler)


def test_mdm_term_masks_at_rate_one_minus_alpha_t():
    model = sharp_model("B", block_size=L)
    x = torch.randint(0, V, (400, L))
    t = torch.full((400,), 0.5)
    with torch.no_grad():
        _, n_masked = model._mdm_term(x, 0.5, t, torch.Generator().manual_seed(0))
    rate = n_masked.double().mean() / L
    assert abs(rate - (1 - alpha_t(0.5, 0.5))) < 0.02


@pytest.mark.parametrize("alpha0", [0.0, 0.25, 1.0])
def test_tiny_model_overfits_one_batch(alpha0):
    torch.manual_seed(0)
    model = EsoLM(EsoLMConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=48, alpha0=alpha0))
    x = torch.randint(0, V, (8, L))  # 8 random sequences: the best NELBO is about log(8) / L = 0.17 nats/token

    def nelbo_per_token():  # averaged over 16 draws per sequence, from a fixed generator
        with torch.no_grad():
            return model.nelbo(x.repeat(16, 1), alpha0, torch.Generator().manual_seed(0)).mean().item() / L

    start = nelbo_per_token()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model.loss(x.repeat(4, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = nelbo_per_token()
    assert abs(start - math.log(V)) < 0.2 and end < 0.8 * start, (start, end)
    if alpha0 == 0:  # the AR model memorises the batch outright
        assert end < 0.25


def reference_order_nll(model, x, order):
    """-log p(x | order) decoding one token per call, with the uncached diffusion forward: step s sees the tokens
    at order[:s] clean and predicts the one at order[s] (the reference sampler's computation)."""
    L = x.numel()
    xs = x[order]
    nll = 0.0
    for s in range(L):
        zs = torch.cat([xs[:s], torch.full((L - s,), model.mask_id)])
        h = model.diffusion_forward(zs[None], order[None], torch.tensor([s]))
        nll -= model.lm_head(h[0, s]).log_softmax(-1)[xs[s]].item()
    return nll


def test_exact_likelihood_against_brute_force():
    """Tiny enumerable model: p(x) under the one-token-per-call sampler = sum over its orders of P(order) p(x|order).
    exact_nll must score each order exactly, its expectation over orders must sit above -log p(x) (Jensen), and
    many orders must close in on -log p(x)."""
    Lt, Vt, alpha0 = 3, 2, 0.5
    model = sharp_model("B", vocab_size=Vt, block_size=Lt, seed=3)
    p_diff = alpha0 * (1 - EPS) / (1 - alpha0 * EPS)
    orders = []  # (probability, order): diffusion subset S in each order, then the rest left to right
    for S in itertools.chain.from_iterable(itertools.combinations(range(Lt), n) for n in range(Lt + 1)):
        rest = [i for i in range(Lt) if i not in S]
        for perm in itertools.permutations(S):
            prob = p_diff ** len(S) * (1 - p_diff) ** len(rest) / math.factorial(len(S))
            orders.append((prob, torch.tensor(list(perm) + rest)))
    assert abs(sum(p for p, _ in orders) - 1) < 1e-12
    xs = all_sequences(Vt, Lt)
    reps = 32  # every x scored 32 times with K = 256 orders, all in one batch
    with torch.no_grad():
        est = model.exact_nll(xs.repeat(reps, 1), alpha0, 256, torch.Generator().manual_seed(0)).view(reps, -1).mean(0)
    total = 0.0
    for x, est_x in zip(xs, est.tolist()):
        with torch.no_grad():
            nll = {tuple(o.tolist()): reference_order_nll(model, x, o) for _, o in orders}
            for _, o in orders:  # the sequential forward scores each order exactly
                got = model._sequential_nll(x[None], o[None], torch.tensor([0])).item()
                assert abs(got - nll[tuple(o.tolist())]) < 1e-9
        p_x = sum(p * math.exp(-nll[tuple(o.tolist())]) for p, o in orders)
        total += p_x
        mean_k1 = sum(p * nll[tuple(o.tolist())] for p, o in orders)  # E[exact_nll with K = 1]
        assert mean_k1 >= -math.log(p_x) - 1e-12
        assert -math.log(p_x) - 0.03 < est_x < mean_k1, (est_x, -math.log(p_x), mean_k1)
    assert abs(total - 1) < 1e-9  # the sampler's distribution is normalised


def test_exact_likelihood_at_alpha0_zero_is_the_ar_likelihood():
    model = sharp_model("B")
    x = torch.randint(0, V, (4, L))
    torch.testing.assert_close(model.exact_nll(x, 0.0, 3), model.nelbo(x, 0.0).detach())
    with pytest.raises(ValueError, match="exact_nll needs variant B"):
        sharp_model("A").exact_nll(x, 0.5)


# ----------------------------------------------------------------------------------------------------------
# Sampler invariants

@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("alpha0,steps", [(0.0, 3), (0.5, 4), (1.0, 5)])
def test_sampler_invariants(variant, prompt, alpha0, steps):
    model = sharp_model(variant)
    p = PROMPTS[prompt]
    x, logits = gen(model, 7, num_samples=4, alpha0=alpha0, steps=steps, prompt=p)
    assert x.shape == (4, L) and x.dtype == torch.long
    assert ((x >= 0) & (x < V)).all()  # never the mask token
    template = torch.full((L,), V) if p is None else torch.cat([p, torch.full((L - len(p),), V)])
    given = template != V
    assert torch.equal(x[:, given], template[given].expand(4, -1))
    k, n_seq, _ = replay_schedule(7, model, int((~given).sum()), alpha0, steps, (~given).expand(4, L))
    assert len(logits) == len(k) + n_seq and all(n > 0 for n in k) and steps >= len(k)
    assert sum(t.size(1) for t in logits) == int((~given).sum())
    assert [t.size(1) for t in logits] == k + [1] * n_seq
    if alpha0 == 0:
        assert k == []
    if alpha0 == 1:
        assert n_seq == 0


@pytest.mark.parametrize("prompt", ["prefix", "infill"])
def test_alpha0_zero_reads_the_prompt_as_an_ar_model(prompt):
    """At alpha0 = 0 the sampler is an AR model's: the given tokens left to right (the order an alpha0 = 0 model trains
    on; a prefix prompt is then read as GPT reads it), then each mask left to right, predicted by a causal forward
    over that order (the reference: one full forward per token)."""
    model, p = sharp_model("B", alpha0=0.0), PROMPTS[prompt]
    x, logits = gen(model, 0, num_samples=2, temperature=0, prompt=p)
    canvas = torch.cat([p, torch.full((L - len(p),), V)]).expand(2, L).clone()
    order = torch.cat([(canvas[0] != V).nonzero()[:, 0], (canvas[0] == V).nonzero()[:, 0]]).expand(2, L)
    n_given = int((canvas[0] != V).sum())
    assert len(logits) == L - n_given
    for i, lg in enumerate(logits):
        ref = model.lm_head(model(canvas.gather(1, order), order))[:, n_given + i]  # causal over the sorted order
        torch.testing.assert_close(lg[:, 0], ref, rtol=0, atol=1e-10)
        canvas[:, order[0, n_given + i]] = ref.argmax(-1)
    assert torch.equal(x, canvas)


def subcontext_calls(given, S, alpha0, offsets):
    """The call that decodes each position under the structured order, written from its statement (METHOD.md §8):
    call j (j < floor(S alpha0)) decodes offset offsets[j] of every length-S chunk; the other positions are decoded
    left to right, one per call. Given positions are decoded by no call (0), and a call left empty is dropped."""
    L, n_pattern = len(given), math.floor(S * alpha0)
    calls, c = [0] * L, 0
    for j in range(n_pattern):
        todo = [p for p in range(offsets[j], L, S) if not given[p]]
        c += bool(todo)
        for p in todo:
            calls[p] = c
    for p in range(L):
        if not given[p] and calls[p] == 0:
            c += 1
            calls[p] = c
    return calls


@pytest.mark.parametrize("L_,S", [(12, 4), (12, 3), (12, 12), (8, 1), (16, 8)])
@pytest.mark.parametrize("alpha0", [1.0, 0.6, 0.25, 0.0])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("prompt", ["none", "prefix", "infill"])
def test_subcontext_order_is_the_papers_construction(L_, S, alpha0, shuffle, prompt):
    model = sharp_model("B", block_size=L_)
    prompts = {"none": None, "prefix": torch.tensor([3, 1, 4, 1, 5]), "infill": torch.tensor([V, 2, V, V, 7, V, V, 1])}
    p = prompts[prompt]
    given = [False] * L_ if p is None else [i < len(p) and p[i] != V for i in range(L_)]
    out = model.generate(4, alpha0, 1, subcontext_len=S, subcontext_shuffle=shuffle, prompt=p,
                         generator=torch.Generator().manual_seed(0))
    offsets = list(range(S))
    if shuffle:  # the offset of each call, read off the first row: one offset per call, shared by every row
        row = out.decoded_by[0].tolist()
        offsets = [next((q % S for q in range(L_) if row[q] == c and not given[q]), None) for c in range(1, S + 1)]
        offsets = [o for o in offsets if o is not None][:math.floor(S * alpha0)]
        offsets += [o for o in range(S) if o not in offsets]  # calls a prompt emptied (dropped) come last
    for row in out.decoded_by.tolist():
        assert row == subcontext_calls(given, S, alpha0, offsets)
    if p is None:
        n_pattern = math.floor(S * alpha0)
        assert out.nfe == n_pattern + L_ - n_pattern * L_ // S
        assert out.nfe == S or alpha0 < 1


def test_subcontext_shuffle_draws_the_offsets_and_each_call_at_random():
    to_gen = torch.ones(8, 12, dtype=torch.bool)
    firsts, layouts = set(), set()
    for seed in range(20):
        order, ks, n_seq = esolm.subcontext_plan(to_gen, 4, 1.0, True, torch.Generator().manual_seed(seed))
        assert ks == [3, 3, 3, 3] and n_seq == 0
        firsts.add(int(order[0, 0]) % 4)  # the offset of the first call
        layouts |= {tuple(r) for r in order[:, :3].tolist()}  # the first call's positions, in each row's order
    assert firsts == {0, 1, 2, 3} and len(layouts) > 20
    order, _, _ = esolm.subcontext_plan(to_gen, 4, 1.0, False)
    assert order[0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11] and (order == order[0]).all()


def test_reveal_schedule_unmasks_about_alpha0():
    for alpha0 in (0.1, 0.5, 0.9):
        counts = [sum(reveal_schedule(1000, alpha0, 16, "cpu", torch.Generator().manual_seed(s))[0])
                  for s in range(20)]
        p = (alpha0 - alpha0 * EPS) / (1 - alpha0 * EPS)
        assert abs(sum(counts) / 20 / 1000 - p) < 4 * math.sqrt(p * (1 - p) / 20000)
    k, n_seq = reveal_schedule(50, 1.0, 1, "cpu", torch.Generator().manual_seed(0))
    assert k == [50] and n_seq == 0  # one step at alpha0 = 1 unmasks everything at once


def test_sample_tokens_temperature_and_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 1, 4)
    g = torch.Generator().manual_seed(0)
    assert sample_tokens(logits, 0.0, 1.0, g).eq(0).all()  # temperature 0 is greedy
    assert sample_tokens(logits, 1.0, 1e-9, g).eq(0).all()  # a tiny nucleus keeps the top token only
    tok = sample_tokens(logits, 1.0, 0.7, g)  # nucleus {0, 1}: renormalised to 5/8, 3/8
    assert set(tok.unique().tolist()) == {0, 1}
    assert abs(tok.eq(0).double().mean() - 5 / 8) < 0.02
    tok = sample_tokens(logits, 1.0, 1.0, g)
    freq = torch.bincount(tok.flatten(), minlength=4).double() / tok.numel()
    assert (freq - torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)).abs().max() < 0.02


def test_all_given_prompt_needs_no_call():
    model = sharp_model("B")
    full = torch.randint(0, V, (L,))
    x, logits = gen(model, 0, num_samples=2, alpha0=0.5, steps=4, prompt=full)
    assert logits == [] and torch.equal(x, full.expand(2, L))


def test_generate_restores_training_mode():
    model = sharp_model("B").train()
    model.generate(1, 0.5, 2)
    assert model.training


# ----------------------------------------------------------------------------------------------------------
# Bad arguments

@pytest.mark.parametrize("call,match", [
    (lambda m, x: m.nelbo(x, -0.1), "nelbo: alpha0=-0.1: must be in"),
    (lambda m, x: m.exact_nll(x, 1.5), "exact_nll: alpha0=1.5: must be in"),
    (lambda m, x: m.nelbo(x[:, :-1], 0.5), "shape"),
    (lambda m, x: m.nelbo(x.float(), 0.5), "LongTensor"),
    (lambda m, x: m.nelbo(x.clamp(max=0) + V, 0.5), "outside"),
    (lambda m, x: m.exact_nll(x - 100, 0.5), "exact_nll: x=...: holds ids outside"),
    (lambda m, x: m.loss(x[:1]), "loss: x=1 row: 0 < alpha0 < 1 needs 2 rows or more"),
    (lambda m, x: m.generate(2, 0.5, 0), "generate: steps=0: must be"),
    (lambda m, x: m.generate(0, 0.5, 4), "num_samples"),
    (lambda m, x: m.generate(2, 2.0, 4), "alpha0"),
    (lambda m, x: m.generate(2, 0.5, 4, temperature=-1), "temperature"),
    (lambda m, x: m.generate(2, 0.5, 4, top_p=0), r"generate: top_p=0: must be in \(0, 1\]"),
    (lambda m, x: m.generate(2, 0.5, 4, adaptive="best"), "adaptive=best: must be None, confidence or margin"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.zeros(L + 1, dtype=torch.long)), "P <= 12"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([V + 1])), "outside"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([1.0])), "LongTensor"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([[1], [2], [3]])), r"\(2, P\)"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([[1, V], [2, 3]])), "same number"),
    (lambda m, x: m.generate(2, 0.5, 4, subcontext_len=5), "subcontext_len=5: must divide L = 12"),
    (lambda m, x: m.generate(2, 0.5, 4, subcontext_len=4, prompt=torch.tensor([[1, V], [V, 3]])), "same given"),
    (lambda m, x: sharp_model("MDLM").generate(2, 1.0, 4, kv_cache=True), "kv_cache=True: MDLM has no KV cache"),
    (lambda m, x: sharp_model("MDLM").generate(2, 0.5, 4), "generate: alpha0=0.5: MDLM is a pure MDM"),
    (lambda m, x: sharp_model("MDLM", alpha0=0.25), "EsoLMConfig: alpha0=0.25: MDLM is a pure MDM"),
    (lambda m, x: sharp_model("MDLM").exact_nll(x, 1.0), "exact_nll needs variant B"),
])
def test_bad_arguments_raise_value_error(call, match):
    model = sharp_model("B")
    x = torch.randint(0, V, (4, L))
    with pytest.raises(ValueError, match=match):
        call(model, x)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="variant"):
        EsoLMConfig(variant="C")
    with pytest.raises(ValueError, match="even"):
        EsoLMConfig(n_embd=30, n_head=2)


# ----------------------------------------------------------------------------------------------------------
# The paper's published checkpoints: from_pretrained against a reference of the official network (the DiT of
# s-sahoo/Eso-LMs, models/dit.py), written here from its description and not from our backbone

OV, OC, OL = 11, 32, 16  # vocabulary (the mask is id OV, the last embedding row), width, length of the tiny DiT


def load_tiny(folder, **overrides):
    return pretrained.from_pretrained(folder, dtype=torch.float64, **{"n_head": 2, "block_size": OL, "alpha0": 1.0,
                                                                      **overrides})


def assert_matches_official(ours, ref, tol=1e-10):
    """Our logits over the V real tokens against the official ones: the same numbers, and the same probabilities
    (the official -1e6 mask logit and our head without the mask's row are the same softmax)."""
    torch.testing.assert_close(ours, ref[..., :OV], atol=tol, rtol=0)
    torch.testing.assert_close(ours.log_softmax(-1), ref.log_softmax(-1)[..., :OV], atol=tol, rtol=0)


def causal(B, T):
    return torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)


@pytest.fixture
def official(tmp_path):
    sd = official_state_dict()
    return save_official(tmp_path / "ckpt", sd), sd


def test_official_diffusion_and_sequential_forwards(official):
    folder, sd = official
    model = load_tiny(folder)
    assert not model.training and model.config.n_layer == 2 and model.config.n_embd == OC
    bare = pretrained.from_pretrained(folder, alpha0=1.0).config  # config.json lacks the heads (read off inv_freq), L
    assert (bare.n_head, bare.block_size, bare.bias, bare.gelu, bare.alpha0) == (2, 1024, True, "tanh", 1.0)
    g = torch.Generator().manual_seed(0)
    B = 3
    x = torch.randint(0, OV, (B, OL), generator=g)
    n_clean = torch.tensor([0, 5, 11])
    # diffusion forward (B): any sorted order (clean tokens first, then masks), causal, RoPE at the original positions
    order = torch.stack([torch.randperm(OL, generator=g) for _ in range(B)])
    zs = x.gather(1, order).masked_fill(torch.arange(OL) >= n_clean[:, None], OV)
    with torch.no_grad():
        ours = model.lm_head(model.diffusion_forward(zs, order, n_clean))
        gelu_exact = load_tiny(folder, gelu="exact")
        wrong = gelu_exact.lm_head(gelu_exact.diffusion_forward(zs, order, n_clean))
    ref = official_logits(sd, zs, order, causal(B, OL))
    assert_matches_official(ours, ref)
    assert (wrong - ref[..., :OV]).abs().max() > 1e-4  # the exact GELU is a different network: the test can tell
    # sequential forward: clean tokens of z0 in a random order, then the masked positions left to right; the official
    # layout is [z ; x] (2L tokens) with the block-diffusion mask of block size 1, logits read from z's masked rows
    order = torch.stack([torch.cat([p[:c], p[c:].sort().values]) for p, c in
                         zip((torch.randperm(OL, generator=g) for _ in range(B)), n_clean.tolist())])
    xs = x.gather(1, order)
    with torch.no_grad():
        h, s, valid = model.sequential_forward(xs, order, n_clean)
        ours = model.lm_head(h)
    for b, c in enumerate(n_clean.tolist()):
        zb = xs[b:b + 1].masked_fill(torch.arange(OL) >= c, OV)
        mask = torch.tensor(brute_sequential(OL, c, "B"))[None]
        ref = official_logits(sd, torch.cat([zb, xs[b:b + 1]], 1), torch.cat([order[b:b + 1]] * 2, 1), mask)
        assert valid[b].sum() == OL - c
        assert_matches_official(ours[b, :OL - c], ref[0, c:OL])
    # alpha0 = 0: the NELBO is the exact AR NLL, every token masked in z, left to right
    mask = torch.tensor(brute_sequential(OL, 0, "B"))[None].expand(B, -1, -1)
    pos = torch.arange(OL).expand(B, OL)
    ref = official_logits(sd, torch.cat([torch.full_like(x, OV), x], 1), torch.cat([pos, pos], 1), mask)[:, :OL]
    ref_nll = -ref.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1).sum(1)
    with torch.no_grad():
        torch.testing.assert_close(model.nelbo(x, 0.0), ref_nll, atol=1e-10, rtol=0)


@pytest.mark.parametrize("alpha0,steps", [(0.0, 4), (1.0, 5)])
def test_official_cached_sampler(official, alpha0, steps):
    """The KV-cached sampler's logits at each call (read off lm_head, in float64) against the official forward over
    the sorted sequence decoded so far: the tokens of earlier calls clean, the rest masks."""
    folder, sd = official
    model = load_tiny(folder)
    per_call = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, out: per_call.append(out))
    x = model.generate(2, alpha0, steps, generator=torch.Generator().manual_seed(3)).x
    hook.remove()
    k, n_seq, order = replay_schedule(3, model, OL, alpha0, steps, torch.ones(2, OL, dtype=torch.bool))
    assert len(per_call) == len(k) + n_seq and (n_seq == 0 if alpha0 == 1 else k == [])
    xs, d = x.gather(1, order), 0
    for n, logits in zip(k + [1] * n_seq, per_call):
        ref = official_logits(sd, xs.masked_fill(torch.arange(OL) >= d, OV), order, causal(2, OL))
        assert_matches_official(logits, ref[:, d:d + n])
        d += n


@pytest.mark.parametrize("change,match", [
    (lambda sd, meta: sd.pop("blocks.1.mlp.0.bias"), "missing tensor 'blocks.1.mlp.0.bias'"),
    (lambda sd, meta: sd.pop("rotary_emb.inv_freq"), "missing tensor 'rotary_emb.inv_freq'"),
    (lambda sd, meta: sd.update({"blocks.0.attn_out.bias": torch.zeros(OC)}),
     "unexpected tensor 'blocks.0.attn_out.bias'"),
    (lambda sd, meta: sd.update({"blocks.0.attn_qkv.weight": torch.zeros(3 * OC, OC + 1)}),
     r"'blocks.0.attn_qkv.weight' has shape \(96, 33\), expected \(96, 32\)"),
    (lambda sd, meta: sd.update({"rotary_emb.inv_freq": torch.ones(4)}), r"'rotary_emb.inv_freq' has shape \(4,\)"),
    (lambda sd, meta: sd["sigma_map.mlp.0.weight"][:, 200].fill_(0.3), "sigma_map.mlp.0.weight.*time conditioning"),
    (lambda sd, meta: meta.update({"mask_index": 0}), "mask_index 0 is not the last embedding row"),
])
def test_official_checkpoint_errors_name_the_problem(tmp_path, change, match):
    sd, meta = official_state_dict(), {"mask_index": OV, "vocab_size": OV + 1}
    change(sd, meta)
    with pytest.raises(ValueError, match=match):
        load_tiny(save_official(tmp_path, sd, meta))


def test_truncated_safetensors_is_a_value_error(tmp_path):
    sd = official_state_dict()
    folder = save_official(tmp_path, sd)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    last = list(sd)[-1]  # the writer stores the tensors in order: cutting the end cuts the last one
    for cut, match in [(data[:-5], f"truncated: tensor '{last}'"), (data[:100], "truncated or not safetensors")]:
        with open(path, "wb") as f:
            f.write(cut)
        with pytest.raises(ValueError, match=match):
            load_tiny(folder)


def test_safetensors_dtypes_and_backbone_prefix(tmp_path):
    """F32, F16, BF16 and F64 tensors read back bit for bit; keys saved from the hub's wrapper ("backbone.") load;
    the hub's config.json (n_blocks, n_heads, model_length) needs no overrides."""
    dtypes = itertools.cycle([torch.float16, torch.bfloat16, torch.float32, torch.float64])
    sd = {f"backbone.{k}": v.to(next(dtypes)) for k, v in official_state_dict().items()}
    meta = {"mask_index": OV, "vocab_size": OV + 1, "n_blocks": 2, "n_heads": 2, "model_length": OL, "cond_dim": 8}
    folder = save_official(tmp_path, sd, meta)
    back = pretrained.read_safetensors(os.path.join(folder, "model.safetensors"))
    assert list(back) == list(sd) and all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in sd.items())
    model = pretrained.from_pretrained(folder, dtype=torch.float64, alpha0=1.0)
    assert model.config.block_size == OL and model.config.n_head == 2
    idx = torch.randint(0, OV + 1, (2, OL))
    pos = torch.stack([torch.randperm(OL) for _ in range(2)])
    with torch.no_grad():
        assert_matches_official(model.lm_head(model(idx, pos)), official_logits(sd, idx, pos, causal(2, OL)))


def test_from_pretrained_downloads_once_and_explains_failures(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    save_official(hub / "someone" / "tiny-esolm", official_state_dict())
    monkeypatch.setattr(pretrained, "HUB_URL", hub.as_uri() + "/{repo}/{file}")
    monkeypatch.setenv("ESOLM_CACHE", str(tmp_path / "cache"))
    first = load_tiny("someone/tiny-esolm")
    assert sorted(os.listdir(tmp_path / "cache" / "someone--tiny-esolm")) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(pretrained, "HUB_URL", (tmp_path / "gone").as_uri() + "/{repo}/{file}")  # a download would fail
    again = load_tiny("someone/tiny-esolm")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    with pytest.raises(OSError, match="could not download .*someone/no-such-model") as e:
        load_tiny("someone/no-such-model")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # a message, not urllib's traceback
    assert not os.path.exists(tmp_path / "cache" / "someone--no-such-model" / "config.json")


def test_cut_off_download_is_not_kept(tmp_path, monkeypatch):
    class CutOff(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # promises 1000 bytes, sends 400, and closes the connection
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 400)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CutOff)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        monkeypatch.setenv("ESOLM_CACHE", str(tmp_path))
        monkeypatch.setattr(pretrained, "HUB_URL", f"http://127.0.0.1:{server.server_port}/{{repo}}/{{file}}")
        with pytest.raises(OSError, match="400 of 1000 bytes"):
            pretrained.download("someone/tiny-esolm", "model.safetensors")
        assert os.listdir(tmp_path / "someone--tiny-esolm") == []  # neither the file nor its partial download
    finally:
        server.shutdown()
        server.server_close()


def test_config_switches_keep_our_models_unchanged():
    keys = set(EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16)).state_dict())
    assert not any(k.endswith(".bias") for k in keys)  # the checkpoints of our own models load as before
    with_bias = set(EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16, bias=True)).state_dict())
    assert with_bias - keys == {"blocks.0.ln_1.bias", "blocks.0.ln_2.bias", "blocks.0.mlp.c_fc.bias",
                                "blocks.0.mlp.c_proj.bias", "ln_f.bias", "lm_head.bias"}
    with pytest.raises(ValueError, match="gelu"):
        EsoLMConfig(gelu="fast")
