"""
Esoteric Language Models (Eso-LMs, Sahoo et al., arXiv 2506.01928): one transformer that is both a masked diffusion
model (MDM) and an autoregressive (AR) model, trained with the hybrid NELBO and sampled with an exact KV cache. The
file is the method, top to bottom (README.md has the pictures): config, backbone, masks, schedule and NELBO pieces,
sampling plans, the Eso-LM (forwards, loss, likelihood, sampler); then the argument checks, off the reading path.

Symbols, as the paper writes them: x, a clean sequence of L tokens over a vocabulary of V (the mask token has id V);
z, a partly masked copy, M(z) its masked positions; t in [0, 1], diffusion time; alpha_t, the probability that a token
is still clean at t; z_t, x with each token masked with probability 1 - alpha_t; z0 = z_t at t = 0 (its law q_0): about
alpha0 L clean tokens, which the sequential phase fills left to right. alpha0 = 1 is a pure MDM, 0 a pure AR model; a
model knows the alpha0 it is trained for (EsoLMConfig). Sorted order: the layout of a forward, clean tokens before
masks (the sequential forward puts its z-queries in front: [z ; x]); in sampling, the generation order (cache slot i
holds the i-th token decoded). order[b, i] is the original position of the i-th token of row b; RoPE rotates each
token by it, so the attention mask is the only place the order shows. T: the sampler's diffusion steps; k: tokens a
call decodes; NFE: the calls of a run. Sizes: B rows, n tokens fed, C channels, nh heads of hs channels.
"""
import math
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

EPS = 1e-3  # the schedule's floor: t >= EPS keeps the MDM weight at most 1 / EPS, and alpha_1 = alpha0 EPS
VARIANTS = ("A", "B", "MDLM")  # the two Eso-LMs, and the MDLM baseline (bidirectional everywhere, alpha0 = 1)


@dataclass
class EsoLMConfig:
    vocab_size: int = 256  # V real tokens; the mask token is id V
    block_size: int = 256  # L, the sequence length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0  # on the two residual branches of each block, as the paper's network
    variant: str = "B"  # "B": KV cache in both phases; "A": bidirectional clean tokens; "MDLM": the baseline
    alpha0: float = 0.25  # what the model is trained for: the fraction of tokens the diffusion phase decodes
    rope_base: float = 10000.0
    pos_emb: bool = False  # also a learned absolute position embedding (nanoGPT's wpe): Sudoku's rows and boxes need it
    bias: bool = False  # biases in the LayerNorms, MLP and lm_head (with gelu="tanh": the paper's published network)
    gelu: str = "exact"  # "exact" erf GELU, or "tanh": the approximation the paper's network uses

    def __post_init__(self):
        check_config(self)


# ----------------------------------------------------------------------------------------------------------
# Backbone: a pre-norm GPT with rotary positions and no time input (the network never sees t)

