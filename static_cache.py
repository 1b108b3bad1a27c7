"""
The cached sampler's calls at static shapes, so that torch.compile captures each as one graph, and on a GPU as one
CUDA graph (mode="reduce-overhead"): gpt-fast's decode step, applied to the Eso-LM sampler. The caller asks for it,
as gpt-fast's generate.py compiles its own decode step; esolm.py does not know this file exists:

    model.generate(8, calls=StaticCalls)

esolm.py's eager call is the lesson; this is the same computation, laid out for speed.

What changes against the eager call (EsoLM.decode):
- The cache keeps all its slots, L plus one, and attention reads all of them; the mask is computed on the device
  from the fed tokens' slot indices. So no shape depends on how many tokens are cached.
- The fed tokens are padded to a power of two (a bucket), so a few shapes serve every call of a run: a graph each.
- Where the call starts, how many fed tokens are real and (A)'s prefix are device tensors, not Python numbers, so
  no value that changes per call is baked into a graph, and nothing in a call waits for the host.
Why the padding is safe: padding queries are mask tokens whose keys and values all go to the last slot, L, a sink
that no real query ever sees (a real query at slot s sees slots <= s < L, and (A)'s clean block). The real fed
tokens go where the eager call puts them, so the cache holds what it holds there, and the masked-out slots add
exactly 0 to the softmax: the logits are the eager ones, up to the order of floating-point sums.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from esolm import KVCache, visible


def bucket(n):
    """The smallest power of two >= n: the padded width of a call that feeds n tokens."""
    return 1 << (n - 1).bit_length()


class SlotCache(KVCache):
    """A KVCache written at given slots (a tensor) and read whole, so its shapes never change."""

    def update(self, slots, k, v):
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class StaticStep(nn.Module):
    """One cached call at a static shape: P fed tokens (B, P), of which the first n_fed are real."""

    def __init__(self, model, B, dtype, device):
        super().__init__()
        self.model = model
        nh, C, L = model.config.n_head, model.config.n_embd, model.config.block_size
        self.caches = nn.ModuleList([SlotCache(B, nh, L + 1, C // nh, dtype, device) for _ in model.blocks])

    def forward(self, idx, pos, params):
        start, n_fed, prefix = params  # 0-d device tensors: the first slot, the real fed tokens, (A)'s block
        sink = self.caches[0].k.size(2) - 1
        i = torch.arange(idx.size(1), device=idx.device)
        slots = torch.where(i < n_fed, start + i, sink)  # (P,): the real tokens' slots, then the sink
        mask = visible(slots, torch.arange(sink + 1, device=idx.device), prefix)  # (P, L + 1)
        return self.model(idx, pos, mask, self.caches, slots)


def compiled_step(model, B, dtype, device):
    """The compiled StaticStep of a model for batch B, built once and kept on the model: its graphs (one per bucket)
    serve every later run of the same shape."""
    steps = model.__dict__.setdefault("_static_steps", {})  # a plain attribute: not part of the state_dict
    key = (B, dtype, str(device))
    if key not in steps:
        # a graph per bucket, per model and batch size: more than dynamo's default of 8 for one code object
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None  # CUDA graphs on a GPU
        steps[key] = torch.compile(StaticStep(model, B, dtype, device), mode=mode, fullgraph=True, dynamic=False)
    return steps[key]


class StaticCalls:
    """The cached calls of one sampling run (EsoLM.decode's Feeds, in order) through the compiled step: the `calls`
    factory of EsoLM.generate."""

    def __init__(self, model, zs, order, feeds):
        self.zs, self.order, self.mask_id = zs, order, model.mask_id
        self.step = compiled_step(model, zs.size(0), model.compute_dtype(), zs.device)
        # every call's numbers, moved to the device once: a call then reads its row without a host sync
        rows = [(f.n_cached, f.d + f.n - f.n_cached, f.prefix) for f in feeds]
        self.params = iter(torch.tensor(rows, dtype=torch.long).to(zs.device))

    def __call__(self, f):
        """The hidden states (B, n, C) of the call's n masks, as EsoLM.decode's eager call returns them."""
        lo, n = f.n_cached, f.d + f.n - f.n_cached
        P = bucket(n)
        idx = F.pad(self.zs[:, lo:lo + n], (0, P - n), value=self.mask_id)
        pos = F.pad(self.order[:, lo:lo + n], (0, P - n))
        torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs have been read: its buffers may go
        return self.step(idx, pos, next(self.params))[:, f.d - lo:n]
