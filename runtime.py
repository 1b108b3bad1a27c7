"""
What running the model takes, shared by every script: the one configurator (typed settings from --key=value), the
device and the precision, checkpoints (train.py's writer beside every script's reader), a figure helper and the
training step's bookkeeping (FLOPs, the EMA's decay). The method itself is in esolm.py; this file imports it, never
the other way round.
"""
import contextlib
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import field, fields

import torch

from data import DataError, check_writable
from esolm import RULES, EsoLM, EsoLMConfig, SettingError, check, mdm_rows
from pretrained import from_pretrained, is_published

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: the default denominator of MFU
DTYPES = ("auto", "bfloat16", "float32")  # the --dtype of every script
RUN_RULES = {  # the rules that recur in the scripts' settings, beside esolm.RULES (alpha0, steps, top_p, ...)
    "seed": (lambda s: s >= 0, "must be at least 0"),
    "count": (lambda n: n >= 1, "must be at least 1"),
    "nonnegative": (lambda n: n >= 0, "must be at least 0"),
    "off": (lambda x: x >= 0, "must be at least 0 (0: off)"),
    "fraction": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
    "dtype": (lambda d: d in DTYPES, f"must be one of {', '.join(DTYPES)}"),
    "folder": (lambda n: bool(n) and "/" not in n and not n.startswith("."), "must be a plain folder name: not "
               "empty, no '/', not starting with '.'"),
    "init_from": (lambda s: s in ("scratch", "resume") or is_published(s), 'must be "scratch", "resume", or a '
                  "published model: a hub id owner/name or a folder"),
    "device": (lambda d: resolve_device(d) and True, ""),  # resolve_device words its own errors
    "writable": (lambda folder: writable(folder), "")}


# ----------------------------------------------------------------------------------------------------------
# The configurator: every script's settings are a dataclass of `setting` fields, read by `configure`

def setting(default, help, rule=None, choices=None):
    """A field of a script's settings: its default, what it means (--help prints both) and what its value must pass:
    a shared rule (a name in esolm.RULES or RUN_RULES; for a tuple, each element) or one of some choices."""
    return field(default=default, metadata={"help": help, "rule": rule, "choices": choices})


def script_name():
    return os.path.basename(sys.argv[0])


def die(msg):
    """End the script with one line, no traceback: what went wrong, named as the user wrote it."""
    raise SystemExit(f"{script_name()}: {msg}")


def configure(cls, argv=None, defaults=None, doc="", notes=None):
    """The settings of a script: cls from --key=value arguments over `defaults` (over the fields' own), each checked
    (its shared rule, then cls.__post_init__) before the script reads or writes anything. A mistake ends the script
    with one line naming the flag. parse_args and build are its two halves, for a script whose defaults depend on
    some of the arguments (train.py's presets)."""
    return build(cls, {**(defaults or {}), **parse_args(cls, argv, doc, notes)})


def parse_args(cls, argv=None, doc="", notes=None):
    """{key: value} of the --key=value arguments (sys.argv's by default), each parsed by its field's type: numbers and
    booleans (true/false, or --key alone) as written, a tuple as a,b,c, a string as is, None as None where allowed.
    --help prints `doc` and every setting with its default and meaning (and notes: {key: text}, in brackets)."""
    argv = sys.argv[1:] if argv is None else argv
    known = {f.name: f for f in fields(cls)}
    if "-h" in argv or "--help" in argv:
        print(doc.strip() + "\n\nSettings (--key=value):")
        for f in known.values():
            note = f" [{notes[f.name]}]" if notes and f.name in notes else ""
            print(f"  --{f.name}={format_value(f.default)}{note}".ljust(46) + " " + f.metadata["help"])
        raise SystemExit(0)
    values = {}
    for arg in argv:
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not key:
            die(f"expected --key=value, got {arg!r} (see --help)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            die(f"unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else " (see --help)"))
        values[key] = parse_value(key, text if eq else None, known[key].type)
    return values


def build(cls, values):
    """cls(**values), each field checked (a float must be finite; then its rule or choices), then by cls.__post_init__;
    a SettingError ends the script, worded as the flag."""
    try:
        for f in fields(cls):
            value, m = values.get(f.name, f.default), f.metadata
            ok, rule = {**RULES, **RUN_RULES}.get(m["rule"], (lambda v: True, ""))
            if m["choices"]:
                ok, rule = (lambda v: v in m["choices"]), f"must be one of {', '.join(map(str, m['choices']))}"
            for v in value if isinstance(value, tuple) else [value]:
                check(not isinstance(v, float) or math.isfinite(v), cls.__name__, f.name, v, "must be a finite number")
                try:
                    good = v is None or ok(v)
                except SettingError as e:  # a rule that words its own reason: device, writable
                    good, rule = False, e.rule
                check(good, cls.__name__, f.name, format_value(value), rule)
        cfg = cls(**values)
    except SettingError as e:
        die(as_flag(e))
    return cfg


def as_flag(e):
    """A SettingError worded as the flag it came from: "--top_p=2: must be in (0, 1]"."""
    return f"--{e.key}" + (f"={e.value}" if e.value is not None else "") + f": {e.rule}"


