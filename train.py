"""
Train an Eso-LM on token shards made by prepare_data.py: one GPU, several (torchrun), or the CPU.

    python train.py --alpha0=0.25                  # built-in Shakespeare; without a GPU, a CPU-sized preset
    python train.py --help                         # every setting, its default and what it does
    python train.py --init_from=resume             # continue the run in --out_dir
    python train.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-0_25 --dataset=owt --alpha0=0.25   # fine-tune
    torchrun --standalone --nproc_per_node=4 train.py --alpha0=0.25 --gradient_accumulation_steps=4

Settings are the fields of TrainConfig below, overridden with --key=value (values parsed as Python literals).
"""
import ast
import difflib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from esolm import LOSS_TYPES, EsoLM, EsoLMConfig, check
from runtime import (DTYPES, H100_BF16_FLOPS, autocast, load_checkpoint, load_model, loss_flops, num_params,
                     resolve_device, save_checkpoint)


def setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data and output
    dataset: str = setting("shakespeare", "folder of data_dir written by prepare_data.py; the default builds itself")
    data_dir: str = setting("data", "where the datasets are")
    out_dir: str = setting("out", "ckpt.pt and log.jsonl go here")
    init_from: str = setting("scratch", '"scratch", "resume" (from out_dir/ckpt.pt; the model\'s shape too), or a '
                             "published model to fine-tune: a hub id (owner/name) or a folder, GPT-2 data")
    # the method
    alpha0: float = setting(0.25, "fraction of tokens the diffusion phase unmasks: 1 = pure MDM, 0 = pure AR")
    batch_split: float = setting(0.5, "fraction of each batch that estimates the MDM term, the rest the AR term")
    variant: str = setting("B", '"B" (KV cache in both phases), "A" (bidirectional clean tokens) or "MDLM" (the '
                           'baseline: bidirectional everywhere, alpha0 = 1)')
    loss_type: str = setting("elbo", '"elbo" or "low_var" (unweighted MDM term, as the paper\'s alpha0 = 1 runs)')
    # model
    block_size: int = setting(256, "L, the sequence length")
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(6, "attention heads; n_embd / n_head must be even (RoPE)")
    n_embd: int = setting(384, "width")
    dropout: float = setting(0.1, "on the two residual branches of each block, as the paper's network")
    # optimisation (the paper: AdamW 3e-4, betas (0.9, 0.999), no weight decay, clip 1.0, constant LR after warmup)
    batch_size: int = setting(64, "sequences per micro-step and process")
    gradient_accumulation_steps: int = setting(1, "micro-steps per iteration, summed over all processes")
    learning_rate: float = setting(1e-3, "peak learning rate of AdamW")
    lr_schedule: str = setting("cosine", '"cosine" (to min_lr at lr_decay_iters) or "constant" after the warmup')
    min_lr: float = setting(1e-4, "the cosine schedule's final learning rate")
    warmup_iters: int = setting(200, "linear warmup from 0")
    lr_decay_iters: int = setting(0, "where the cosine reaches min_lr; 0: max_iters")
    max_iters: int = setting(5000, "training iterations")
    weight_decay: float = setting(0.0, "AdamW's, on matrices only")
    beta1: float = setting(0.9, "AdamW")
    beta2: float = setting(0.999, "AdamW")
    grad_clip: float = setting(1.0, "clip the gradient's norm to this; 0: off")
    ema: float = setting(0.0, "EMA of the weights, decay min(ema, (1 + n) / (10 + n)) at update n (paper: 0.9999); "
                         "0: off")
    # evaluation and logging
    eval_interval: int = setting(500, "evaluate and save a checkpoint every this many iterations, and at the end")
    eval_iters: int = setting(20, "batches per split, the same windows and noise at every evaluation")
    log_interval: int = setting(50, "a log line every this many iterations")
    # system
    device: str = setting("auto", '"auto" (cuda if there is one), "cpu", "cuda", "cuda:1", ...')
    dtype: str = setting("auto", '"auto" (bfloat16 on a GPU that has it, else float32), "bfloat16", "float32"')
    compile: bool = setting(False, "torch.compile the transformer")
    peak_flops: float = setting(H100_BF16_FLOPS, "the card's dense bf16 peak, for MFU (default: H100 SXM); 0: no MFU")
    seed: int = setting(1337, "seed of every random draw (windows, masks, orders, t, dropout)")

    def __post_init__(self):
        """Each setting's domain, checked before anything is read or written: a bad value is one line naming it."""
        def need(ok, key, rule):
            check(ok, key, getattr(self, key), rule)

        for f in fields(self):
            if f.type is float:
                need(math.isfinite(getattr(self, f.name)), f.name, "must be a finite number")
        need(self.init_from in ("scratch", "resume") or published(self.init_from), "init_from",
             'must be "scratch", "resume", or a published model: a hub id owner/name or a folder')
        for key, allowed in (("loss_type", LOSS_TYPES), ("lr_schedule", ("cosine", "constant")), ("dtype", DTYPES)):
            need(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}")
        need(self.dataset and "/" not in self.dataset, "dataset", "must be the name of a folder in data_dir")
        need(0 <= self.alpha0 <= 1, "alpha0", "must be in [0, 1] (0: pure AR, 1: pure MDM)")
        need(self.alpha0 == 1 or self.variant != "MDLM", "alpha0", "variant MDLM is a pure MDM: alpha0 = 1 only")
        pure = self.alpha0 == 0 or self.alpha0 == 1  # one term of the NELBO only
        need(0 < self.batch_split < 1 or pure, "batch_split",
             "must be in (0, 1) when 0 < alpha0 < 1: each batch feeds both terms of the NELBO")
        for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            need(getattr(self, key) >= 1, key, "must be at least 1")
        need(self.batch_size >= 2 or pure, "batch_size",
             "must be at least 2 when 0 < alpha0 < 1: one row for each term of the NELBO")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(0 <= self.min_lr <= self.learning_rate, "min_lr", "must be in [0, learning_rate]")
        for key in ("warmup_iters", "lr_decay_iters", "max_iters", "seed"):
            need(getattr(self, key) >= 0, key, "must be at least 0")
        for key in ("weight_decay", "grad_clip", "peak_flops"):
            need(getattr(self, key) >= 0, key, "must be at least 0 (0: off)")
        for key in ("beta1", "beta2", "ema"):
            need(0 <= getattr(self, key) < 1, key, "must be in [0, 1)")
        world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
        need(self.gradient_accumulation_steps % world_size == 0, "gradient_accumulation_steps",
             f"must be a multiple of the number of processes ({world_size})")
        resolve_device(self.device)
        try:
            prepare_data.check_writable(self.out_dir)
        except prepare_data.DataError as e:
            need(False, "out_dir", str(e))
        EsoLMConfig(**self.model_args())  # the model's own checks: sizes, dropout, variant

    def model_args(self, vocab_size=256):
        return dict(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                    n_embd=self.n_embd, dropout=self.dropout, variant=self.variant)


MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "variant")  # a resumed run takes these from its checkpoint


def published(init_from):
    """Whether --init_from names a published model (EsoLM.from_pretrained): a folder, or a hub id owner/name."""
    return os.path.isdir(init_from) or re.fullmatch(r"[\w.-]+/[\w.-]+", init_from) is not None

# Without a GPU these replace the defaults above (settings given on the command line still win): sized so that
# `python train.py --alpha0=0.25` trains in under 6 minutes on 2 CPU cores. On a CPU, many small steps learn more
# per second than few big ones (in tuning runs of about the same time, batch 8 x 3000 steps reached a lower NELBO
# than batch 32 x 700 and than batch 16; 2800 steps leave a margin under 6 minutes).
CPU_PRESET = dict(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, batch_size=8, learning_rate=1.5e-3,
                  min_lr=1.5e-4, warmup_iters=100, max_iters=2800, eval_interval=1400, eval_iters=8, log_interval=100,
                  peak_flops=0.0)


def die(msg):
    raise SystemExit(f"train.py: {msg}")


def print_help():
    print(__doc__)
    print("Settings (--key=value; without a GPU the defaults start from the CPU preset, in brackets):")
    for f in fields(TrainConfig):
        preset = f" [{CPU_PRESET[f.name]}]" if f.name in CPU_PRESET else ""
        print(f"  --{f.name}={f.default!r}{preset}".ljust(46) + f.metadata["help"])


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
            die(f"--{key}={text}: takes a {types[key].__name__}")
        out[key] = value
    return out


