"""
Esoteric Language Models (Eso-LMs, arXiv 2506.01928): one transformer, both a masked diffusion model
(MDM) and an autoregressive (AR) model, its NELBO, and a sampler with an exact KV cache. README.md
has the notation and the pictures. Sizes: B rows, n tokens, C channels, nh heads of hs, L long.
"""
import math
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

EPS = 1e-3  # the schedule's floor: t >= EPS keeps the MDM weight at most 1 / EPS


def need(ok, message):  # a bad argument: a ValueError that names it
    if not ok:
        raise ValueError(message)


@dataclass
class EsoLMConfig:
    vocab_size: int = 256  # V real tokens; the mask token is id V
    block_size: int = 256  # L, the sequence length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0  # on the two residual branches, as in the paper's network
    variant: str = "B"  # "B": cached in both phases; "A": its clean tokens see each other; "MDLM"
    alpha0: float = 0.25  # what the model is trained for: the share the diffusion phase decodes
    rope_base: float = 10000.0
    pos_emb: bool = False  # a learned absolute position embedding too (Sudoku needs one)
    bias: bool = False  # biases in LayerNorm, MLP and head (the published network has them)
    gelu: str = "exact"  # or "tanh", the published network's approximation

    def __post_init__(self):
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            need(getattr(self, key) >= 1, f"EsoLMConfig: {key} must be at least 1")
        need(self.n_embd % self.n_head == 0 and self.n_embd // self.n_head % 2 == 0, "EsoLMConfig: "
             f"n_embd / n_head = {self.n_embd} / {self.n_head} must be even (RoPE turns pairs)")
        need(0 <= self.dropout < 1, f"EsoLMConfig: dropout={self.dropout} must be in [0, 1)")
        need(self.variant in ("A", "B", "MDLM") and self.gelu in ("exact", "tanh"),
             f"EsoLMConfig: variant={self.variant!r} or gelu={self.gelu!r} is unknown")
        check_alpha0(self.alpha0, self.variant, "EsoLMConfig")


def check_alpha0(alpha0, variant, where):
    need(0 <= alpha0 <= 1 and (alpha0 == 1 or variant != "MDLM"),
         f"{where}: alpha0={alpha0} must be in [0, 1] (0: AR, 1: MDM), and 1 for MDLM")
    return alpha0


