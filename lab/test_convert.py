"""lab/convert.py against the authors' network, written here from its description
(docs/pretrained.md; the DiT of s-sahoo/Eso-LMs, models/dit.py), not from esolm.py's backbone:
checkpoints in their format with random values everywhere, and a reference forward in float64.
Run: python -m pytest -q lab/test_convert.py"""
import dataclasses
import http.server
import itertools
import json
import math
import os
import re
import threading

import pytest
import torch
import torch.nn.functional as F

from esolm import EsoLM, EsoLMConfig, random_plan
from lab import convert as conv
from lab.common import load_model

V, C, L = 11, 32, 16  # vocabulary (the mask is id V, the last embedding row), width, length


# --- The authors' network ---------------------------------------------------------------------
def official_state_dict(n_layer=2, n_head=2, cond=8, seed=0):
    """A DiT state_dict, random values everywhere (the official code starts the adaLN layers and
    the output layer at zero, which would hide a wrong fold). sigma_map's sin(t freq) columns stay
    in their nn.Linear init range, as in any model without time conditioning."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.4):
        return torch.randn(shape, generator=g) * std

    hs, init = C // n_head, (torch.rand(cond, 128, generator=g) * 2 - 1) / 16
    sd = {"vocab_embed.embedding": r(V + 1, C, std=1.0),
          "sigma_map.mlp.0.weight": torch.cat([r(cond, 128), init], 1),
          "sigma_map.mlp.0.bias": r(cond), "sigma_map.mlp.2.weight": r(cond, cond),
          "sigma_map.mlp.2.bias": r(cond),
          "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hs, 2).float() / hs))}
    for b in (f"blocks.{i}." for i in range(n_layer)):
        sd |= {b + "norm1.weight": 1 + r(C), b + "attn_qkv.weight": r(3 * C, C),
               b + "attn_out.weight": r(C, C), b + "norm2.weight": 1 + r(C),
               b + "mlp.0.weight": r(4 * C, C), b + "mlp.0.bias": r(4 * C),
               b + "mlp.2.weight": r(C, 4 * C, std=0.2), b + "mlp.2.bias": r(C),
               b + "adaLN_modulation.weight": r(6 * C, cond), b + "adaLN_modulation.bias": r(6 * C)}
    return sd | {"output_layer.norm_final.weight": 1 + r(C),
                 "output_layer.linear.weight": r(V + 1, C), "output_layer.linear.bias": r(V + 1),
                 "output_layer.adaLN_modulation.weight": r(2 * C, cond),
                 "output_layer.adaLN_modulation.bias": r(2 * C)}


def write_safetensors(path, tensors):  # the authors' format (.ci/gpu_check.py uses it too)
    codes, header, blobs, at = {v: k for k, v in conv.DTYPES.items()}, {}, [], 0
    for name, t in tensors.items():
        blobs.append(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        at += len(blobs[-1])
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at - len(blobs[-1]), at]}
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def save_official(folder, sd, meta=None):
    """As a bare PyTorchModelHubMixin save: config.json holds only the mask id and the rows."""
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), sd)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta or {"mask_index": V, "vocab_size": V + 1}, f)
    return str(folder)


def official_logits(sd, idx, pos, allowed):
    """The official EsoLMDiT forward in float64: logits (B, T, V + 1), the mask's at -1e6. idx, pos
    (B, T): ids and original positions in sorted order; allowed (B, T, T): query i may see key j."""
    W = {k.removeprefix("backbone."): v.double() for k, v in sd.items()}
    inv_freq = sd[next(k for k in sd if k.endswith("rotary_emb.inv_freq"))].float()  # float32
    (B, T), hs = idx.shape, 2 * inv_freq.numel()
    # conditioning: the timestep embedder at t = 0 ([cos(t f), sin(t f)], an MLP), then silu
    half = W["sigma_map.mlp.0.weight"].size(1) // 2
    args = torch.zeros(1, 1) * torch.exp(-math.log(10000) * torch.arange(half) / half)
    t_freq = torch.cat([args.cos(), args.sin()], -1).double()
    c = F.silu(F.silu(t_freq @ W["sigma_map.mlp.0.weight"].T + W["sigma_map.mlp.0.bias"])
               @ W["sigma_map.mlp.2.weight"].T + W["sigma_map.mlp.2.bias"])[0]
    # rotary: float32 angles of positions 0..L-1, over both halves of the head, gathered at pos
    angles = torch.einsum("i,j->ij", torch.arange(int(pos.max()) + 1).float(), inv_freq)
    emb = torch.cat([angles, angles], -1)
    cos, sin = (f(emb).double()[pos][:, None] for f in (torch.cos, torch.sin))  # (B, 1, T, hs)

    def rotary(t):  # t * cos + rotate_half(t) * sin
        return t * cos + torch.cat([-t[..., hs // 2:], t[..., :hs // 2]], -1) * sin

    def norm(x, w):  # the DiT's LayerNorm: no bias, eps 1e-5, the weight after normalising
        return F.layer_norm(x, (C,), eps=1e-5) * w

    def modulation(prefix, n):  # the n adaLN vectors of c
        return (W[prefix + "adaLN_modulation.weight"] @ c
                + W[prefix + "adaLN_modulation.bias"]).chunk(n)

    x = W["vocab_embed.embedding"][idx]
    for i in range(1 + max(int(k.split(".")[1]) for k in W if k.startswith("blocks."))):
        w = {k.removeprefix(f"blocks.{i}."): v for k, v in W.items()}
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(f"blocks.{i}.", 6)
        h = norm(x, w["norm1.weight"]) * (1 + scale1) + shift1
        q, k, v = (h @ w["attn_qkv.weight"].T).view(B, T, 3, C // hs, hs).permute(2, 0, 3, 1, 4)
        scores = rotary(q) @ rotary(k).transpose(-1, -2) / math.sqrt(hs)
        y = scores.masked_fill(~allowed[:, None], -math.inf).softmax(-1) @ v
        x = x + gate1 * (y.transpose(1, 2).reshape(B, T, C) @ w["attn_out.weight"].T)
        h = norm(x, w["norm2.weight"]) * (1 + scale2) + shift2
        h = F.gelu(h @ w["mlp.0.weight"].T + w["mlp.0.bias"], approximate="tanh")
        x = x + gate2 * (h @ w["mlp.2.weight"].T + w["mlp.2.bias"])
    shift, scale = modulation("output_layer.", 2)
    h = norm(x, W["output_layer.norm_final.weight"]) * (1 + scale) + shift
    logits = h @ W["output_layer.linear.weight"].T + W["output_layer.linear.bias"]
    logits[..., -1] = -1e6  # the mask is never predicted
    return logits


def causal(B, T):
    return torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)


def sequential_allowed():
    """(B)'s AR-term layout [z ; x], 2L tokens, as the official code builds it: z-query i sees
    itself and the x-keys before it; x is causal and never sees z."""
    ones = torch.ones(L, L, dtype=torch.bool)
    return torch.cat([torch.cat([ones.diag().diag(), ones.tril(-1)], 1),
                      torch.cat([~ones, ones.tril()], 1)])[None]


def assert_matches_official(ours, ref, tol=1e-10):
    """Our logits over the V real tokens against theirs: the same numbers, and the same softmax
    (their -1e6 mask logit and our head without the mask's row are the same distribution)."""
    torch.testing.assert_close(ours, ref[..., :V], atol=tol, rtol=0)
    torch.testing.assert_close(ours.log_softmax(-1), ref.log_softmax(-1)[..., :V], atol=tol, rtol=0)


def tiny(folder, **kw):  # a converted tiny DiT, in float64
    return conv.convert(folder, **{"alpha0": 1.0, "block_size": L, "dtype": torch.float64, **kw})[0]


@pytest.fixture
def official(tmp_path):
    sd = official_state_dict()
    return save_official(tmp_path / "ckpt", sd), sd


# --- The converted model is the authors' network ----------------------------------------------
def test_official_diffusion_and_sequential_forwards(official):
    folder, sd = official
    model = tiny(folder)
    assert not model.training and model.config.n_layer == 2 and model.config.n_embd == C
    _, bare = conv.convert(folder, alpha0=1.0)  # config.json lacks the heads (from inv_freq) and L
    assert (bare.n_head, bare.block_size, bare.bias, bare.gelu) == (2, 1024, True, "tanh")
    g = torch.Generator().manual_seed(0)
    B, n_clean = 3, torch.tensor([0, 5, 11])
    x = torch.randint(0, V, (B, L), generator=g)
    # diffusion forward (B): any sorted order (clean first, then masks), causal, RoPE at positions
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    zs = x.gather(1, order).masked_fill(torch.arange(L) >= n_clean[:, None], V)
    exact = EsoLM(dataclasses.replace(model.config, gelu="exact")).double().eval()
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = model.lm_head(model.diffusion_forward(zs, order, n_clean))
        wrong = exact.lm_head(exact.diffusion_forward(zs, order, n_clean))
    ref = official_logits(sd, zs, order, causal(B, L))
    assert_matches_official(ours, ref)
    assert (wrong - ref[..., :V]).abs().max() > 1e-4  # exact GELU is another network: it can tell
    # sequential forward: z0's clean tokens in a random order, then its masks left to right; the
    # official layout is [z ; x] (2L tokens), logits read off z's masked rows
    order = torch.stack([torch.cat([p[:c], p[c:].sort().values]) for p, c in
                         zip((torch.randperm(L, generator=g) for _ in range(B)), n_clean.tolist())])
    xs = x.gather(1, order)
    with torch.no_grad():
        h, s, valid = model.sequential_forward(xs, order, n_clean)
        ours = model.lm_head(h)
    for b, c in enumerate(n_clean.tolist()):
        zb = xs[b:b + 1].masked_fill(torch.arange(L) >= c, V)
        ref = official_logits(sd, torch.cat([zb, xs[b:b + 1]], 1), order[b:b + 1].repeat(1, 2),
                              sequential_allowed())
        assert valid[b].sum() == L - c
        assert_matches_official(ours[b, :L - c], ref[0, c:L])
    # alpha0 = 0: the NELBO is the exact AR NLL, every token masked in z, left to right
    pos = torch.arange(L).repeat(B, 2)
    ref = official_logits(sd, torch.cat([torch.full_like(x, V), x], 1), pos,
                          sequential_allowed().expand(B, -1, -1))[:, :L]
    ref_nll = -ref.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1).sum(1)
    with torch.no_grad():
        torch.testing.assert_close(model.nelbo(x, 0.0), ref_nll, atol=1e-10, rtol=0)