# -----------------------------------------------------------------------------------------------------------
# settings, built once: defaults, the CPU preset when no GPU will be used, the model shape of a resumed run or a
# published model, the command line; then validated (TrainConfig.__post_init__), before anything is read or written

overrides = parse_overrides(sys.argv[1:])
on_gpu = torch.cuda.is_available() and overrides.get("device", "auto") != "cpu"
init_from = overrides.get("init_from", TrainConfig.init_from)
resuming = init_from == "resume"
start, pretrained = {}, None  # the model config the run starts from (a checkpoint's or a published model's)
if resuming:
    try:
        ckpt = load_checkpoint(os.path.join(overrides.get("out_dir", TrainConfig.out_dir), "ckpt.pt"))
    except ValueError as e:
        die(f"--init_from=resume: {e}")
    start = ckpt["model_config"]
elif init_from != "scratch" and published(init_from):
    try:
        pretrained, _ = load_model("", init_from)
    except ValueError as e:
        die(e)
    start = asdict(pretrained.config)
shape = {k: start[k] for k in MODEL_KEYS if k in start}
for k in shape:  # the model keeps its shape; a published model may train at another L
    if k in overrides and overrides[k] != shape[k] and (resuming or k != "block_size"):
        die(f"--{k}={overrides[k]}: differs from {'the checkpoint' if resuming else init_from}'s {shape[k]} (the "
            "model keeps its shape)")
try:
    cfg = TrainConfig(**{**({} if on_gpu else CPU_PRESET), **shape, **overrides})
except ValueError as e:
    die(e)

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
torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores (TF32), where there are any
torch.backends.cudnn.allow_tf32 = True
ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
if master:
    if not on_gpu:
        print("no GPU: starting from the CPU preset " + ", ".join(f"{k}={v}" for k, v in CPU_PRESET.items()))
    os.makedirs(cfg.out_dir, exist_ok=True)
    backend = f" ({dist.get_backend()})" if ddp else ""
    print(f"device {device}, dtype {dtype}, {world_size} process(es){backend}\n" + json.dumps(asdict(cfg)))


def seed_for(*keys):
    """Every random draw of iteration i of process `rank` comes from seed_for(rank, i): a resumed run repeats the
    uninterrupted one exactly, and the checkpoint's RNG state is just the seed and the iteration."""
    return int(np.random.SeedSequence([cfg.seed, *keys]).generate_state(1)[0])


EVAL = 1 << 31  # a "rank" no process has: evaluation draws its own fixed windows and noise

# -----------------------------------------------------------------------------------------------------------
# data: windows of block_size tokens from memory-mapped shards, drawn uniformly with replacement

data_path = os.path.join(cfg.data_dir, cfg.dataset)
if not os.path.exists(os.path.join(data_path, "meta.json")) and cfg.dataset == "shakespeare":
    if master:
        print(f"{data_path} not found: preparing the built-in corpus (python prepare_data.py)")
        prepare_data.main(["--data_dir", cfg.data_dir])
    if ddp:
        dist.barrier()
L = cfg.block_size
windows = {}  # split -> (its shards longer than L, the cumulative count of their windows)
try:
    meta = prepare_data.load_meta(cfg.data_dir, cfg.dataset)
    for split in ("train", "val"):
        arrays = [prepare_data.read_shard(os.path.join(data_path, f)) for f in meta[f"{split}_shards"]]
        arrays = [a for a in arrays if len(a) > L]
        windows[split] = arrays, np.cumsum([len(a) - L + 1 for a in arrays])
        if not arrays:
            die(f"{data_path}: no {split} shard holds more than block_size={L} tokens")
except (ValueError, OSError) as e:
    die(str(e))


def window(split, i):
    """The i-th window of a split, numbering the windows of its shards one shard after another."""
    arrays, ends = windows[split]
    s = int(np.searchsorted(ends, i, side="right"))
    start = i - (ends[s - 1] if s else 0)
    return arrays[s][start:start + L]


def get_batch(split, rng):
    ix = rng.integers(0, windows[split][1][-1], size=cfg.batch_size)
    x = torch.from_numpy(np.stack([window(split, i) for i in ix]).astype(np.int64))
    return x.pin_memory().to(device, non_blocking=True) if device_type == "cuda" else x


