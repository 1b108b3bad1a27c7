"""
Sample from a checkpoint of train.py (python -m lab.convert makes one from the paper's models).

    python sample.py --out_dir=out                          # at the model's own alpha0
    python sample.py --out_dir=out --show                   # watch sample 1 decode, 24 frames
    python sample.py --out_dir=out --alpha0=1 --steps=32 --prompt="ROMEO:"
    python sample.py --out_dir=out --infill="ROMEO: [[60]] JULIET:"   # [[n]]: n tokens to make
    python sample.py --out_dir=out --adaptive=margin --threshold=0.9  # the model picks the order
    python sample.py --explain                              # the README's worked example
"""
import itertools
import re
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
    infill: str = ""  # text with [[n]] for n tokens to generate; masks pad it to L
    show: bool = False  # print sample 1's canvas as it decodes (at most 24 frames)
    cut_eot: bool = True  # cut each sample at its first end-of-text token after the prompt
    kv_cache: bool = True  # False: the uncached reference, a full forward a call
    ema: bool = True  # the EMA weights, if saved
    explain: bool = False  # print the README's worked example and stop
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def render(row, decoded, tok):  # a canvas: the decoded runs as text, a masked position as a glyph
    runs = [list(r) for _, r in itertools.groupby(range(len(row)), key=decoded.__getitem__)]
    return "".join(tok.decode(row[r[0]:r[-1] + 1]) if decoded[r[0]] else "\u2591" * len(r)
                   for r in runs)


def explain(L=8, alpha0=0.5, steps=4, seed=17):
    """The README's worked example: a tiny random Eso-LM (B) samples 8 letters, call by call."""
    torch.manual_seed(seed)
    config = EsoLMConfig(vocab_size=26, block_size=L, n_layer=1, n_head=2, n_embd=16, alpha0=alpha0)
    u = torch.rand(2, 1, L, generator=torch.Generator().manual_seed(seed))
    plan = random_plan(torch.ones(1, L, dtype=torch.bool), alpha0, steps, u)  # the paper's plan
    out = EsoLM(config).double().generate(1, plan=plan, seed=seed)
    x, calls, k = [chr(97 + i) for i in out.x[0]], out.decoded_by[0], plan.ks[0].tolist()
    order = plan.order[0][calls[plan.order[0]].argsort(stable=True)].tolist()  # in call order
    n, m, canvas = len(k), sum(k), lambda j: [x[p] if calls[p] <= j else "_" for p in range(L)]
    print(f"Eso-LM (B), L = {L}, alpha0 = {alpha0}, T = {steps} steps, a tiny random model (seed "
          f"{seed})\n\ngeneration order: positions {' '.join(map(str, order[:m]))} | "
          f"{' '.join(map(str, order[m:]))}\n  diffusion: {m} positions in a random order, in {n} "
          f"calls (a step that reveals nothing makes none)\n  sequential: the other {L - m}, left "
          "to right, one a call\nsorted layout: cache slot i holds the i-th position of the order")
    for name, row in (("slot", range(L)), ("position", order), ("token", [x[p] for p in order])):
        print(f"  {name:8s}  " + " ".join(f"{v:>2}" for v in row) + "\n" * (name == "token"))
    print("call  phase       k  decodes positions  feeds slots  n_cached  canvas after the call")
    d = d_prev = 0
    for j, kj in enumerate(k + [1] * (L - m), 1):  # a call feeds [n_cached, d + k): "why exact"
        print(f"{j:4d}  {'diffusion' if j <= n else 'sequential':10s}  {kj}  "
              f"{' '.join(map(str, order[d:d + kj])):17s}  [{d_prev}, {d + kj})       "
              f"{d_prev:<8d}  {''.join(canvas(j))}")
        d_prev, d = d, d + kj
    print(f"\nz0, the canvas the sequential phase starts from: {''.join(canvas(n))}\nx, the "
          f"sample:{' ' * 36}{''.join(x)}")


cfg = configure(Settings, __doc__)
if cfg.explain:
    raise SystemExit(explain())
check(cfg, "num_samples", cfg.num_samples >= 1, "must be at least 1")
check(cfg, "batch_size", cfg.batch_size >= 0, "must be at least 0 (0: all at once)")
check(cfg, "infill", not (cfg.prompt and cfg.infill), "and --prompt: one or the other")
check(cfg, "device", cfg.device == "cpu" or cfg.device[:4] == "cuda" and torch.cuda.is_available(),
      "is not a device here")
try:
    ckpt = load_checkpoint(f"{cfg.out_dir}/ckpt.pt")
    model = EsoLM(EsoLMConfig(**ckpt["model_config"])).to(cfg.device).eval()
    model.load_state_dict(ckpt["ema"] if cfg.ema and ckpt["ema"] else ckpt["model"])
    tok = get_tokenizer(ckpt["dataset_meta"]["tokenizer"])
except (ValueError, RuntimeError) as e:
    fail(f"--out_dir={cfg.out_dir}: {e}")
c, ids, eot, batch = model.config, [], tok.eot_id, cfg.batch_size or cfg.num_samples
for i, piece in enumerate(re.split(r"\[\[(\d+)\]\]", cfg.infill or cfg.prompt)):  # n mask ids
    ids += [model.mask_id] * int(piece) if i % 2 else list(tok.encode(piece))
check(cfg, "infill" if cfg.infill else "prompt", len(ids) <= c.block_size,
      f"is {len(ids)} tokens, L is {c.block_size}")
options = {k: getattr(cfg, k) for k in
           ("alpha0", "steps", "adaptive", "threshold", "temperature", "top_p", "kv_cache")}
print(f"{cfg.out_dir}/ckpt.pt (iter {ckpt['iter_num']}): variant {c.variant}, L = {c.block_size}, "
      f"trained for alpha0 = {c.alpha0}; " + ", ".join(f"{k}={v}" for k, v in options.items()
                                                      if v is not None))
for first in range(0, cfg.num_samples, batch):
    n, t0, n_cut = min(batch, cfg.num_samples - first), time.time(), 0
    try:
        out = model.generate(n, prompt=torch.tensor(ids).long(), seed=cfg.seed + first, **options)
    except ValueError as e:  # a setting generate rejects, named as its argument
        fail(e)
    if cfg.show and first == 0:
        row, call, nfe = out.x[0].tolist(), out.decoded_by[0].tolist(), int(out.nfe[0])
        for j in sorted({round(i * nfe / 23) for i in range(24)}):
            print(f"---------- after call {j} of {nfe}: {call.count(j)} new token(s), "
                  f"{sum(k > j for k in call)} masked\n" + render(row, [k <= j for k in call], tok))
    for i, row in enumerate(out.x.tolist()):
        end = row.index(eot, len(ids)) if cfg.cut_eot and eot in row[len(ids):] else len(row)
        n_cut += end < len(row)
        print(f"---------- sample {first + i + 1}\n{tok.decode(row[:end])}")
    print(f"---------- {n} samples: {time.time() - t0:.2f} s, NFE {out.nfe.float().mean():.1f} "
          f"each; {n_cut} cut at an end-of-text token")
