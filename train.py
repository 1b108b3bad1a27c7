"""
Train an Eso-LM on token shards made by prepare_data.py: one GPU, several (torchrun), or the CPU.

    python train.py --alpha0=0.25                  # built-in Shakespeare; without a GPU, a CPU-sized preset
    python train.py --dataset=sudoku --alpha0=1    # Sudoku grids (built on first use), with the Sudoku preset
    python train.py --init_from=resume             # continue the run in --out_dir
    python train.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-0_25 --dataset=owt   # fine-tune a published model
    torchrun --standalone --nproc_per_node=4 train.py --alpha0=0.25 --gradient_accumulation_steps=4

Settings: TrainConfig's fields below, as --key=value (--help lists them), checked before anything is read or written.
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import Windows
from esolm import EsoLM, EsoLMConfig
from pretrained import from_pretrained, is_published
from runtime import (H100_BF16_FLOPS, Objective, autocast, build, checkpoint_config, die, ema_decay, load_checkpoint,
                     loss_flops, need, num_params, parse_args, resolve_device, save_checkpoint, setting)


@dataclass
class TrainConfig:
    # data and output
    dataset: str = setting("shakespeare", "a folder of data_dir; shakespeare, sudoku: built on first use", "folder")
    data_dir: str = setting("data", "where the datasets are")
    out_dir: str = setting("out", "ckpt.pt and log.jsonl go here", rule="writable")
    init_from: str = setting("scratch", '"scratch", "resume" (out_dir/ckpt.pt), a published model', "init_from")
    # the method
    alpha0: float = setting(0.25, "what the model trains for: 1 = MDM, 0 = AR (resumed, published: its own)", "alpha0")
    batch_split: float = setting(0.5, "fraction of each batch that estimates the MDM term, the rest the AR term")
    variant: str = setting("B", '"B" (KV cache in both phases), "A" (bidirectional clean tokens), "MDLM" (baseline)')
    loss_type: str = setting("elbo", "low_var: an unweighted MDM term (paper, alpha0 = 1)", choices=("elbo", "low_var"))
    # model
    block_size: int = setting(256, "L, the sequence length")
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(6, "attention heads; n_embd / n_head must be even (RoPE)")
    n_embd: int = setting(384, "width")
    dropout: float = setting(0.1, "on the two residual branches of each block, as the paper's network")
    pos_emb: bool = setting(False, "a learned absolute position embedding too (RoPE alone: the paper's network)")
    # optimisation (the paper: AdamW 3e-4, betas (0.9, 0.999), no weight decay, clip 1.0, constant LR after warmup)
    batch_size: int = setting(64, "sequences per micro-step and process", rule="count")
    gradient_accumulation_steps: int = setting(1, "micro-steps per iteration, over all processes", rule="count")
    learning_rate: float = setting(1e-3, "peak learning rate of AdamW")
    lr_schedule: str = setting("cosine", "or constant after the warmup", choices=("cosine", "constant"))
    min_lr: float = setting(1e-4, "the cosine schedule's final learning rate")
    warmup_iters: int = setting(200, "linear warmup from 0", rule="nonnegative")
    lr_decay_iters: int = setting(0, "where the cosine reaches min_lr; 0: max_iters", rule="nonnegative")
    max_iters: int = setting(5000, "training iterations", rule="nonnegative")
    weight_decay: float = setting(0.0, "AdamW's, on matrices only", rule="off")
    beta1: float = setting(0.9, "AdamW", rule="fraction")
    beta2: float = setting(0.999, "AdamW", rule="fraction")
    grad_clip: float = setting(1.0, "clip the gradient's norm to this; 0: off", rule="off")
    ema: float = setting(0.0, "EMA of the weights, the official warm-up (paper: 0.9999); 0: off", rule="fraction")
    # evaluation and logging
    eval_interval: int = setting(500, "evaluate and save a checkpoint every this many iterations", rule="count")
    eval_iters: int = setting(20, "batches per split, the same windows and noise every time", rule="count")
    log_interval: int = setting(50, "a log line every this many iterations", rule="count")
    # system
    device: str = setting("auto", '"auto" (cuda if there is one), "cpu", "cuda", "cuda:1", ...', rule="device")
    dtype: str = setting("auto", '"auto" (bfloat16 on a GPU that has it, else float32), "bfloat16"', rule="dtype")
    compile: bool = setting(False, "torch.compile the transformer")
    peak_flops: float = setting(H100_BF16_FLOPS, "dense bf16 peak for MFU (default: H100 SXM); 0: no MFU", "off")
    seed: int = setting(1337, "seed of every random draw (windows, masks, orders, t, dropout)", rule="seed")

    def __post_init__(self):
        """The rules that span settings (each one's own: rule= or choices=; the model's: EsoLMConfig's)."""
        pure = self.alpha0 in (0, 1)  # one term of the NELBO only
        need(self, 0 < self.batch_split < 1 or pure, "batch_split",
             "must be in (0, 1) when 0 < alpha0 < 1: each batch feeds both terms of the NELBO")
        need(self, self.batch_size >= 2 or pure, "batch_size",
             "must be at least 2 when 0 < alpha0 < 1: one row for each term of the NELBO")
        need(self, self.learning_rate > 0, "learning_rate", "must be positive")
        need(self, 0 <= self.min_lr <= self.learning_rate, "min_lr", "must be in [0, learning_rate]")
        need(self, self.gradient_accumulation_steps % int(os.environ.get("WORLD_SIZE", 1)) == 0,  # set by torchrun
             "gradient_accumulation_steps", "must be a multiple of the number of processes")
        EsoLMConfig(**self.model_args())  # the model's own checks: sizes, dropout, variant, alpha0

    def model_args(self, vocab_size=256):
        keys = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "variant", "alpha0", "pos_emb")
        return {"vocab_size": vocab_size, **{k: getattr(self, k) for k in keys}}