@pytest.mark.parametrize("alpha0,steps", [(0.0, 4), (0.5, 4), (1.0, 5)])
def test_official_cached_sampler(official, alpha0, steps):
    """The KV-cached sampler's logits at each call (read off lm_head) against the official forward
    over the sorted sequence decoded so far: earlier calls' tokens clean, the rest masks. The order
    is the plan generate drew (row b seeded seed + b), its sequential phase left to right."""
    folder, sd = official
    model, B, seed, per_call = tiny(folder), 2, 3, []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, out: per_call.append(out))
    out = model.generate(B, alpha0, steps, seed=seed, net=model)  # net: every row, every call
    hook.remove()
    u = torch.stack([torch.rand(3, L, generator=torch.Generator().manual_seed(seed + b))
                     for b in range(B)], 1)
    order, ks = random_plan(torch.ones(B, L, dtype=torch.bool), alpha0, steps, u[:2])
    for b, switch in enumerate(ks.sum(1).tolist()):
        order[b, switch:] = order[b, switch:].sort().values
    calls, xs = out.decoded_by.gather(1, order), out.x.gather(1, order)
    assert (calls.diff(dim=1) >= 0).all() and len(per_call) == out.nfe.max()  # slots, in turn
    for j, logits in enumerate(per_call, 1):
        d, n = (calls < j).sum(1), (calls == j).sum(1)
        ref = official_logits(sd, xs.masked_fill(torch.arange(L) >= d[:, None], V), order,
                              causal(B, L))
        for b in range(B):
            assert_matches_official(logits[b, :n[b]], ref[b, d[b]:d[b] + n[b]])


