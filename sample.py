"""
Sample from a checkpoint written by train.py, or from one of the paper's published models.

    python sample.py --out_dir=out                              # at the alpha0 the model was trained for
    python sample.py --out_dir=out --show                       # watch sample 1 decode, one frame per network call
    python sample.py --out_dir=out --alpha0=1 --steps=32 --prompt="**ROMEO**"   # alpha0, T steps, a prefix
    python sample.py --out_dir=out --infill="**ROMEO** [[60]] **JULIET**"   # [[n]]: n tokens to generate there
    python sample.py --out_dir=out --adaptive=margin            # the model chooses the order as it decodes
    python sample.py --out_dir=out --alpha0=1 --subcontext_len=16          # the paper's structured order: NFE 16
    python sample.py --init_from=sahoo-diffusion/Eso-LM-B-alpha-0_25 --prompt="The"
    python sample.py --explain                                  # the README's worked example, printed by the code

Each sample is cut at its first end-of-text token after the prompt; each batch prints its network calls (NFE) and time.
"""
import itertools
import sys
import time
from dataclasses import dataclass

import torch

from data import encode_template, get_tokenizer
from esolm import EsoLM, EsoLMConfig, SettingError, random_plan
from metrics import corpus_word_rate, training_words
from runtime import as_flag, autocast, configure, die, load_model, need, resolve_device, setting, sync
from static_cache import StaticCalls

MASK_GLYPH = "\u2591"  # how --show draws a position that is still masked


@dataclass
class Settings:
    out_dir: str = setting("out", "folder holding ckpt.pt")
    init_from: str = setting("", "a published model instead: hub id or folder (GPT-2 tokens)")
    num_samples: int = setting(4, "samples to draw", rule="num_samples")
    batch_size: int = setting(0, "samples per call of generate (0: all at once)", rule="nonnegative")
    alpha0: float | None = setting(None, "default: the alpha0 the model was trained for", rule="alpha0")
    steps: int | None = setting(None, "diffusion steps T (default: L)", rule="steps")
    subcontext_len: int = setting(0, "S: the structured order, call j decodes offset j of every length-S chunk "
                                  "(0: random)", rule="subcontext_len")
    subcontext_shuffle: bool = setting(False, "the offsets, and each call, in random order")
    adaptive: str | None = setting(None, "confidence or margin: each call decodes the masks the model is surest of",
                                   rule="adaptive")
    temperature: float = setting(0.8, "as nanoGPT's sample.py; 1: the model's own", rule="temperature")
    top_p: float = setting(0.9, "nucleus sampling, as the paper's samples; 1: off", rule="top_p")
    seed: int = setting(0, "of the plan, the orders and the tokens", rule="seed")
    prompt: str = setting("", "text to continue")
    infill: str = setting("", "template: text with [[n]] where n tokens are to be generated")
    show: bool = setting(False, "watch sample 1 decode: the canvas after each network call")
    cut_eot: bool = setting(True, "cut each sample at its first end-of-text token after the prompt")
    kv_cache: bool | None = setting(None, "default: on, off for MDLM (which has none); False: the uncached reference")
    compile: bool = setting(False, "the cached calls as static-shape compiled graphs (static_cache.py)")
    explain: bool = setting(False, "print the worked example of the README and exit")
    ema: bool = setting(True, "use the EMA weights if saved")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...", rule="device")
    dtype: str = setting("auto", "auto (bfloat16 on a GPU that has it), bfloat16 or float32", rule="dtype")

    def __post_init__(self):
        need(self, not (self.prompt and self.infill), "infill", "and --prompt: give one of them, not both")
        need(self, not self.compile or self.kv_cache is not False, "compile", "compiles the cached calls: it needs "
             "the KV cache (not --kv_cache=False)")


def render(row, decoded, tokenizer):
    """The canvas of one sample: the runs of decoded positions as text, each other position as MASK_GLYPH."""
    runs = [list(run) for _, run in itertools.groupby(range(len(row)), key=decoded.__getitem__)]
    return "".join(tokenizer.decode(row[r[0]:r[-1] + 1]) if decoded[r[0]] else MASK_GLYPH * len(r) for r in runs)


def show(row, call, nfe, tokenizer):
    """Replay a decoding, the canvas after each call (call[i]: the call that decoded i); piped, 24 frames at most."""
    tty = sys.stdout.isatty()
    for c in range(nfe + 1) if tty else sorted({round(i * nfe / 23) for i in range(24)}):
        head = f"---------- after call {c} of {nfe}: {call.count(c)} new token(s), {sum(k > c for k in call)} masked"
        canvas = render(row, [k <= c for k in call], tokenizer)
        print(("\x1b[H\x1b[J" if tty else "") + head + "\n" + canvas, flush=True)  # in a terminal: home, clear, draw
        time.sleep(min(0.3, max(0.02, 8 / max(nfe, 1))) if tty else 0)