# Presets replace the defaults above (the command line still wins): without a GPU, for `python train.py --alpha0=0.25`
# in about 4 minutes on 2 CPU cores (docs/training.md); for Sudoku (docs/sudoku.md)
CPU = dict(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, batch_size=8, learning_rate=1.5e-3,
           min_lr=1.5e-4, warmup_iters=100, max_iters=2800, eval_interval=1400, eval_iters=8, log_interval=100,
           peak_flops=0.0)
SUDOKU = dict(block_size=81, pos_emb=True, loss_type="low_var", dropout=0.0, peak_flops=0.0)
PRESETS = {"cpu": CPU, "sudoku cpu": {**CPU, **SUDOKU, "batch_size": 32, "learning_rate": 2e-3, "min_lr": 2e-4,
                                      "max_iters": 7000, "eval_interval": 1000},
           "sudoku gpu": {**SUDOKU, "n_layer": 8, "n_head": 8, "n_embd": 512, "batch_size": 256, "learning_rate": 5e-4,
                          "min_lr": 5e-5, "warmup_iters": 1000, "max_iters": 50_000, "eval_interval": 5000}}
SHAPE = ("block_size", "n_layer", "n_head", "n_embd", "variant", "pos_emb")  # a resumed run keeps these

# -----------------------------------------------------------------------------------------------------------
# settings, built once: the defaults, a preset, the model a resumed run or a published model starts from, the command
# line; then checked (TrainConfig.__post_init__, EsoLMConfig), before anything is read or written

overrides = parse_args(TrainConfig, doc=__doc__, notes={k: f"CPU: {v}" for k, v in CPU.items()})
kind = "gpu" if torch.cuda.is_available() and overrides.get("device", "auto") != "cpu" else "cpu"
dataset = overrides.get("dataset", TrainConfig.dataset)
preset = PRESETS.get(f"{dataset} {kind}", PRESETS.get(kind, {}))
init_from = overrides.get("init_from", TrainConfig.init_from)
resuming, ckpt, pretrained = init_from == "resume", None, None
try:  # the model a run starts from: a checkpoint's, or a published one's
    if resuming:
        ckpt = load_checkpoint(os.path.join(overrides.get("out_dir", TrainConfig.out_dir), "ckpt.pt"))
    elif init_from != "scratch" and is_published(init_from):
        pretrained = from_pretrained(init_from, alpha0=overrides.get("alpha0", TrainConfig.alpha0))
except (ValueError, OSError) as e:
    die(f"--init_from={init_from}: {e}")
start = checkpoint_config(ckpt) if ckpt else asdict(pretrained.config) if pretrained else {}
for k in SHAPE:  # the model keeps its shape; a published model may train at another L
    if k in start and k in overrides and overrides[k] != start[k] and (resuming or k != "block_size"):
        die(f"--{k}={overrides[k]}: differs from {'the checkpoint' if resuming else init_from}'s {start[k]} "
            "(the model keeps its shape)")
shape = {k: start[k] for k in SHAPE + ("alpha0",) if k in start}
cfg = build(TrainConfig, {**preset, **shape, **overrides})

# -----------------------------------------------------------------------------------------------------------
# setup: processes, device, precision