# --- Checkpoints in their format: what is checked ---------------------------------------------
@pytest.mark.parametrize("change,match", [
    (lambda sd, meta: sd.pop("blocks.1.mlp.0.bias"), "'blocks.1.mlp.0.bias': missing"),
    (lambda sd, meta: sd.pop("rotary_emb.inv_freq"), "missing tensor 'rotary_emb.inv_freq'"),
    (lambda sd, meta: sd.update({"blocks.0.attn_out.bias": torch.zeros(C)}),
     r"'blocks.0.attn_out.bias': \(32,\), expected None"),
    (lambda sd, meta: sd.update({"blocks.0.attn_qkv.weight": torch.zeros(3 * C, C + 1)}),
     r"'blocks.0.attn_qkv.weight': \(96, 33\), expected \(96, 32\)"),
    (lambda sd, meta: sd.update({"sigma_map.mlp.2.weight": torch.zeros(8, 9)}),
     r"'sigma_map.mlp.2.weight': \(8, 9\), expected \(8, 8\)"),
    (lambda sd, meta: sd["sigma_map.mlp.0.weight"][:, 200].fill_(0.3), "sigma_map.*conditioning"),
    (lambda sd, meta: meta.update({"mask_index": 0}), "mask_index 0 is not the last row, 11"),
])
def test_official_checkpoint_errors_name_the_problem(tmp_path, change, match):
    sd, meta = official_state_dict(), {"mask_index": V, "vocab_size": V + 1}
    change(sd, meta)
    with pytest.raises(ValueError, match=match):
        tiny(save_official(tmp_path, sd, meta))


