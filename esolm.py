"""
Esoteric Language Models (Eso-LMs) in one file: a transformer that is both a masked diffusion model and an
autoregressive model, trained with the hybrid NELBO and sampled with an exact KV cache.

Order of the file: config -> primitives (RoPE, MLP) -> attention with the KV cache -> block -> backbone ->
attention masks -> noise schedule -> the Eso-LM (its two training forwards, the NELBO, the exact likelihood, the
sampler) -> running it (devices, checkpoints) -> loading the paper's published checkpoints. Section numbers (§5)
are those of the method's summary in README.md ("The method, mapped to the code"), not the paper's.

Two layouts, one convention. A forward pass sees its tokens in *sorted order*: clean tokens first, then masks
(§5). `order[b, i]` is the original position of the i-th token of row b, and RoPE rotates by it, so a token
means the same wherever the layout puts it and the attention mask is the only place the order shows up.
- The diffusion forward (the MDM term, and every sampling call) feeds the L tokens of z_t in that order.
- The sequential forward (the AR term) feeds two streams, [z ; x]: the masked positions of z0 as mask tokens
  (queries), and the clean sequence x (keys). Two, because a masked position's query must not see its own
  token, while the positions after it must see that token as a key: one stream cannot do both.

Reading path for the sampler: generate -> reveal_schedule (how many tokens each call decodes) ->
generation_order (in which order) -> _generate (feeds each call only what the cache lacks; the comment there
says why that is exact) -> Transformer.forward -> Attention.forward -> KVCache.update.
"""
import contextlib
import http.client
import json
import math
import os
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

EPS = 1e-3  # alpha_1 = alpha0 * EPS: the log-linear schedule never masks with probability exactly 1 (§3)
VARIANTS = ("A", "B")  # (B): KV cache in both phases; (A): bidirectional clean tokens, cache in the sequential phase
LOSS_TYPES = ("elbo", "low_var")
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: the default denominator of MFU


@dataclass
class EsoLMConfig:
    vocab_size: int = 256  # real tokens; the mask token is id vocab_size
    block_size: int = 256  # L, the sequence length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    variant: str = "B"  # "B": KV cache in both phases; "A": bidirectional clean tokens, cache in the AR phase
    rope_base: float = 10000.0
    # the two switches the paper's published DiT needs (see from_pretrained); off, the model is nanoGPT's
    bias: bool = False  # biases in the LayerNorms, the MLP and lm_head; attention has none either way
    gelu: str = "exact"  # "exact" erf GELU, or "tanh": the approximation the paper's network uses

    def __post_init__(self):
        for key, ok, rule in (
                ("vocab_size", self.vocab_size >= 1, "must be at least 1"),
                ("block_size", self.block_size >= 1, "must be at least 1"),
                ("n_layer", self.n_layer >= 1, "must be at least 1"),
                ("n_embd", self.n_embd >= 1, "must be at least 1"),
                ("n_head", self.n_head >= 1 and self.n_embd % self.n_head == 0 and self.n_embd // self.n_head % 2 == 0,
                 f"n_embd / n_head ({self.n_embd} / {self.n_head}) must be an even integer: RoPE turns pairs of "
                 "channels"),
                ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
                ("variant", self.variant in VARIANTS, f"must be one of {', '.join(VARIANTS)}"),
                ("gelu", self.gelu in ("exact", "tanh"), "must be exact or tanh")):
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)}: {rule}")


# ----------------------------------------------------------------------------------------------------------
# Primitives

def rope_tables(block_size, head_size, base):
    """cos and sin of the rotary angles for every position, (L, hs/2). Built once; the forward gathers rows."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    # x (B, nh, T, hs); cos, sin (B, 1, T, hs/2), gathered at each token's ORIGINAL position, so a token keeps
    # its meaning wherever the sorted layout puts it (§2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def additive_mask(mask, dtype):
    """bool mask (True = may attend) -> 0 / -inf; None (causal) and masks already additive pass as they are."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"  # F.gelu's name for the two choices
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


# ----------------------------------------------------------------------------------------------------------
# Attention with a KV cache