ddp = "RANK" in os.environ  # launched by torchrun
rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
master = rank == 0
device = resolve_device(cfg.device)
device_type = device.split(":")[0]
if ddp:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
grad_accum = cfg.gradient_accumulation_steps // world_size
amp, dtype = autocast(device, cfg.dtype)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 tensor cores, where there are
ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
if master:
    os.makedirs(cfg.out_dir, exist_ok=True)
    print(f"preset for {dataset} on the {kind}: {preset}\n" * bool(preset) + f"device {device}, dtype {dtype}, "
          f"{world_size} process(es)" + (f" ({dist.get_backend()})" if ddp else "") + "\n" + json.dumps(asdict(cfg)))


def seed_for(*keys):  # every draw of iteration i of process r comes from seed_for(r, i): a resume repeats it exactly
    return int(np.random.SeedSequence([cfg.seed, *keys]).generate_state(1)[0])


EVAL = 1 << 31  # a "rank" no process has: evaluation draws its own fixed windows and noise
# -----------------------------------------------------------------------------------------------------------
# data: windows of block_size tokens from memory-mapped shards (data.Windows), drawn uniformly with replacement

L = cfg.block_size
built_in = cfg.dataset in ("shakespeare", "sudoku")  # they build themselves: prepare_data.py, run as a user would
if built_in and not os.path.exists(os.path.join(cfg.data_dir, cfg.dataset, "meta.json")):
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py"),
           f"--data_dir={cfg.data_dir}"] + ["--sudoku"] * (cfg.dataset == "sudoku")
    if master and subprocess.run(cmd).returncode:
        die(f"--dataset={cfg.dataset}: {' '.join(cmd[1:])} failed")
    if ddp:
        dist.barrier()
try:
    windows = {split: Windows(cfg.data_dir, cfg.dataset, split, L) for split in ("train", "val")}
except (ValueError, OSError) as e:
    die(e)
meta = windows["train"].meta


def get_batch(split, rng):  # uniformly, with replacement
    x = torch.from_numpy(windows[split].batch(rng.integers(0, len(windows[split]), size=cfg.batch_size)))
    return x.pin_memory().to(device, non_blocking=True) if device_type == "cuda" else x


# -----------------------------------------------------------------------------------------------------------
# model (new, resumed from out_dir/ckpt.pt, or a published model to fine-tune) and AdamW, decay on matrices only

if start and start["vocab_size"] != meta["vocab_size"]:
    die(f"--init_from={cfg.init_from}: the model's vocab_size {start['vocab_size']} differs from {cfg.dataset}'s "
        f"{meta['vocab_size']}" + " (published models need GPT-2 tokens: prepare_data.py --tokenizer=gpt2)"
        * bool(pretrained))
options = {k: start[k] for k in ("bias", "gelu") if k in start}  # a published model's biases and tanh GELU
model_config = EsoLMConfig(**cfg.model_args(meta["vocab_size"]), **options)
torch.manual_seed(cfg.seed)
model = EsoLM(model_config).to(device)
if pretrained or ckpt:
    model.load_state_dict(pretrained.state_dict() if pretrained else ckpt["model"])
ema_model = EsoLM(model_config).to(device).eval().requires_grad_(False) if cfg.ema else None
if ema_model:
    ema_model.load_state_dict(ckpt["ema"] if ckpt and ckpt["ema"] else model.state_dict())
if master:
    print(f"model: {num_params(model) / 1e6:.2f}M parameters, {model_config}")
groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
          {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
if ckpt:
    optimizer.load_state_dict(ckpt["optimizer"])
iter_num, best_val = (ckpt["iter_num"], ckpt["best_val_loss"]) if ckpt else (0, math.inf)
resumed_at = iter_num if ckpt else None  # the checkpoint was evaluated when it was saved
ckpt = pretrained = None  # free the memory

# -----------------------------------------------------------------------------------------------------------
# compile, DDP; evaluation: the NELBO per token at the model's alpha0, on fixed windows with fixed noise


if cfg.compile:
    # the transformer forward (the loss's draws of masks and orders stay eager), with dynamic shapes: the AR term's
    # length changes with every draw of z0, and static graphs recompile for each new one until torch gives up
    model.compile(dynamic=True)
objective = Objective(model, cfg.batch_split, cfg.loss_type)  # model.loss_terms as a module's forward, for DDP
if ddp:
    objective = DDP(objective, device_ids=[local_rank] if device_type == "cuda" else None)


@torch.no_grad()
def evaluate(m):
    out = {}
    for split in ("train", "val"):
        rng = np.random.default_rng(seed_for(EVAL, 0))  # the same windows every time
        gen = torch.Generator(device=device).manual_seed(seed_for(EVAL, 1))  # the same t and masks every time
        with amp:
            nelbo = [m.nelbo(get_batch(split, rng), generator=gen).float().mean() for _ in range(cfg.eval_iters)]
        out[split] = torch.stack(nelbo).mean().item() / L
    return out


flops_per_iter = loss_flops(model, cfg.batch_size, cfg.batch_split) * cfg.gradient_accumulation_steps
tokens_per_iter = cfg.batch_size * L * cfg.gradient_accumulation_steps  # all processes together


def get_lr(it):  # a linear warmup, then constant, or a cosine to min_lr at lr_decay_iters (0: max_iters)
    if it < cfg.warmup_iters or cfg.lr_schedule == "constant":
        return cfg.learning_rate * min(1, (it + 1) / max(1, cfg.warmup_iters))
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, (cfg.lr_decay_iters or cfg.max_iters) - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def report(line, record):  # a line for the terminal, a record for out_dir/log.jsonl (the master process only)
    bar.write(line)
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
t_last, iters_since, t_start = time.time(), 0, time.time()
compile_note = cfg.compile and master
while True:
    if (iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters) and iter_num != resumed_at:
        stop_if_nonfinite()
        t_eval = time.time()
        losses = evaluate(ema_model or model)
        if master:
            bpb = f", {losses['val'] / math.log(2):.3f} bits/byte" if meta["tokenizer"] == "bytes" else ""
            report(f"iter {iter_num}: val NELBO {losses['val']:.4f} nats/token (ppl {math.exp(losses['val']):.2f}"
                   f"{bpb}), train {losses['train']:.4f}", {"iter": iter_num, **losses,
                                                              "seconds": time.time() - t_start})
            if not math.isfinite(losses["val"]):
                die(f"validation NELBO is {losses['val']} at iteration {iter_num}; {ckpt_path} left as it was")
            best_val = min(best_val, losses["val"])
            save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema_model and ema_model.state_dict(),
                            iter_num=iter_num, optimizer=optimizer.state_dict(), best_val_loss=best_val,
                            model_config=asdict(model_config), train_config=asdict(cfg), dataset_meta=meta,
                            rng={"seed": cfg.seed, "scheme": "seed_for"})
        t_last += time.time() - t_eval  # ms/iter counts training only
    if iter_num >= cfg.max_iters:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed_for(rank, iter_num))  # masks, orders, t and dropout of this iteration
    rng = np.random.default_rng(seed_for(rank, iter_num, 0))  # its windows
    terms = torch.zeros(2, device=device)  # the MDM and AR terms of this iteration, for the log
    for micro_step in range(grad_accum):
        if ddp:  # sync gradients on the last micro-step only
            objective.require_backward_grad_sync = micro_step == grad_accum - 1
        with amp:
            mdm, ar = objective(get_batch("train", rng))
        ((mdm + ar) / grad_accum).backward()
        terms += torch.stack([mdm, ar]).detach().float() / grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema_model:  # update n = iter_num + 1, counted from the iteration: a resumed run repeats it
        decay = ema_decay(cfg.ema, iter_num + 1)
        torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    nonfinite |= ~torch.isfinite(terms.sum())
    iter_num, iters_since = iter_num + 1, iters_since + 1
    bar.update(1)
    if compile_note:  # once: the first step is where torch.compile does its work
        bar.write(f"iteration {iter_num}: {time.time() - t_last:.1f} s, torch.compile compiled the model in it")
        compile_note = False

    if iter_num % cfg.log_interval == 0:
        stop_if_nonfinite()  # syncs with the device, so the timing below is honest
        if master:
            mdm, ar = terms.tolist()
            dt = (time.time() - t_last) / iters_since
            mfu = flops_per_iter / world_size / dt / cfg.peak_flops if cfg.peak_flops else None
            report(f"iter {iter_num}: loss {mdm + ar:.4f} (MDM {mdm:.4f} + AR {ar:.4f}), lr {lr:.2e}, grad norm "
                   f"{grad_norm.item():.3f}, {dt * 1000:.0f} ms/iter, {tokens_per_iter / dt:,.0f} tokens/s"
                   + (f", MFU {mfu:.1%}" if mfu else ""), {"iter": iter_num, "loss": mdm + ar, "mdm": mdm, "ar": ar,
                   "lr": lr, "grad_norm": grad_norm.item(), "ms_per_iter": dt * 1000,
                   "tokens_per_s": tokens_per_iter / dt, "mfu": mfu})
        t_last, iters_since = time.time(), 0

bar.close()
if ddp:
    dist.destroy_process_group()
