"""
What running the model takes, shared by train.py, sample.py, evaluate.py, bench.py and sweep.py: the device and the
precision, the settings several scripts check alike, and the checkpoint format, its writer (train.py's) beside its
reader. The method itself is in esolm.py.
"""
import contextlib
import os

import torch

from esolm import EsoLM, EsoLMConfig, check, mdm_rows

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: the default denominator of MFU
DTYPES = ("auto", "bfloat16", "float32")  # the --dtype of every script


def resolve_device(name="auto"):
    """"auto" -> "cuda" when there is a GPU, else "cpu"; any other name is checked to exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind, index = torch.device(name).type, torch.device(name).index
    except RuntimeError:
        kind, index = None, None
    check(kind in ("cpu", "cuda"), "device", name, "not a device this code runs on: use auto, cpu, cuda or cuda:N")
    check(kind == "cpu" or torch.cuda.is_available(), "device", name,
          f"CUDA is not available on this machine (torch {torch.__version__}); use cpu or auto")
    check(kind == "cpu" or index is None or index < torch.cuda.device_count(), "device", name,
          f"this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return name


SHARED_RULES = {  # settings that several scripts have, checked wherever a script has them
    "alpha0": (lambda a: a is None or 0 <= a <= 1, "must be in [0, 1] (0: pure AR, 1: pure MDM)"),
    "seed": (lambda s: s >= 0, "must be at least 0"),
    "dtype": (lambda d: d in DTYPES, f"must be one of {', '.join(DTYPES)}")}


def check_args(args, rules=()):
    """A script's settings against their domains, before any work: the shared ones it has, then its own rules
    (key, ok, what is allowed). The first one that fails is a SettingError. Returns the device (resolve_device)."""
    for key, (ok, rule) in SHARED_RULES.items():
        if hasattr(args, key):
            check(ok(getattr(args, key)), key, getattr(args, key), rule)
    for key, ok, rule in rules:
        check(ok, key, getattr(args, key), rule)
    return resolve_device(getattr(args, "device", "auto"))


def autocast(device, dtype="auto"):
    """(context, name) of the compute precision: "auto" is bfloat16 autocast on a GPU that has it, else float32 (no
    autocast); "bfloat16" asks for autocast on any device (on a CPU it is emulated, slowly)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16), dtype


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def loss_flops(model, B, alpha0, batch_split=0.5):
    """FLOPs of forward + backward of model.loss on B rows, for MFU: 6 per weight per fed token (embedding lookups
    are free) plus attention, 12 n_layer C L per token (nanoGPT's count). An MDM row feeds L tokens, an AR row L
    x-tokens plus one z-query per masked position, about (1 - alpha0) L."""
    L, C = model.config.block_size, model.config.n_embd
    n_mdm = mdm_rows(B, alpha0, batch_split)
    fed = n_mdm * L + (B - n_mdm) * (2 - alpha0) * L
    return (6 * (num_params(model) - model.wte.weight.numel()) + 12 * model.config.n_layer * C * L) * fed


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: train.py writes them, every script reads them

CHECKPOINT_FORMAT = "esolm-checkpoint"  # the tag of every checkpoint
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "iter_num", "best_val_loss", "model_config", "train_config",
                   "dataset_meta")


def save_checkpoint(path, **fields):
    """Write a checkpoint: CHECKPOINT_KEYS (the model's state_dict without _orig_mod./module. prefixes) and any more
    fields, to a temporary file renamed over `path`: a crash mid-write leaves the previous checkpoint whole."""
    assert set(CHECKPOINT_KEYS) <= set(fields), f"a checkpoint needs {CHECKPOINT_KEYS}"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **fields}, path + ".tmp")
    os.replace(path + ".tmp", path)


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
    out_dir/ckpt.pt of train.py. A problem is a SettingError that names the setting."""
    try:
        if init_from:
            return EsoLM.from_pretrained(init_from).to(device), None
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        return model_from_checkpoint(ckpt, device, ema), ckpt
    except (ValueError, OSError) as e:  # OSError: a failed download
        key, value = ("init_from", init_from) if init_from else ("out_dir", out_dir)
        check(False, key, value, str(e))
