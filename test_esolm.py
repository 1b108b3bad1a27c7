"""Parity tests for esolm.py: each one checks the code against an independent statement of the method
(README, "The method, mapped to the code").
Run: python -m pytest -q"""
import itertools
import math

import pytest
import torch

from esolm import (EPS, EsoLM, EsoLMConfig, KVCache, alpha_t, antithetic_t, apply_rope, diffusion_mask,
                   generation_order, mdm_weight, reveal_schedule, rope_tables, sample_tokens, sequential_mask)

V, L = 13, 12


def sharp_model(variant, dtype=torch.float64, vocab_size=V, block_size=L, seed=0):
    """A tiny model with large random weights: attention is peaked, so a wrong mask or a stale cache entry
    changes the logits far beyond the tolerance (at GPT-2 init every attention row is nearly uniform)."""
    torch.manual_seed(seed)
    model = EsoLM(EsoLMConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                              variant=variant))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.35)
    return model.to(dtype).eval()


def gen(model, seed, **kw):
    return model.generate(generator=torch.Generator().manual_seed(seed), return_logits=True, **kw)


def replay_schedule(seed, model, n_gen, alpha0, steps, to_gen):
    """The reveal schedule and generation order that generate() draws first from a generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    k, n_seq = reveal_schedule(n_gen, alpha0, steps, "cpu", g)
    return k, n_seq, generation_order(to_gen, n_gen - n_seq, g)


PROMPTS = {
    "none": None,
    "prefix": torch.tensor([3, 1, 4, 1]),
    "infill": torch.tensor([2, 7, V, V, 1, V, 8, V, V, V, 0, V]),  # V = mask_id: generate these
}


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
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_cached_equals_uncached(variant, alpha0, steps, prompt, dtype, tol):
    model = sharp_model(variant, dtype)
    kw = dict(num_samples=3, alpha0=alpha0, steps=steps, prompt=PROMPTS[prompt])
    x1, logits1 = gen(model, 5, kv_cache=True, **kw)
    x2, logits2 = gen(model, 5, kv_cache=False, **kw)
    assert torch.equal(x1, x2)
    assert [t.shape for t in logits1] == [t.shape for t in logits2]
    for a, b in zip(logits1, logits2):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    if (alpha0, steps) == (0.7, 3):  # this case must decode several tokens in one call
        assert max(t.size(1) for t in logits1) > 1


def test_rows_use_different_orders():
    to_gen = torch.ones(4, L, dtype=torch.bool)
    order = generation_order(to_gen, 6, torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in order[:, :6].tolist()}) == 4
    assert torch.equal(order[:, 6:], order[:, 6:].sort(1).values)  # the sequential phase goes left to right
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
    got = sequential_mask(n_clean, M, L_, variant)
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
    assert torch.allclose(model.loss(x, 0.0), -logp.mean() / 4)


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
        t = antithetic_t(6, "cpu", g)
        nll, n_masked = model._mdm_term(x, 1.0, t, g)
    torch.testing.assert_close(got, nll / t)


def test_antithetic_t_covers_the_unit_interval():
    t = antithetic_t(8, "cpu", torch.Generator().manual_seed(0))
    assert ((t > 0) & (t <= 1)).all()
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), 1 / 8))


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
    model = EsoLM(EsoLMConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=48))
    x = torch.randint(0, V, (8, L))  # 8 random sequences: the best NELBO is about log(8) / L = 0.17 nats/token

    def nelbo_per_token():  # averaged over 16 draws per sequence, from a fixed generator
        with torch.no_grad():
            return model.nelbo(x.repeat(16, 1), alpha0, torch.Generator().manual_seed(0)).mean().item() / L

    start = nelbo_per_token()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model.loss(x.repeat(4, 1), alpha0)
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
    with pytest.raises(ValueError, match="variant B"):
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
    (lambda m, x: m.nelbo(x, -0.1), "alpha0"),
    (lambda m, x: m.loss(x, 1.5), "alpha0"),
    (lambda m, x: m.nelbo(x[:, :-1], 0.5), "shape"),
    (lambda m, x: m.nelbo(x.float(), 0.5), "LongTensor"),
    (lambda m, x: m.loss(x.clamp(max=0) + V, 0.5), "outside"),
    (lambda m, x: m.loss(x - 100, 0.5), "outside"),
    (lambda m, x: m.loss(x, 0.5, batch_split=1.0), "batch_split"),
    (lambda m, x: m.loss(x[:1], 0.5), "2 rows"),
    (lambda m, x: m.loss(x, 0.5, loss_type="mse"), "loss_type"),
    (lambda m, x: m.generate(2, 0.5, 0), "steps"),
    (lambda m, x: m.generate(0, 0.5, 4), "num_samples"),
    (lambda m, x: m.generate(2, 2.0, 4), "alpha0"),
    (lambda m, x: m.generate(2, 0.5, 4, temperature=-1), "temperature"),
    (lambda m, x: m.generate(2, 0.5, 4, top_p=0), "top_p"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.zeros(L + 1, dtype=torch.long)), "T <= 12"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([V + 1])), "outside"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([1.0])), "LongTensor"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([[1], [2], [3]])), r"\(2, T\)"),
    (lambda m, x: m.generate(2, 0.5, 4, prompt=torch.tensor([[1, V], [2, 3]])), "same number"),
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
