"""
Sample from a checkpoint written by train.py, or from one of the paper's published models.

    python sample.py --out_dir=out                                # samples at the alpha0 the model trained with
    python sample.py --out_dir=out --show                         # watch sample 1 decode, one frame per network call
    python sample.py --out_dir=out --alpha0=1 --steps=32          # any alpha0 and number of diffusion steps
    python sample.py --out_dir=out --prompt="**ROMEO**"           # continue a prefix
    python sample.py --out_dir=out --infill="**ROMEO**
[[60]]
**JULIET**"                                                       # [[n]]: n tokens to generate there
    python sample.py --out_dir=out --alpha0=1 --subcontext_len=16     # the paper's structured order: NFE 16
    python sample.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-0_25 --alpha0=0.25 --prompt="The"
    python sample.py --explain                                    # the README's worked example, printed by the code

Positions after the prompt or template are generated too. Each sample is cut at its first end-of-text token after
the prompt (--no-cut_eot keeps the whole canvas). Each batch prints its number of network calls (NFE) and wall
time; for byte-level data, the share of the samples' words that occur in the training text follows.
"""
import argparse
import re
import sys
import time

import torch

import prepare_data
from esolm import EsoLM, EsoLMConfig, random_plan
from runtime import autocast, check_args, load_model

MASK_GLYPH = "\u2591"  # how --show draws a position that is still masked


def encode_template(text, tokenizer, mask_id):
    """Text with [[n]] markers -> token ids, each marker replaced by n mask ids (positions to generate)."""
    ids = []
    for i, piece in enumerate(re.split(r"\[\[(\d+)\]\]", text)):
        ids += [mask_id] * int(piece) if i % 2 else list(tokenizer.encode(piece))
    return ids


def cut_at_eot(row, start, eot_id):
    """The tokens of a sample up to its first end-of-text token at or after `start` (the prompt's end)."""
    return row[:row.index(eot_id, start)] if eot_id in row[start:] else row


def render(row, decoded, tokenizer):
    """The canvas of one sample: the runs of decoded positions as text, each other position as MASK_GLYPH."""
    text, i = [], 0
    while i < len(row):
        j = i
        while j < len(row) and decoded[j] == decoded[i]:
            j += 1
        text.append(tokenizer.decode(row[i:j]) if decoded[i] else MASK_GLYPH * (j - i))
        i = j
    return "".join(text)


def show(row, call, nfe, tokenizer):
    """Replay the decoding of one sample: the canvas after each network call (call[i]: the call that decoded
    position i, 0 for the prompt). In a terminal the frames redraw in place over about 8 seconds; piped, at most
    24 of them are printed, evenly spaced."""
    tty = sys.stdout.isatty()
    frames = range(nfe + 1) if tty else sorted({round(i * nfe / 23) for i in range(24)})
    for c in frames:
        head = f"---------- after call {c} of {nfe}: {call.count(c)} new token(s), {sum(k > c for k in call)} masked"
        canvas = render(row, [k <= c for k in call], tokenizer)
        if tty:
            print("\x1b[H\x1b[J" + head + "\n" + canvas, flush=True)  # home and clear, then draw
            time.sleep(min(0.3, max(0.02, 8 / max(nfe, 1))))
        else:
            print(head + "\n" + canvas)