def rope_tables(block_size, head_size, base):
    """cos and sin of the rotary angles of every position, (L, hs/2). Built once; a forward gathers its rows."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    # x (B, heads, n, hs); cos, sin (B, 1, n, hs/2), gathered at each token's ORIGINAL position
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"  # F.gelu's names for the two choices

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, (B, nh, L, hs), written in place (gpt-fast's cache). Unlike an AR
    cache, slot i holds the i-th token in *generation order* (each row its own; positions live in RoPE). A call writes
    every token it is fed; the first n_cached slots are final, and the next call overwrites the rest."""

    def __init__(self, B, n_head, size, head_size, dtype, device):
        super().__init__()
        # zeros, not empty: the static path (static_cache.py) reads every slot, and the mask removes finite numbers only
        self.register_buffer("k", torch.zeros(B, n_head, size, head_size, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros_like(self.k))

    def update(self, start, k, v):
        """Write the chunk (B, nh, n, hs) at slots [start, start+n); return the keys/values of slots [0, start+n)."""
        end = start + k.size(2)
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.causal = config.variant != "MDLM"  # what no mask means: causal over the sorted order, or MDLM's all

    def forward(self, x, cos, sin, mask=None, cache=None, start=0, n_z=0, x_mask=None):
        B, n, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        qk, v = self.c_attn(x).split([2 * C, C], dim=2)
        # q and k rotated in one go: (B, n, 2C) viewed as 2 nh heads, (B, 2 nh, n, hs), then split back into nh each
        q, k = apply_rope(qk.view(B, n, 2 * nh, hs).transpose(1, 2), cos, sin).split(nh, dim=1)
        v = v.view(B, n, nh, hs).transpose(1, 2)  # (B, nh, n, hs)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nh, start+n, hs): the cached tokens, then this chunk
        if n_z:  # layout [z ; x]: x never attends to z, so its queries run on their own over the x keys (causal for
            # (B): the fast path), and only the n_z z-queries read `mask`
            y = torch.cat([self.sdpa(q[:, :, :n_z], k, v, mask),
                           self.sdpa(q[:, :, n_z:], k[:, :, n_z:], v[:, :, n_z:], x_mask)], dim=2)
        else:
            y = self.sdpa(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, n, C))

    def sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and self.causal)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)  # the residual branches only, as the paper's network

    def forward(self, x, cos, sin, **attention):
        x = x + self.dropout(self.attn(self.ln_1(x), cos, sin, **attention))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.mask_id = config.vocab_size
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # + 1 row for the mask token
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb else None  # at original positions
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # untied head over the V real tokens only: the mask is never predicted ("zero masking")
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-2 init: N(0, 0.02), residual projections by 1/sqrt(2 n_layer) (the residual stream keeps its variance)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # linear and embedding weights; LayerNorm weights stay 1
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def compute_dtype(self):  # the dtype of q, k and v: autocast's when it is on, else the weights'
        dev = self.wte.weight.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.wte.weight.dtype

    def forward(self, idx, pos, mask=None, caches=None, start=0, n_z=0, x_mask=None):
        """idx, pos (B, n): token ids (the mask id allowed) and original positions, in sorted order. mask: bool
        (B or 1, 1, nq, start + n) or (nq, start + n) over its nq queries (n, or n_z), True = may attend; None: causal
        over the sorted order (MDLM: all to all). caches: a KVCache per layer, written at [start, start + n). n_z > 0:
        the sequential layout [z ; x]: n_z z-queries with `mask`, then the x-stream with `x_mask` (None: causal).
        Returns the hidden states (B, n, C): callers apply lm_head to the rows they need (no C x V on clean tokens)."""
        x = self.wte(idx) if self.wpe is None else self.wte(idx) + self.wpe(pos)
        dtype = self.compute_dtype()
        cos, sin = (t[pos].unsqueeze(1).to(dtype) for t in (self.rope_cos, self.rope_sin))  # (B, 1, n, hs/2)
        mask, x_mask = (None if m is None else torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(
            ~m, -math.inf) for m in (mask, x_mask))  # additive, once for all layers (SDPA would convert per call)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask=mask, cache=caches[i] if caches else None, start=start, n_z=n_z,
                      x_mask=x_mask)
        return self.ln_f(x)


# ----------------------------------------------------------------------------------------------------------
# Attention masks. A[q, j] = True: the token at sorted index q may attend to the one at sorted index j.

def visible(q, j, prefix):
    """Causal over the sorted order, but the first `prefix` tokens ((A)'s clean block; (B): 0) see each other both ways:
    the diffusion masks, the x-stream, every sampler call. q, j: sorted indices (nq,), (nk,); prefix: int, (B, 1, 1)."""
    return (j <= q[:, None]) | (j < prefix)  # (nq, nk), or (B, nq, nk) with a per-row prefix (B, 1, 1)


def diffusion_mask(prefix, L, variant):
    """(B, 1, L, L) mask of the L-token diffusion forward over z_t: clean tokens first, then masks. prefix (B,): the
    clean tokens of (A) that see each other both ways (in training all of them; in sampling see EsoLM.feeds).

    (B): causal, so a clean token sees only the clean tokens before it in the order: its keys/values can be cached.
    (A): the clean block is bidirectional. MDLM sees everything. L = 4, prefix = 2 (c: clean, m: mask, 1: may attend):

        (B)    c c m m        (A)    c c m m        MDLM   c c m m
            c  1 . . .            c  1 1 . .            c  1 1 1 1
            c  1 1 . .            c  1 1 . .            c  1 1 1 1
            m  1 1 1 .            m  1 1 1 .            m  1 1 1 1
            m  1 1 1 1            m  1 1 1 1            m  1 1 1 1
    """
    i = torch.arange(L, device=prefix.device)  # the block that sees itself both ways: (B) none, MDLM all L tokens
    block = {"A": prefix, "B": torch.zeros_like(prefix), "MDLM": torch.full_like(prefix, L)}[variant]
    # block[:, None, None] (B, 1, 1) against the (L, L) rule: (B, L, L), then the head axis: (B, 1, L, L)
    return visible(i, i, block[:, None, None]).unsqueeze(1)


