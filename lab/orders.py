"""The official code's later structured orders, a plan for generate(plan=...): L / S chunks of S
positions; call j of the diffusion phase decodes offset j of every chunk (at alpha0 = 1 each chunk
left to right, all in parallel, in S calls). With shuffle the offsets come in a random order (a
row its own), and so do a call's positions. The first floor(S alpha0) calls follow the pattern;
the sequential phase decodes the rest, left to right.

    out = model.generate(8, 1.0, plan=subcontext_plan(model, 8, 1.0, S=16, seed=0), seed=0)
"""
import math

import torch
import torch.nn.functional as F

from esolm import Plan, need


def subcontext_plan(model, B, alpha0, S, shuffle=False, seed=0, prompt=None):
    """The structured plan of B rows (prompt: as generate takes it); row b draws from seed + b."""
    L, dev, mask = model.config.block_size, model.wte.weight.device, model.mask_id
    need(S >= 1 and L % S == 0, f"subcontext_plan: S={S} must divide L = {L}")
    p = torch.zeros(0, dtype=torch.long) if prompt is None else prompt.long()
    to_gen = (F.pad(p.to(dev), (0, L - p.size(-1)), value=mask) == mask).expand(B, L)
    u = torch.stack([torch.rand(3, L, device=dev, generator=torch.Generator(dev).manual_seed(
        seed + b)) for b in range(B)], 1).double()
    pos, n_pattern = torch.arange(L, device=dev), math.floor(S * alpha0)
    offsets = u[0, :, :S].argsort(1) if shuffle else torch.arange(S, device=dev).expand(B, S)
    call = offsets.argsort(1).gather(1, (pos % S).expand(B, L))  # (B, L): each position's call
    diffusion = to_gen & (call < n_pattern)
    key = torch.where(diffusion, 1 + call + (u[1] if shuffle else pos / L), 1 + n_pattern + pos / L)
    given = u[2] if alpha0 > 0 else pos / L  # as random_plan: at alpha0 = 0 left to right
    order = torch.where(to_gen, key, given.expand(B, L)).argsort(1)
    n = torch.zeros(B, S, dtype=torch.long, device=dev).scatter_add_(1, call, diffusion.long())
    ks = n[:, :n_pattern].gather(1, (n[:, :n_pattern] == 0).long().argsort(dim=1, stable=True))
    return Plan(order, ks[:, :int((ks > 0).sum(1).max())] if n_pattern else ks)
