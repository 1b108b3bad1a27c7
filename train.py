"""Train an Eso-LM on token shards (prepare_data.py): one GPU, several (torchrun), or the CPU.

    python train.py --alpha0=0.25                  # Shakespeare; without a GPU, the CPU preset
    python train.py --init_from=resume             # go on with the run in --out_dir
    torchrun --standalone --nproc_per_node=4 train.py --gradient_accumulation_steps=4
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

from configurator import check, configure, fail
from data import Windows, load_checkpoint, save_checkpoint
from esolm import EsoLM, EsoLMConfig


@dataclass
class TrainConfig:
    # data and output
    dataset: str = "shakespeare"  # a folder of data_dir (shakespeare: made on first use)
    data_dir: str = "data"
    out_dir: str = "out"  # ckpt.pt and log.jsonl
    init_from: str = "scratch"  # or resume (out_dir/ckpt.pt), or a checkpoint (its weights)
    # the method and the model
    alpha0: float = 0.25  # what the model is trained for: 1 is an MDM, 0 an AR model
    variant: str = "B"  # B (cached in both phases), A (clean tokens see each other), MDLM
    batch_split: float = 0.5  # the share of a batch on the MDM term, the rest on the AR term
    loss_type: str = "elbo"  # or low_var: the MDM term unweighted (the paper's alpha0 = 1)
    block_size: int = 256  # L, the sequence length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1  # on the residual branches, as the paper's network
    pos_emb: bool = False  # a learned absolute position embedding too
    # optimisation (the paper: AdamW 3e-4, betas 0.9, 0.999, constant after warmup, clip 1)
    batch_size: int = 64  # sequences a micro-step and process
    gradient_accumulation_steps: int = 1  # micro-steps an iteration, over all processes
    learning_rate: float = 1e-3  # the peak, after warmup_iters; then a cosine to min_lr
    min_lr: float = 1e-4  # at lr_decay_iters; = learning_rate: constant, as the paper
    warmup_iters: int = 200
    lr_decay_iters: int = 0  # 0: max_iters
    max_iters: int = 5000
    weight_decay: float = 0.0  # on matrices only
    betas: tuple[float, ...] = (0.9, 0.999)  # AdamW's
    grad_clip: float = 1.0  # 0: off
    ema: float = 0.0  # the weights' EMA, warmed up as the official one (paper: 0.9999); 0: off
    # evaluation, logging, system
    eval_interval: int = 500  # evaluate, and save a checkpoint
    eval_iters: int = 20  # batches a split: the same windows and noise every time
    log_interval: int = 50
    device: str = "auto"  # auto: cuda if there is one; cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it, else float32
    compile: bool = False  # torch.compile the transformer
    peak_flops: float = 989e12  # for MFU: an H100 SXM's bf16 peak; 0: no MFU
    seed: int = 1337  # of every draw: windows, masks, orders, t, dropout


# without a GPU: the quick start, 3 to 5 minutes on 2 CPU cores
CPU = dict(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, batch_size=8,
           learning_rate=1.5e-3, min_lr=1.5e-4, warmup_iters=100, max_iters=2800,
           eval_interval=1400, eval_iters=8, log_interval=100, peak_flops=0.0)
SHAPE = ("block_size", "n_layer", "n_head", "n_embd", "variant", "pos_emb")  # a model keeps these

# --- settings: the defaults, the CPU preset without a GPU, the command line; checked first
preset = not torch.cuda.is_available() or "--device=cpu" in sys.argv
cfg = configure(TrainConfig, __doc__, defaults=CPU if preset else None)
pure, accum = cfg.alpha0 in (0, 1), cfg.gradient_accumulation_steps  # pure: one term only
for key, ok, rule in [
        ("batch_size", cfg.batch_size >= 2 - pure, "must be at least 2 (1 at alpha0 0 or 1)"),
        ("batch_split", 0 < cfg.batch_split < 1 or pure, "must be in (0, 1): rows for both terms"),
        ("learning_rate", cfg.learning_rate > 0, "must be positive"),
        ("min_lr", 0 <= cfg.min_lr <= cfg.learning_rate, "must be in [0, learning_rate]"),
        ("gradient_accumulation_steps", accum >= 1 and accum % int(os.environ.get(
            "WORLD_SIZE", 1)) == 0, "must be a multiple of the number of processes"),
        *[(k, getattr(cfg, k) >= 1, "must be at least 1")
          for k in ("eval_interval", "eval_iters", "log_interval")],
        *[(k, getattr(cfg, k) >= 0, "must be at least 0") for k in ("max_iters", "warmup_iters",
          "lr_decay_iters", "weight_decay", "grad_clip", "seed", "peak_flops")],
        ("betas", [0 <= b < 1 for b in cfg.betas] == [True, True], "must be two in [0, 1)"),
        ("ema", 0 <= cfg.ema < 1, "must be in [0, 1)"),
        ("loss_type", cfg.loss_type in ("elbo", "low_var"), "must be elbo or low_var"),
        ("dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "must be auto, bfloat16, float32"),
        ("device", cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda")
         and torch.cuda.is_available(), "is not a device here"),
        ("dataset", "/" not in cfg.dataset and cfg.dataset[:1] != ".", "must be a folder name"),
        ("out_dir", cfg.init_from == "resume" or not os.path.exists(f"{cfg.out_dir}/ckpt.pt"),
         "holds a run: resume it, or choose another")]:
    check(cfg, key, ok, rule)
ckpt, resuming, given = None, cfg.init_from == "resume", {a.split("=")[0][2:] for a in sys.argv}
if cfg.init_from != "scratch":  # a checkpoint's model keeps its shape and, unless told, alpha0
    try:
        ckpt = load_checkpoint(f"{cfg.out_dir}/ckpt.pt" if resuming else cfg.init_from)
    except ValueError as e:
        fail(f"--init_from={cfg.init_from}: {e}")
    check(cfg, "init_from", not resuming or ckpt["optimizer"], "its ckpt.pt has no optimizer")
    for key in SHAPE + ("alpha0",):
        value = ckpt["model_config"][key]
        ok = key not in given or key == "alpha0" or value == getattr(cfg, key)
        check(cfg, key, ok, f"the checkpoint's is {value}")
        setattr(cfg, key, getattr(cfg, key) if key in given else value)
config = {k: getattr(cfg, k) for k in ("dropout", "alpha0", *SHAPE)}  # and a converted model's:
config |= {k: v for k, v in (ckpt or {}).get("model_config", {}).items() if k in ("bias", "gelu")}
try:
    EsoLMConfig(**config, vocab_size=1)  # the model's own checks, before any work
except ValueError as e:
    fail(e)

# --- processes, device, precision
ddp = "RANK" in os.environ  # launched by torchrun
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world, master = int(os.environ.get("WORLD_SIZE", 1)), rank == 0
device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
gpu = device.startswith("cuda")
if ddp:
    dist.init_process_group("nccl" if gpu else "gloo")
    if gpu:
        torch.cuda.set_device(device := f"cuda:{local_rank}")
bf16 = gpu and torch.cuda.is_bf16_supported()
dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if bf16 else "float32"
amp = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
grad_accum = accum // world


def seed_for(*keys):  # iteration i of process r draws from seed_for(r, i): a resume repeats it
    return int(np.random.SeedSequence([cfg.seed, *keys]).generate_state(1)[0])


# --- data: windows of L tokens (data.Windows), drawn uniformly with replacement
L = cfg.block_size
if cfg.dataset == "shakespeare" and not os.path.exists(f"{cfg.data_dir}/shakespeare/meta.json"):
    prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
    if master and subprocess.call([sys.executable, prepare, f"--data_dir={cfg.data_dir}"]):
        fail("--dataset=shakespeare: prepare_data.py failed")
    if ddp:
        dist.barrier()
try:
    windows = {split: Windows(cfg.data_dir, cfg.dataset, split, L) for split in ("train", "val")}
except (ValueError, OSError) as e:
    fail(f"--dataset={cfg.dataset}: {e}")
meta = windows["train"].meta
vocab = ckpt and ckpt["model_config"]["vocab_size"]
check(cfg, "init_from", vocab in (None, meta["vocab_size"]), f"its vocabulary, {vocab} tokens, "
      f"is not {cfg.dataset}'s {meta['vocab_size']}")
try:
    os.makedirs(cfg.out_dir, exist_ok=True)
    open(f"{cfg.out_dir}/log.jsonl", "a").close()
except OSError as e:
    fail(f"--out_dir={cfg.out_dir}: {e.strerror}")


def get_batch(split, rng):
    x = windows[split].batch(rng.integers(0, len(windows[split]), size=cfg.batch_size))
    return x.pin_memory().to(device, non_blocking=True) if gpu else x


# --- the model (new, resumed, or a checkpoint's weights), its EMA, AdamW (decay on matrices)
model_config = EsoLMConfig(**config, vocab_size=meta["vocab_size"])
torch.manual_seed(cfg.seed)
model = EsoLM(model_config).to(device)
ema_model = EsoLM(model_config).to(device).eval().requires_grad_(False) if cfg.ema else None
model.load_state_dict(ckpt["model"] if ckpt else model.state_dict())
if ema_model:  # a resumed run's EMA, else the weights'
    ema_model.load_state_dict(ckpt["ema"] if resuming and ckpt["ema"] else model.state_dict())
n_params = sum(p.numel() for p in model.parameters())
if master:
    print(f"device {device}, {dtype}, {world} process(es)" + (f" ({dist.get_backend()})" if ddp
          else "") + ", CPU preset" * preset + f"\n{json.dumps(asdict(cfg))}\nmodel: "
          f"{n_params / 1e6:.2f}M parameters, {model_config}")
groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
          {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, cfg.learning_rate, cfg.betas,
                              weight_decay=cfg.weight_decay, fused=True)
if resuming:
    optimizer.load_state_dict(ckpt["optimizer"])
iter_num, best_val = (ckpt["iter_num"], ckpt["best_val_loss"]) if resuming else (0, math.inf)
resumed_at = iter_num if resuming else None  # that iteration was evaluated before it was saved

# --- compile, DDP; evaluation: the NELBO a token at the model's alpha0, fixed windows, noise
if cfg.compile:  # the forward, dynamic shapes: the AR term's length changes with every z0
    model.compile(dynamic=True)


class Objective(torch.nn.Module):  # model.loss as a forward: DDP syncs gradients in forward
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.loss(x, cfg.batch_split, cfg.loss_type)


objective = DDP(Objective(model), [local_rank] if gpu else None) if ddp else Objective(model)


@torch.no_grad()
def evaluate(m):
    out, was_training = {}, m.training
    m.eval()  # no dropout: the same value every time
    for split in ("train", "val"):
        rng = np.random.default_rng(seed_for(1 << 31, 0))  # a "rank" no process has
        gen = torch.Generator(device=device).manual_seed(seed_for(1 << 31, 1))
        with amp:
            nelbo = sum(m.nelbo(get_batch(split, rng), generator=gen).float().mean()
                        for _ in range(cfg.eval_iters))
        out[split] = nelbo.item() / cfg.eval_iters / L
    m.train(was_training)
    return out


def get_lr(it):  # a linear warmup, then a cosine to min_lr at lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * min(1, (it + 1) / max(1, cfg.warmup_iters))
    end = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, end - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# MFU: 6 FLOPs a weight and fed token + attention's 12 n_layer C L; an AR row feeds (2 - alpha0) L
tokens_per_iter = cfg.batch_size * L * accum  # all processes
s = cfg.batch_split if cfg.alpha0 > 0 else 0.0  # the MDM rows' share (at alpha0 = 1 any works)
flops_per_token = 6 * (n_params - model.wte.weight.numel()) + 12 * cfg.n_layer * cfg.n_embd * L
flops_per_iter = flops_per_token * tokens_per_iter * (s + (1 - s) * (2 - cfg.alpha0))


def log(line, record):  # a line for the terminal, a record for out_dir/log.jsonl
    print(line, flush=True)
    with open(f"{cfg.out_dir}/log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def stop_if_nonfinite():  # a sync with the device: call where one is due anyway
    if nonfinite.item():
        fail(f"NaN or inf loss by iteration {iter_num}; {cfg.out_dir}/ckpt.pt is the last good")


# --- training loop
nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # set on the device
t_last, iters_since, t_start = time.time(), 0, time.time()
while True:
    if (iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters) and iter_num != resumed_at:
        stop_if_nonfinite()
        losses = evaluate(ema_model or model)
        if master:
            log(f"iter {iter_num}: val NELBO {losses['val']:.4f} nats/token (ppl "
                f"{math.exp(losses['val']):.2f}), train {losses['train']:.4f}",
                {"iter": iter_num, **losses, "seconds": time.time() - t_start})
            if not math.isfinite(losses["val"]):
                fail(f"the validation NELBO is {losses['val']}; {cfg.out_dir}/ckpt.pt is kept")
            best_val = min(best_val, losses["val"])
            save_checkpoint(f"{cfg.out_dir}/ckpt.pt", model=model.state_dict(), ema=ema_model
                            and ema_model.state_dict(), optimizer=optimizer.state_dict(),
                            iter_num=iter_num, best_val_loss=best_val, train_config=asdict(cfg),
                            model_config=asdict(model_config), dataset_meta=meta)
        t_last, iters_since = time.time(), 0  # ms/iter counts training only
    if iter_num >= cfg.max_iters:
        break
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed_for(rank, iter_num))  # this iteration's masks, orders, t and dropout
    rng = np.random.default_rng(seed_for(rank, iter_num, 0))  # and its windows
    terms = torch.zeros(2, device=device)  # the MDM and AR terms, for the log
    for micro_step in range(grad_accum):
        if ddp:  # sync the gradients on the last micro-step only
            objective.require_backward_grad_sync = micro_step == grad_accum - 1
        with amp:
            mdm, ar = objective(get_batch("train", rng))
        ((mdm + ar) / grad_accum).backward()
        terms += torch.stack([mdm, ar]).detach().float() / grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema_model:  # update n = iter_num + 1 decays by min(ema, (1 + n) / (10 + n)): the warm-up
        decay = min(cfg.ema, (iter_num + 2) / (iter_num + 11))
        torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    nonfinite |= ~torch.isfinite(terms.sum())
    iter_num, iters_since = iter_num + 1, iters_since + 1
    if iter_num % cfg.log_interval == 0:
        stop_if_nonfinite()  # so the timing below is honest too
        if master:
            (mdm, ar), dt = terms.tolist(), (time.time() - t_last) / iters_since
            mfu = flops_per_iter / world / dt / cfg.peak_flops if cfg.peak_flops else None
            log(f"iter {iter_num}: loss {mdm + ar:.4f} (MDM {mdm:.4f} + AR {ar:.4f}), lr {lr:.2e}, "
                f"grad norm {grad_norm.item():.3f}, {dt * 1000:.0f} ms/iter, "
                f"{tokens_per_iter / dt:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu else ""),
                {"iter": iter_num, "loss": mdm + ar, "mdm": mdm, "ar": ar, "lr": lr,
                 "grad_norm": grad_norm.item(), "ms_per_iter": dt * 1000,
                 "tokens_per_s": tokens_per_iter / dt, "mfu": mfu})
        t_last, iters_since = time.time(), 0
if ddp:
    dist.destroy_process_group()