# --- Backbone: a pre-norm GPT with rotary positions and no time input (it never sees t)
def rope_tables(L, hs, base):  # cos, sin (L, hs/2): p turns (x[i], x[i + hs/2]) by p / base^(2i/hs)
    inv_freq = 1.0 / base ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.outer(torch.arange(L, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):  # x (..., nh, hs); cos, sin (..., 1, hs/2) at original positions
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.causal = config.variant != "MDLM"  # what no mask means: causal, or MDLM's all to all
        # the sampler's KV cache (B, L + 1, nh, hs): slot i, a row's i-th token once fed; L, a sink
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, cos, sin, mask, slots, n_z, x_mask, fed):
        q, k, v = self.c_attn(x).unflatten(-1, (3, self.n_head, -1)).unbind(-3)  # (..., nh, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if fed is not None:  # x (N, C): k, v to their slots, q to (B, n); it reads all the cache
            self.k_cache[fed[0], slots[fed]], self.v_cache[fed[0], slots[fed]] = k, v
            q = q.new_zeros(*slots.shape, *q.shape[1:]).index_put_(fed, q)
            k, v = self.k_cache, self.v_cache
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, n or L + 1, hs)
        if n_z:  # [z ; x]: mask is z's queries'; x never sees z: x's run alone, with x_mask
            y = torch.cat([self.sdpa(q[:, :, :n_z], k, v, mask),
                           self.sdpa(q[:, :, n_z:], k[:, :, n_z:], v[:, :, n_z:], x_mask)], dim=2)
        else:
            y = self.sdpa(q, k, v, mask)
        y = y.transpose(1, 2).flatten(2)  # (B, n, C)
        return self.c_proj(y if fed is None else y[fed])

    def sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None and self.causal)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, b = config.n_embd, config.bias
        self.ln_1, self.attn = nn.LayerNorm(C, bias=b), Attention(config)
        self.ln_2 = nn.LayerNorm(C, bias=b)
        self.c_fc, self.c_proj = nn.Linear(C, 4 * C, bias=b), nn.Linear(4 * C, C, bias=b)  # the MLP
        self.gelu = "tanh" if config.gelu == "tanh" else "none"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, *attention):
        x = x + self.dropout(self.attn(self.ln_1(x), cos, sin, *attention))
        return x + self.dropout(self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate=self.gelu)))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.mask_id = config, config.vocab_size
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # + 1: the mask token
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb else None
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # untied, over the V real tokens: the mask is never predicted ("zero masking")
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("rope_cos", cos)  # saved: a converted model brings its own tables
        self.register_buffer("rope_sin", sin)
        for name, p in self.named_parameters():  # GPT-2's init; residual outputs / sqrt(2 n_layer)
            if p.dim() == 2:
                scale = math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 1
                nn.init.normal_(p, std=0.02 / scale)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def compute_dtype(self):  # of q, k and v: autocast's when it is on, else the weights'
        w, d = self.wte.weight, self.wte.weight.device.type
        return torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else w.dtype

    def forward(self, idx, pos, mask=None, slots=None, n_z=0, x_mask=None, fed=None):
        """Hidden states (B, n, C) of idx at positions pos (B, n), sorted. mask: bool (B or 1, 1,
        n or n_z, keys), True: may attend, None = causal (MDLM: all); slots (B, n): cached calls."""
        if slots is not None:  # a cached call: only the (rows, columns) fed, not the sink
            fed = fed or (slots < self.config.block_size).nonzero(as_tuple=True)
            idx, pos = idx[fed], pos[fed]  # (N,) for (B, n)
        x = self.wte(idx) if self.wpe is None else self.wte(idx) + self.wpe(pos)
        cos, sin = (t[pos, None].to(self.compute_dtype()) for t in (self.rope_cos, self.rope_sin))
        mask, x_mask = (None if m is None else cos.new_zeros(m.shape).masked_fill_(~m, -math.inf)
                        for m in (mask, x_mask))  # additive, once
        for block in self.blocks:
            x = block(x, cos, sin, mask, slots, n_z, x_mask, fed)
        x = self.ln_f(x)
        return x if fed is None else x.new_zeros(*slots.shape, x.size(-1)).index_put_(fed, x)


# --- Attention masks. A[q, j] = True: the token at sorted index q may attend to index j
def visible(q, j, prefix):  # causal, but the first `prefix` ((A)'s clean block) see both ways
    return (j <= q[..., None]) | (j < prefix)  # q (..., nq), j (nk,), prefix int or (B, 1, 1)


def diffusion_mask(prefix, L, variant):
    """(B, 1, L, L): the diffusion forward over z_t, clean first (README: pictures). In (B) a clean
    token sees only those before it: its keys and values can be cached. prefix (B,): (A)'s clean
    block, which sees itself both ways. MDLM sees all."""
    i = torch.arange(L, device=prefix.device)
    block = {"A": prefix, "B": 0 * prefix, "MDLM": torch.full_like(prefix, L)}[variant]
    return visible(i, i, block[:, None, None]).unsqueeze(1)


def sequential_mask(n_clean, M, L, variant):
    """The AR term's masks, layout [z ; x]: z-queries at z0's M masked positions (after its clean
    tokens, left to right), x the clean sequence in that order. A z-query sees itself and the x-keys
    before it; x is causal ((A): its clean block both ways), never z. -> (B, 1, M, M + L), x's."""
    B, dev = n_clean.size(0), n_clean.device
    c, r, i = n_clean[:, None, None], torch.arange(M, device=dev), torch.arange(L, device=dev)
    zz = torch.eye(M, dtype=torch.bool, device=dev).expand(B, M, M)  # each z-query sees itself
    zx = i < c + r[:, None]  # and the x-keys before its sorted index c + r: (B, M, L)
    x_mask = None if variant == "B" else visible(i, i, c).unsqueeze(1)
    return torch.cat([zz, zx], 2).unsqueeze(1), x_mask


