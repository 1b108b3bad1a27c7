"""
Loading the paper's published checkpoints (sahoo-diffusion/Eso-LM-B-alpha-1 and -alpha-0_25 on the Hugging Face hub)
into esolm.py's backbone: the download, the safetensors format by hand (no new dependency), the shape table of the
authors' network and the fold. The entry point is from_pretrained; docs/pretrained.md tells the story.

    from pretrained import from_pretrained
    model = from_pretrained("sahoo-diffusion/Eso-LM-B-alpha-0_25")   # or a folder holding the two files

The authors' network is a DiT: after each LayerNorm comes adaLN, h * (1 + scale) + shift, and each residual branch is
multiplied by a gate, all computed from c = silu(sigma_map(sigma)). Eso-LMs always run at sigma = 0 (no time input),
so c is one constant vector and so is every shift, scale and gate: they fold exactly into LayerNorm weights and
biases and into the residual projections. The DiT is then our backbone with bias=True and gelu="tanh".
"""
import http.client
import json
import math
import os
import re
import urllib.request

import torch
import torch.nn.functional as F
from tqdm import tqdm

from esolm import EsoLM, EsoLMConfig, check

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


def write_safetensors(path, tensors):
    """{name: tensor} as a .safetensors file (the reader's format above; the header padded to 8 bytes, as the official
    writer does). The tests and the GPU check write checkpoints in the authors' format with it."""
    codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


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


def is_published(source):
    """Whether source names a published model from_pretrained loads: a folder, or a hub id owner/name."""
    return os.path.isdir(source) or re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def official_shapes(V, C, n_layer, n_head, cond=128, n_freq=256):
    """{name: shape} of the authors' network's state_dict, V tokens (plus the mask) wide C: what the loader expects.
    The published models: V = 50257, C = 768, 12 layers and heads, cond 128, n_freq 256."""
    R, hs = V + 1, C // n_head  # embedding and output rows: the tokens, then the mask
    block = {"norm1.weight": (C,), "attn_qkv.weight": (3 * C, C), "attn_out.weight": (C, C), "norm2.weight": (C,),
             "mlp.0.weight": (4 * C, C), "mlp.0.bias": (4 * C,), "mlp.2.weight": (C, 4 * C), "mlp.2.bias": (C,),
             "adaLN_modulation.weight": (6 * C, cond), "adaLN_modulation.bias": (6 * C,)}
    return {"vocab_embed.embedding": (R, C), "sigma_map.mlp.0.weight": (cond, n_freq), "sigma_map.mlp.0.bias": (cond,),
            "sigma_map.mlp.2.weight": (cond, cond), "sigma_map.mlp.2.bias": (cond,), "rotary_emb.inv_freq": (hs // 2,),
            "output_layer.norm_final.weight": (C,), "output_layer.linear.weight": (R, C),
            "output_layer.linear.bias": (R,), "output_layer.adaLN_modulation.weight": (2 * C, cond),
            "output_layer.adaLN_modulation.bias": (2 * C,),
            **{f"blocks.{i}.{k}": shape for i in range(n_layer) for k, shape in block.items()}}


def from_pretrained(source, dtype=torch.float32, alpha0=None, **overrides):
    """One of the paper's published Eso-LM (B) models, exactly, in eval mode: source is a folder holding
    model.safetensors and config.json, or a hub id such as "sahoo-diffusion/Eso-LM-B-alpha-1" (downloaded once). The
    alpha0 it was trained for comes from config.json ("alpha0") or the name (...-alpha-0_25); `alpha0` is the value
    to take when neither says. overrides: EsoLMConfig fields, e.g. block_size."""
    paths = [os.path.join(source, f) if os.path.isdir(source) else download(source, f)
             for f in ("config.json", "model.safetensors")]
    with open(paths[0]) as f:
        meta = json.load(f)
    named = re.search(r"alpha-(\d+(?:_\d+)?)$", source.rstrip("/"))
    alpha0 = meta.get("alpha0", float(named.group(1).replace("_", ".")) if named else alpha0)
    check(alpha0 is not None, "from_pretrained", "alpha0", None, f"needed for {source} (its config does not say "
          "which alpha0 it was trained with)")
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
                            "alpha0": alpha0, **overrides})
    if meta.get("mask_index", rows - 1) != config.vocab_size:
        raise ValueError(f"{paths[0]}: mask_index {meta['mask_index']} is not the last embedding row, "
                         f"{config.vocab_size}, where this backbone keeps the mask")
    want = official_shapes(config.vocab_size, C, config.n_layer, config.n_head, cond, n_freq)
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
    model = EsoLM(config).to(dtype)
    model.load_state_dict(fold_official(sd, config.n_layer))
    # RoPE as the DiT builds it, float32 angles from the stored inv_freq: the tables then match its own bit for bit
    # (rope_tables' float64 angles differ by up to 4e-5 at L = 1024)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), sd["rotary_emb.inv_freq"].float())
    model.rope_cos.copy_(angles.cos())
    model.rope_sin.copy_(angles.sin())
    return model.eval()
