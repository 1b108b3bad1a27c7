"""
Sample from a checkpoint of train.py (python -m lab.convert makes one from the paper's models).

    python sample.py --out_dir=out                          # at the alpha0 the model was trained for
    python sample.py --out_dir=out --show                   # watch sample 1 decode, call by call
    python sample.py --out_dir=out --alpha0=1 --steps=32 --prompt="ROMEO:"
    python sample.py --out_dir=out --infill="ROMEO: [[60]] JULIET:"   # [[n]]: n tokens to generate
    python sample.py --out_dir=out --adaptive=margin --threshold=0.9  # the model picks the order
    python sample.py --explain                              # the README's worked example
"""
import itertools
import re
import sys
import time
from dataclasses import dataclass

import torch

from configurator import check, configure, fail
from data import get_tokenizer, load_checkpoint
from esolm import EsoLM, EsoLMConfig, random_plan


@dataclass
class Settings:
    out_dir: str = "out"  # the folder of ckpt.pt
    num_samples: int = 4
    batch_size: int = 0  # samples a generate call (0: all)
    alpha0: float | None = None  # default: what the model was trained for
    steps: int | None = None  # diffusion steps T (default: L)
    adaptive: str | None = None  # confidence or margin: decode the masks the model is surest of
    threshold: float | None = None  # adaptive: decode every mask that scores this or more
    temperature: float = 0.8
    top_p: float = 0.9  # nucleus sampling, as the paper's samples; 1: off
    seed: int = 0  # sample i draws from stream seed + i
    prompt: str = ""  # text to continue
    infill: str = ""  # text with [[n]] where n tokens are to be generated
    show: bool = False  # print sample 1's canvas after each network call
    cut_eot: bool = True  # cut each sample at its first end-of-text token after the prompt
    kv_cache: bool = True  # False: the uncached reference, a full forward a call
    ema: bool = True  # the EMA weights, if saved
    explain: bool = False  # print the README's worked example and stop
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def render(row, decoded, tok):  # a canvas: the decoded runs as text, a masked position as a glyph
    runs = [list(r) for _, r in itertools.groupby(range(len(row)), key=decoded.__getitem__)]
    return "".join(tok.decode(row[r[0]:r[-1] + 1]) if decoded[r[0]] else "\u2591" * len(r) for r in runs)


def explain(L=8, alpha0=0.5, steps=4, seed=17):
    """The README's worked example: a tiny random Eso-LM (B) samples 8 letters, call by call."""
    torch.manual_seed(seed)
    model = EsoLM(EsoLMConfig(vocab_size=26, block_size=L, n_layer=1, n_head=2, n_embd=16, alpha0=alpha0))
    out = model.double().generate(1, steps=steps, seed=seed)
    x, calls = out.x[0].tolist(), out.decoded_by[0]
    plan = random_plan(torch.ones(1, L, dtype=torch.bool), alpha0, steps, torch.rand(3, 1, L, generator=
                       torch.Generator().manual_seed(seed))[:2])  # the plan generate drew first
    order = plan.order[0][calls[plan.order[0]].argsort(stable=True)].tolist()  # as decoded: in call order
    k, n = plan.ks[0].tolist(), len(plan.ks[0])
    letter = [chr(97 + i) for i in range(26)]
    print(f"Eso-LM (B), L = {L}, alpha0 = {alpha0}, T = {steps} diffusion steps, a tiny random model (seed {seed})"
          f"\n\ngeneration order: positions {' '.join(map(str, order[:sum(k)]))} | "
          f"{' '.join(map(str, order[sum(k):]))}\n  the diffusion phase decodes {sum(k)} positions, in a random "
          f"order, in {n} calls (steps that reveal nothing make none)\n  then the sequential phase decodes the "
          f"other {L - sum(k)}, left to right, one a call\nsorted layout: cache slot i holds the i-th position "
          "of the order, which RoPE turns it by")
    for name, values in (("slot", range(L)), ("position", order), ("token", [letter[x[p]] for p in order])):
        print(f"  {name:8s}  " + " ".join(f"{v:>2}" for v in values) + "\n" * (name == "token"))
    print("call  phase       k  decodes positions  feeds slots  n_cached  canvas after the call")
    d = d_prev = 0
    for j, kj in enumerate(k + [1] * (L - sum(k)), 1):  # a call feeds [n_cached, d + k): README, "why exact"
        canvas = "".join(letter[x[p]] if calls[p] <= j else "_" for p in range(L))
        print(f"{j:4d}  {'diffusion' if j <= n else 'sequential':10s}  {kj}  "
              f"{' '.join(map(str, order[d:d + kj])):17s}  [{d_prev}, {d + kj})       {d_prev:<8d}  {canvas}")
        d_prev, d = d, d + kj
    z0 = "".join(letter[x[p]] if calls[p] <= n else "_" for p in range(L))
    print(f"\nz0 (the canvas the sequential phase starts from): {z0}\nx  (the sample):{' ' * 33}"
          + "".join(letter[t] for t in x))