# --- Noise schedule: alpha_t = alpha0 (1 - (1 - EPS) t), from alpha0 at t = 0 to alpha0 EPS
def alpha_t(alpha0, t):
    return alpha0 * (1 - (1 - EPS) * t)


def mdm_weight(alpha0, t):  # -alpha_t' / (1 - alpha_t): the MDM term's weight, 1/t at alpha0 = 1
    return alpha0 * (1 - EPS) / (1 - alpha_t(alpha0, t))


def stratified_t(n, device):  # training: row i in the i-th of n slices of [EPS, 1), less variance
    return EPS + (1 - EPS) * (torch.rand(n, device=device) + torch.arange(n, device=device)) / n


def nll_per_row(logits, targets, sel):  # each row's sum of -log p(target) at sel's N True entries
    nll = torch.zeros_like(sel, dtype=torch.promote_types(logits.dtype, torch.float32))
    nll[sel] = F.cross_entropy(logits.to(nll.dtype), targets, reduction="none")
    return nll.sum(1)


def clean_first_order(clean, shuffle, generator=None):  # (B, L): clean first, then left to right
    pos = torch.arange(clean.size(1), device=clean.device) / clean.size(1)
    key = torch.rand(clean.shape, generator=generator, device=clean.device) if shuffle else pos
    return torch.where(clean, key, 1 + pos).argsort(1)


# --- The sampling plan, each row its own
# order (B, L): the positions in generation order, given first (decode sorts the sequential phase's
# by position). ks (B, N): the tokens each diffusion call decodes, 0 after a row's last.
Plan = namedtuple("Plan", "order ks")
Samples = namedtuple("Samples", "x decoded_by nfe")  # decoded_by: each position's call (0: given)
SAMPLER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def random_plan(to_gen, alpha0, steps, u):
    """The paper's plan for the positions to_gen (B, L), from uniforms u (2, B, L). T steps, t = 1
    to 0: step t -> s reveals Binomial(masks left, (a_s - a_t) / (1 - a_t)): each mask gets the step
    that reveals it, or none; a step revealing nothing makes no call. Slots: the given tokens
    (random, as z0's clean ones; at alpha0 = 0 in order), each step's, the rest."""
    (B, L), dev = to_gen.shape, to_gen.device
    a = alpha_t(alpha0, torch.linspace(1, 0, steps + 1, dtype=torch.float64, device=dev))
    p = torch.cat([a.diff(), 1 - a[-1:]]) / (1 - a[0])  # P(revealed at step i), then P(never)
    step = torch.searchsorted(p.cumsum(0), u[0].double(), right=True).clamp(max=steps)  # (B, L)
    given = u[1] if alpha0 > 0 else torch.arange(L, device=dev) / L
    order = torch.where(to_gen, 1 + step + u[1], given).argsort(1)
    n = torch.zeros(B, steps + 1, dtype=torch.long, device=dev).scatter_add_(1, step, to_gen.long())
    ks = n[:, :steps].gather(1, (n[:, :steps] == 0).long().argsort(dim=1, stable=True))  # 0s last
    return Plan(order, ks[:, :int((ks > 0).sum(1).max())])


