"""
Esoteric Language Models (Eso-LMs) in one file: a transformer that is both a masked diffusion model and an
autoregressive model, trained with the hybrid NELBO and sampled with an exact KV cache.

Section numbers (§5) refer to "The method, mapped to the code" in README.md. Order of the file:
config -> primitives (RoPE, MLP) -> attention with the KV cache -> block -> backbone -> attention masks
-> noise schedule -> the Eso-LM: its two training forwards, NELBO, exact likelihood (§7), sampler.

Layout convention used everywhere: a forward pass sees the tokens in *sorted order* (clean tokens first, then
masks, §5). `order[b, i]` is the original position of the i-th token of row b, and RoPE is computed from it,
so the attention mask is the only place the order shows up.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-3  # alpha_1 = alpha0 * EPS: the log-linear schedule never masks with probability exactly 1 (§3)


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

    def __post_init__(self):
        if self.variant not in ("A", "B"):
            raise ValueError(f"variant must be 'A' or 'B', got {self.variant!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd / n_head must be an even integer for RoPE, got {self.n_embd}/{self.n_head}")


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
    """bool mask (True = may attend) -> 0 / -inf, or None (causal) -> None."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# ----------------------------------------------------------------------------------------------------------
# Attention with a KV cache

class KVCache:
    """Preallocated keys and values of one layer, (B, nh, L, hs), written in place (gpt-fast style).

    Unlike an AR cache, slot i holds the i-th token in *generation order*, not position i: each row of the batch
    has its own order, and the positions of its tokens live in RoPE, not in the slot index."""

    def __init__(self, size):
        self.size = size  # L slots: every token enters the cache at most once
        self.k = self.v = None

    def update(self, start, k, v):
        """Write the chunk (B, nh, T, hs) at slots [start, start+T); return the keys/values of slots [0, start+T).
        The sampler advances `start` only past the chunk's clean tokens, so the next chunk overwrites the
        masks' slots: their keys/values must not be kept (§6.3)."""
        if self.k is None:  # allocated on first use, so it takes the dtype of autocast if one is active
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.size, hs)
            self.v = torch.empty_like(self.k)
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
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nh, start+T, hs)
        if isinstance(attn_mask, tuple):
            # the sequential layout [z ; x] (§5): x never attends to z, so its L queries run as an attention of
            # their own (causal for (B): the fast path) and only the M z-queries read the (M, M+L) mask.
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
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
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
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        # untied head over the real tokens only: the mask is never predicted (zero-masking of SUBS, §2)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-2 init: N(0, 0.02), and residual projections scaled by 1/sqrt(2 n_layer) so that the residual
        # stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() == 2:  # linear and embedding weights; LayerNorm weights stay 1
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos, attn_mask=None, caches=None, start=0):
        """idx, pos: (B, T) token ids (mask_id allowed) and original positions, in sorted order.
        attn_mask: bool (B or 1, 1, T, start+T), True = may attend; None = causal; a pair for the sequential
        layout (see sequential_forward). caches: one KVCache per layer, written at slots [start, start+T)
        (sampling only). Returns the final hidden states (B, T, C): callers
        apply lm_head only to the rows they need, which skips the C x V product on clean tokens."""
        x = self.drop(self.wte(idx))
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype  # that of q, k, v
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
    """The one rule behind every mask: causal over the sorted order, except that the first `prefix` tokens
    (the bidirectional clean block of (A); 0 for (B)) are visible to all. q, j: sorted indices (Tq,), (Tk,)."""
    return (j <= q[:, None]) | (j < prefix)


def diffusion_mask(n_clean, L, variant):
    """(B, 1, L, L) mask of the L-token diffusion forward: clean tokens first, then masks. n_clean: (B,).

    (B): plain causal; a clean token sees only the clean tokens before it in the (random) order, which is why
    its keys/values can be cached. (A): the clean block is bidirectional; masks see every clean token and the
    masks before them. L = 4, n_clean = 2 (c = clean, m = mask, 1 = may attend):

        (B)    c c m m        (A)    c c m m
            c  1 . . .            c  1 1 . .
            c  1 1 . .            c  1 1 . .
            m  1 1 1 .            m  1 1 1 .
            m  1 1 1 1            m  1 1 1 1
    """
    i = torch.arange(L, device=n_clean.device)
    prefix = n_clean if variant == "A" else torch.zeros_like(n_clean)
    return visible(i, i, prefix[:, None, None]).unsqueeze(1)


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