cfg = configure(Settings, __doc__)
if cfg.explain:
    explain()
    sys.exit()
check(cfg, "num_samples", cfg.num_samples >= 1, "must be at least 1")
check(cfg, "batch_size", cfg.batch_size >= 0, "must be at least 0 (0: all at once)")
check(cfg, "infill", not (cfg.prompt and cfg.infill), "and --prompt: one or the other")
try:
    ckpt = load_checkpoint(f"{cfg.out_dir}/ckpt.pt")
    model = EsoLM(EsoLMConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"] if cfg.ema and ckpt["ema"] else ckpt["model"])
    model.to(cfg.device).eval()
    tok = get_tokenizer(ckpt["dataset_meta"]["tokenizer"])
except (ValueError, RuntimeError) as e:
    fail(f"--out_dir={cfg.out_dir}: {e}")
c, ids = model.config, []
for i, piece in enumerate(re.split(r"\[\[(\d+)\]\]", cfg.infill or cfg.prompt)):  # [[n]]: n mask ids
    ids += [model.mask_id] * int(piece) if i % 2 else list(tok.encode(piece))
check(cfg, "infill" if cfg.infill else "prompt", len(ids) <= c.block_size, f"is {len(ids)} tokens, L is {c.block_size}")
prompt = torch.tensor(ids, dtype=torch.long) if ids else None
options = {k: getattr(cfg, k) for k in ("steps", "adaptive", "threshold", "temperature", "top_p", "kv_cache")}
print(f"{cfg.out_dir}/ckpt.pt (iter {ckpt['iter_num']}): variant {c.variant}, L = {c.block_size}, trained for "
      f"alpha0 = {c.alpha0}; " + ", ".join(f"{k}={v}" for k, v in options.items() if v is not None))
batch, n_cut = cfg.batch_size or cfg.num_samples, 0
for first in range(0, cfg.num_samples, batch):
    n, t0 = min(batch, cfg.num_samples - first), time.time()
    try:
        out = model.generate(n, cfg.alpha0, prompt=prompt, seed=cfg.seed + first, **options)
    except ValueError as e:  # a setting generate rejects, named as its argument
        fail(e)
    if first == 0 and cfg.alpha0 not in (None, c.alpha0):
        print(f"note: sampling at alpha0={cfg.alpha0}; the model was trained at {c.alpha0}", file=sys.stderr)
    if cfg.show and first == 0:  # sample 1's canvas after each call
        row, call = out.x[0].tolist(), out.decoded_by[0].tolist()
        for j in sorted({round(i * int(out.nfe[0]) / 23) for i in range(24)}):  # 24 frames at most
            print(f"---------- after call {j} of {int(out.nfe[0])}: {call.count(j)} new token(s), "
                  f"{sum(k > j for k in call)} masked\n" + render(row, [k <= j for k in call], tok))
    for i, row in enumerate(out.x.tolist()):
        end = row.index(tok.eot_id, len(ids)) if cfg.cut_eot and tok.eot_id in row[len(ids):] else len(row)
        n_cut += end < len(row)
        print(f"---------- sample {first + i + 1}\n{tok.decode(row[:end])}")
    print(f"---------- batch of {n}: NFE {out.nfe.float().mean():.1f} a sample, {time.time() - t0:.2f} s")
if cfg.cut_eot and tok.eot_id is not None:
    print(f"{n_cut} of {cfg.num_samples} samples cut at an end-of-text token (--cut_eot=False keeps them)")