# -----------------------------------------------------------------------------------------------------------
# model: new, resumed from out_dir/ckpt.pt, or a published model to fine-tune

if start and start["vocab_size"] != meta["vocab_size"]:
    hint = "" if resuming else " (published models need a dataset in GPT-2 tokens: prepare_data.py --tokenizer gpt2)"
    die(f"--init_from={cfg.init_from}: the model's vocab_size {start['vocab_size']} differs from {cfg.dataset}'s "
        f"{meta['vocab_size']}{hint}")
options = {k: start[k] for k in ("bias", "gelu") if k in start}  # a published model's biases and tanh GELU
model_config = EsoLMConfig(**cfg.model_args(meta["vocab_size"]), **options)
torch.manual_seed(cfg.seed)
model = EsoLM(model_config).to(device)
if pretrained is not None:
    model.load_state_dict(pretrained.state_dict())
    pretrained = None
elif resuming:
    model.load_state_dict(ckpt["model"])
ema_model = None
if cfg.ema:
    ema_model = EsoLM(model_config).to(device).eval().requires_grad_(False)
    ema_model.load_state_dict(ckpt["ema"] if resuming and ckpt["ema"] else model.state_dict())
if master:
    print(f"model: {num_params(model) / 1e6:.2f}M parameters, vocab {model_config.vocab_size}, "
          f"variant {model_config.variant}")

# -----------------------------------------------------------------------------------------------------------
# optimizer: AdamW, weight decay on matrices only

params = [p for p in model.parameters() if p.requires_grad]
groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
if resuming:
    optimizer.load_state_dict(ckpt["optimizer"])
iter_num = ckpt["iter_num"] if resuming else 0
resumed_at = iter_num if resuming else None  # the checkpoint was evaluated when it was saved
best_val = ckpt["best_val_loss"] if resuming else math.inf
ckpt = None  # free the memory

# -----------------------------------------------------------------------------------------------------------
# compile, DDP


class Objective(torch.nn.Module):
    """model.loss_terms as a forward pass: DDP syncs gradients through the module's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.loss_terms(x, cfg.alpha0, cfg.batch_split, cfg.loss_type)


if cfg.compile:
    # the transformer forward (the loss's draws of masks and orders stay eager), with dynamic shapes: the AR term's
    # length changes with every draw of z0, and static graphs recompile for each new one until torch gives up
    model.compile(dynamic=True)
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
        with amp:
            nelbo = [m.nelbo(get_batch(split, rng), cfg.alpha0, gen).float().mean() for _ in range(cfg.eval_iters)]
        out[split] = torch.stack(nelbo).mean().item() / L
    return out


flops_per_iter = loss_flops(model, cfg.batch_size, cfg.alpha0, cfg.batch_split) * cfg.gradient_accumulation_steps
tokens_per_iter = cfg.batch_size * L * cfg.gradient_accumulation_steps  # all processes together


def get_lr(it):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


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
compile_note = cfg.compile and master
while True:
    if (iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters) and iter_num != resumed_at:
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
            save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema_model.state_dict() if ema_model else None,
                            optimizer=optimizer.state_dict(), iter_num=iter_num, best_val_loss=best_val,
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
    if ema_model:  # with the official warm-up: early on, the average forgets the random init quickly
        n = iter_num + 1  # updates so far, this one included, counted from the iteration: a resume repeats it
        decay = min(cfg.ema, (1 + n) / (10 + n))
        torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    nonfinite |= ~torch.isfinite(terms.sum())
    iter_num += 1
    iters_since += 1
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
            bar.write(f"iter {iter_num}: loss {mdm + ar:.4f} (MDM {mdm:.4f} + AR {ar:.4f}), lr {lr:.2e}, "
                      f"grad norm {grad_norm.item():.3f}, {dt * 1000:.0f} ms/iter, {tokens_per_iter / dt:,.0f} tokens/s"
                      + (f", MFU {mfu:.1%}" if mfu else ""))
            log({"iter": iter_num, "loss": mdm + ar, "mdm": mdm, "ar": ar, "lr": lr, "grad_norm": grad_norm.item(),
                 "ms_per_iter": dt * 1000, "tokens_per_s": tokens_per_iter / dt, "mfu": mfu})
        t_last, iters_since = time.time(), 0

bar.close()
if ddp:
    dist.destroy_process_group()