def explain(L=8, alpha0=0.5, steps=4, seed=16):
    """The README's worked example, printed by the code: Eso-LM (B) sampling L = 8 tokens at alpha0 = 0.5 with a
    tiny random model (letters for tokens, _ for a mask), call by call: what each call feeds and decodes."""
    torch.manual_seed(seed)
    model = EsoLM(EsoLMConfig(vocab_size=26, block_size=L, n_layer=1, n_head=2, n_embd=16)).double()
    letters = [chr(ord("a") + i) for i in range(26)] + ["_"]
    out = model.generate(1, alpha0, steps, generator=torch.Generator().manual_seed(seed))
    # the plan generate drew first from the same generator: the order, the tokens per call, the sequential calls
    to_gen = torch.ones(1, L, dtype=torch.bool)
    plan = random_plan(to_gen, alpha0, steps, torch.Generator().manual_seed(seed))
    order, ks, n_seq = plan
    order, x, call = order[0].tolist(), out.x[0].tolist(), out.calls[0].tolist()
    n_diffusion = L - n_seq
    print(f"Eso-LM (B), L = {L}, alpha0 = {alpha0}, T = {steps} diffusion steps, a tiny random model (seed {seed})\n")
    print(f"generation order: positions {' '.join(map(str, order[:n_diffusion]))} | "
          f"{' '.join(map(str, order[n_diffusion:]))}")
    print(f"  the diffusion phase decodes {n_diffusion} positions in a random order, then the sequential phase the "
          f"other {n_seq} left to right")
    print("sorted layout: cache slot i holds the i-th position of the order, which RoPE rotates it by")
    print("  slot      " + " ".join(f"{i:2d}" for i in range(L)))
    print("  position  " + " ".join(f"{p:2d}" for p in order))
    print("  token     " + " ".join(f"{letters[x[p]]:>2s}" for p in order) + "\n")
    print("call  phase       k  decodes positions  feeds slots  n_cached  canvas after the call")
    for i, f in enumerate(model.feeds(plan)):
        phase = "diffusion" if i < len(ks) - n_seq else "sequential"
        canvas = "".join(letters[x[p]] if call[p] <= i + 1 else "_" for p in range(L))
        decoded = " ".join(map(str, order[f.d:f.d + f.k]))
        print(f"{i + 1:4d}  {phase:10s}  {f.k}  {decoded:17s}  [{f.n_cached}, {f.d + f.k})       {f.n_cached:<8d}  "
              f"{canvas}")
    z0 = "".join(letters[x[p]] if call[p] <= len(ks) - n_seq else "_" for p in range(L))
    print(f"\nz0 (the canvas the sequential phase starts from): {z0}\nx  (the sample):                                 "
          f"{''.join(letters[t] for t in x)}")


