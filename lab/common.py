"""What the lab's tools share: a checkpoint's model, devices and precision, statistics, figures."""
import contextlib
import math
import os

import numpy as np
import torch

from data import Windows, load_checkpoint
from esolm import EsoLM, EsoLMConfig


def load_model(out_dir, device="cpu", ema=True):
    """(model in eval mode, checkpoint) of out_dir/ckpt.pt, with its EMA weights if saved."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = EsoLM(EsoLMConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"] if ema and ckpt["ema"] else ckpt["model"])
    return model.to(device).eval(), ckpt


def autocast(device, dtype="auto"):
    """(context, name): bf16 autocast when asked, or ("auto") on a GPU with bf16; else float32."""
    if dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16), dtype


def device_ok(name):  # cpu, or cuda (cuda:N) on a machine with a GPU
    return name == "cpu" or name.startswith("cuda") and torch.cuda.is_available()


def sync(device):  # wait for the device, so that a wall-clock time covers its work
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def mean_se(values):
    """Mean and standard error of the mean."""
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def perplexity(mean, se):  # exp of a per-token NLL, and its standard error (delta method)
    return math.exp(mean), math.exp(mean) * se


def held_out(data_dir, dataset, L, n):
    """(n, L) windows evenly spaced over the validation split: the same windows for every model."""
    windows = Windows(data_dir, dataset, "val", L)
    return windows.batch(np.linspace(0, len(windows) - 1, n).astype(np.int64))


def pyplot(what):
    """matplotlib.pyplot drawing to files, or None after saying that `what` is not drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"matplotlib is not installed: no {what} (pip install matplotlib)")


def nfe_figure(path, lines, ylabel, title, per="sample"):
    """A figure of y against the network calls (log2), lines {label: [(nfe, y, error bar), ...]}."""
    if (plt := pyplot(os.path.basename(path))) is None:
        return
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for label, points in lines.items():
        ax.errorbar(*zip(*sorted(points)), fmt="o-", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel=f"network calls a {per} (NFE)", ylabel=ylabel, title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
