"""
What both test files share: the authors' network, written from its description (docs/pretrained.md; the DiT of
s-sahoo/Eso-LMs, models/dit.py) and not from esolm.py's backbone: checkpoints in their format with random values
everywhere, and a reference forward, which the tests compare pretrained.py's fold against.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

from pretrained import write_safetensors


def official_state_dict(n_layer=2, n_head=2, cond=8, seed=0, V=11, C=32):
    """A DiT state_dict with the official keys and random values everywhere (the official code starts the adaLN
    layers and the output layer at zero, which would hide a wrong fold); tiny by default, V tokens plus the mask and
    width C. The sin(t * freq) half of sigma_map's input stays in its nn.Linear init range, as in any model without
    time conditioning."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.4):
        return torch.randn(shape, generator=g) * std

    hs = C // n_head
    sd = {"vocab_embed.embedding": r(V + 1, C, std=1.0),
          "sigma_map.mlp.0.weight": torch.cat([r(cond, 128), (torch.rand(cond, 128, generator=g) * 2 - 1) / 16], 1),
          "sigma_map.mlp.0.bias": r(cond), "sigma_map.mlp.2.weight": r(cond, cond), "sigma_map.mlp.2.bias": r(cond),
          "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hs, 2).float() / hs))}
    for i in range(n_layer):
        sd |= {f"blocks.{i}.norm1.weight": 1 + r(C), f"blocks.{i}.attn_qkv.weight": r(3 * C, C),
               f"blocks.{i}.attn_out.weight": r(C, C), f"blocks.{i}.norm2.weight": 1 + r(C),
               f"blocks.{i}.mlp.0.weight": r(4 * C, C), f"blocks.{i}.mlp.0.bias": r(4 * C),
               f"blocks.{i}.mlp.2.weight": r(C, 4 * C, std=0.2), f"blocks.{i}.mlp.2.bias": r(C),
               f"blocks.{i}.adaLN_modulation.weight": r(6 * C, cond), f"blocks.{i}.adaLN_modulation.bias": r(6 * C)}
    return sd | {"output_layer.norm_final.weight": 1 + r(C), "output_layer.linear.weight": r(V + 1, C),
                 "output_layer.linear.bias": r(V + 1), "output_layer.adaLN_modulation.weight": r(2 * C, cond),
                 "output_layer.adaLN_modulation.bias": r(2 * C)}


def save_official(folder, sd, meta=None):
    """As a bare PyTorchModelHubMixin save: config.json holds only the mask id and the embedding rows."""
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), sd)
    with open(os.path.join(folder, "config.json"), "w") as f:
        V = sd[next(k for k in sd if k.endswith("vocab_embed.embedding"))].size(0) - 1
        json.dump(meta or {"mask_index": V, "vocab_size": V + 1}, f)
    return str(folder)


def official_logits(sd, idx, pos, allowed):
    """The official EsoLMDiT forward, in float64: logits (B, T, V + 1) with the mask's logit at -1e6. idx, pos (B, T):
    ids and original positions in sorted order; allowed (B, T, T): True where query i may attend to key j."""
    W = {k.removeprefix("backbone."): v.double() for k, v in sd.items()}
    inv_freq = sd[next(k for k in sd if k.endswith("rotary_emb.inv_freq"))].float()  # a float32 buffer in the DiT
    B, T = idx.shape
    C, hs = W["vocab_embed.embedding"].size(1), 2 * inv_freq.numel()
    # conditioning: the timestep embedder at t = 0 (frequency embedding [cos(t f), sin(t f)], MLP), then silu
    half = W["sigma_map.mlp.0.weight"].size(1) // 2
    args = torch.zeros(1, 1) * torch.exp(-math.log(10000) * torch.arange(half) / half)
    t_freq = torch.cat([args.cos(), args.sin()], -1).double()
    c = F.silu(F.silu(t_freq @ W["sigma_map.mlp.0.weight"].T + W["sigma_map.mlp.0.bias"])
               @ W["sigma_map.mlp.2.weight"].T + W["sigma_map.mlp.2.bias"])[0]
    # rotary: float32 angles of positions 0..L-1, duplicated over the two halves of the head, gathered at pos
    angles = torch.einsum("i,j->ij", torch.arange(int(pos.max()) + 1).float(), inv_freq)
    emb = torch.cat([angles, angles], -1)
    cos, sin = (f(emb).double()[pos][:, None] for f in (torch.cos, torch.sin))  # (B, 1, T, hs)

    def rotary(t):  # t * cos + rotate_half(t) * sin
        return t * cos + torch.cat([-t[..., hs // 2:], t[..., :hs // 2]], -1) * sin

    def norm(x, w):  # the DiT's LayerNorm: no bias, eps 1e-5, weight applied after normalising
        return F.layer_norm(x, (C,), eps=1e-5) * w

    x = W["vocab_embed.embedding"][idx]
    for i in range(1 + max(int(k.split(".")[1]) for k in W if k.startswith("blocks."))):
        w = {k.removeprefix(f"blocks.{i}."): v for k, v in W.items() if k.startswith(f"blocks.{i}.")}
        shift1, scale1, gate1, shift2, scale2, gate2 = (w["adaLN_modulation.weight"] @ c
                                                        + w["adaLN_modulation.bias"]).chunk(6)
        h = norm(x, w["norm1.weight"]) * (1 + scale1) + shift1
        q, k, v = (h @ w["attn_qkv.weight"].T).view(B, T, 3, C // hs, hs).permute(2, 0, 3, 1, 4)
        scores = rotary(q) @ rotary(k).transpose(-1, -2) / math.sqrt(hs)
        y = (scores.masked_fill(~allowed[:, None], -math.inf).softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + gate1 * (y @ w["attn_out.weight"].T)
        h = norm(x, w["norm2.weight"]) * (1 + scale2) + shift2
        h = F.gelu(h @ w["mlp.0.weight"].T + w["mlp.0.bias"], approximate="tanh")
        x = x + gate2 * (h @ w["mlp.2.weight"].T + w["mlp.2.bias"])
    shift, scale = (W["output_layer.adaLN_modulation.weight"] @ c + W["output_layer.adaLN_modulation.bias"]).chunk(2)
    h = norm(x, W["output_layer.norm_final.weight"]) * (1 + scale) + shift
    logits = h @ W["output_layer.linear.weight"].T + W["output_layer.linear.bias"]
    logits[..., -1] = -1e6  # the mask is never predicted
    return logits