def test_truncated_safetensors_is_a_value_error(tmp_path):
    sd = official_state_dict()
    folder = save_official(tmp_path, sd)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    last = list(sd)[-1]  # the writer stores the tensors in order: cutting the end cuts the last
    for cut, match in [(data[:-5], f"'{last}' is truncated"), (data[:100], "truncated or not")]:
        with open(path, "wb") as f:
            f.write(cut)
        with pytest.raises(ValueError, match=match):
            tiny(folder)


def test_safetensors_dtypes_and_backbone_prefix(tmp_path):
    """F32, F16, BF16 and F64 tensors read back bit for bit; keys saved from the hub's wrapper
    ("backbone.") load; the hub's config.json gives L (model_length)."""
    dtypes = itertools.cycle([torch.float16, torch.bfloat16, torch.float32, torch.float64])
    sd = {f"backbone.{k}": v.to(next(dtypes)) for k, v in official_state_dict().items()}
    meta = {"mask_index": V, "vocab_size": V + 1, "n_blocks": 2, "n_heads": 2, "model_length": L}
    folder = save_official(tmp_path, sd, meta)
    back = conv.read_safetensors(os.path.join(folder, "model.safetensors"))
    assert list(back) == list(sd)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in sd.items())
    model = tiny(folder, block_size=None)
    assert model.config.block_size == L and model.config.n_head == 2
    idx = torch.randint(0, V + 1, (2, L))
    pos = torch.stack([torch.randperm(L) for _ in range(2)])
    with torch.no_grad():
        ours = model.lm_head(model(idx, pos))
    assert_matches_official(ours, official_logits(sd, idx, pos, causal(2, L)))


# --- The download -----------------------------------------------------------------------------
def test_convert_downloads_once_and_explains_failures(tmp_path, monkeypatch):
    hub, cache = tmp_path / "hub", tmp_path / "cache"
    save_official(hub / "someone" / "tiny-esolm", official_state_dict())
    monkeypatch.setattr(conv, "HUB_URL", hub.as_uri() + "/{repo}/{file}")
    monkeypatch.setenv("ESOLM_CACHE", str(cache))
    first = tiny("someone/tiny-esolm")
    assert sorted(os.listdir(cache / "someone/tiny-esolm")) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(conv, "HUB_URL", (tmp_path / "gone").as_uri() + "/{repo}/{file}")
    again = tiny("someone/tiny-esolm")  # from the cache: a download would fail
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    with pytest.raises(OSError, match="could not download .*someone/no-such-model") as e:
        tiny("someone/no-such-model")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # not urllib's traceback
    assert os.listdir(cache / "someone" / "no-such-model") == []


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
        url = f"http://127.0.0.1:{server.server_port}/{{repo}}/{{file}}"
        monkeypatch.setattr(conv, "HUB_URL", url)
        with pytest.raises(OSError, match="400 out of 1000 bytes"):
            conv.download("someone/tiny-esolm", "model.safetensors")
        assert os.listdir(tmp_path / "someone" / "tiny-esolm") == []  # no file, no partial one
    finally:
        server.shutdown()
        server.server_close()