def parse_value(key, text, kind):
    """The text after --key= (None for a bare --key) as a value of `kind`: int, float, bool, str, X | None or
    tuple[X, ...]."""
    if isinstance(kind, types.UnionType):  # X | None
        return None if text == "None" else parse_value(key, text, typing.get_args(kind)[0])
    if typing.get_origin(kind) is tuple:
        return tuple(parse_value(key, t, typing.get_args(kind)[0]) for t in (text or "").split(",") if t)
    if kind is bool:
        value = {"true": True, "1": True, "false": False, "0": False}.get((text or "true").lower())
    elif kind is str:
        value = text
    else:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
    if value is None:
        die(f"--{key}={text}: takes a {kind.__name__}" if text is not None else f"--{key} needs a value: --{key}=...")
    return value


def format_value(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def need(cfg, ok, key, rule):
    """A rule of a script's own settings, in its __post_init__: a SettingError naming the setting unless ok."""
    check(ok, type(cfg).__name__, key, getattr(cfg, key), rule)


# ----------------------------------------------------------------------------------------------------------
# Devices and precision

def writable(folder):
    """True, or a SettingError if folder cannot be created or written in (data.check_writable)."""
    try:
        return check_writable(folder) or True
    except DataError as e:
        check(False, "writable", "folder", folder, str(e))


def resolve_device(name="auto"):
    """"auto" -> "cuda" when there is a GPU, else "cpu"; any other name is checked to exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind, index = torch.device(name).type, torch.device(name).index
    except RuntimeError:
        kind, index = None, None
    check(kind in ("cpu", "cuda"), "device", "device", name, "is not a device this code runs on: use auto, cpu, cuda "
          "or cuda:N")
    check(kind == "cpu" or torch.cuda.is_available(), "device", "device", name,
          f"is not available: CUDA is not available on this machine (torch {torch.__version__}); use cpu or auto")
    check(kind == "cpu" or index is None or index < torch.cuda.device_count(), "device", "device", name,
          f"is not a GPU here: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return name


def autocast(device, dtype="auto"):
    """(context, name) of the compute precision: "auto" is bfloat16 autocast on a GPU that has it, else float32 (no
    autocast); "bfloat16" asks for autocast on any device (on a CPU it is emulated, slowly)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16), dtype


def sync(device):
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


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


def checkpoint_config(ckpt):
    """The EsoLMConfig fields of a checkpoint. Those written before the model knew its alpha0 hold it in their
    train_config only."""
    return {"alpha0": ckpt["train_config"]["alpha0"], **ckpt["model_config"]}


def model_from_checkpoint(ckpt, device="cpu", ema=True):
    """The model of a checkpoint in eval mode: its EMA weights when they were saved and `ema` is True."""
    model = EsoLM(EsoLMConfig(**checkpoint_config(ckpt)))
    model.load_state_dict(ckpt["ema"] if ema and ckpt["ema"] else ckpt["model"])
    return model.to(device).eval()


def load_model(out_dir, init_from="", device="cpu", ema=True, alpha0=None):
    """(model, checkpoint) a script runs: a published model (init_from: hub id or folder; checkpoint None; alpha0
    for one that does not say what it was trained for), else out_dir/ckpt.pt of train.py. A problem is a
    SettingError that names the setting."""
    try:
        if init_from:
            return from_pretrained(init_from, alpha0=alpha0).to(device), None
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        return model_from_checkpoint(ckpt, device, ema), ckpt
    except SettingError:  # from_pretrained: the model does not say its alpha0, and alpha0 is None
        raise
    except (ValueError, OSError) as e:  # OSError: a failed download
        key, value = ("init_from", init_from) if init_from else ("out_dir", out_dir)
        check(False, "load_model", key, value, f"cannot be read: {e}")


# ----------------------------------------------------------------------------------------------------------
# Figures, and the training step's bookkeeping

def pyplot(what):
    """matplotlib.pyplot drawing to files (the Agg backend), or None, after saying that `what` is not drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"matplotlib is not installed: no {what} (pip install matplotlib)")


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def loss_flops(model, B, batch_split=0.5):
    """FLOPs of forward + backward of model.loss on B rows, for MFU: 6 per weight per fed token (embedding lookups
    are free) plus attention, 12 n_layer C L per token (nanoGPT's count). An MDM row feeds L tokens, an AR row L
    x-tokens plus one z-query per masked position, about (1 - alpha0) L."""
    L, C, alpha0 = model.config.block_size, model.config.n_embd, model.config.alpha0
    n_mdm = mdm_rows(B, alpha0, batch_split)
    fed = n_mdm * L + (B - n_mdm) * (2 - alpha0) * L
    return (6 * (num_params(model) - model.wte.weight.numel()) + 12 * model.config.n_layer * C * L) * fed


class Objective(torch.nn.Module):
    """model.loss_terms as a module's forward pass: DistributedDataParallel syncs gradients through forward."""

    def __init__(self, model, batch_split, loss_type):
        super().__init__()
        self.model, self.args = model, (batch_split, loss_type)

    def forward(self, x):
        return self.model.loss_terms(x, *self.args)


def ema_decay(ema, n):
    """The EMA's decay at update n = 1, 2, ... with the official warm-up: min(ema, (1 + n) / (10 + n)), so that early
    on the average forgets the random init quickly (a constant 0.9999 keeps 61% of it after 5000 steps)."""
    return min(ema, (1 + n) / (10 + n))
