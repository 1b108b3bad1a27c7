"""
Train an Eso-LM on token shards made by prepare_data.py: one GPU, several (torchrun), or the CPU.

    python train.py --alpha0=0.25                  # built-in Shakespeare; without a GPU, a CPU-sized preset
    python train.py --help                         # every setting, its default and what it does
    python train.py --init_from=resume             # continue the run in --out_dir
    torchrun --standalone --nproc_per_node=4 train.py --alpha0=0.25

Settings are the fields of TrainConfig below, overridden with --key=value (values parsed as Python literals).
"""
import ast
import difflib
import inspect
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from esolm import EsoLM, EsoLMConfig
from sample import load_checkpoint


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "shakespeare"  # folder of data_dir written by prepare_data.py; the default one builds itself
    data_dir: str = "data"
    out_dir: str = "out"  # ckpt.pt and log.jsonl go here
    init_from: str = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
    # the method
    alpha0: float = 0.25  # fraction of tokens the diffusion phase unmasks: 1 = pure MDM, 0 = pure AR
    batch_split: float = 0.5  # fraction of each batch that estimates the MDM term, the rest the AR term
    variant: str = "B"  # "B" (KV cache in both phases) or "A"
    loss_type: str = "elbo"  # "elbo" or "low_var" (unweighted MDM term, as the paper's alpha0 = 1 runs)
    # model
    block_size: int = 256  # L
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    # optimisation (the paper: AdamW 3e-4, betas (0.9, 0.999), no weight decay, clip 1.0, constant LR after warmup)
    batch_size: int = 64  # sequences per micro-step and process
    gradient_accumulation_steps: int = 1  # summed over all processes
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" (to min_lr at lr_decay_iters) or "constant"
    min_lr: float = 1e-4
    warmup_iters: int = 200
    lr_decay_iters: int = 0  # 0: max_iters
    max_iters: int = 5000
    weight_decay: float = 0.0  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0: off
    ema: float = 0.0  # decay of an exponential moving average of the weights (paper: 0.9999); 0: off
    # evaluation and logging
    eval_interval: int = 500
    eval_iters: int = 20  # batches per split, the same windows and noise at every evaluation
    log_interval: int = 50
    # system
    device: str = "auto"  # "auto" (cuda if available), "cuda", "cuda:1", "cpu"
    dtype: str = "auto"  # "auto" (bfloat16 on a GPU that has it, else float32), "bfloat16", "float32"
    compile: bool = False  # torch.compile the transformer
    peak_flops: float = 989e12  # for MFU: the card's dense bf16 peak (H100 SXM); 0: no MFU
    seed: int = 1337


# Without a GPU these replace the defaults above (settings given on the command line still win): sized so that
# `python train.py --alpha0=0.25` trains in under 10 minutes on 2 cores and its samples already look like plays.
CPU_PRESET = dict(block_size=128, n_layer=4, n_head=4, n_embd=192, dropout=0.0, batch_size=32,
                  learning_rate=2e-3, min_lr=2e-4, warmup_iters=50, max_iters=700, eval_interval=350,
                  eval_iters=8, log_interval=25, peak_flops=0.0)


def die(msg):
    raise SystemExit(f"train.py: {msg}")


def print_help():
    print(__doc__)
    print("Settings (--key=value; a CPU-only machine starts from the preset in brackets):")
    for line in inspect.getsource(TrainConfig).splitlines()[2:]:
        m = re.match(r"\s+(\w+): \w+ = (.*?)\s*(#.*)?$", line)
        if m:
            preset = f" [{CPU_PRESET[m[1]]}]" if m[1] in CPU_PRESET else ""
            print(f"  --{m[1]}={m[2]}{preset}".ljust(44) + (m[3] or ""))
        elif line.strip().startswith("#"):
            print(f"  {line.strip()}")


