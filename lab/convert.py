"""The paper's published Eso-LM (B) models as checkpoints of ours: their DiT's adaLN input, the
time, is 0 in Eso-LMs, so it folds into our backbone, bias=True, gelu="tanh" (docs/pretrained.md).
    python -m lab.convert --source=sahoo-diffusion/Eso-LM-B-alpha-1 --out_dir=out_owt  # or a folder
"""
import json
import os
import re
import urllib.request
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from configurator import check, configure, fail
from data import GPT2, save_checkpoint
from esolm import EsoLM, EsoLMConfig, need

HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"  # tests: a file:// folder
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Settings:
    source: str = ""  # a hub id (owner/name), or a folder of config.json and model.safetensors
    out_dir: str = ""  # the folder for ckpt.pt
    alpha0: float | None = None  # if neither its config.json nor its name says
    block_size: int | None = None  # L (default: config.json's model_length, else 1024)
    dtype: str = "float32"  # or bfloat16


def read_safetensors(path):  # an 8-byte size N, N bytes of JSON {name: {dtype, shape, offsets}}
    with open(path, "rb") as f:
        raw = memoryview(f.read())
    n = int.from_bytes(raw[:8], "little")
    need(len(raw) >= 8 + n, f"{path}: truncated or not safetensors")
    header, data, out = json.loads(bytes(raw[8:8 + n])), raw[8 + n:], {}
    header.pop("__metadata__", None)
    for name, t in header.items():
        (begin, end), dtype = t["data_offsets"], DTYPES.get(t["dtype"])
        need(dtype and end <= len(data) and end - begin == dtype.itemsize * torch.Size(
            t["shape"]).numel(), f"{path}: tensor {name!r} is truncated or not {'/'.join(DTYPES)}")
        out[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).view(t["shape"])
    return out


def download(repo, file):  # once, as a temporary file renamed when complete
    cache = os.environ.get("ESOLM_CACHE") or os.path.expanduser("~/.cache/esolm")
    path, url = os.path.join(cache, repo, file), HUB_URL.format(repo=repo, file=file)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:  # urllib's errors, or http.client's; a cut-off one too
            os.replace(urllib.request.urlretrieve(url, path + ".part")[0], path)
        except Exception as e:
            raise OSError(f"could not download {url}: {e}") from None
        finally:  # never kept, Ctrl-C too
            if os.path.exists(path + ".part"):
                os.remove(path + ".part")
    return path


