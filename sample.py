"""
Sample from a checkpoint written by train.py.

    python sample.py --out_dir=out                                # 4 samples at the alpha0 the model trained with
    python sample.py --out_dir=out --alpha0=1 --steps=32          # any alpha0 and number of diffusion steps
    python sample.py --out_dir=out --prompt="**ROMEO**"           # continue a prefix
    python sample.py --out_dir=out --infill="**ROMEO**
[[60]]
**JULIET**"                                                       # [[n]]: n tokens to generate there

Positions after the prompt or template are generated too. Each batch prints its number of network calls (NFE)
and wall time.
"""
import argparse
import os
import re
import time
from contextlib import nullcontext

import torch

import prepare_data
from esolm import EsoLM, EsoLMConfig

CHECKPOINT_FORMAT = "esolm-checkpoint"
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "iter_num", "best_val_loss", "model_config", "train_config",
                   "dataset_meta")


def load_checkpoint(path, device="cpu"):
    """torch.load with weights_only=True, so a tampered pickle cannot run code, then check that it is ours."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors and plain data, or a damaged file
        raise ValueError(f"{path} is not a checkpoint of this project, or is damaged: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this project (it has no {CHECKPOINT_FORMAT!r} tag)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return ckpt


def encode_template(text, tokenizer, mask_id):
    """Text with [[n]] markers -> token ids, each marker replaced by n mask ids (positions to generate)."""
    ids = []
    for i, piece in enumerate(re.split(r"\[\[(\d+)\]\]", text)):
        ids += [mask_id] * int(piece) if i % 2 else list(tokenizer.encode(piece))
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=0, help="samples per call of generate (0: all at once)")
    p.add_argument("--alpha0", type=float, default=None, help="default: the value the model trained with")
    p.add_argument("--steps", type=int, default=0, help="diffusion steps T (0: block_size)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; the paper shows samples at 0.9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--infill", default="", help="template: text with [[n]] where n tokens are to be generated")
    p.add_argument("--kv_cache", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights if saved")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if args.prompt and args.infill:
        p.error("give --prompt or --infill, not both")

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), device)
        tokenizer = prepare_data.get_tokenizer(ckpt["dataset_meta"]["tokenizer"])
    except ValueError as e:
        raise SystemExit(f"sample.py: {e}")
    config = EsoLMConfig(**ckpt["model_config"])
    model = EsoLM(config)
    model.load_state_dict(ckpt["ema"] if args.ema and ckpt["ema"] else ckpt["model"])
    model.to(device).eval()
    alpha0 = ckpt["train_config"]["alpha0"] if args.alpha0 is None else args.alpha0
    steps = args.steps or config.block_size

    prompt = None
    if args.prompt or args.infill:
        ids = encode_template(args.infill, tokenizer, model.mask_id) if args.infill else tokenizer.encode(args.prompt)
        if len(ids) > config.block_size:
            raise SystemExit(f"sample.py: the prompt is {len(ids)} tokens, more than block_size={config.block_size}")
        prompt = torch.tensor(ids, dtype=torch.long, device=device)

    nfe = 0

    def count_call(*_):
        nonlocal nfe
        nfe += 1

    model.register_forward_hook(count_call)  # one network call (NFE) per forward of the whole model
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    print(f"{args.out_dir}/ckpt.pt: iter {ckpt['iter_num']}, variant {config.variant}, L = {config.block_size}; "
          f"sampling alpha0={alpha0}, steps={steps}, temperature={args.temperature}, top_p={args.top_p}, "
          f"kv_cache={args.kv_cache}")
    batch_size = args.batch_size or args.num_samples
    for first in range(0, args.num_samples, batch_size):
        n = min(batch_size, args.num_samples - first)
        nfe, t0 = 0, time.time()
        try:
            with autocast:
                x = model.generate(n, alpha0, steps, args.temperature, args.top_p, prompt, args.kv_cache, generator)
        except ValueError as e:
            raise SystemExit(f"sample.py: {e}")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        for i, row in enumerate(x.tolist()):
            print(f"---------- sample {first + i + 1}\n{tokenizer.decode(row)}")
        print(f"---------- batch of {n}: NFE {nfe}, {dt:.2f} s")


if __name__ == "__main__":
    main()