def parse_overrides(argv):
    """--key=value arguments -> {key: value}, each value a Python literal of the field's type."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help()
            sys.exit(0)
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            die(f"expected --key=value, got {arg!r} (see --help)")
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            die(f"unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else " (see --help)"))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(text.lower(), text)  # a bare word is a string
        if types[key] is float and type(value) is int:
            value = float(value)
        if type(value) is not types[key]:
            die(f"--{key} takes a {types[key].__name__}, got {text!r}")
        out[key] = value
    return out


# -----------------------------------------------------------------------------------------------------------
# setup: settings, processes, device, autocast

overrides = parse_overrides(sys.argv[1:])
cfg = TrainConfig(**{k: v for k, v in overrides.items() if k == "device"})
ddp = "RANK" in os.environ  # launched by torchrun
rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
master = rank == 0
device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cpu":
    cfg = TrainConfig(**CPU_PRESET)
    if master:
        print("no GPU: starting from the CPU preset " + ", ".join(f"{k}={v}" for k, v in CPU_PRESET.items()))
cfg = TrainConfig(**{**asdict(cfg), **overrides})
for key, allowed in (("variant", "AB"), ("loss_type", ("elbo", "low_var")), ("init_from", ("scratch", "resume")),
                     ("lr_schedule", ("cosine", "constant")), ("dtype", ("auto", "bfloat16", "float32"))):
    if getattr(cfg, key) not in allowed:
        die(f"--{key} must be one of {list(allowed)}, got {getattr(cfg, key)!r}")
if not 0 <= cfg.alpha0 <= 1:
    die(f"--alpha0 must be in [0, 1], got {cfg.alpha0}")
if ddp:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
if cfg.gradient_accumulation_steps % world_size:
    die(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the number of "
        f"processes ({world_size})")
grad_accum = cfg.gradient_accumulation_steps // world_size
dtype = cfg.dtype
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=torch.bfloat16)
torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores (TF32), where there are any
torch.backends.cudnn.allow_tf32 = True
model_keys = ("block_size", "n_layer", "n_head", "n_embd", "variant")
ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
ckpt = None
if cfg.init_from == "resume":  # the model's shape comes from the checkpoint
    try:
        ckpt = load_checkpoint(ckpt_path, device)
    except ValueError as e:
        die(f"--init_from=resume: {e}")
    for k in model_keys:
        if k in overrides and overrides[k] != ckpt["model_config"][k]:
            die(f"--{k}={overrides[k]} differs from the checkpoint's {ckpt['model_config'][k]}")
    cfg = replace(cfg, **{k: ckpt["model_config"][k] for k in model_keys})
if master:
    os.makedirs(cfg.out_dir, exist_ok=True)
    print(f"device {device}, dtype {dtype}, {world_size} process(es)\n" + json.dumps(asdict(cfg)))


def seed_for(*keys):
    """Every random draw of iteration i of process `rank` comes from seed_for(rank, i): a resumed run repeats the
    uninterrupted one exactly, and the checkpoint's RNG state is just the seed and the iteration."""
    return int(np.random.SeedSequence([cfg.seed, *keys]).generate_state(1)[0])


EVAL = 1 << 31  # a "rank" no process has: evaluation draws its own fixed windows and noise


# -----------------------------------------------------------------------------------------------------------
# data: random windows of block_size tokens from memory-mapped shards, drawn with replacement

data_path = os.path.join(cfg.data_dir, cfg.dataset)
if not os.path.exists(os.path.join(data_path, "meta.json")) and cfg.dataset == "shakespeare":
    if master:
        print(f"{data_path} not found: preparing the built-in corpus (python prepare_data.py)")
        prepare_data.main(["--data_dir", cfg.data_dir])
    if ddp:
        dist.barrier()
try:
    meta = prepare_data.load_meta(cfg.data_dir, cfg.dataset)
    shards = {split: [prepare_data.read_shard(os.path.join(data_path, f)) for f in meta[f"{split}_shards"]]
              for split in ("train", "val")}
except (ValueError, OSError) as e:
    die(str(e))
for split, arrays in shards.items():
    if not any(len(a) > cfg.block_size for a in arrays):
        die(f"{data_path}: no {split} shard holds more than block_size={cfg.block_size} tokens")


def get_batch(split, rng):
    arrays = [a for a in shards[split] if len(a) > cfg.block_size]
    weights = np.array([len(a) - cfg.block_size for a in arrays], dtype=np.float64)  # uniform over windows
    which = rng.choice(len(arrays), size=cfg.batch_size, p=weights / weights.sum())
    x = np.stack([arrays[w][o:o + cfg.block_size] for w, o in
                  zip(which, rng.integers(0, weights[which].astype(np.int64) + 1))]).astype(np.int64)
    x = torch.from_numpy(x)
    return x.pin_memory().to(device, non_blocking=True) if device_type == "cuda" else x


# -----------------------------------------------------------------------------------------------------------
# model, resumed from out_dir/ckpt.pt if asked

if ckpt and ckpt["model_config"]["vocab_size"] != meta["vocab_size"]:
    die(f"the checkpoint's vocab_size {ckpt['model_config']['vocab_size']} differs from {cfg.dataset}'s "
        f"{meta['vocab_size']}")
model_config = EsoLMConfig(vocab_size=meta["vocab_size"], dropout=cfg.dropout, **{k: getattr(cfg, k) for k in model_keys})
torch.manual_seed(cfg.seed)
model = EsoLM(model_config).to(device)
if ckpt:
    model.load_state_dict(ckpt["model"])
ema_model = None
if cfg.ema:
    ema_model = EsoLM(model_config).to(device).eval().requires_grad_(False)
    ema_model.load_state_dict(ckpt["ema"] if ckpt and ckpt.get("ema") else model.state_dict())
n_params = model.num_params()
if master:
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {model_config.vocab_size}, variant {model_config.variant}")

# -----------------------------------------------------------------------------------------------------------
# optimizer: AdamW, weight decay on matrices only

params = [p for p in model.parameters() if p.requires_grad]
groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              fused=device_type == "cuda")
if ckpt:
    optimizer.load_state_dict(ckpt["optimizer"])
iter_num = ckpt["iter_num"] if ckpt else 0
resumed_at = iter_num if ckpt else None  # the checkpoint was evaluated when it was saved
best_val = ckpt["best_val_loss"] if ckpt else math.inf
ckpt = None  # free the memory