def sample_tokens(logits, u, temperature=1.0, top_p=1.0):
    """A token per row of logits (..., V): the inverse CDF at u of softmax(logits / temperature), in
    float64, nucleus-filtered (the likeliest up to a mass of top_p); temperature 0: argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    p = (logits.double() / temperature).softmax(-1)
    if top_p < 1:
        p_sorted, index = p.sort(-1, descending=True)
        p = p.scatter(-1, index, p_sorted.masked_fill(p_sorted.cumsum(-1) - p_sorted >= top_p, 0))
    cdf = p.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)


def adaptive_score(logits, temperature, rule):
    """How sure the model is of each mask (Kim et al., 2025), from softmax(logits / temperature)
    (temperature 0: 1): "confidence", the top probability; "margin", the top minus the second."""
    p = (logits.double() / (temperature or 1)).softmax(-1).topk(2, dim=-1).values
    return p[..., 0] - p[..., 1] if rule == "margin" else p[..., 0]


# --- The Eso-LM: its two forwards, the NELBO, the exact likelihood and the sampler
class EsoLM(Transformer):  # a mask predicts its own position (README: the masks), not the next
    def diffusion_forward(self, zs, order, prefix):  # over z_t, sorted; prefix (B,): (A)'s block
        mask = diffusion_mask(prefix, zs.size(1), "A") if self.config.variant == "A" else None
        return self(zs, order, mask)

    def sequential_forward(self, xs, order, n_clean):
        """The AR term's forward over x in sorted order, xs (z0's clean tokens, then its masks left
        to right): the masks' hidden states (B, M, C), sorted indices s and `valid` (B, M)."""
        L, M = xs.size(1), int((xs.size(1) - n_clean).max())
        r = torch.arange(M, device=xs.device)
        valid = r < (L - n_clean)[:, None]
        s = (n_clean[:, None] + r).clamp(max=L - 1)  # padding reuses index L - 1, never read
        z_mask, x_mask = sequential_mask(n_clean, M, L, self.config.variant)
        idx = torch.cat([torch.full_like(s, self.mask_id), xs], 1)
        h = self(idx, torch.cat([order.gather(1, s), order], 1), z_mask, n_z=M, x_mask=x_mask)
        return h[:, :M], s, valid

    # The NELBO. Generation goes all masks -> z0 (the diffusion phase) -> x (left to right), so
    #   -log p(x) <= AR term (-log p(x | z0), teacher-forced) + MDM term (MDLM's bound on z0)
    def nelbo(self, x, alpha0=None, generator=None):
        """One draw of each row's NELBO in nats, both terms on every row of x (B, L), each row its
        own t; alpha0: default the model's. A bound, up to the schedule's floor (README)."""
        alpha0 = self.check_x(x, alpha0, "nelbo")
        t = EPS + (1 - EPS) * torch.rand(x.size(0), device=x.device, generator=generator)
        mdm_nll = self._mdm_term(x, alpha0, t, generator)
        return self._ar_term(x, alpha0, generator) + mdm_weight(alpha0, t) * mdm_nll

    def loss(self, x, batch_split=0.5, loss_type="elbo"):
        """The training objective, (MDM term, AR term) per token at the model's alpha0 (minimise the
        sum): the first rows (a share batch_split, a row at least) estimate the MDM term, the rest
        the AR term, each a mean over its rows. "low_var": the MDM term unweighted (alpha0 = 1)."""
        (B, L), alpha0 = x.shape, self.config.alpha0
        need(loss_type in ("elbo", "low_var"), f"loss: loss_type={loss_type!r} is unknown")
        need(0 <= batch_split <= 1, f"loss: batch_split={batch_split} must be in [0, 1]")
        need(alpha0 in (0, 1) or B >= 2, f"loss: x has {B} row; 0 < alpha0 < 1 needs one a term")
        n_mdm = B * int(alpha0) if alpha0 in (0, 1) else min(max(round(B * batch_split), 1), B - 1)
        mdm = ar = torch.zeros((), device=x.device)
        if n_mdm:
            t = stratified_t(n_mdm, x.device)
            nll = self._mdm_term(x[:n_mdm], alpha0, t)
            mdm = (nll if loss_type == "low_var" else mdm_weight(alpha0, t) * nll).sum() / n_mdm / L
        if n_mdm < B:
            ar = self._ar_term(x[n_mdm:], alpha0).sum() / ((B - n_mdm) * L)
        return mdm, ar

    def _mdm_term(self, x, alpha0, t, generator=None):  # sum_{l in M(z_t)} -log p(x_l | z_t)
        B, L = x.shape
        if alpha0 == 0:  # its weight is 0: no forward
            return torch.zeros(B, device=x.device)
        u = torch.rand(B, L, device=x.device, generator=generator)
        masked = u < 1 - alpha_t(alpha0, t)[:, None]
        # clean, then masks, each in a random order: as (B) samples (decoded so far, decoding now)
        order = (torch.rand(B, L, device=x.device, generator=generator) + masked).argsort(1)
        xs, ms = x.gather(1, order), masked.gather(1, order)
        h = self.diffusion_forward(xs.masked_fill(ms, self.mask_id), order, L - ms.sum(1))
        return nll_per_row(self.lm_head(h[ms]), xs[ms], ms)

    def _ar_term(self, x, alpha0, generator=None):  # sum_{l in M(z0)} -log p(x_l | z0, x_<l)
        B, L = x.shape
        masked = torch.rand(B, L, device=x.device, generator=generator) < 1 - alpha0  # M(z0)
        if not masked.any():
            return torch.zeros(B, device=x.device)
        # as the sampler decodes: z0's clean tokens ((B): in a random order), then its masks in turn
        order = clean_first_order(~masked, self.config.variant == "B", generator)
        return self._sequential_nll(x, order, L - masked.sum(1))

    def _sequential_nll(self, x, order, n_clean):  # -log p of sorted indices n_clean.., in turn
        xs = x.gather(1, order)
        h, s, valid = self.sequential_forward(xs, order, n_clean)
        return nll_per_row(self.lm_head(h[valid]), xs.gather(1, s)[valid], valid)

    @torch.no_grad()
    def exact_nll(self, x, alpha0=None, num_orders=1, generator=None):
        """-log mean_k p(x | order_k) over K = num_orders orders (as the sampler's, a row its own),
        nats per row: decoding a token a call, (B) is an AR model over its order, scored exactly by
        one sequential forward; in expectation, a bound on that sampler's -log p(x)."""
        alpha0 = self.check_x(x, alpha0, "exact_nll")
        need(self.config.variant == "B", "exact_nll: needs variant B (A's clean tokens see both)")
        need(isinstance(num_orders, int) and num_orders >= 1, "exact_nll: num_orders must be >= 1")
        (B, L), no_clean = x.shape, torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        p = (alpha_t(alpha0, 0.0) - alpha_t(alpha0, 1.0)) / (1 - alpha_t(alpha0, 1.0))
        log_p = []
        for _ in range(num_orders):  # the diffusion positions as the sampler draws them
            diffusion = torch.rand(B, L, device=x.device, generator=generator) < p
            order = clean_first_order(diffusion, True, generator)
            log_p.append(-self._sequential_nll(x, order, no_clean))
        return math.log(num_orders) - torch.stack(log_p).logsumexp(0)

    def check_x(self, x, alpha0, where):  # the door of nelbo and exact_nll; returns alpha0
        L, V, c = self.config.block_size, self.config.vocab_size, self.config
        need(torch.is_tensor(x) and x.dtype == torch.long and x.dim() == 2 and x.size(1) == L and
             (not x.numel() or 0 <= x.min() <= x.max() < V), f"{where}: x must be (B, {L}) ids<{V}")
        return check_alpha0(c.alpha0 if alpha0 is None else alpha0, c.variant, where)

    @torch.no_grad()
    def generate(self, num_samples, alpha0=None, steps=None, *, prompt=None, plan=None,
                 temperature=1.0, top_p=1.0, adaptive=None, threshold=None, kv_cache=True,
                 net=None, seed=0):
        """Sample num_samples sequences: Samples. alpha0: default the model's; steps: T (default L).
        prompt: ids (P,) or (B, P), P <= L; a mask id is a position to generate, any number a row.
        plan: instead of random_plan's. adaptive ("confidence", "margin"): a diffusion call decodes
        the masks the model is surest of, as many as planned or all that score threshold (>= 1).
        kv_cache=False: the reference. net: a compiled model. seed: row b draws from seed + b."""
        (L, V), variant = (self.config.block_size, self.config.vocab_size), self.config.variant
        alpha0 = check_alpha0(self.config.alpha0 if alpha0 is None else alpha0, variant, "generate")
        kv_cache = kv_cache and variant != "MDLM"  # MDLM has none: its tokens see each other
        p = torch.zeros(0, dtype=torch.long) if prompt is None else prompt
        for name, value, ok, rule in [
                ("num_samples", num_samples, type(num_samples) is int and num_samples > 0, "> 0"),
                ("steps", steps, steps is None or isinstance(steps, int) and steps > 0, "> 0"),
                ("temperature", temperature, temperature >= 0, ">= 0"),
                ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
                ("adaptive", adaptive, adaptive in (None, "confidence", "margin"), "one of those"),
                ("threshold", threshold, threshold is None or adaptive, "for an adaptive order"),
                ("prompt", getattr(p, "shape", p), torch.is_tensor(p) and p.dtype == torch.long and
                 p.dim() in (1, 2) and p.size(-1) <= L and (p.dim() == 1 or len(p) == num_samples)
                 and (not p.numel() or 0 <= p.min() <= p.max() <= V), f"(P,) or (B, P) ids <= {V}, "
                 f"P <= {L}")]:
            need(ok, f"generate: {name}={value!r} must be {rule}")
        z = F.pad(p.to(self.wte.weight.device), (0, L - p.size(-1)), value=self.mask_id)
        z = z.expand(num_samples, L).clone()  # the canvas: the mask id where a token is to come
        u = torch.stack([torch.rand(3, L, device=z.device, generator=torch.Generator(z.device)
                                    .manual_seed(seed + b)) for b in range(num_samples)], 1)
        plan = plan or random_plan(z == self.mask_id, alpha0, steps or L, u[:2])
        need(plan.order.shape == z.shape, f"generate: plan.order must be of shape {tuple(z.shape)}")
        zs, order = z.gather(1, plan.order), plan.order.clone()
        score = adaptive and (lambda logits: adaptive_score(logits, temperature, adaptive))

        def pick(logits, rows, pos):  # a token for each (row, position), at its own uniform
            return sample_tokens(logits, u[2, rows, pos].double(), temperature, top_p)

        was_training = self.training
        calls = self.eval().decode(zs, Plan(order, plan.ks), pick, score, threshold, kv_cache, net)
        self.train(was_training)  # eval mode while sampling: no dropout
        return Samples(*(t.gather(1, order.argsort(1)) for t in (zs, calls)), calls.amax(1))

    def decode(self, zs, plan, pick, score=None, threshold=None, kv_cache=True, net=None):
        """Run a plan's calls on zs (B, L), the sorted canvas, in place (plan.order: as decoded);
        returns each slot's call. pick(logits, rows, positions): the ids. score: adaptive."""
        (B, L), dev, c = zs.shape, zs.device, self.config
        slot, rows = torch.arange(L + 1, device=dev), torch.arange(B, device=dev)
        order, ks, calls, j = plan.order, plan.ks, torch.zeros_like(zs), 0  # j: the batch's calls
        batch = zs, order, calls  # the caller's: the working rows are written back as rows leave
        d = (zs != self.mask_id).sum(1)  # (B,): the slots each row has decoded, given ones first
        switch, d_prev = d + ks.sum(1), torch.zeros_like(d)  # where the sequential phase starts
        shape, dtype = (B, L + 1, c.n_head, c.n_embd // c.n_head), self.compute_dtype()
        for a in (block.attn for block in self.blocks if kv_cache):  # zeros: -inf hides finite only
            if a.k_cache is None or (a.k_cache.shape, a.k_cache.dtype) != (shape, dtype):
                a.k_cache, a.v_cache = (torch.zeros(shape, dtype=dtype, device=dev) for _ in "kv")
        while True:
            adapt = (d < switch) & (score is not None)  # k, below: as planned; sequential phase, 1
            k = torch.where(d < switch, ks[:, j] if j < ks.size(1) else 0, (d < L).long())
            n = torch.where(adapt, L - d, k)  # the masks read; adaptive: every one left
            # a call feeds slots [n_cached, d + n): what the last call decoded (now clean), then the
            # masks it reads. (B) keeps what was clean when last fed; (A), its frozen clean block
            n_cached = d_prev if c.variant == "B" else torch.where(d_prev >= switch, d_prev, 0)
            prefix = torch.zeros_like(d) if c.variant == "B" else torch.minimum(d, switch)
            fed = torch.where(d < L, d + n - n_cached, 0)
            W, n_max, left, starting = torch.stack(
                [fed.max(), n.max(), (d < L).sum(), ((d == switch) & (d < L)).sum()]).tolist()
            if not left or net is None and 2 * left <= len(rows):  # rows done leave, once half
                for whole, part in zip(batch, (zs, order, calls) if len(rows) < B else ()):
                    whole[rows] = part  # the working rows are copies once some have left
                if not left:
                    return batch[2]
                keep = (d < L).nonzero()[:, 0]
                rows, zs, order, ks, calls, d, d_prev, switch = (
                    t[keep] for t in (rows, zs, order, ks, calls, d, d_prev, switch))
                for a in (block.attn for block in self.blocks if kv_cache):
                    a.k_cache, a.v_cache = a.k_cache[keep], a.v_cache[keep]
                continue  # this call, again, for the rows left
            j += 1
            if starting:  # the sequential phase: its masks left to right, by position
                tail = (slot[:L] >= switch[:, None]) & (d == switch)[:, None]
                order.copy_(order.gather(1, torch.where(tail, L + order, slot[:L]).argsort(1)))
            with sdpa_kernel(SAMPLER_ATTENTION):  # not cuDNN's, which plans each new shape anew
                if kv_cache:
                    # a row feeds its slots, padded to W with the sink L. A mask not fed comes after
                    # every fed token in its row's order: leaving it out is exact
                    s = torch.where(slot[:W] < fed[:, None], n_cached[:, None] + slot[:W], L)
                    g, mask = s.clamp(max=L - 1), visible(s, slot, prefix[:, None, None])
                    h = (net or self)(zs.gather(1, g), order.gather(1, g), mask.unsqueeze(1), s)
                    first = d - n_cached  # where the masks start among the fed tokens
                else:  # the reference: the whole canvas, every call
                    h, first = self.diffusion_forward(zs, order, prefix), d
            i = (first[:, None] + slot[:n_max]).clamp(max=h.size(1) - 1)  # the masks' rows of h
            logits = self.lm_head(h.gather(1, i[..., None].expand(-1, -1, h.size(-1))))
            perm = slot[:n_max].expand(len(zs), n_max)  # which mask read goes to slot d + i
            if score is not None:  # the k best to the next slots, the others after them in order
                s = score(logits).masked_fill(slot[:n_max] >= n[:, None], -1)  # padding last
                if threshold is not None:
                    k = torch.where(adapt, (s >= threshold).sum(1).clamp(1).minimum(switch - d), k)
                rank = s.argsort(dim=1, descending=True, stable=True).argsort(1)
                perm = (rank >= k[:, None]).long().argsort(dim=1, stable=True)
                wide = F.pad(order, (0, n_max))  # every row's window fits; padding stays put
                at = d[:, None] + slot[:n_max]
                order.copy_(wide.scatter(1, at, wide.gather(1, d[:, None] + perm))[:, :L])
            write = (slot[:L] >= d[:, None]) & (slot[:L] < (d + k)[:, None])
            r, i = (slot[:n_max] < k[:, None]).nonzero(as_tuple=True)  # row by row, as write
            zs[write] = pick(logits[r, perm[r, i]], rows[r], order[write])
            calls[write] = j
            d_prev, d = d, d + k