def sequential_mask(n_clean, M, L, variant):
    """The masks of the sequential forward (the AR term), layout [z ; x] in sorted order: z0's clean tokens first,
    then its M masked positions left to right; x is the clean sequence in the same order. A z-query sees itself and
    the x-keys before it; the x-stream is causal ((A): its clean block bidirectional) and never sees z. Clean
    z-queries carry no loss, so only the M masked ones are fed: z-query r is at sorted index n_clean + r (rows with
    fewer masks are padded, and nothing reads the padding). L = 4, n_clean = 2: the full 2L layout, the rows fed (*):

        (B)      z z z z  x x x x         (A)      z z z z  x x x x
            z    1 . . .  . . . .             z    1 . . .  . . . .
            z    . 1 . .  1 . . .             z    . 1 . .  1 . . .
          * z    . . 1 .  1 1 . .           * z    . . 1 .  1 1 . .
          * z    . . . 1  1 1 1 .           * z    . . . 1  1 1 1 .
          * x    . . . .  1 . . .           * x    . . . .  1 1 . .
          * x    . . . .  1 1 . .           * x    . . . .  1 1 . .
          * x    . . . .  1 1 1 .           * x    . . . .  1 1 1 .
          * x    . . . .  1 1 1 1           * x    . . . .  1 1 1 1

    Returns what the forward reads: the z-queries' mask (B, 1, M, M + L) over [z ; x], and the x-stream's own
    (B, 1, L, L), None for (B) (causal). The block where x would see z is never built: the forward skips it."""
    B, dev = n_clean.size(0), n_clean.device
    c = n_clean[:, None, None]  # (B, 1, 1): broadcast over (z-query r, key i)
    r, i = torch.arange(M, device=dev), torch.arange(L, device=dev)
    zz = torch.eye(M, dtype=torch.bool, device=dev).expand(B, M, M)  # each z-query sees itself...
    zx = i < c + r[:, None]  # ... and the x-keys strictly before its sorted index: (L,) < (B, M, 1) -> (B, M, L)
    x_mask = None if variant == "B" else visible(i, i, c).unsqueeze(1)
    return torch.cat([zz, zx], 2).unsqueeze(1), x_mask


# ----------------------------------------------------------------------------------------------------------
# Noise schedule and the pieces of the NELBO

def alpha_t(alpha0, t):
    """alpha_t = alpha0 (1 - (1 - EPS) t): alpha0 at t = 0, alpha0 EPS at t = 1; linear in t ("log-linear" noise)."""
    return alpha0 * (1 - (1 - EPS) * t)


def mdm_weight(alpha0, t):
    """-alpha_t' / (1 - alpha_t) = alpha0 (1 - EPS) / (1 - alpha_t): the MDM term's weight; 1/t at alpha0 = 1."""
    return alpha0 * (1 - EPS) / (1 - alpha_t(alpha0, t))


def stratified_t(n, device, generator=None):
    """t for n rows, stratified as the official code draws it: row i is uniform in the i-th of n equal slices of
    [0, 1), mapped to [EPS, 1) (less variance than independent draws; t >= EPS keeps the MDM weight at most 1 / EPS)."""
    return EPS + (1 - EPS) * (torch.rand(n, device=device, generator=generator) + torch.arange(n, device=device)) / n


def mdm_rows(B, alpha0, batch_split):
    """How many of B rows (the first) estimate the MDM term in training, the rest the AR term; alpha0 0 or 1: 0 or B."""
    check(alpha0 in (0, 1) or B >= 2, "loss", "x", f"{B} row", "0 < alpha0 < 1 needs 2 rows or more: one for each term")
    return B * int(alpha0) if alpha0 in (0, 1) else min(max(round(B * batch_split), 1), B - 1)


def nll_per_row(logits, targets, sel):
    """Sum over the selected tokens of each row of -log p(target); logits (N, V) for the N True entries of sel."""
    nll = torch.zeros(sel.shape, device=sel.device, dtype=torch.promote_types(logits.dtype, torch.float32))
    nll[sel] = F.cross_entropy(logits.to(nll.dtype), targets, reduction="none")
    return nll.sum(1)


def clean_first_order(clean, shuffle, generator=None):
    """(B, L) positions in sorted order: the clean first (shuffled, or left to right), then the others left to right."""
    B, L = clean.shape
    pos = torch.arange(L, device=clean.device) / L
    key = torch.rand(B, L, device=clean.device, generator=generator) if shuffle else pos.expand(B, L)
    return torch.where(clean, key, 1 + pos).argsort(1)


# ----------------------------------------------------------------------------------------------------------
# Sampling plans: which positions each network call decodes

# order (B, L): the positions in generation order, given tokens first; ks: tokens per call; n_seq: sequential calls
Plan = namedtuple("Plan", "order ks n_seq")


def reveal_schedule(n_gen, alpha0, steps, device, generator=None):
    """Tokens decoded per call of the diffusion phase, k_1..k_n, and the tokens left to the sequential phase. Each of
    T = steps even steps t -> s reveals Binomial(remaining, (alpha_s - alpha_t) / (1 - alpha_t)); drawing for each
    mask the step that reveals it (or none) has the same law. About alpha0 n_gen / T tokens a step; empty: no call."""
    a = alpha_t(alpha0, torch.linspace(1, 0, steps + 1, dtype=torch.float64, device=device))  # (T + 1,), t = 1 .. 0
    # for a mask at t = 1: P(revealed in step i) = (a[i+1] - a[i]) / (1 - a[0]), then P(still masked at t = 0)
    p = torch.cat([a.diff(), (1 - a[-1:])]) / (1 - a[0])
    step = torch.searchsorted(p.cumsum(0), torch.rand(n_gen, device=device, generator=generator, dtype=torch.float64),
                              right=True).clamp(max=steps)
    k = torch.bincount(step, minlength=steps + 1).tolist()
    return [n for n in k[:steps] if n], k[steps]