# --- The command line: a checkpoint of this project -------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    """The CLI's checkpoint, loaded as any other, is the converted model; alpha0 from the name."""
    folder = save_official(tmp_path / "Eso-LM-B-alpha-0_25", official_state_dict())
    conv.main([f"--source={folder}", f"--out_dir={tmp_path / 'out'}", f"--block_size={L}"])
    model, ckpt = load_model(str(tmp_path / "out"))
    ours, config = conv.convert(folder, block_size=L)
    assert config.alpha0 == model.config.alpha0 == ckpt["train_config"]["alpha0"] == 0.25
    assert ckpt["dataset_meta"] == {"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert ckpt["ema"] is None and ckpt["model_config"] == dataclasses.asdict(config)
    idx, pos = torch.randint(0, V + 1, (2, L)), torch.stack([torch.randperm(L) for _ in range(2)])
    with torch.no_grad():
        assert torch.equal(model.lm_head(model(idx, pos)), ours.lm_head(ours(idx, pos)))
    conv.main([f"--source={folder}", f"--out_dir={tmp_path / 'bf16'}", "--dtype=bfloat16"])
    ckpt = torch.load(tmp_path / "bf16" / "ckpt.pt", weights_only=True)
    assert ckpt["model"]["lm_head.weight"].dtype == torch.bfloat16
    assert ckpt["model_config"]["block_size"] == 1024


@pytest.mark.parametrize("args,match", [
    ([], "--source=: is needed"),
    (["--source={folder}"], "--out_dir=: must be a folder"),
    (["--source={folder}", "--out_dir={taken}"], "--out_dir=.*taken: must be a folder, no ckpt"),
    (["--source={folder}", "--out_dir={out}", "--dtype=float16"], "--dtype=float16: must be"),
    (["{folder}", "--out_dir={out}"], "unknown setting '.*tiny'"),
    (["--source={folder}", "--out_dir={out}", "--steps=3"], "unknown setting '--steps=3'"),
    (["--source={folder}", "--out_dir={out}", "--alpha0=x"], "--alpha0=x: must be a finite number"),
    (["--source={folder}", "--out_dir={out}", "--alpha0=2"], r"alpha0=2.0 must be in \[0, 1\]"),
    (["--source={folder}", "--out_dir={out}", "--alpha0=1", "--block_size=0"],
     "block_size must be at least 1"),
    (["--source={folder}", "--out_dir={out}"], "does not say its alpha0: --alpha0"),
    (["--source={named}", "--out_dir={out}", "--alpha0=0.5"], "alpha-1 says alpha0=1.0, not 0.5"),
    (["--source=owner/gone", "--out_dir={out}"], "could not download .*owner/gone/config.json"),
    (["--source={folder}/gone-alpha-1", "--out_dir={out}"], "no folder .*tiny/gone-alpha-1$"),
    (["--source={broken}", "--out_dir={out}", "--alpha0=1"], "truncated or not safetensors"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, args, match):
    monkeypatch.setattr(conv, "HUB_URL", (tmp_path / "hub").as_uri() + "/{repo}/{file}")
    monkeypatch.setenv("ESOLM_CACHE", str(tmp_path / "cache"))
    sd = official_state_dict()
    paths = {"folder": save_official(tmp_path / "tiny", sd), "out": tmp_path / "out",
             "named": save_official(tmp_path / "Eso-LM-B-alpha-1", sd),
             "broken": save_official(tmp_path / "broken", sd), "taken": tmp_path / "taken"}
    with open(tmp_path / "broken" / "model.safetensors", "wb") as f:
        f.write(b"\xff" * 16)
    os.makedirs(paths["taken"])
    open(paths["taken"] / "ckpt.pt", "w").close()
    with pytest.raises(SystemExit) as e:
        conv.main([a.format(**paths) for a in args])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert re.search(match, e.value.code), e.value.code
    assert not os.path.exists(tmp_path / "out")  # nothing written
    assert not os.path.exists(tmp_path / "tiny" / "gone-alpha-1")  # a mistyped folder is not made


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kw):  # as torch.save on a read-only file system
        raise RuntimeError("open file failed: Read-only file system")
    monkeypatch.setattr(conv, "save_checkpoint", refuse)
    with pytest.raises(SystemExit, match="open file failed: Read-only file system"):
        conv.main([f"--source={save_official(tmp_path / 'tiny', official_state_dict())}",
                   f"--out_dir={tmp_path / 'out'}", "--alpha0=1"])


def test_config_switches_keep_our_models_unchanged():
    keys = set(EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16)).state_dict())
    assert not any(k.endswith(".bias") for k in keys)  # our own checkpoints load as before
    with_bias = set(EsoLM(EsoLMConfig(n_layer=1, n_head=2, n_embd=16, bias=True)).state_dict())
    assert with_bias - keys == {"blocks.0.ln_1.bias", "blocks.0.ln_2.bias", "blocks.0.c_fc.bias",
                                "blocks.0.c_proj.bias", "ln_f.bias", "lm_head.bias"}
    with pytest.raises(ValueError, match="gelu"):
        EsoLMConfig(gelu="fast")