class KVCache:
    """Preallocated keys and values of one layer, (B, nh, L, hs), written in place (gpt-fast style).

    Unlike an AR cache, slot i holds the i-th token in *generation order*, not position i: each row of the batch
    has its own order, and the positions of its tokens live in RoPE, not in the slot index. A call writes every
    token it is fed, masks included; the sampler then keeps only the slots whose keys/values stay valid (its
    n_cached), and the next call overwrites the rest (§6.3). (A) rewrites its whole clean block at every call of
    its diffusion phase."""

    def __init__(self, B, n_head, size, head_size, dtype, device):
        # size = L slots: the sequence never holds more tokens. dtype: the compute dtype (autocast's when it is on)
        self.k = torch.empty(B, n_head, size, head_size, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def update(self, start, k, v):
        """Write the chunk (B, nh, T, hs) at slots [start, start+T); return the keys/values of slots [0, start+T)."""
        T = k.size(2)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attn_mask, cache=None, start=0):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        qk, v = self.c_attn(x).split([2 * C, C], dim=2)
        # q and k rotated together, as 2 nh heads: 35 ops a layer instead of 44 (a cached call is bound by op count)
        q, k = apply_rope(qk.view(B, T, 2 * nh, hs).transpose(1, 2), cos, sin).split(nh, dim=1)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nh, start+T, hs)
        if isinstance(attn_mask, tuple):
            # the sequential layout [z ; x] (module docstring): x never attends to z, so its L queries run as an
            # attention of their own (causal for (B): the fast path) and only the M z-queries read the (M, M+L) mask.
            # Measured on CPU: 4 x 256 model, L = 256, alpha0 = 0.25: -6% time per training step
            z_mask, x_mask = attn_mask
            M = z_mask.size(-2)
            y = torch.cat([self.sdpa(q[:, :, :M], k, v, z_mask),
                           self.sdpa(q[:, :, M:], k[:, :, M:], v[:, :, M:], x_mask)], dim=2)
        else:
            y = self.sdpa(q, k, v, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def sdpa(self, q, k, v, attn_mask):
        # attn_mask None means causal over the sorted order, as in the (B) diffusion forward: SDPA then skips
        # the upper triangle instead of reading a mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                              dropout_p=self.dropout if self.training else 0.0)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, cache=None, start=0):
        x = x + self.attn(self.ln_1(x), cos, sin, attn_mask, cache, start)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------
# Backbone: a pre-norm GPT with RoPE and no time conditioning (§2)

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.mask_id = config.vocab_size
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # + 1 row for the mask token
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # untied head over the real tokens only: the mask is never predicted (zero-masking of SUBS, §2)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-2 init: N(0, 0.02), and residual projections scaled by 1/sqrt(2 n_layer) so that the residual
        # stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() == 2:  # linear and embedding weights; LayerNorm weights stay 1
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith(".bias"):  # with config.bias: start at 0, as nanoGPT does
                nn.init.zeros_(p)

    def compute_dtype(self):
        """The dtype of q, k and v: autocast's when it is on, else the weights'."""
        dev = self.wte.weight.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.wte.weight.dtype

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos, attn_mask=None, caches=None, start=0):
        """idx, pos: (B, T) token ids (mask_id allowed) and original positions, in sorted order.
        attn_mask: (B or 1, 1, T, start+T), bool (True = may attend) or additive (0 / -inf); None = causal; a pair
        for the sequential layout (see sequential_forward). caches: one KVCache per layer, written at slots
        [start, start+T) (sampling only). Returns the final hidden states (B, T, C): callers
        apply lm_head only to the rows they need, which skips the C x V product on clean tokens."""
        x = self.drop(self.wte(idx))
        dtype = self.compute_dtype()
        cos, sin = (t[pos].unsqueeze(1).to(dtype) for t in (self.rope_cos, self.rope_sin))  # (B, 1, T, hs/2)
        # SDPA turns a bool mask into an additive one on every call: do it once for all layers
        if isinstance(attn_mask, tuple):
            attn_mask = tuple(additive_mask(m, dtype) for m in attn_mask)
        else:
            attn_mask = additive_mask(attn_mask, dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, caches[i] if caches else None, start)
        return self.ln_f(x)


# ----------------------------------------------------------------------------------------------------------
# Attention masks (§5). A[q, j] = True: the token at sorted index q may attend to the one at sorted index j.

def visible(q, j, prefix):
    """The rule behind the diffusion masks, the x-stream of the sequential mask and every call of the sampler:
    causal over the sorted order, except that the first `prefix` tokens (the bidirectional clean block of (A); 0
    for (B)) are visible to all. q, j: sorted indices (Tq,), (Tk,). (The z-queries of the sequential mask follow
    a rule of their own: see sequential_mask.)"""
    return (j <= q[:, None]) | (j < prefix)


def diffusion_mask(prefix, L, variant):
    """(B, 1, L, L) mask of the L-token diffusion forward: clean tokens first, then masks. prefix (B,): the clean
    tokens that see each other both ways in (A) (all of them in training; the sampler freezes the block).

    (B): plain causal; a clean token sees only the clean tokens before it in the (random) order, which is why
    its keys/values can be cached. (A): the clean block is bidirectional; masks see every clean token and the
    masks before them. L = 4, prefix = 2 (c = clean, m = mask, 1 = may attend):

        (B)    c c m m        (A)    c c m m
            c  1 . . .            c  1 1 . .
            c  1 1 . .            c  1 1 . .
            m  1 1 1 .            m  1 1 1 .
            m  1 1 1 1            m  1 1 1 1
    """
    i = torch.arange(L, device=prefix.device)
    return visible(i, i, (prefix if variant == "A" else torch.zeros_like(prefix))[:, None, None]).unsqueeze(1)


def sequential_mask(n_clean, M, L, variant):
    """(B, 1, M+L, M+L) mask of the sequential forward (the AR term), layout [z ; x] in sorted order: clean
    tokens of z0 first, then its masked positions left to right; x is the clean sequence in the same order.
    z-query q sees itself and the x-keys before it; x is causal ((A): its clean block bidirectional) and never
    sees z. The method's layout has L z-queries; the clean ones carry no loss and equal their x-twins, so only
    the M masked ones are fed: z-query r is sorted index n_clean + r (rows with fewer masks are padded;
    nothing reads the padding queries). L = 4, n_clean = 2, the full 2L layout, and what we keep (*):

        (B)      z z z z  x x x x         (A)      z z z z  x x x x
            z    1 . . .  . . . .             z    1 . . .  . . . .
            z    . 1 . .  1 . . .             z    . 1 . .  1 . . .
          * z    . . 1 .  1 1 . .           * z    . . 1 .  1 1 . .
          * z    . . . 1  1 1 1 .           * z    . . . 1  1 1 1 .
          * x    . . . .  1 . . .           * x    . . . .  1 1 . .
          * x    . . . .  1 1 . .           * x    . . . .  1 1 . .
          * x    . . . .  1 1 1 .           * x    . . . .  1 1 1 .
          * x    . . . .  1 1 1 1           * x    . . . .  1 1 1 1
    """
    B, dev = n_clean.size(0), n_clean.device
    c = n_clean[:, None, None]
    r, i = torch.arange(M, device=dev), torch.arange(L, device=dev)
    zz = torch.eye(M, dtype=torch.bool, device=dev).expand(B, M, M)
    zx = i < c + r[:, None]  # (B, M, L): x-keys strictly before the z-query's sorted index
    xz = torch.zeros(B, L, M, dtype=torch.bool, device=dev)
    xx = visible(i, i, c if variant == "A" else 0).expand(B, L, L)
    return torch.cat([torch.cat([zz, zx], 2), torch.cat([xz, xx], 2)], 1).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Noise schedule (§3) and the pieces of the NELBO (§4)