def rand(*shape, device, generator=None, dtype=torch.float32):
    return torch.rand(shape, device=device, generator=generator, dtype=dtype)


def antithetic_t(n, device, generator=None):
    """t_i = (u + i/n) mod 1 (§4), mapped to (0, 1] so that t = 0 (no masks, infinite weight) cannot occur."""
    return 1 - (rand(1, device=device, generator=generator) + torch.arange(n, device=device) / n) % 1


def nll_per_row(logits, targets, sel):
    """sum over the selected tokens of each row of -log p(target); logits (N, V) for the N True entries of sel."""
    nll = torch.zeros(sel.shape, device=sel.device, dtype=torch.promote_types(logits.dtype, torch.float32))
    nll[sel] = F.cross_entropy(logits.to(nll.dtype), targets, reduction="none")
    return nll.sum(1)


# ----------------------------------------------------------------------------------------------------------
# Sampling helpers (§6)

def reveal_schedule(n_gen, alpha0, steps, device, generator=None):
    """Tokens decoded per network call of the diffusion phase, k_1..k_S (empty steps dropped), and the number of
    tokens left to the sequential phase, decoded one per call. Drawing, for each masked position, the step that reveals it (or none: then the
    sequential phase decodes it) has the same law as k_s ~ Binomial(remaining, (alpha_s - alpha_t)/(1 - alpha_t))
    step by step, and needs one draw instead of `steps` dependent ones."""
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