def explain(L=8, alpha0=0.5, steps=4, seed=16):
    """The README's worked example: a tiny random Eso-LM (B) samples 8 letters (_: a mask), call by call."""
    torch.manual_seed(seed)
    model = EsoLM(EsoLMConfig(vocab_size=26, block_size=L, n_layer=1, n_head=2, n_embd=16, alpha0=alpha0)).double()
    letters = [chr(ord("a") + i) for i in range(26)] + ["_"]
    out = model.generate(1, steps=steps, generator=torch.Generator().manual_seed(seed))
    # the plan generate drew first from the same generator: the order, the tokens per call, the sequential calls
    plan = random_plan(torch.ones(1, L, dtype=torch.bool), alpha0, steps, torch.Generator().manual_seed(seed))
    order, x, call = plan.order[0].tolist(), out.x[0].tolist(), out.decoded_by[0].tolist()
    n_diffusion, n_diffusion_calls = L - plan.n_seq, len(plan.ks) - plan.n_seq
    print(f"Eso-LM (B), L = {L}, alpha0 = {alpha0}, T = {steps} diffusion steps, a tiny random model (seed {seed})\n\n"
          f"generation order: positions {' '.join(map(str, order[:n_diffusion]))} | "
          f"{' '.join(map(str, order[n_diffusion:]))}\n  the diffusion phase decodes {n_diffusion} positions in a "
          f"random order, in {n_diffusion_calls} calls: the T = {steps} steps but those that reveal nothing\n  "
          f"then the sequential phase decodes the other {plan.n_seq}, left to right, one per call\n"
          "sorted layout: cache slot i holds the i-th position of the order, which RoPE rotates it by")
    for name, values in (("slot", range(L)), ("position", order), ("token", [letters[x[p]] for p in order])):
        print(f"  {name:8s}  " + " ".join(f"{v:>2}" for v in values) + "\n" * (name == "token"))
    print("call  phase       k  decodes positions  feeds slots  n_cached  canvas after the call")
    for i, f in enumerate(model.feeds(plan)):
        phase, decoded = "diffusion" if i < n_diffusion_calls else "sequential", " ".join(map(str, order[f.d:][:f.k]))
        print(f"{i + 1:4d}  {phase:10s}  {f.k}  {decoded:17s}  [{f.n_cached}, {f.d + f.k})       {f.n_cached:<8d}  "
              + "".join(letters[x[p]] if call[p] <= i + 1 else "_" for p in range(L)))
    z0 = "".join(letters[x[p]] if call[p] <= n_diffusion_calls else "_" for p in range(L))
    print(f"\nz0 (the canvas the sequential phase starts from): {z0}\nx  (the sample):{' ' * 33}" + "".join(
        letters[t] for t in x))


cfg = configure(Settings, doc=__doc__)
if cfg.explain:
    explain()
    sys.exit()
device = resolve_device(cfg.device)
try:
    model, ckpt = load_model(cfg.out_dir, cfg.init_from, device, cfg.ema, alpha0=cfg.alpha0)
    tokenizer = get_tokenizer(ckpt["dataset_meta"]["tokenizer"] if ckpt else "gpt2")
except ValueError as e:  # a SettingError, or a DataError: GPT-2's BPE missing offline
    die(as_flag(e) if isinstance(e, SettingError) else e)
config = model.config
source = f"{cfg.out_dir}/ckpt.pt: iter {ckpt['iter_num']}" if ckpt else cfg.init_from
alpha0 = config.alpha0 if cfg.alpha0 is None else cfg.alpha0
if alpha0 != config.alpha0:
    print(f"note: sampling at alpha0={alpha0}, but the model trained at {config.alpha0}: it saw diffusion contexts "
          f"with at most about {config.alpha0:.0%} clean tokens", file=sys.stderr)
ids = encode_template(cfg.infill, tokenizer, model.mask_id) if cfg.infill else list(tokenizer.encode(cfg.prompt))
if len(ids) > config.block_size:
    die(f"--{'infill' if cfg.infill else 'prompt'}: {len(ids)} tokens, more than block_size={config.block_size}")
prompt = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
generated = [i >= len(ids) or ids[i] == model.mask_id for i in range(config.block_size)]  # not given

generator, eot = torch.Generator(device=device).manual_seed(cfg.seed), tokenizer.eot_id
amp, dtype = autocast(device, cfg.dtype)
options = {k: getattr(cfg, k) for k in ("steps", "temperature", "top_p", "subcontext_len", "subcontext_shuffle",
                                        "adaptive", "kv_cache")}
print(f"{source}, variant {config.variant}, L = {config.block_size}; sampling alpha0={alpha0}, {dtype}, "
      + ", ".join(f"{k}={v}" for k, v in options.items() if v not in (None, False, 0) or k == "kv_cache"))
batch_size, texts, n_cut = cfg.batch_size or cfg.num_samples, [], 0
for first in range(0, cfg.num_samples, batch_size):
    n, t0 = min(batch_size, cfg.num_samples - first), time.time()
    try:
        with amp:
            x, call, nfe = model.generate(n, alpha0, prompt=prompt, generator=generator,
                                          calls=StaticCalls if cfg.compile else None, **options)
    except SettingError as e:  # a setting that fits no model of this size or variant (generate's own checks)
        die(as_flag(e))
    sync(device)
    dt = time.time() - t0
    if cfg.show and first == 0:
        show(x[0].tolist(), call[0].tolist(), nfe, tokenizer)
    for i, row in enumerate(x.tolist()):
        kept = row[:row.index(eot, len(ids))] if cfg.cut_eot and eot in row[len(ids):] else row
        n_cut += len(kept) < len(row)
        texts.append(render(kept, generated, tokenizer))  # the given tokens drawn as glyphs: not words
        print(f"---------- sample {first + i + 1}\n{tokenizer.decode(kept)}")
    print(f"---------- batch of {n}: NFE {nfe}, {dt:.2f} s")
if cfg.cut_eot and tokenizer.eot_id is not None:
    print(f"{n_cut} of {cfg.num_samples} samples cut at an end-of-text token (--cut_eot=False keeps them whole)")
if ckpt and tokenizer.name == "bytes":
    vocabulary = training_words(ckpt["train_config"]["data_dir"], ckpt["train_config"]["dataset"])
    print(f"corpus word rate: {corpus_word_rate(texts, vocabulary):.1%} of the samples' words (prompt excluded) "
          "occur in the training text")