def alpha_t(alpha0, t):
    """Probability that a token is still clean at time t: alpha0 at t = 0, alpha0 * EPS at t = 1."""
    return alpha0 * (1 - (1 - EPS) * t)


def mdm_weight(alpha0, t):
    """-alpha_t' / (1 - alpha_t) = alpha0 (1 - eps) / (1 - alpha_t): the MDM term's weight; 1/t at alpha0 = 1."""
    return alpha0 * (1 - EPS) / (1 - alpha_t(alpha0, t))


def p_diffusion(alpha0):
    """Probability that the diffusion phase, not the sequential one, decodes a given masked position: the fraction
    of masks the schedule unmasks from t = 1 to t = 0, (alpha_0 - alpha_1) / (1 - alpha_1) (§6.1)."""
    return (alpha_t(alpha0, 0.0) - alpha_t(alpha0, 1.0)) / (1 - alpha_t(alpha0, 1.0))


def rand(*shape, device, generator=None, dtype=torch.float32):
    return torch.rand(shape, device=device, generator=generator, dtype=dtype)


def stratified_t(n, device, generator=None):
    """t for n rows as the official code draws it (§4): row i takes its own uniform inside the i-th of n equal slices
    of [0, 1), mapped to [EPS, 1). The slices cover the schedule evenly (lower variance than independent draws) and
    t >= EPS bounds the MDM weight by about 1 / EPS, so a t near 0 cannot make a loss spike."""
    u = (rand(n, device=device, generator=generator) + torch.arange(n, device=device)) / n
    return EPS + (1 - EPS) * u


def mdm_rows(B, alpha0, batch_split):
    """How many of B rows (the first ones) estimate the MDM term in training; the others estimate the AR term (§4).
    When alpha0 is 0 or 1 the absent term takes no rows."""
    if alpha0 in (0, 1):
        return B * int(alpha0)
    if 0 < batch_split < 1 and B >= 2:
        return min(max(round(B * batch_split), 1), B - 1)
    raise ValueError(f"0 < alpha0 < 1 needs both terms: batch_split in (0, 1) and at least 2 rows, got "
                     f"batch_split={batch_split} and {B} rows")


def nll_per_row(logits, targets, sel):
    """sum over the selected tokens of each row of -log p(target); logits (N, V) for the N True entries of sel."""
    nll = torch.zeros(sel.shape, device=sel.device, dtype=torch.promote_types(logits.dtype, torch.float32))
    nll[sel] = F.cross_entropy(logits.to(nll.dtype), targets, reduction="none")
    return nll.sum(1)


# ----------------------------------------------------------------------------------------------------------
# Sampling helpers (§6)

def reveal_schedule(n_gen, alpha0, steps, device, generator=None):
    """Tokens decoded per network call of the diffusion phase, k_1..k_S (empty steps dropped), and the number of
    tokens left to the sequential phase, decoded one per call. Drawing, for each masked position, the step that
    reveals it (or none: then the sequential phase decodes it) has the same law as drawing
    k_s ~ Binomial(remaining, (alpha_s - alpha_t) / (1 - alpha_t)) step by step, and needs one draw instead of
    `steps` dependent ones."""
    a = alpha_t(alpha0, torch.linspace(1, 0, steps + 1, dtype=torch.float64, device=device))
    p = torch.cat([a.diff(), (1 - a[-1:])]) / (1 - a[0])  # P(revealed at step s), then P(left to the AR phase)
    step = torch.searchsorted(p.cumsum(0), rand(n_gen, device=device, generator=generator, dtype=torch.float64),
                              right=True).clamp(max=steps)
    k = torch.bincount(step, minlength=steps + 1).tolist()
    return [n for n in k[:steps] if n], k[steps]


def generation_order(to_gen, n_diffusion, generator=None):
    """(B, L) positions in generation order, one random order per row (§6.2): the given tokens first, then
    n_diffusion positions in a random order (the diffusion phase), then the rest left to right (sequential)."""
    B, L = to_gen.shape
    order = (rand(B, L, device=to_gen.device, generator=generator) + to_gen).argsort(1)
    n_first = L - int(to_gen[0].sum()) + n_diffusion
    return torch.cat([order[:, :n_first], order[:, n_first:].sort(1).values], 1)