class EsoLM(Transformer):

    def diffusion_forward(self, zs, order, n_clean):
        """The L-token forward over z_t in sorted order (clean first, §5). Hidden states (B, L, C)."""
        mask = None if self.config.variant == "B" else diffusion_mask(n_clean, zs.size(1), "A")
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
        """One Monte Carlo draw of the NELBO of each row of x (B, L), in nats per sequence: AR term + MDM term,
        both on every row, t antithetic over the batch."""
        self._check_x(x)
        _check_alpha0(alpha0)
        t = antithetic_t(x.size(0), x.device, generator)
        mdm_nll, _ = self._mdm_term(x, alpha0, t, generator)
        return self._ar_term(x, alpha0, generator) + mdm_weight(alpha0, t) * mdm_nll

    def loss(self, x, alpha0, batch_split=0.5, loss_type="elbo"):
        """Training objective, a per-token NELBO estimate: the first rows (fraction batch_split) estimate the MDM
        term, the others the AR term; each is averaged over its own tokens and the two are added (§4). When
        alpha0 is 0 or 1 the absent term takes no rows. loss_type "low_var" replaces the weighted MDM term by
        the plain mean of -log p over its masked tokens."""
        self._check_x(x)
        _check_alpha0(alpha0)
        if loss_type not in ("elbo", "low_var"):
            raise ValueError(f"loss_type must be 'elbo' or 'low_var', got {loss_type!r}")
        B, L = x.shape
        if alpha0 in (0, 1):
            n_mdm = B * int(alpha0)
        elif 0 < batch_split < 1 and B >= 2:
            n_mdm = min(max(round(B * batch_split), 1), B - 1)
        else:
            raise ValueError(f"0 < alpha0 < 1 needs both terms: batch_split in (0, 1) and at least 2 rows, got "
                             f"batch_split={batch_split} and {B} rows")
        loss = 0.0
        if n_mdm:
            t = antithetic_t(n_mdm, x.device)
            nll, n_masked = self._mdm_term(x[:n_mdm], alpha0, t)
            if loss_type == "elbo":
                loss = loss + (mdm_weight(alpha0, t) * nll).sum() / (n_mdm * L)
            else:
                loss = loss + nll.sum() / n_masked.sum().clamp(min=1)
        if n_mdm < B:
            loss = loss + self._ar_term(x[n_mdm:], alpha0).sum() / ((B - n_mdm) * L)
        return loss

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
        # sorted order: the clean tokens of z0 first (in a random order for (B); (A) sees them bidirectionally,
        # so left to right will do), then the masked positions left to right
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
        the probability that the diffusion phase reveals it, those come first in a random order, the rest left to
        right. K = 1 is the exact likelihood of one order; the log-mean-exp over K orders is an importance-weighted
        bound on -log p(x) under the sampler that tightens as K grows."""
        if self.config.variant != "B":
            raise ValueError("exact_nll needs variant B: the clean tokens of (A) see each other both ways")
        self._check_x(x)
        _check_alpha0(alpha0)
        B, L = x.shape
        p_diffusion = alpha0 * (1 - EPS) / (1 - alpha0 * EPS)  # 1 - P(left to the AR phase), see reveal_schedule
        no_clean = torch.zeros(B, dtype=torch.long, device=x.device)
        log_p = []
        for _ in range(num_orders):
            diffusion = rand(B, L, device=x.device, generator=generator) < p_diffusion
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
    def generate(self, num_samples, alpha0, steps, temperature=1.0, top_p=1.0, prompt=None, kv_cache=True,
                 generator=None, return_logits=False):
        """Sample (num_samples, L) token ids: a diffusion phase of `steps` steps, then a sequential phase.
        kv_cache=False runs the uncached reference (a full L-token forward per call, what MDLM pays); both give
        the same tokens for the same generator state. `generator` must live on the model's device."""
        _check_alpha0(alpha0)
        if not (isinstance(num_samples, int) and num_samples >= 1 and isinstance(steps, int) and steps >= 1):
            raise ValueError(f"num_samples and steps must be integers >= 1, got {num_samples} and {steps}")
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        was_training = self.training
        self.eval()  # dropout off: the cached and reference paths must compute the same function
        try:
            return self._generate(num_samples, alpha0, steps, temperature, top_p, prompt, kv_cache, generator,
                                  return_logits)
        finally:
            self.train(was_training)

    def _generate(self, B, alpha0, steps, temperature, top_p, prompt, kv_cache, generator, return_logits):
        L = self.config.block_size
        z = self._prompt_template(prompt, B)  # (B, L), mask_id where a token is to be generated
        n_gen = int((z[0] == self.mask_id).sum())
        k_diffusion, n_seq = reveal_schedule(n_gen, alpha0, steps, z.device, generator)
        order = generation_order(z == self.mask_id, n_gen - n_seq, generator)  # (B, L) positions
        zs = z.gather(1, order)  # sorted: the given tokens, then the masks in generation order
        d = L - n_gen  # tokens decoded so far, the given ones included: zs[:, :d] is clean
        c_switch = L - n_seq  # clean tokens when the sequential phase starts
        caches = [KVCache(L) for _ in self.blocks] if kv_cache else None
        n = 0  # cache slots holding clean tokens
        all_logits = []
        for k in k_diffusion + [1] * n_seq:  # one network call (NFE) each
            # (B): causal over the generation order. (A): the clean tokens form one bidirectional block, frozen
            # at c_switch once the sequential phase starts; the tokens decoded after it join causally
            prefix = 0 if self.config.variant == "B" else min(d, c_switch)
            if kv_cache:
                # feed only what is not cached: the tokens decoded by the last call (now clean) and the k masks
                # to decode now, at sorted indices [n, d + k); they see every cached key (§6.3)
                q = torch.arange(n, d + k, device=z.device)
                mask = visible(q, torch.arange(d + k, device=z.device), prefix)
                h = self(zs[:, n:d + k], order[:, n:d + k], mask, caches, n)[:, d - n:]
                # keep the clean tokens' keys/values; the masks' slots get overwritten by the next call. (A)'s
                # diffusion phase keeps none: its clean tokens see each other, so each new one changes them all
                n = d if self.config.variant == "B" or d >= c_switch else 0
            else:
                h = self.diffusion_forward(zs, order, torch.full((B,), prefix, device=z.device))[:, d:d + k]
            logits = self.lm_head(h)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, k, V)
            zs[:, d:d + k] = sample_tokens(logits, temperature, top_p, generator)
            all_logits.append(logits)
            d += k
        x = torch.empty_like(zs).scatter_(1, order, zs)
        return (x, all_logits) if return_logits else x

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