# -----------------------------------------------------------------------------------------------------------
# compile, DDP


class Objective(torch.nn.Module):
    """model.loss as a forward pass: DDP syncs gradients through the module's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.loss(x, cfg.alpha0, cfg.batch_split, cfg.loss_type)


if cfg.compile:
    model.compile()  # compiles the transformer forward; the loss's sampling of masks and orders stays eager
objective = Objective(model)
if ddp:
    objective = DDP(objective, device_ids=[local_rank] if device_type == "cuda" else None)

# -----------------------------------------------------------------------------------------------------------
# evaluation: NELBO per token on fixed windows with fixed noise, so that evaluations compare


@torch.no_grad()
def evaluate(m):
    out = {}
    for split in ("train", "val"):
        rng = np.random.default_rng(seed_for(EVAL, 0))  # the same windows every time
        gen = torch.Generator(device=device).manual_seed(seed_for(EVAL, 1))  # the same t and masks every time
        with autocast:
            nelbo = [m.nelbo(get_batch(split, rng), cfg.alpha0, gen).float().mean() for _ in range(cfg.eval_iters)]
        out[split] = torch.stack(nelbo).mean().item() / cfg.block_size
    return out


def fed_tokens_per_row():
    """Tokens a training row feeds through the network: L for an MDM row, L + about (1 - alpha0) L for an AR row."""
    mdm = 1.0 if cfg.alpha0 == 1 else 0.0 if cfg.alpha0 == 0 else cfg.batch_split
    return cfg.block_size * (mdm + (1 - mdm) * (2 - cfg.alpha0))


# forward + backward: 6 FLOPs per weight per fed token (embedding lookups are free), plus attention (nanoGPT's count),
# over all processes
flops_per_iter = (6 * (n_params - model.wte.weight.numel()) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size) \
    * fed_tokens_per_row() * cfg.batch_size * cfg.gradient_accumulation_steps
tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps  # all processes together


def get_lr(it):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def save_checkpoint():
    ckpt = {"format": "esolm-checkpoint", "version": 1, "model": model.state_dict(),
            "ema": ema_model.state_dict() if ema_model else None, "optimizer": optimizer.state_dict(),
            "iter_num": iter_num, "best_val_loss": best_val, "model_config": asdict(model_config),
            "train_config": asdict(cfg), "dataset_meta": meta, "rng": {"seed": cfg.seed, "scheme": "seed_for"}}
    torch.save(ckpt, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash mid-write leaves the previous checkpoint


def log(record):
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------------------------------------
# training loop

nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # set on device, read at log/eval: no sync per step


def stop_if_nonfinite():
    if nonfinite.item():
        die(f"the loss became NaN or inf before iteration {iter_num}; stopping, and {ckpt_path} keeps the last good "
            f"state (try a lower --learning_rate)")


bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
t_last, iters_since = time.time(), 0
while True:
    if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != resumed_at:
        stop_if_nonfinite()
        t_eval = time.time()
        losses = evaluate(ema_model or model)
        if master:
            bpb = f", {losses['val'] / math.log(2):.3f} bits/byte" if meta["tokenizer"] == "bytes" else ""
            bar.write(f"iter {iter_num}: val NELBO {losses['val']:.4f} nats/token (ppl {math.exp(losses['val']):.2f}"
                      f"{bpb}), train {losses['train']:.4f}")
            log({"iter": iter_num, "val": losses["val"], "train": losses["train"]})
            if not math.isfinite(losses["val"]):
                die(f"validation NELBO is {losses['val']} at iteration {iter_num}; {ckpt_path} left as it was")
            best_val = min(best_val, losses["val"])
            save_checkpoint()
        t_last += time.time() - t_eval  # ms/iter counts training only
    if iter_num == cfg.max_iters:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed_for(rank, iter_num))  # masks, orders, t and dropout of this iteration
    rng = np.random.default_rng(seed_for(rank, iter_num, 0))  # its windows
    for micro_step in range(grad_accum):
        if ddp:  # sync gradients on the last micro-step only
            objective.require_backward_grad_sync = micro_step == grad_accum - 1
        with autocast:
            loss = objective(get_batch("train", rng)) / grad_accum
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema_model:
        torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - cfg.ema)
    nonfinite |= ~torch.isfinite(loss)
    iter_num += 1
    iters_since += 1
    bar.update(1)

    if iter_num % cfg.log_interval == 0:
        stop_if_nonfinite()  # syncs with the device, so the timing below is honest
        if master:
            loss_value = loss.item() * grad_accum
            dt = (time.time() - t_last) / iters_since
            mfu = flops_per_iter / world_size / dt / cfg.peak_flops if cfg.peak_flops else None
            bar.write(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm.item():.3f}, "
                      f"{dt * 1000:.0f} ms/iter, {tokens_per_iter / dt:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else ""))
            log({"iter": iter_num, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(), "ms_per_iter": dt * 1000,
                 "tokens_per_s": tokens_per_iter / dt, "mfu": mfu})
        t_last, iters_since = time.time(), 0

bar.close()
if ddp:
    dist.destroy_process_group()