def sample_tokens(logits, temperature, top_p, generator=None):
    """Gumbel-max in float64 from softmax(logits / temperature), nucleus-filtered when top_p < 1 (§6.5)."""
    if temperature == 0:
        return logits.argmax(-1)
    logp = (logits.double() / temperature).log_softmax(-1)
    if top_p < 1:  # keep the most likely tokens until their mass reaches top_p (the first one always stays)
        p_sorted, idx = logp.exp().sort(-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p
        logp = logp.scatter(-1, idx, logp.gather(-1, idx).masked_fill(drop, -math.inf))
    u = rand(*logp.shape, device=logp.device, generator=generator, dtype=torch.float64)
    return (logp - (-u.log()).log()).argmax(-1)


def clean_first_order(clean, shuffle, generator=None):
    """(B, L) positions in sorted order: the clean ones first (in a random order if shuffle, else left to right),
    then the rest left to right."""
    B, L = clean.shape
    pos = torch.arange(L, device=clean.device) / L
    key = rand(B, L, device=clean.device, generator=generator) if shuffle else pos.expand(B, L)
    return torch.where(clean, key, 1 + pos).argsort(1)


def _check_alpha0(alpha0):
    if not 0 <= alpha0 <= 1:
        raise ValueError(f"alpha0 must be in [0, 1], got {alpha0}")


# ----------------------------------------------------------------------------------------------------------
# The Eso-LM: the backbone plus its two training forwards, the NELBO and the sampler

# The attention kernels of the sampler: any but cuDNN's. On Hopper GPUs torch prefers cuDNN attention in bf16,
# and cuDNN builds an execution plan for each new shape of q, k and v (tens of ms of host time). The cached
# sampler's keys grow at every call, so each call would build one: measured on an H200 in bf16 (12 x 768,
# L = 1024), the cached sampler ran 9x *slower* than the uncached one, whose shapes never change (BENCHMARKS.md).
SAMPLER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class EsoLM(Transformer):

    def diffusion_forward(self, zs, order, prefix):
        """The L-token forward over z_t in sorted order (clean first, §5). Hidden states (B, L, C). prefix (B,): the
        size of (A)'s bidirectional clean block (in training, all its clean tokens); (B) is causal and ignores it."""
        mask = None if self.config.variant == "B" else diffusion_mask(prefix, zs.size(1), "A")
        return self(zs, order, mask)

    def sequential_forward(self, xs, order, n_clean):
        """The forward of the AR term: xs is the clean x in sorted order (clean of z0 first, then the masked
        positions of z0 left to right). Returns the hidden states of the masked positions' z-queries (B, M, C),
        their sorted indices s (B, M), and `valid` (B, M): which are real rather than padding."""
        B, L = xs.shape
        M = int((L - n_clean).max())
        r = torch.arange(M, device=xs.device)
        valid = r < (L - n_clean)[:, None]
        s = (n_clean[:, None] + r).clamp(max=L - 1)  # padding queries reuse index L-1; nothing reads them
        idx = torch.cat([torch.full_like(s, self.mask_id), xs], 1)
        pos = torch.cat([order.gather(1, s), order], 1)
        mask = sequential_mask(n_clean, M, L, self.config.variant)
        h = self(idx, pos, (mask[:, :, :M], None if self.config.variant == "B" else mask[:, :, M:, M:]))
        return h[:, :M], s, valid

    # ------------------------------------------------------------------------------------------------------
    # NELBO (§4)

    def nelbo(self, x, alpha0, generator=None):
        """One Monte Carlo draw of the NELBO of each row of x (B, L), in nats per sequence. Generation has two stages:
        the diffusion phase turns all-masks into z0 (about alpha0 L clean tokens), then the sequential phase decodes
        x from z0 left to right. So -log p(x) <= AR term (-log p(x | z0), teacher-forced) + MDM term (the MDLM bound
        on z0, restricted to t in [0, 1]). Both terms on every row; t stratified over the rows."""
        self._check_x(x)
        _check_alpha0(alpha0)
        t = stratified_t(x.size(0), x.device, generator)
        mdm_nll, _ = self._mdm_term(x, alpha0, t, generator)
        return self._ar_term(x, alpha0, generator) + mdm_weight(alpha0, t) * mdm_nll

    def loss(self, x, alpha0, batch_split=0.5, loss_type="elbo"):
        """Training objective, a per-token NELBO estimate: the sum of the two terms of `loss_terms`."""
        mdm, ar = self.loss_terms(x, alpha0, batch_split, loss_type)
        return mdm + ar

    def loss_terms(self, x, alpha0, batch_split=0.5, loss_type="elbo"):
        """(MDM term, AR term), each a per-token estimate: the first rows of x (fraction batch_split, see mdm_rows)
        estimate the MDM term, the others the AR term, each averaged over all tokens of its own rows (§4); an absent
        term is 0. loss_type "low_var" drops the MDM weight: the plain -log p of the masked tokens, divided by all
        tokens of the MDM rows as the weighted term is (the official code's choice)."""
        self._check_x(x)
        _check_alpha0(alpha0)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        B, L = x.shape
        n_mdm = mdm_rows(B, alpha0, batch_split)
        mdm = ar = torch.zeros((), device=x.device)
        if n_mdm:
            t = stratified_t(n_mdm, x.device)
            nll, _ = self._mdm_term(x[:n_mdm], alpha0, t)
            mdm = (nll if loss_type == "low_var" else mdm_weight(alpha0, t) * nll).sum() / (n_mdm * L)
        if n_mdm < B:
            ar = self._ar_term(x[n_mdm:], alpha0).sum() / ((B - n_mdm) * L)
        return mdm, ar

    def loss_flops(self, B, alpha0, batch_split=0.5):
        """FLOPs of forward + backward of `loss` on B rows, for MFU: 6 per weight per fed token (embedding lookups
        are free) plus attention, 12 n_layer C L per token (nanoGPT's count). An MDM row feeds L tokens, an AR row
        L x-tokens plus one z-query per masked position, about (1 - alpha0) L."""
        L, C = self.config.block_size, self.config.n_embd
        n_mdm = mdm_rows(B, alpha0, batch_split)
        fed = n_mdm * L + (B - n_mdm) * (2 - alpha0) * L
        return (6 * (self.num_params() - self.wte.weight.numel()) + 12 * self.config.n_layer * C * L) * fed

    def _mdm_term(self, x, alpha0, t, generator=None):
        """sum_{l in M(z_t)} -log p(x_l | z_t) for each row (unweighted), and |M(z_t)|."""
        B, L = x.shape
        if alpha0 == 0:  # the weight alpha0 (1 - eps) / (1 - alpha_t) is 0: skip the forward pass
            return torch.zeros(B, device=x.device), torch.zeros(B, device=x.device, dtype=torch.long)
        masked = rand(B, L, device=x.device, generator=generator) < 1 - alpha_t(alpha0, t)[:, None]  # M(z_t)
        # sorted order: clean tokens first, then masks, each group in a random order (§5)
        order = (rand(B, L, device=x.device, generator=generator) + masked).argsort(1)
        xs, ms = x.gather(1, order), masked.gather(1, order)
        h = self.diffusion_forward(xs.masked_fill(ms, self.mask_id), order, L - ms.sum(1))
        return nll_per_row(self.lm_head(h[ms]), xs[ms], ms), ms.sum(1)

    def _ar_term(self, x, alpha0, generator=None):
        """sum_{l in M(z0)} -log p(x_l | z0 and the true tokens of M(z0) left of l), z0 ~ q_0, for each row."""
        B, L = x.shape
        masked = rand(B, L, device=x.device, generator=generator) < 1 - alpha0  # M(z0); every token at alpha0 = 0
        if not masked.any():
            return torch.zeros(B, device=x.device)
        # sorted order: the clean tokens of z0 first, then the masked positions left to right. (B) takes the clean
        # ones in a random order, because its sampler decodes them in a random order and a clean token only sees
        # those before it; (A) sees them all both ways, so any order does
        order = clean_first_order(~masked, self.config.variant == "B", generator)
        return self._sequential_nll(x, order, L - masked.sum(1))

    def _sequential_nll(self, x, order, n_clean):
        """-log p of the tokens at sorted indices n_clean.. of each row, each given the tokens before it."""
        xs = x.gather(1, order)
        h, s, valid = self.sequential_forward(xs, order, n_clean)
        return nll_per_row(self.lm_head(h[valid]), xs.gather(1, s)[valid], valid)

    @torch.no_grad()
    def exact_nll(self, x, alpha0, num_orders=1, generator=None):
        """-log mean_k p(x | order_k) of each row, nats per sequence (§7). Decoding one token per call along a
        fixed generation order, Eso-LM (B) is an AR model over that order, scored exactly by one sequential forward
        with every token masked. The orders follow the sampler's law: each position is a diffusion position with
        probability p_diffusion(alpha0), those come first in a random order, the rest left to right; each row draws
        its own orders. K = 1 is the exact likelihood of one order; the log-mean-exp over K orders is an
        importance-weighted bound on -log p(x) under the sampler that tightens as K grows."""
        if self.config.variant != "B":
            raise ValueError("exact_nll needs variant B: the clean tokens of (A) see each other both ways")
        self._check_x(x)
        _check_alpha0(alpha0)
        B, L = x.shape
        no_clean = torch.zeros(B, dtype=torch.long, device=x.device)
        log_p = []
        for _ in range(num_orders):
            diffusion = rand(B, L, device=x.device, generator=generator) < p_diffusion(alpha0)
            log_p.append(-self._sequential_nll(x, clean_first_order(diffusion, True, generator), no_clean))
        return math.log(num_orders) - torch.stack(log_p).logsumexp(0)

    def _check_x(self, x):
        L, V = self.config.block_size, self.config.vocab_size
        if not torch.is_tensor(x) or x.dim() != 2 or x.size(1) != L or x.dtype != torch.long:
            raise ValueError(f"x must be a LongTensor of shape (B, {L}), got "
                             f"{(x.dtype, tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__}")
        if x.numel() and (x.min() < 0 or x.max() >= V):
            raise ValueError(f"x holds ids outside [0, {V}) (real tokens only; the mask id {V} is not allowed)")

    # ------------------------------------------------------------------------------------------------------
    # Sampler (§6)

    @torch.no_grad()
    def generate(self, num_samples, alpha0, steps, *, temperature=1.0, top_p=1.0, prompt=None, kv_cache=True,
                 generator=None, compile=False, return_logits=False, return_calls=False):
        """Sample (num_samples, L) token ids: a diffusion phase of `steps` steps, then a sequential phase (§6).
        kv_cache=False runs the uncached reference (a full L-token forward per call, what MDLM pays); both give
        the same tokens for the same generator state. `generator` must live on the model's device. compile=True
        runs each cached call's network through torch.compile (dynamic shapes; the first calls pay for compiling).
        Returns x, then the logits of each call (a list of (B, k, V), at least float32) if return_logits, then the
        network call that decoded each position ((B, L), 1 for the first call, 0 for given tokens) if return_calls."""
        _check_alpha0(alpha0)
        if not (isinstance(num_samples, int) and num_samples >= 1 and isinstance(steps, int) and steps >= 1):
            raise ValueError(f"num_samples and steps must be integers >= 1, got {num_samples} and {steps}")
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        was_training = self.training
        self.eval()  # dropout off: the cached and reference paths must compute the same function
        try:
            with sdpa_kernel(SAMPLER_ATTENTION):
                x, logits, calls = self._generate(num_samples, alpha0, steps, temperature, top_p, prompt, kv_cache,
                                                  generator, compile, return_logits)
        finally:
            self.train(was_training)
        return (x, *([logits] if return_logits else []), *([calls] if return_calls else [])) \
            if return_logits or return_calls else x

    def _generate(self, B, alpha0, steps, temperature, top_p, prompt, kv_cache, generator, compile, return_logits):
        L, dev = self.config.block_size, self.wte.weight.device
        z = self._prompt_template(prompt, B)  # (B, L), mask_id where a token is to be generated
        n_gen = int((z[0] == self.mask_id).sum())
        k_diffusion, n_seq = reveal_schedule(n_gen, alpha0, steps, dev, generator)
        ks = k_diffusion + [1] * n_seq  # tokens decoded by each network call (NFE = len(ks)), Python ints: no syncs
        order = generation_order(z == self.mask_id, n_gen - n_seq, generator)  # (B, L) positions
        zs = z.gather(1, order)  # sorted: the given tokens, then the masks in generation order
        d = L - n_gen  # tokens decoded so far, the given ones included: zs[:, :d] is clean
        c_switch = L - n_seq  # clean tokens when the sequential phase starts
        nh, dtype = self.config.n_head, self.compute_dtype()
        caches = [KVCache(B, nh, L, self.config.n_embd // nh, dtype, dev) for _ in self.blocks] if kv_cache else None
        i = torch.arange(L, device=dev)
        causal = additive_mask(visible(i, i, 0), dtype)  # (L, L), built once: each call takes a slice
        net = torch.compile(self, dynamic=True) if compile else self
        n_cached = 0  # cache slots [0, n_cached) hold keys/values that the coming calls can reuse as they are
        logits_per_call = []
        for k in ks:
            # (B): causal over the generation order. (A): the clean tokens form one bidirectional block, frozen
            # at c_switch once the sequential phase starts; the tokens decoded after it join causally
            prefix = 0 if self.config.variant == "B" else min(d, c_switch)
            if kv_cache:
                # Feed only what is not cached: the tokens decoded by the last call (now clean, with their ids) and
                # the k masks to decode now, sorted indices [n_cached, d + k). Why this is exact, for (B): under the
                # causal mask over the generation order, a token's keys and values at every layer depend only on
                # the tokens before it in the order; once it is clean, those are clean too and never change, so
                # its keys/values are final and computed once. The masks not fed yet come after every fed token
                # in the order, so no fed query may see them: leaving them out changes nothing (§6.3).
                if prefix <= n_cached:  # each fed token sees every cached key and the fed ones up to itself
                    mask = causal[n_cached:d + k, :d + k]
                else:  # (A) before its block is cached: the block is fed whole and sees itself both ways
                    mask = additive_mask(visible(i[n_cached:d + k], i[:d + k], prefix), dtype)
                fed = (zs[:, n_cached:d + k], order[:, n_cached:d + k], mask)
                if compile:  # contiguous copies: slices of larger tensors add stride guards, and so graphs
                    fed = [t.contiguous() for t in fed]
                h = net(*fed, caches, n_cached)[:, d - n_cached:]
                # keep the clean tokens' keys/values; the masks' slots get overwritten by the next call. (A)'s
                # diffusion phase keeps none: its clean tokens see each other, so each new one changes them all
                n_cached = d if self.config.variant == "B" or d >= c_switch else 0
            else:
                h = self.diffusion_forward(zs, order, torch.full((B,), prefix, device=dev))[:, d:d + k]
            logits = self.lm_head(h)  # (B, k, V) in the compute dtype; sample_tokens upcasts to float64
            zs[:, d:d + k] = sample_tokens(logits, temperature, top_p, generator)
            if return_logits:
                logits_per_call.append(logits.to(torch.promote_types(logits.dtype, torch.float32)))
            d += k
        x = torch.empty_like(zs).scatter_(1, order, zs)
        call = torch.repeat_interleave(torch.arange(len(ks) + 1), torch.tensor([L - n_gen] + ks)).to(dev)
        return x, logits_per_call, torch.empty_like(zs).scatter_(1, order, call.expand(B, L))

    def _prompt_template(self, prompt, B):
        """(B, L) ids: the prompt padded with mask_id to length L; mask_id marks the positions to generate."""
        L, V, dev = self.config.block_size, self.config.vocab_size, self.wte.weight.device
        if prompt is None:
            return torch.full((B, L), self.mask_id, device=dev)
        if (not torch.is_tensor(prompt) or prompt.dtype != torch.long or prompt.dim() not in (1, 2)
                or prompt.size(-1) > L or (prompt.dim() == 2 and prompt.size(0) != B)):
            raise ValueError(f"prompt must be a LongTensor (T,) or ({B}, T) with T <= {L}, got "
                             f"{(prompt.dtype, tuple(prompt.shape)) if torch.is_tensor(prompt) else type(prompt)}")
        if prompt.numel() and (prompt.min() < 0 or prompt.max() > V):
            raise ValueError(f"prompt holds ids outside [0, {V}] (the mask id {V} marks a position to generate)")
        z = F.pad(prompt.to(dev), (0, L - prompt.size(-1)), value=self.mask_id).expand(B, L).clone()
        n_gen = (z == self.mask_id).sum(1)
        if (n_gen != n_gen[0]).any():
            raise ValueError(f"every row of prompt must leave the same number of positions to generate (the rows "
                             f"share one reveal schedule), got {n_gen.tolist()}")
        return z

    @classmethod
    def from_pretrained(cls, source, dtype=torch.float32, **overrides):
        """One of the paper's published Eso-LM (B) models, exactly, in eval mode. source: a folder holding
        model.safetensors and config.json, or a hub id such as "sahoo-diffusion/Eso-LM-B-alpha-1" (downloaded once
        into $ESOLM_CACHE, default ~/.cache/esolm). The fold is computed in float64, then cast to `dtype`.
        overrides: EsoLMConfig fields, e.g. block_size. See the last section of this file."""
        return load_official(cls, source, dtype, overrides)


# ----------------------------------------------------------------------------------------------------------
# Running it: the device and precision of every script, and the checkpoints train.py writes

def resolve_device(name="auto"):
    """"auto" -> "cuda" when there is a GPU, else "cpu"; any other name is checked to exist here (ValueError)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind, index = torch.device(name).type, torch.device(name).index
    except RuntimeError:
        kind, index = None, None
    if kind not in ("cpu", "cuda"):
        raise ValueError("not a device this code runs on: use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"CUDA is not available on this machine (torch {torch.__version__}); use cpu or auto")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return name


DTYPES = ("auto", "bfloat16", "float32")  # the --dtype of every script
SHARED_RULES = (  # settings that several scripts have, checked wherever a script has them
    ("alpha0", lambda a: a is None or 0 <= a <= 1, "must be in [0, 1] (0: pure AR, 1: pure MDM)"),
    ("seed", lambda s: s >= 0, "must be at least 0"),
    ("dtype", lambda d: d in DTYPES, f"must be one of {', '.join(DTYPES)}"))


def check_args(args, rules):
    """A script's settings against their domains, before any work: rules are (key, ok, what is allowed), and the
    first one that is not ok is a ValueError "--key=value: what is allowed". Returns the device (resolve_device)."""
    shared = [(key, ok(getattr(args, key)), rule) for key, ok, rule in SHARED_RULES if hasattr(args, key)]
    for key, ok, rule in [*shared, *rules]:
        if not ok:
            raise ValueError(f"--{key}={getattr(args, key)}: {rule}")
    try:
        return resolve_device(getattr(args, "device", "auto"))
    except ValueError as e:
        raise ValueError(f"--device={args.device}: {e}") from None


def autocast(device, dtype="auto"):
    """(context, name) of the compute precision: dtype "auto" is bfloat16 autocast on a GPU that has it, else
    float32 (no autocast); "bfloat16" asks for autocast on any device (on a CPU it is emulated, slowly)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16), dtype


CHECKPOINT_FORMAT = "esolm-checkpoint"  # the tag train.py writes into every checkpoint
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "iter_num", "best_val_loss", "model_config", "train_config",
                   "dataset_meta")


def load_checkpoint(path):
    """A checkpoint of train.py, on the CPU: torch.load with weights_only=True, so a tampered pickle cannot run
    code, then checked to be ours. Any problem is a ValueError that names it."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors and plain data, or a damaged file
        raise ValueError(f"{path} is not a checkpoint of this project, or is damaged: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (it has no {CHECKPOINT_FORMAT!r} tag)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", ema=True):
    """The model of a checkpoint in eval mode: its EMA weights when they were saved and `ema` is True."""
    model = EsoLM(EsoLMConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"] if ema and ckpt["ema"] else ckpt["model"])
    return model.to(device).eval()


def load_model(out_dir, init_from="", device="cpu", ema=True):
    """(model, checkpoint) a script runs: a published model (init_from: hub id or folder; checkpoint None), else
    out_dir/ckpt.pt of train.py. A problem is a ValueError that names the setting."""
    try:
        if init_from:
            return EsoLM.from_pretrained(init_from).to(device), None
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        return model_from_checkpoint(ckpt, device, ema), ckpt
    except (ValueError, OSError) as e:  # OSError: a failed download
        raise ValueError(f"--init_from={init_from}: {e}" if init_from else f"--out_dir={out_dir}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Loading the paper's published checkpoints (see README, "Use the paper's checkpoints")
#
# The authors' network is a DiT: after each LayerNorm comes adaLN, h * (1 + scale) + shift, and each residual
# branch is multiplied by a gate, all computed from c = silu(sigma_map(sigma)). Eso-LMs always run at sigma = 0
# (no time conditioning, §2), so c is one constant vector and so is every shift, scale and gate: they fold exactly
# into LayerNorm weights and biases and into the residual projections. The DiT is then our backbone with bias=True
# and gelu="tanh", and all of the above (masks, NELBO, KV cache) applies to it unchanged.

HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"  # tests point it at a file:// folder
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file: an 8-byte little-endian header size N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}, then the raw little-endian data."""
    with open(path, "rb") as f:
        raw = memoryview(f.read())
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 + n:
        raise ValueError(f"{path}: truncated or not safetensors (header of {n} bytes, file of {len(raw)})")
    header, data, tensors = json.loads(bytes(raw[8:8 + n])), raw[8 + n:], {}
    header.pop("__metadata__", None)
    for name, t in header.items():
        (begin, end), dtype = t["data_offsets"], SAFETENSORS_DTYPES.get(t["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t['dtype']}, not one of {list(SAFETENSORS_DTYPES)}")
        if end > len(data) or end - begin != math.prod(t["shape"]) * dtype.itemsize:
            raise ValueError(f"{path}: truncated: tensor {name!r} {t['shape']} needs bytes [{begin}, {end}) of "
                             f"the {len(data)} stored")
        tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).view(t["shape"])  # an aligned copy
    return tensors


def download(repo, file):
    """Local path of `file` of the hub repository `repo`, downloaded on first use. It is written under a temporary
    name and renamed once complete, so that an interrupted download is never mistaken for the file."""
    path = os.path.join(os.environ.get("ESOLM_CACHE") or os.path.expanduser("~/.cache/esolm"),
                        repo.replace("/", "--"), file)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        url, part = HUB_URL.format(repo=repo, file=file), f"{path}.{os.getpid()}.part"  # one per process (torchrun)
        try:
            with (urllib.request.urlopen(url) as r, open(part, "wb") as f,
                  tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                       desc=f"{repo}/{file}") as bar):
                while chunk := r.read(1 << 20):
                    bar.update(f.write(chunk))
            if bar.total and bar.n != bar.total:  # urllib ends a cut-off body without an error
                raise OSError(f"the connection closed after {bar.n} of {bar.total} bytes")
            os.replace(part, path)
        except (OSError, http.client.HTTPException) as e:  # urllib's URLError and HTTPError are OSErrors
            if os.path.exists(part):
                os.remove(part)
            raise OSError(f"could not download {url}: {e} (is {repo!r} a public hub id, or a folder?)") from None
    return path