def random_plan(to_gen, alpha0, steps, generator=None):
    """The paper's default plan: per row, the given tokens (random, as z0's clean ones in training; at alpha0 = 0 left
    to right, as an AR model reads), then the diffusion positions in a random order, then the rest left to right; the
    binomial schedule over T = steps. to_gen (B, L): True where a token is to be generated."""
    (B, L), dev = to_gen.shape, to_gen.device
    ks, n_seq = reveal_schedule(int(to_gen[0].sum()), alpha0, steps, dev, generator)
    key = torch.rand(B, L, device=dev, generator=generator)
    order = (torch.where(to_gen | (alpha0 > 0), key, torch.arange(L, device=dev) / L) + to_gen).argsort(1)
    return Plan(torch.cat([order[:, :L - n_seq], order[:, L - n_seq:].sort(1).values], 1), ks + [1] * n_seq, n_seq)


def subcontext_plan(to_gen, S, alpha0, shuffle, generator=None):
    """The paper's structured orders: L / S chunks of length S, and call j of the diffusion phase decodes offset j of
    every chunk (NFE = S at alpha0 = 1: each chunk left to right, all in parallel). With shuffle, the offsets in a
    random order (shared by the batch), each row's positions within a call too. Only the first floor(S alpha0) calls
    follow the pattern, the rest is the sequential phase. Given tokens come first (as in random_plan), out of calls."""
    B, L = to_gen.shape
    dev, pos = to_gen.device, torch.arange(L, device=to_gen.device)
    n_pattern = math.floor(S * alpha0)
    offsets = torch.randperm(S, device=dev, generator=generator) if shuffle else torch.arange(S, device=dev)
    # the inverse permutation of offsets (offset -> its call, (S,)), read at pos % S: the call of each position, (L,)
    call = torch.empty_like(offsets).scatter_(0, offsets, torch.arange(S, device=dev))[pos % S]
    diffusion = to_gen & (call < n_pattern)
    within = torch.rand(B, L, device=dev, generator=generator, dtype=torch.float64) if shuffle else pos.double() / L
    key = torch.where(diffusion, 1 + call + within, 1 + n_pattern + pos.double() / L)
    given = torch.rand(B, L, device=dev, generator=generator, dtype=torch.float64) if alpha0 else pos.double() / L
    order = torch.where(to_gen, key, given).argsort(1)
    counts = torch.zeros(B, S, dtype=torch.long, device=dev).scatter_add_(1, call.expand(B, L), diffusion.long())
    check(bool((counts == counts[:1]).all()), "generate", "prompt", "(rows with different given positions)",
          "a subcontext order needs the same given positions in every row (the rows share the calls)")
    n_seq = int(to_gen[0].sum()) - int(counts[0].sum())
    return Plan(order, [k for k in counts[0, :n_pattern].tolist() if k] + [1] * n_seq, n_seq)


