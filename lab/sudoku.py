"""Sudoku, where the decoding order decides (docs/sudoku.md): the dataset, the preset, solving.

    python -m lab.sudoku build
    python -m lab.sudoku train --alpha0=1 --out_dir=out_sudoku_b1  # train.py with the preset
    python -m lab.sudoku solve --out_dir=out_sudoku_b1 --baselines=out_sudoku_mdlm --thresholds=0.9
"""
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from configurator import check, configure, fail
from data import Windows, get_tokenizer
from lab.common import autocast, device_ok, load_model, mean_se, nfe_figure
from lab.metrics import timed_generate
from prepare_data import PLAIN_NAME, ShardWriter, dataset_folder

# A grid: 81 ids, 0-8 the digits 1-9, -1 empty; the solver: a bit mask of each unit's digits
CELL_UNITS = [(i // 9, 9 + i % 9, 18 + i // 27 * 3 + i % 9 // 3) for i in range(81)]  # r, c, box
UNITS = np.array([[i for i in range(81) if u in CELL_UNITS[i]] for u in range(27)])  # (27, 9)
BINS, ADAPTIVE = ((30, 34), (35, 39), (40, 45)), ("confidence", "margin")


def search(grid, used, empty, n, limit, rnd):  # count_solutions's search
    if n == 0:
        return 1
    fewest = 10
    for j in range(n):  # branch on the cell with the fewest candidates
        a, b, c = CELL_UNITS[empty[j]]
        m = ~(used[a] | used[b] | used[c]) & 511
        if m.bit_count() < fewest:
            fewest, best, candidates = m.bit_count(), j, m
            if fewest <= 1:
                break
    if fewest == 0:
        return 0
    n, i = n - 1, empty[best]
    empty[best], empty[n] = empty[n], i  # the branching cell, past the still-empty prefix
    (a, b, c), digits, count = CELL_UNITS[i], [d for d in range(9) if candidates >> d & 1], 0
    if rnd:
        rnd.shuffle(digits)
    for d in digits:
        grid[i], bit = d, 1 << d
        used[a], used[b], used[c] = used[a] | bit, used[b] | bit, used[c] | bit
        count += search(grid, used, empty, n, limit, rnd)
        used[a], used[b], used[c] = used[a] ^ bit, used[b] ^ bit, used[c] ^ bit
        if count >= limit:
            break
    return count


def count_solutions(cells, limit=2, rnd=None):  # of a part of a valid grid; fills in cells
    used, empty = [0] * 27, [i for i, d in enumerate(cells) if d < 0]
    for i, d in enumerate(cells):
        for u in CELL_UNITS[i] if d >= 0 else ():
            used[u] |= 1 << d
    if rnd:
        rnd.shuffle(empty)  # random ties between equally constrained cells
    return search(cells, used, empty, len(empty), limit, rnd)


def valid_sudoku(grids):  # (N,) bool: each row, column and box holds 0-8 once
    return (np.sort(np.asarray(grids).reshape(-1, 81)[:, UNITS], 2) == np.arange(9)).all((1, 2))


def sudoku_chunk(seed, index, size, givens=None):  # its own stream: any number of workers
    rng, grids, puzzles = np.random.default_rng([seed, givens is not None, index]), [], []
    for _ in range(size):  # randomized backtracking: no template to relabel
        count_solutions(grid := [-1] * 81, 1, random.Random(int(rng.integers(2**63))))
        grids.append(grid)
    for grid in grids if givens else ():  # cells emptied in a random order, but not one
        n_givens, tried = int(rng.integers(givens[0], givens[1] + 1)), []  # that allows a
        for _ in range(5):  # second solution; of 5 orders, the first to get to n_givens
            cells, n = grid.copy(), 81
            for i in rng.permutation(81):
                if n > n_givens:
                    cells[i] = -1
                    if count_solutions(cells.copy()) == 1:
                        n -= 1
                    else:
                        cells[i] = grid[i]
            tried.append((n, cells))
            if n == n_givens:
                break
        puzzles.append(min(tried, key=lambda t: t[0])[1])  # or the closest
    return np.array(grids, np.uint8), givens and np.array(puzzles, np.int8)


def sudoku_rows(pool, seed, n, chunk, givens=None):  # n grids (and puzzles)
    tasks = [(seed, j, min(chunk, n - j * chunk), givens) for j in range(-(-n // chunk))]
    grids, puzzles = zip(*pool.starmap(sudoku_chunk, tasks))
    return np.concatenate(grids), givens and np.concatenate(puzzles)


@dataclass
class Build:
    data_dir: str = "data"
    name: str = "sudoku"
    sudoku_train: int = 100_000  # solved training grids
    sudoku_test: int = 1000  # held-out puzzles, one solution each
    givens: tuple[int, ...] = (30, 45)  # drawn uniformly in this range
    seed: int = 0
    workers: int = min(8, os.cpu_count() or 1)


def build(argv=None):  # train: grids; val: solutions; puzzles: 9 where empty
    cfg = configure(Build, __doc__, argv)
    for key in ("sudoku_train", "sudoku_test", "workers"):
        check(cfg, key, getattr(cfg, key) >= 1, "must be at least 1")
    check(cfg, "name", PLAIN_NAME.fullmatch(cfg.name), "is not a plain name")
    check(cfg, "seed", cfg.seed >= 0, "must be at least 0")
    check(cfg, "givens", len(cfg.givens) == 2 and 17 <= cfg.givens[0] <= cfg.givens[1] <= 81,
          "must be a,b with 17 <= a <= b <= 81")
    with Pool(cfg.workers) as pool:
        train, _ = sudoku_rows(pool, cfg.seed, cfg.sudoku_train, 1000)
        solutions, puzzles = sudoku_rows(pool, cfg.seed, cfg.sudoku_test, 50, cfg.givens)
    if len(set(map(bytes, np.concatenate([train, solutions])))) < len(train) + len(solutions):
        fail(f"--seed={cfg.seed}: a grid came twice; try another seed")
    puzzles, tok, shards = np.where(puzzles < 0, 9, puzzles), get_tokenizer("sudoku"), {}
    with dataset_folder(cfg.data_dir, cfg.name) as folder:
        for split, rows in ("train", train), ("val", solutions), ("puzzles", puzzles):
            writer = ShardWriter(folder, split, np.dtype("uint16"), 50_000_000 // 81 * 81)
            writer.write(rows.reshape(-1))  # whole grids a shard: record_len 81
            writer.close()
            shards[split.removesuffix("s") + "_shards"] = writer.names  # puzzle_shards
        meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, eot_id=None, dtype="uint16",
                    record_len=81, **shards, train_grids=len(train), test_puzzles=len(puzzles),
                    givens=list(cfg.givens), seed=cfg.seed, source="a randomized solver")
        Path(folder, "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {cfg.data_dir}/{cfg.name}: {len(train)} grids, {len(puzzles)} puzzles")


# train.py's flags, before the command line's (which win), after its CPU preset
SUDOKU = dict(dataset="sudoku", block_size=81, pos_emb=True, loss_type="low_var")
CPU = dict(batch_size=32, learning_rate=2e-3, min_lr=2e-4, max_iters=7000, eval_interval=1000)
GPU = dict(n_layer=8, n_head=8, n_embd=512, dropout=0.0, batch_size=256, learning_rate=5e-4,
           min_lr=5e-5, warmup_iters=1000, max_iters=50_000, eval_interval=5000, peak_flops=0.0)


def train(argv):  # train.py with the Sudoku preset (after build)
    gpu = torch.cuda.is_available() and "--device=cpu" not in argv
    flags = [f"--{k}={v}" for k, v in (SUDOKU | (GPU if gpu else CPU)).items()] + list(argv)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train.py")
    sys.exit(subprocess.run([sys.executable, script, *flags]).returncode)


def solve_rate(model, puzzles, seed, amp, **kw):  # one call; solved: valid, keeping the givens
    n, prompt = len(puzzles), puzzles.to(model.wte.weight.device)
    x, nfe, seconds = timed_generate(model, n, n, seed, amp, prompt=prompt, **kw)
    x, nfe, given = x.cpu(), nfe.float(), puzzles != model.mask_id
    solved = torch.from_numpy(valid_sudoku(x.numpy())) & ((x == puzzles) | ~given).all(1)
    n_givens, out = given.sum(1), {"seconds": seconds[0]}
    for name, lo, hi in [("all", 0, 81)] + [(f"givens {a}-{b}", a, b) for a, b in BINS]:
        if (sel := (n_givens >= lo) & (n_givens <= hi)).any():
            p, se = mean_se(solved[sel].numpy())
            out[name] = dict(solved=p, se=se, n=int(sel.sum()), nfe=nfe[sel].mean().item(),
                             nfe_max=int(nfe[sel].max()))  # all's: the calls the batch made
    return out


@dataclass
class Solve:
    out_dir: str = "out_sudoku_b1"  # the model; sudoku.json goes here
    baselines: tuple[str, ...] = ()  # more models, each at its own alpha0 too
    puzzles: int = 1000  # the first of the model's dataset
    alpha0s: tuple[float, ...] = ()  # more beside each model's own (MDLM: 1 only)
    orders: tuple[str, ...] = ("random", *ADAPTIVE)  # at alpha0 = 0: left to right, one cell
    thresholds: tuple[float, ...] = ()  # adaptive: a cell a tau beside the plan's k
    steps: int = 1024  # T: about one cell a call
    temperature: float = 1.0  # of the digits and the scores (0: the likeliest digit)
    seed: int = 0  # the same draws for every model
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"  # bfloat16 (autocast) on a GPU, else float32; or either


def solve(argv=None):
    cfg = configure(Solve, __doc__, argv)
    check(cfg, "puzzles", cfg.puzzles >= 1, "must be at least 1")
    check(cfg, "orders", {*cfg.orders} <= {"random", *ADAPTIVE}, "are random, confidence, margin")
    check(cfg, "dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "is auto, bfloat16, float32")
    check(cfg, "device", device_ok(cfg.device), "is not a device here")
    check(cfg, "alpha0s", all(0 <= a <= 1 for a in cfg.alpha0s), "must each be in [0, 1]")
    models = {d: load_model(d, cfg.device) for d in (cfg.out_dir, *cfg.baselines)}
    trained = models[cfg.out_dir][1]["train_config"]
    for key, d in [("out_dir", cfg.out_dir)] + [("baselines", d) for d in cfg.baselines]:
        ok = models[d][1]["dataset_meta"]["tokenizer"] == "sudoku"
        check(cfg, key, ok, f"{d} is not a Sudoku model")
    w = Windows(trained["data_dir"], trained["dataset"], "puzzle", 81)
    puzzles = w.batch(range(min(cfg.puzzles, len(w))))
    amp, dtype = autocast(cfg.device, cfg.dtype)
    for m, _ in models.values():  # a first call pays the device's start-up, outside the timings
        with amp:
            m.generate(len(p := puzzles[:8]), steps=8, prompt=p.to(cfg.device), adaptive="margin")
    cells = [dict(model=d, alpha0=a, order=o, threshold=t) for d, (m, _) in models.items()
             for a in dict.fromkeys([m.config.alpha0, *cfg.alpha0s])
             if a == 1 or m.config.variant != "MDLM"  # MDLM: alpha0 = 1 only
             for o in (cfg.orders if a > 0 else ["left to right"])
             for t in ((None, *cfg.thresholds) if o in ADAPTIVE else [None])]
    for c in cells:
        c |= solve_rate(models[c["model"]][0], puzzles, cfg.seed, amp, alpha0=c["alpha0"],
                        steps=cfg.steps, threshold=c["threshold"], temperature=cfg.temperature,
                        adaptive=c["order"] if c["order"] in ADAPTIVE else None)
        print("{model} alpha0={alpha0:g} {order} tau={threshold}: {seconds:.1f} s".format(**c),
              *(f"{k} {v['solved']:.1%} +- {v['se']:.1%} NFE {v['nfe']:.1f} (max {v['nfe_max']})"
                for k, v in c.items() if isinstance(v, dict)), sep="; ", flush=True)
    out = dict(settings=vars(cfg), dtype=dtype, cells=cells)
    Path(cfg.out_dir, "sudoku.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {cfg.out_dir}/sudoku.json")
    lines = {}  # solved against NFE: a line a model and order, a point a tau
    for c in cells:
        name = f"{Path(c['model']).name}, alpha0 {c['alpha0']:g}, {c['order']}"
        lines.setdefault(name, []).append((c["all"]["nfe"], c["all"]["solved"], c["all"]["se"]))
    nfe_figure(os.path.join(cfg.out_dir, "sudoku.png"), lines, "puzzles solved",
               f"{len(puzzles)} puzzles, temperature {cfg.temperature:g}", per="puzzle")


def main(argv=None):
    argv, run = sys.argv[1:] if argv is None else argv, dict(build=build, train=train, solve=solve)
    if argv[:1] in (["-h"], ["--help"]):
        return print(__doc__.strip())
    if not argv or argv[0] not in run:
        fail("the first argument is a command: build, train or solve")
    try:
        run[argv[0]](argv[1:])
    except (ValueError, OSError) as e:  # one line, no traceback
        fail(e)


if __name__ == "__main__":
    main()