def fold_official(sd, n_layer):
    """Our backbone's state_dict from the DiT's: the constant adaLN vectors, computed once from c = silu(sigma_map(0))
    in float64, multiplied into the weights they act on."""
    def f64(key):  # the products below are formed in float64 and rounded once, to the model's dtype
        return sd[key].double()

    half = sd["sigma_map.mlp.0.weight"].size(1) // 2
    t_freq = torch.cat([torch.ones(half), torch.zeros(half)]).double()  # [cos(0 * freq)] + [sin(0 * freq)]
    c = F.silu(F.linear(t_freq, f64("sigma_map.mlp.0.weight"), f64("sigma_map.mlp.0.bias")))
    c = F.silu(F.linear(c, f64("sigma_map.mlp.2.weight"), f64("sigma_map.mlp.2.bias")))  # the DiT applies silu again

    def adaln(prefix, n):  # the n modulation vectors (C,) of one adaLN layer
        return F.linear(c, f64(prefix + "adaLN_modulation.weight"), f64(prefix + "adaLN_modulation.bias")).chunk(n)

    out = {"wte.weight": sd["vocab_embed.embedding"]}
    for b in (f"blocks.{i}." for i in range(n_layer)):
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln(b, 6)
        out |= {b + "ln_1.weight": f64(b + "norm1.weight") * (1 + scale1), b + "ln_1.bias": shift1,
                b + "attn.c_attn.weight": sd[b + "attn_qkv.weight"],  # the same (three, heads, head size) layout
                b + "attn.c_proj.weight": gate1[:, None] * f64(b + "attn_out.weight"),
                b + "ln_2.weight": f64(b + "norm2.weight") * (1 + scale2), b + "ln_2.bias": shift2,
                b + "mlp.c_fc.weight": sd[b + "mlp.0.weight"], b + "mlp.c_fc.bias": sd[b + "mlp.0.bias"],
                b + "mlp.c_proj.weight": gate2[:, None] * f64(b + "mlp.2.weight"),
                b + "mlp.c_proj.bias": gate2 * f64(b + "mlp.2.bias")}
    shift, scale = adaln("output_layer.", 2)
    # lm_head leaves out the mask's row (the last): the DiT sets that logit to -1e6, whose exp is exactly 0, so the
    # softmax over the other rows is the same
    return out | {"ln_f.weight": f64("output_layer.norm_final.weight") * (1 + scale), "ln_f.bias": shift,
                  "lm_head.weight": sd["output_layer.linear.weight"][:-1],
                  "lm_head.bias": sd["output_layer.linear.bias"][:-1]}