def die(msg):
    raise SystemExit(f"sample.py: {msg}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    parser.add_argument("--init_from", default="", help="a published model instead: hub id or folder (GPT-2 tokens)")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=0, help="samples per call of generate (0: all at once)")
    parser.add_argument("--alpha0", type=float, default=None, help="default: the value the model trained with")
    parser.add_argument("--steps", type=int, default=0, help="diffusion steps T (0: block_size)")
    parser.add_argument("--subcontext_len", type=int, default=0,
                        help="S: the structured order, call j decodes offset j of every length-S chunk (0: random)")
    parser.add_argument("--subcontext_shuffle", action="store_true", help="the offsets, and each call, in random order")
    parser.add_argument("--temperature", type=float, default=0.8, help="as nanoGPT's sample.py; 1: the model's own")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, as the paper's samples; 1: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--infill", default="", help="template: text with [[n]] where n tokens are to be generated")
    parser.add_argument("--show", action="store_true", help="watch sample 1 decode: the canvas after each network call")
    parser.add_argument("--cut_eot", action=argparse.BooleanOptionalAction, default=True,
                        help="cut each sample at its first end-of-text token after the prompt")
    parser.add_argument("--kv_cache", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on, off for MDLM (which has none); --no-kv_cache: the uncached reference")
    parser.add_argument("--compile", action="store_true", help="the cached calls as static-shape compiled graphs")
    parser.add_argument("--explain", action="store_true", help="print the worked example of the README and exit")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights if saved")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU that has it), bfloat16 or float32")
    args = parser.parse_args(argv)
    if args.explain:
        return explain()
    try:  # every setting is checked here, before the model is read
        device = check_args(args, (
            ("num_samples", args.num_samples >= 1, "must be at least 1"),
            ("batch_size", args.batch_size >= 0, "must be at least 1, or 0 for all samples at once"),
            ("steps", args.steps >= 0, "must be at least 1, or 0 for block_size"),
            ("subcontext_len", args.subcontext_len >= 0, "must be at least 1, or 0 for the random order"),
            ("temperature", args.temperature >= 0, "must be at least 0 (0: greedy)"),
            ("top_p", 0 < args.top_p <= 1, "must be in (0, 1] (1: no nucleus filter)"),
            ("infill", not (args.prompt and args.infill), "give --prompt or --infill, not both")))
        model, ckpt = load_model(args.out_dir, args.init_from, device, args.ema)
        tokenizer = prepare_data.get_tokenizer(ckpt["dataset_meta"]["tokenizer"] if ckpt else "gpt2")
    except ValueError as e:
        die(e)
    source = f"{args.out_dir}/ckpt.pt: iter {ckpt['iter_num']}" if ckpt else args.init_from
    trained_alpha0 = ckpt["train_config"]["alpha0"] if ckpt else None
    config = model.config
    alpha0 = trained_alpha0 if args.alpha0 is None else args.alpha0
    if alpha0 is None:
        die(f"--alpha0: needed for {args.init_from} (its config does not say which alpha0 it was trained with)")
    if trained_alpha0 is not None and alpha0 != trained_alpha0:
        print(f"note: sampling at alpha0={alpha0}, but the model trained at {trained_alpha0}: it saw diffusion "
              f"contexts with at most about {trained_alpha0:.0%} clean tokens", file=sys.stderr)
    steps = args.steps or config.block_size

    prompt, ids = None, []
    if args.prompt or args.infill:
        ids = encode_template(args.infill, tokenizer, model.mask_id) if args.infill else tokenizer.encode(args.prompt)
        if len(ids) > config.block_size:
            flag = "--infill" if args.infill else "--prompt"
            die(f"{flag}: {len(ids)} tokens, more than block_size={config.block_size}")
        prompt = torch.tensor(ids, dtype=torch.long, device=device)
    generated = [i >= len(ids) or ids[i] == model.mask_id for i in range(config.block_size)]  # not given

    generator = torch.Generator(device=device).manual_seed(args.seed)
    amp, dtype = autocast(device, args.dtype)
    print(f"{source}, variant {config.variant}, L = {config.block_size}; sampling alpha0={alpha0}, steps={steps}, "
          f"temperature={args.temperature}, top_p={args.top_p}, "
          f"kv_cache={'default' if args.kv_cache is None else args.kv_cache}, {dtype}"
          + (f", subcontext_len={args.subcontext_len}{' shuffled' if args.subcontext_shuffle else ''}"
             if args.subcontext_len else ""))
    batch_size = args.batch_size or args.num_samples
    texts, n_cut = [], 0
    for first in range(0, args.num_samples, batch_size):
        n = min(batch_size, args.num_samples - first)
        t0 = time.time()
        try:
            with amp:
                x, call, nfe, _ = model.generate(
                    n, alpha0, steps, temperature=args.temperature, top_p=args.top_p, prompt=prompt,
                    subcontext_len=args.subcontext_len, subcontext_shuffle=args.subcontext_shuffle,
                    kv_cache=args.kv_cache, compile=args.compile, generator=generator)
        except ValueError as e:
            die(e)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        if args.show and first == 0:
            show(x[0].tolist(), call[0].tolist(), nfe, tokenizer)
        for i, row in enumerate(x.tolist()):
            kept = cut_at_eot(row, len(ids), tokenizer.eot_id) if args.cut_eot else row
            n_cut += len(kept) < len(row)
            texts.append(render(kept, generated, tokenizer))  # the given tokens drawn as glyphs: not words
            print(f"---------- sample {first + i + 1}\n{tokenizer.decode(kept)}")
        print(f"---------- batch of {n}: NFE {nfe}, {dt:.2f} s")
    if args.cut_eot:
        print(f"{n_cut} of {args.num_samples} samples cut at an end-of-text token (--no-cut_eot keeps them whole)")
    if ckpt and tokenizer.name == "bytes":
        from evaluate import corpus_word_rate, training_words
        vocabulary = training_words(ckpt["train_config"]["data_dir"], ckpt["train_config"]["dataset"])
        print(f"corpus word rate: {corpus_word_rate(texts, vocabulary):.1%} of the samples' words (prompt excluded) "
              "occur in the training text")


if __name__ == "__main__":
    main()