def sample_tokens(logits, temperature, top_p, generator=None):
    """Gumbel-max in float64 from softmax(logits / temperature), nucleus-filtered when top_p < 1."""
    if temperature == 0:
        return logits.argmax(-1)
    logp = (logits.double() / temperature).log_softmax(-1)
    if top_p < 1:  # keep the most likely tokens until their mass reaches top_p (the first one always stays)
        p_sorted, idx = logp.exp().sort(-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p
        logp = logp.scatter(-1, idx, logp.gather(-1, idx).masked_fill(drop, -math.inf))
    u = torch.rand(*logp.shape, device=logp.device, generator=generator, dtype=torch.float64)
    return (logp - (-u.log()).log()).argmax(-1)


def adaptive_score(logits, temperature, rule):
    """How sure the model is of each mask, (B, n) (Kim et al., 2025): "confidence" is the top probability, "margin"
    the top minus the second, of softmax(logits / temperature) (temperature 0: as 1), before the nucleus filter."""
    p = (logits.double() / (temperature or 1)).softmax(-1).topk(2, dim=-1).values  # (B, n, 2)
    return p[..., 0] - p[..., 1] if rule == "margin" else p[..., 0]


# One network call: d, the tokens decoded before it (given ones included); feed sorted indices [n_cached, d + n) (the
# cache holds [0, n_cached)), decode k of the n masks at [d, d + n): all (n = k), or in an adaptive order the k best of
# every mask left. prefix: (A)'s bidirectional clean block, (B): 0
Feed = namedtuple("Feed", "n_cached d k n prefix")
# What generate returns: x (B, L), the samples; decoded_by (B, L), the call that decoded each position (0: given); nfe
Samples = namedtuple("Samples", "x decoded_by nfe")


# cuDNN attention builds an execution plan for every new shape, and a cached call's shapes change at every call
SAMPLER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ----------------------------------------------------------------------------------------------------------
# The Eso-LM: the backbone plus its two training forwards, the NELBO, the exact likelihood and the sampler

class EsoLM(Transformer):
    """A masked position l is predicted by the mask token at l, not by the token before it as in GPT: the layout is in
    any order, so "the next slot" means nothing, and only a query rotated to position l can say which it predicts."""

    def diffusion_forward(self, zs, order, prefix):
        """The L-token forward over z_t in sorted order (clean first). Hidden states (B, L, C). prefix (B,): the
        size of (A)'s bidirectional clean block (in training, all its clean tokens); (B) is causal, MDLM sees all."""
        return self(zs, order, diffusion_mask(prefix, zs.size(1), "A") if self.config.variant == "A" else None)

    def sequential_forward(self, xs, order, n_clean):
        """The forward of the AR term. xs: the clean x in sorted order (z0's clean tokens first, then its masked
        positions left to right). Returns the hidden states of the masked positions' z-queries (B, M, C), their
        sorted indices s (B, M), and `valid` (B, M): which are real rather than padding."""
        B, L = xs.shape
        M = int((L - n_clean).max())
        r = torch.arange(M, device=xs.device)
        valid = r < (L - n_clean)[:, None]
        s = (n_clean[:, None] + r).clamp(max=L - 1)  # padding queries reuse index L-1; nothing reads them
        z_mask, x_mask = sequential_mask(n_clean, M, L, self.config.variant)
        h = self(torch.cat([torch.full_like(s, self.mask_id), xs], 1), torch.cat([order.gather(1, s), order], 1),
                 z_mask, n_z=M, x_mask=x_mask)
        return h[:, :M], s, valid

    # ------------------------------------------------------------------------------------------------------
    # The NELBO

    def nelbo(self, x, alpha0=None, generator=None):
        """One Monte Carlo draw of the NELBO of each row of x (B, L) at alpha0 (default: the model's), nats per
        sequence, both terms on every row. Generation goes all-masks -> z0 (diffusion) -> x (left to right), so
            -log p(x) <= AR term (-log p(x | z0), teacher-forced) + MDM term (MDLM's bound on z0, t in [0, 1]),
        up to the schedule's floor: alpha_1 = alpha0 EPS > 0, so it may sit below by about EPS x the cross-entropies."""
        alpha0 = check_likelihood_args(self, x, alpha0, "nelbo")
        t = stratified_t(x.size(0), x.device, generator)
        mdm_nll, _ = self._mdm_term(x, alpha0, t, generator)
        return self._ar_term(x, alpha0, generator) + mdm_weight(alpha0, t) * mdm_nll

    def loss(self, x, batch_split=0.5, loss_type="elbo"):
        """Training objective at the model's alpha0: the sum of the two `loss_terms` ("elbo": the NELBO per token)."""
        return sum(self.loss_terms(x, batch_split, loss_type))

    def loss_terms(self, x, batch_split=0.5, loss_type="elbo"):
        """(MDM term, AR term), per-token estimates: the first rows of x (fraction batch_split) estimate the MDM term,
        the others the AR term, each averaged over all tokens of its rows; an absent term is 0. "low_var" drops the MDM
        weight, as the official code's alpha0 = 1 runs (still divided by all tokens of the MDM rows)."""
        (B, L), alpha0 = x.shape, self.config.alpha0
        n_mdm = mdm_rows(B, alpha0, batch_split)
        mdm = ar = torch.zeros((), device=x.device)
        if n_mdm:
            t = stratified_t(n_mdm, x.device)
            nll, _ = self._mdm_term(x[:n_mdm], alpha0, t)
            mdm = (nll if loss_type == "low_var" else mdm_weight(alpha0, t) * nll).sum() / (n_mdm * L)
        if n_mdm < B:
            ar = self._ar_term(x[n_mdm:], alpha0).sum() / ((B - n_mdm) * L)
        return mdm, ar

    def _mdm_term(self, x, alpha0, t, generator=None):
        """sum_{l in M(z_t)} -log p(x_l | z_t) for each row (unweighted), and |M(z_t)|."""
        B, L = x.shape
        if alpha0 == 0:  # the weight alpha0 (1 - EPS) / (1 - alpha_t) is 0: skip the forward pass
            return torch.zeros(B, device=x.device), torch.zeros(B, device=x.device, dtype=torch.long)
        masked = torch.rand(B, L, device=x.device, generator=generator) < 1 - alpha_t(alpha0, t)[:, None]  # M(z_t)
        # sorted order: clean tokens first, then masks, each group in a random order: an order the sampler produces
        # (decoded so far, then decoding now), so (B)'s causal attention trains on exactly the contexts it samples with
        order = (torch.rand(B, L, device=x.device, generator=generator) + masked).argsort(1)
        xs, ms = x.gather(1, order), masked.gather(1, order)
        h = self.diffusion_forward(xs.masked_fill(ms, self.mask_id), order, L - ms.sum(1))
        return nll_per_row(self.lm_head(h[ms]), xs[ms], ms), ms.sum(1)

    def _ar_term(self, x, alpha0, generator=None):
        """sum_{l in M(z0)} -log p(x_l | z0 and the true tokens of M(z0) left of l), z0 ~ q_0, for each row."""
        B, L = x.shape
        masked = torch.rand(B, L, device=x.device, generator=generator) < 1 - alpha0  # M(z0); every token at alpha0 = 0
        if not masked.any():
            return torch.zeros(B, device=x.device)
        # sorted order: z0's clean tokens, then its masks left to right, as the sampler decodes them; for (B) the clean
        # ones in a random order, as its diffusion phase decodes them ((A)'s see each other both ways: any order does)
        order = clean_first_order(~masked, self.config.variant == "B", generator)
        return self._sequential_nll(x, order, L - masked.sum(1))

    def _sequential_nll(self, x, order, n_clean):
        """-log p of the tokens at sorted indices n_clean.. of each row, each given the tokens before it."""
        xs = x.gather(1, order)
        h, s, valid = self.sequential_forward(xs, order, n_clean)
        return nll_per_row(self.lm_head(h[valid]), xs.gather(1, s)[valid], valid)

    @torch.no_grad()
    def exact_nll(self, x, alpha0=None, num_orders=1, generator=None):
        """-log mean_k p(x | order_k) over K = num_orders generation orders, nats per row, at alpha0 (default: the
        model's). Decoding one token per call along a fixed order, (B) is an AR model over it, scored exactly by one
        sequential forward with every token masked: K = 1 is exact for one sampled order; over K orders it is an
        importance-weighted bound on -log p(x) that tightens with K. Orders follow the sampler's law, each row its own:
        diffusion positions (each with the probability p the schedule gives) first, in a random order, then the rest."""
        alpha0 = check_likelihood_args(self, x, alpha0, "exact_nll")
        check(self.config.variant == "B", "exact_nll", "variant", self.config.variant,
              "exact_nll needs variant B: the clean tokens of (A) and MDLM see each other both ways")
        (B, L), no_clean = x.shape, torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        p = (alpha_t(alpha0, 0.0) - alpha_t(alpha0, 1.0)) / (1 - alpha_t(alpha0, 1.0))  # (a_0 - a_1) / (1 - a_1)
        log_p = [-self._sequential_nll(x, clean_first_order(torch.rand(B, L, device=x.device, generator=generator) < p,
                                                            True, generator), no_clean) for _ in range(num_orders)]
        return math.log(num_orders) - torch.stack(log_p).logsumexp(0)

    # ------------------------------------------------------------------------------------------------------
    # The sampler

    @torch.no_grad()
    def generate(self, num_samples, alpha0=None, steps=None, *, temperature=1.0, top_p=1.0, prompt=None,
                 subcontext_len=0, subcontext_shuffle=False, adaptive=None, kv_cache=None, calls=None, generator=None):
        """Sample (num_samples, L) token ids: a diffusion phase, then a sequential phase; returns Samples. alpha0:
        default the model's. The plan: the binomial schedule over T = steps (default L), a random order per row; with
        subcontext_len = S, the paper's structured order (steps unused). adaptive="confidence" or "margin": each
        diffusion call decodes the k masks the model is surest of (the plan still says how many; see decode).
        prompt: ids (P,) or (num_samples, P), P <= L; mask ids in it are positions to generate (infilling). kv_cache
        (default: on, off for MDLM): False runs the uncached reference, a full forward per call, with the same tokens.
        calls: a factory (model, zs, order, feeds) -> call that runs the cached calls (static_cache.StaticCalls);
        default: decode's eager ones. `generator` must live on the model's device."""
        alpha0 = self.config.alpha0 if alpha0 is None else alpha0
        steps = self.config.block_size if steps is None else steps
        kv_cache = self.config.variant != "MDLM" if kv_cache is None else kv_cache
        check_sampling_args(self, locals())
        z = prompt_canvas(self, prompt, num_samples)  # (B, L), the mask id where a token is to be generated
        to_gen = z == self.mask_id
        plan = (subcontext_plan(to_gen, subcontext_len, alpha0, subcontext_shuffle, generator) if subcontext_len
                else random_plan(to_gen, alpha0, steps, generator))
        zs = z.gather(1, plan.order)  # sorted: the given tokens, then the masks in generation order
        score = adaptive and (lambda logits: adaptive_score(logits, temperature, adaptive))
        was_training = self.training
        self.eval()  # dropout off: the cached and reference paths must compute the same function
        try:
            self.decode(zs, plan, lambda lg: sample_tokens(lg, temperature, top_p, generator), kv_cache, calls, score)
        finally:
            self.train(was_training)
        decoded_by = torch.repeat_interleave(torch.arange(len(plan.ks) + 1, device=z.device),
                                             torch.tensor([z.size(1) - sum(plan.ks)] + plan.ks, device=z.device))
        unsort = plan.order.argsort(1)  # the order as decoded (an adaptive one was rearranged by decode)
        return Samples(zs.gather(1, unsort), decoded_by.expand_as(zs).gather(1, unsort), len(plan.ks))

    def feeds(self, plan, adaptive=False):
        """The network calls of a plan, as Feeds. Why the cache is exact, for (B): under the causal mask over the
        generation order, a token's keys and values depend only on the tokens before it in the order; once it is
        clean, so are they, for good: its keys/values are final, computed once. A call feeds what the cache lacks, the
        tokens the last call decoded (now clean) and the masks to decode now (adaptive: every mask left, all after the
        clean tokens). (A)'s clean tokens see each other both ways, so its diffusion phase keeps nothing; at the switch
        to the sequential phase (c_switch tokens clean) its clean block freezes and (A) caches like (B)."""
        L = self.config.block_size
        d, c_switch, n_cached, feeds = L - sum(plan.ks), L - plan.n_seq, 0, []  # d: decoded so far, given included
        for k in plan.ks:
            prefix = 0 if self.config.variant == "B" else min(d, c_switch)
            feeds.append(Feed(n_cached, d, k, L - d if adaptive and d < c_switch else k, prefix))
            # n_cached is set for the NEXT call: the d tokens decoded before this one are final once it has run. In
            # the README's example call 2 is Feed(0, 2, 2, ..), feeding [0, 4); call 3 then caches [0, 2), feeds [2, 5)
            n_cached = d if self.config.variant == "B" or d >= c_switch else 0  # not d + k: [d, d + k) held masks
            d += k
        return feeds

    def decode(self, zs, plan, pick, kv_cache=True, calls=None, score=None):
        """Run the network calls of a plan on zs (B, L), the sorted canvas, filling its masks in place; pick(logits
        (B, k, V)) -> token ids (B, k). score(logits (B, n, V)) -> (B, n): adaptive decoding. Each diffusion call then
        scores every mask left, each seeing the clean tokens and the masks before it in the plan's order (causal, as
        in training), and its k best take the next k slots of plan.order (rearranged in place)."""
        (B, L), order, feeds = zs.shape, plan.order, self.feeds(plan, score is not None)
        if not kv_cache:
            def call(f):  # the uncached reference: the whole canvas at every call
                return self.diffusion_forward(zs, order, torch.full((B,), f.prefix, device=zs.device))[:, f.d:f.d + f.n]
        elif calls is not None:
            call = calls(self, zs, order, feeds)
        else:
            nh, C, i = self.config.n_head, self.config.n_embd, torch.arange(L, device=zs.device)
            caches = [KVCache(B, nh, L, C // nh, self.compute_dtype(), zs.device) for _ in self.blocks]

            def call(f):  # each fed token sees every cached key and the fed ones up to itself ((A): its block too);
                # the masks not fed yet come after every fed token in the order, so leaving them out changes nothing
                lo, hi = f.n_cached, f.d + f.n
                h = self(zs[:, lo:hi], order[:, lo:hi], visible(i[lo:hi], i[:hi], f.prefix), caches, lo)
                return h[:, f.d - lo:]
        with sdpa_kernel(SAMPLER_ATTENTION):
            for j, f in enumerate(feeds):
                if j == len(feeds) - plan.n_seq:  # the sequential phase: the masks left, [d, L), left to right (a
                    order[:, f.d:] = order[:, f.d:].sort(1).values  # planned order is already; an adaptive one is not)
                logits = self.lm_head(call(f))  # (B, n, V) in the compute dtype; sample_tokens upcasts to float64
                if f.n > f.k:  # adaptive; each mask's new rank: i for the i-th best, k + its old index for the others
                    best = score(logits).topk(f.k, dim=1).indices  # (B, k), best first
                    rank = torch.arange(f.n, device=zs.device).expand(B, f.n) + f.k
                    perm = rank.scatter(1, best, torch.arange(f.k, device=zs.device).expand(B, f.k)).argsort(1)
                    order[:, f.d:f.d + f.n] = order[:, f.d:f.d + f.n].gather(1, perm)  # the k best take the next slots
                    logits = logits.gather(1, perm[:, :f.k, None].expand(-1, -1, logits.size(-1)))
                zs[:, f.d:f.d + f.k] = pick(logits)


# ----------------------------------------------------------------------------------------------------------
# Argument checks (and generate's prompt canvas): each door of the library checks what comes through it, once; a
# script words a SettingError as the flag it came from (sample.py: --top_p=2: ...), the library as the argument

class SettingError(ValueError):
    def __init__(self, where, key, value, rule):
        super().__init__(f"{where}: {key}={value}: {rule}")
        self.key, self.value, self.rule = key, value, rule


def check(ok, where, key, value, rule):  # the one way this project rejects a bad setting
    if not ok:
        raise SettingError(where, key, value, rule)


RULES = {  # (ok, rule) of the arguments that recur; the scripts check their flags of the same names with them
    "alpha0": (lambda a: 0 <= a <= 1, "must be in [0, 1] (0: pure AR, 1: pure MDM)"),
    "num_samples": (lambda n: isinstance(n, int) and n >= 1, "must be an int >= 1"),
    "steps": (lambda n: isinstance(n, int) and n >= 1, "must be an int >= 1"),
    "temperature": (lambda t: t >= 0, "must be at least 0 (0: greedy)"),
    "top_p": (lambda p: 0 < p <= 1, "must be in (0, 1] (1: no nucleus filter)"),
    "subcontext_len": (lambda s: isinstance(s, int) and s >= 0, "must be an int >= 0 (0: the random order)"),
    "adaptive": (lambda a: a in (None, "confidence", "margin"), "must be None, confidence or margin")}


def check_alpha0(where, alpha0, variant):
    check(RULES["alpha0"][0](alpha0), where, "alpha0", alpha0, RULES["alpha0"][1])
    check(alpha0 == 1 or variant != "MDLM", where, "alpha0", alpha0, "MDLM is a pure MDM: alpha0 = 1 only")
    return alpha0


def check_config(c):  # EsoLMConfig's door: the model's shape, variant and alpha0
    for key in ("vocab_size", "block_size", "n_layer", "n_embd"):
        check(getattr(c, key) >= 1, "EsoLMConfig", key, getattr(c, key), "must be at least 1")
    check(c.n_head >= 1 and c.n_embd % c.n_head == 0 and c.n_embd // c.n_head % 2 == 0, "EsoLMConfig", "n_head",
          c.n_head, f"n_embd / n_head ({c.n_embd} / {c.n_head}) must be an even integer: RoPE turns pairs of channels")
    check(0 <= c.dropout < 1, "EsoLMConfig", "dropout", c.dropout, "must be in [0, 1)")
    for key, allowed in (("variant", VARIANTS), ("gelu", ("exact", "tanh"))):
        check(getattr(c, key) in allowed, "EsoLMConfig", key, getattr(c, key), f"must be one of {', '.join(allowed)}")
    check_alpha0("EsoLMConfig", c.alpha0, c.variant)


def prompt_canvas(model, prompt, B):
    """(B, L) ids: the prompt padded with the mask id to length L; the mask id marks the positions to generate."""
    L, V, dev = model.config.block_size, model.config.vocab_size, model.wte.weight.device
    prompt = torch.zeros(0, dtype=torch.long) if prompt is None else prompt  # no prompt: every position to generate
    check(torch.is_tensor(prompt) and prompt.dtype == torch.long and prompt.dim() in (1, 2) and prompt.size(-1) <= L
          and (prompt.dim() == 1 or prompt.size(0) == B), "generate", "prompt", getattr(prompt, "shape", prompt),
          f"must be a LongTensor (P,) or ({B}, P) with P <= {L}")
    check(not prompt.numel() or 0 <= prompt.min() <= prompt.max() <= V, "generate", "prompt", "...",
          f"holds ids outside [0, {V}] (the mask id {V} marks a position to generate)")
    z = F.pad(prompt.to(dev), (0, L - prompt.size(-1)), value=model.mask_id).expand(B, L).clone()
    n_gen = (z == model.mask_id).sum(1)
    check(bool((n_gen == n_gen[0]).all()), "generate", "prompt", "...", f"every row must leave the same number of "
          f"positions to generate (the rows share one schedule), got {n_gen.tolist()}")
    return z


def check_likelihood_args(model, x, alpha0, where):  # the door of nelbo and exact_nll; returns alpha0 (None: model's)
    L, V = model.config.block_size, model.config.vocab_size
    check(torch.is_tensor(x) and x.dim() == 2 and x.size(1) == L and x.dtype == torch.long, where, "x",
          (x.dtype, tuple(x.shape)) if torch.is_tensor(x) else x, f"must be a LongTensor of shape (B, {L})")
    check(not x.numel() or 0 <= x.min() <= x.max() < V, where, "x", "...", f"holds ids outside [0, {V})")
    return check_alpha0(where, model.config.alpha0 if alpha0 is None else alpha0, model.config.variant)


def check_sampling_args(model, a):  # generate's door: its arguments (a dict), by RULES and against the model
    L, S = model.config.block_size, a["subcontext_len"]
    for key in ("num_samples", "steps", "temperature", "top_p", "subcontext_len", "adaptive"):
        check(RULES[key][0](a[key]), "generate", key, a[key], RULES[key][1])
    check_alpha0("generate", a["alpha0"], model.config.variant)
    check(S == 0 or L % S == 0, "generate", "subcontext_len", S, f"must divide L = {L} (0: the random order)")
    check(not a["kv_cache"] or model.config.variant != "MDLM", "generate", "kv_cache", True, "MDLM has no KV cache: "
          "its tokens attend both ways, so each new one changes every key and value (use kv_cache=False)")