def load_official(cls, source, dtype, overrides):
    """EsoLM.from_pretrained: read, check, fold, build."""
    paths = [os.path.join(source, f) if os.path.isdir(source) else download(source, f)
             for f in ("config.json", "model.safetensors")]
    with open(paths[0]) as f:
        meta = json.load(f)
    sd = {k.removeprefix("backbone."): v for k, v in read_safetensors(paths[1]).items()}  # the hub's wrapper adds it
    for k in ("vocab_embed.embedding", "sigma_map.mlp.0.weight", "rotary_emb.inv_freq"):  # read for the config
        if k not in sd:
            raise ValueError(f"{paths[1]}: missing tensor {k!r}")
    (rows, C), (cond, n_freq) = sd["vocab_embed.embedding"].shape, sd["sigma_map.mlp.0.weight"].shape
    # config.json of the hub's files holds n_blocks, n_heads, model_length; a bare mixin save only mask_index and
    # vocab_size: then the depth and head size come off the tensors (RoPE spans a head), and L is the paper's 1024
    n_blocks = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    config = EsoLMConfig(**{"vocab_size": rows - 1, "n_embd": C, "n_layer": meta.get("n_blocks", n_blocks),
                            "n_head": meta.get("n_heads", max(1, C // (2 * len(sd["rotary_emb.inv_freq"])))),
                            "block_size": meta.get("model_length", 1024), "variant": "B", "bias": True, "gelu": "tanh",
                            **overrides})
    if meta.get("mask_index", rows - 1) != config.vocab_size:
        raise ValueError(f"{paths[0]}: mask_index {meta['mask_index']} is not the last embedding row, "
                         f"{config.vocab_size}, where this backbone keeps the mask")
    R, hs = config.vocab_size + 1, C // config.n_head  # embedding and output rows: the tokens, then the mask
    block = {"norm1.weight": (C,), "attn_qkv.weight": (3 * C, C), "attn_out.weight": (C, C), "norm2.weight": (C,),
             "mlp.0.weight": (4 * C, C), "mlp.0.bias": (4 * C,), "mlp.2.weight": (C, 4 * C), "mlp.2.bias": (C,),
             "adaLN_modulation.weight": (6 * C, cond), "adaLN_modulation.bias": (6 * C,)}
    want = {"vocab_embed.embedding": (R, C), "sigma_map.mlp.0.weight": (cond, n_freq), "sigma_map.mlp.0.bias": (cond,),
            "sigma_map.mlp.2.weight": (cond, cond), "sigma_map.mlp.2.bias": (cond,), "rotary_emb.inv_freq": (hs // 2,),
            "output_layer.norm_final.weight": (C,), "output_layer.linear.weight": (R, C),
            "output_layer.linear.bias": (R,), "output_layer.adaLN_modulation.weight": (2 * C, cond),
            "output_layer.adaLN_modulation.bias": (2 * C,),
            **{f"blocks.{i}.{k}": shape for i in range(config.n_layer) for k, shape in block.items()}}
    for k in sorted(want.keys() | sd.keys()):
        if k not in sd or k not in want:
            raise ValueError(f"{paths[1]}: {'missing' if k not in sd else 'unexpected'} tensor {k!r} (an Eso-LM DiT "
                             f"with {config.n_layer} blocks has {len(want)} tensors)")
        if tuple(sd[k].shape) != want[k]:
            raise ValueError(f"{paths[1]}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {want[k]}")
    # Non-constant conditioning. When sigma is always 0, the columns of sigma_map's first layer that multiply
    # sin(sigma * freq) only ever see zeros: no gradient, so they keep their nn.Linear init, within +-1/sqrt(fan_in)
    # (weight decay only shrinks them). Training with time conditioning moves them out of that range, and such a
    # model, folded at sigma = 0, would silently be a different model.
    if sd["sigma_map.mlp.0.weight"][:, n_freq // 2:].abs().max() > 1 / math.sqrt(n_freq):
        raise ValueError(f"{paths[1]}: the sin(sigma * freq) columns of sigma_map.mlp.0.weight were trained: a model "
                         f"with time conditioning, whose adaLN is not constant, does not fold into this backbone")
    model = cls(config).to(dtype)
    model.load_state_dict(fold_official(sd, config.n_layer))
    # RoPE as the DiT builds it, float32 angles from the stored inv_freq: the tables then match its own bit for bit
    # (rope_tables' float64 angles differ by up to 4e-5 at L = 1024)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), sd["rotary_emb.inv_freq"].float())
    model.rope_cos.copy_(angles.cos())
    model.rope_sin.copy_(angles.sin())
    return model.eval()