def official_shapes(V, C, n_layer, n_head, cond=128, n_freq=256):  # the DiT's, V tokens + the mask
    block = {"norm1.weight": (C,), "norm2.weight": (C,), "attn_qkv.weight": (3 * C, C),
             "attn_out.weight": (C, C), "mlp.0.weight": (4 * C, C), "mlp.0.bias": (4 * C,),
             "mlp.2.weight": (C, 4 * C), "mlp.2.bias": (C,),
             "adaLN_modulation.weight": (6 * C, cond), "adaLN_modulation.bias": (6 * C,)}
    return {"vocab_embed.embedding": (V + 1, C), "rotary_emb.inv_freq": (C // n_head // 2,),
            "sigma_map.mlp.0.weight": (cond, n_freq), "sigma_map.mlp.0.bias": (cond,),
            "sigma_map.mlp.2.weight": (cond, cond), "sigma_map.mlp.2.bias": (cond,),
            "output_layer.norm_final.weight": (C,), "output_layer.linear.weight": (V + 1, C),
            "output_layer.linear.bias": (V + 1,), "output_layer.adaLN_modulation.bias": (2 * C,),
            "output_layer.adaLN_modulation.weight": (2 * C, cond),
            **{f"blocks.{i}.{k}": s for i in range(n_layer) for k, s in block.items()}}


def fold_official(sd, n_layer, L):  # the adaLN vectors of c = silu(sigma_map(0)) into the weights
    def linear(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    half = sd["sigma_map.mlp.0.weight"].size(1) // 2
    t_freq = torch.cat([torch.ones(half), torch.zeros(half)]).double()  # [cos 0] + [sin 0]
    c = F.silu(linear(F.silu(linear(t_freq, "sigma_map.mlp.0")), "sigma_map.mlp.2"))
    shift, scale = linear(c, "output_layer.adaLN_modulation").chunk(2)
    # RoPE as the DiT builds it, float32 angles from its inv_freq: its own tables, bit for bit
    angles = torch.outer(torch.arange(L).float(), sd["rotary_emb.inv_freq"].float())
    # lm_head drops the mask's row (the last): the DiT sets its logit to -1e6, whose exp is 0
    out = {"wte.weight": sd["vocab_embed.embedding"], "rope_cos": angles.cos(),
           "rope_sin": angles.sin(), "lm_head.weight": sd["output_layer.linear.weight"][:-1],
           "lm_head.bias": sd["output_layer.linear.bias"][:-1], "ln_f.bias": shift,
           "ln_f.weight": sd["output_layer.norm_final.weight"] * (1 + scale)}
    for p in (f"blocks.{i}." for i in range(n_layer)):
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(c, p + "adaLN_modulation").chunk(6)
        out |= {p + "ln_1.weight": sd[p + "norm1.weight"] * (1 + scale1), p + "ln_1.bias": shift1,
                p + "attn.c_attn.weight": sd[p + "attn_qkv.weight"],  # the same (3, nh, hs) rows
                p + "attn.c_proj.weight": gate1[:, None] * sd[p + "attn_out.weight"],
                p + "ln_2.weight": sd[p + "norm2.weight"] * (1 + scale2), p + "ln_2.bias": shift2,
                p + "c_fc.weight": sd[p + "mlp.0.weight"], p + "c_fc.bias": sd[p + "mlp.0.bias"],
                p + "c_proj.weight": gate2[:, None] * sd[p + "mlp.2.weight"],
                p + "c_proj.bias": gate2 * sd[p + "mlp.2.bias"]}
    return out


def convert(source, alpha0=None, block_size=None, dtype=torch.float32):
    """(EsoLM, EsoLMConfig) of a published model in a folder or on the hub, folded in float64."""
    need(os.path.isdir(source) or re.fullmatch(r"[\w.-]+/[\w.-]+", source), f"no folder {source}")
    meta, path = (os.path.join(source, f) if os.path.isdir(source) else download(source, f)
                  for f in ("config.json", "model.safetensors"))
    with open(meta) as f:
        meta = json.load(f)
    named = re.search(r"alpha-(\d+(?:[._]\d+)?)$", source.rstrip("/"))  # ...-alpha-0_25
    said = meta.get("alpha0", float(named[1].replace("_", ".")) if named else None)
    need(alpha0 in (None, said) or said is None, f"{source} says alpha0={said}, not {alpha0}")
    need(said is not None or alpha0 is not None, f"{source} does not say its alpha0: --alpha0")
    sd = {k.removeprefix("backbone."): v.double() for k, v in read_safetensors(path).items()}
    for k in ("vocab_embed.embedding", "sigma_map.mlp.0.weight", "rotary_emb.inv_freq"):
        need(k in sd, f"{path}: missing tensor {k!r}")
    (R, C), (cond, n_freq) = sd["vocab_embed.embedding"].shape, sd["sigma_map.mlp.0.weight"].shape
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    n_head = C // max(1, 2 * len(sd["rotary_emb.inv_freq"]))  # RoPE spans a head
    L = meta.get("model_length", 1024) if block_size is None else block_size  # a bare save's: none
    config = EsoLMConfig(R - 1, L, n_layer, n_head, C, alpha0=alpha0 if said is None else said,
                         bias=True, gelu="tanh")
    need(meta.get("mask_index", R - 1) == R - 1,
         f"{source}: mask_index {meta.get('mask_index')} is not the last row, {R - 1}")
    want = official_shapes(R - 1, C, config.n_layer, config.n_head, cond, n_freq)
    for k in sorted(want.keys() | sd.keys()):
        shape = tuple(sd[k].shape) if k in sd else "missing"
        need(shape == want.get(k), f"{path}: tensor {k!r}: {shape}, expected {want.get(k)}")
    # sin(sigma freq) is 0 at sigma = 0: these columns keep their init, unless trained with time
    need(sd["sigma_map.mlp.0.weight"][:, n_freq // 2:].abs().max() <= n_freq ** -0.5,
         f"{path}: sigma_map's sin(sigma freq) columns were trained: time conditioning")
    model = EsoLM(config).to(dtype)
    model.load_state_dict(fold_official(sd, config.n_layer, config.block_size))
    return model.eval(), config


def main(argv=None):
    cfg = configure(Settings, __doc__, argv)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    check(cfg, "source", cfg.source, "is needed: a hub id (owner/name) or a folder")
    check(cfg, "out_dir", cfg.out_dir and not os.path.exists(path), "must be a folder, no ckpt.pt")
    check(cfg, "dtype", cfg.dtype in ("float32", "bfloat16"), "must be float32 or bfloat16")
    try:  # a bad alpha0 or block_size is EsoLMConfig's
        model, config = convert(cfg.source, cfg.alpha0, cfg.block_size, getattr(torch, cfg.dtype))
        os.makedirs(cfg.out_dir, exist_ok=True)
        meta = {"tokenizer": "gpt2", "vocab_size": GPT2.vocab_size, "eot_id": GPT2.eot_id}
        save_checkpoint(path, model=model.state_dict(), ema=None, optimizer=None, iter_num=0,
                        best_val_loss=float("inf"), model_config=asdict(config), dataset_meta=meta,
                        train_config={"source": cfg.source, "alpha0": config.alpha0})
    except (ValueError, OSError, RuntimeError) as e:  # torch.save's: RuntimeError
        fail(e)
    print(f"wrote {path}: alpha0 = {config.alpha0}, L = {config.block_size}")


if __name__ == "__main__":
    main()
