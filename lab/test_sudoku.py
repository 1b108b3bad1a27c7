"""
lab/sudoku.py: the dataset (valid, distinct grids; unique-solution puzzles never in training; the
old builder's bytes, for any number of workers), the validity rule with a counter-example for each
of its parts, the solve rule on a stub whose answers are known, puzzles of any givens in one
generate call, and the three commands end to end on a tiny model.
"""
import hashlib
import importlib.util
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import Windows, read_shard
from esolm import EsoLM, EsoLMConfig, Samples
from lab import sudoku
from lab.common import autocast

# sha256 of train_000.bin + val_000.bin + puzzles_000.bin as the old data.build_sudoku wrote them
OLD_BYTES = "147611664efd88072e1e0972d9f8bd9d2f6cc5d85d2d1b5a48dcc4e2535c697f"


@pytest.fixture(autouse=True)
def one_thread():  # tiny models: threads would only wait on each other, the more on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sudoku")
    sudoku.build([f"--data_dir={root}", "--sudoku_train=200", "--sudoku_test=20", "--seed=3"])
    return root


def load(root, name="sudoku"):  # (meta, train grids, puzzles (9: empty), solutions), int64
    meta = json.loads((root / name / "meta.json").read_text())
    return meta, *(np.concatenate([read_shard(root / name / s) for s in meta[f"{k}_shards"]])
                   .astype(np.int64).reshape(-1, 81) for k in ("train", "puzzle", "val"))


def test_sudoku_dataset(root, tmp_path):
    meta, train, puzzles, solutions = load(root)
    assert (meta["tokenizer"], meta["vocab_size"], meta["record_len"]) == ("sudoku", 9, 81)
    assert (meta["train_grids"], meta["test_puzzles"], len(train), len(puzzles)) == (200, 20) * 2
    assert sudoku.valid_sudoku(train).all() and sudoku.valid_sudoku(solutions).all()
    grids = {g.tobytes() for g in train}
    assert len(grids) == 200 and not grids & {g.tobytes() for g in solutions}
    givens = (puzzles != 9).sum(1)
    assert ((givens >= 30) & (givens <= 45)).all() and len(set(givens.tolist())) > 5
    assert ((puzzles == 9) | (puzzles == solutions)).all()
    assert all(sudoku.count_solutions(np.where(p == 9, -1, p).tolist()) == 1 for p in puzzles)
    sudoku.build([f"--data_dir={tmp_path}", "--sudoku_train=200", "--sudoku_test=20", "--seed=3",
                  "--workers=1"])  # one worker: the same bytes, which are the old builder's
    shards = ["train_000.bin", "val_000.bin", "puzzles_000.bin", "meta.json"]
    assert all((tmp_path / "sudoku" / s).read_bytes() == (root / "sudoku" / s).read_bytes()
               for s in shards)
    old = b"".join((root / "sudoku" / s).read_bytes() for s in shards[:3])
    assert hashlib.sha256(old).hexdigest() == OLD_BYTES


def test_sudoku_windows_are_whole_grids(root):
    windows = Windows(root, "sudoku", "train", 81)
    assert len(windows) == 200 and sudoku.valid_sudoku(windows.batch(np.arange(200))).all()
    with pytest.raises(ValueError, match="block_size must be that"):
        Windows(root, "sudoku", "train", 80)


def rules(g):  # (rows, columns, boxes): does each hold 0-8 once, written again here
    boxes = g.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    return tuple(bool((np.sort(u, 1) == np.arange(9)).all()) for u in (g, g.T, boxes))


def test_validity_has_a_counter_example_for_each_rule(root):
    grid = load(root)[1][0].reshape(9, 9)
    latin = np.add.outer(np.arange(9), np.arange(9)) % 9  # a Latin square
    rows, cols, masked = grid.copy(), grid.copy(), grid.copy()
    rows[[0, 1], 0] = rows[[1, 0], 0]  # two cells of a column, in one box
    cols[0, [0, 1]] = cols[0, [1, 0]]  # two cells of a row, in one box
    masked[4, 4] = 9  # a cell left empty
    assert [rules(g) for g in (grid, latin, rows, cols)] == [
        (True, True, True), (True, True, False), (False, True, True), (True, False, True)]
    assert sudoku.valid_sudoku(np.stack([grid, latin, rows, cols, masked])).tolist() == [
        True, False, False, False, False]
    # a grid whose every unit still sums to 36 (0 + ... + 8): +1, -1 at the corners of a rectangle
    for r, c in itertools.product((1, 2), range(3, 9)):  # rows of one band, columns of two boxes
        sums = grid.copy()
        sums[[0, r, 0, r], [0, c, c, 0]] += [1, 1, -1, -1]
        if sums.min() >= 0 and sums.max() <= 8 and not all(rules(sums)):
            break
    units = sums.reshape(81)[sudoku.UNITS]
    assert (units.sum(1) == 36).all() and not sudoku.valid_sudoku(sums[None])[0]


class Known(torch.nn.Module):
    """A stub: answers puzzle i (found by its givens) with its solution (i % 3 == 0), the solution
    with two cells of a row swapped across boxes (1: invalid), or a training grid (2: valid, but not
    the givens). Records every generate call."""
    mask_id = 9

    def __init__(self, puzzles, solutions, other):
        super().__init__()
        self.wte, self.calls = torch.nn.Embedding(10, 1), []
        self.puzzles, self.solutions, self.other = puzzles, solutions, other

    def generate(self, n, **kw):
        self.calls.append(kw)
        rows = [next(i for i, q in enumerate(self.puzzles) if (q == p.numpy()).all())
                for p in kw["prompt"]]
        x = torch.from_numpy(self.solutions[rows])
        for j, i in enumerate(rows):
            if i % 3 == 1:
                x[j, [2, 3]] = x[j, [3, 2]]
            elif i % 3 == 2:
                x[j] = torch.from_numpy(self.other)
        return Samples(x, torch.zeros_like(x), torch.full((n,), 7))


def test_solved_means_valid_and_keeps_the_givens(root):
    _, train, puzzles, solutions = load(root)
    model = Known(puzzles, solutions, train[0])
    out = sudoku.solve_rate(model, torch.from_numpy(puzzles), 5, autocast("cpu")[0], alpha0=1.0)
    expect = torch.arange(20) % 3 == 0
    assert out["all"]["solved"] == pytest.approx(7 / 20) and out["all"]["n"] == 20
    givens = (puzzles != 9).sum(1)
    for a, b in sudoku.BINS:  # each bin: its own puzzles
        sel = torch.from_numpy((givens >= a) & (givens <= b))
        if sel.any():
            assert out[f"givens {a}-{b}"]["solved"] == pytest.approx(expect[sel].double().mean())
    assert sum(v["n"] for k, v in out.items() if k.startswith("givens")) == 20
    # the mixed batch: every puzzle, whatever its givens, in one call, rows drawing from seed + i
    assert len(model.calls) == 1 and model.calls[0]["seed"] == 5 and model.calls[0]["alpha0"] == 1


@pytest.mark.parametrize("adaptive, threshold", [("confidence", None), ("margin", 0.5)])
def test_puzzles_of_any_givens_decode_in_one_call(root, adaptive, threshold):
    _, _, puzzles, _ = load(root)
    torch.manual_seed(0)
    model = EsoLM(EsoLMConfig(vocab_size=9, block_size=81, n_layer=1, n_head=2, n_embd=16,
                              alpha0=1.0, pos_emb=True)).eval()
    calls, generate = [], model.generate
    model.generate = lambda *a, **kw: calls.append(generate(*a, **kw)) or calls[-1]
    prompt = torch.from_numpy(puzzles)
    out = sudoku.solve_rate(model, prompt, 0, autocast("cpu")[0], alpha0=1.0, steps=1024,
                            adaptive=adaptive, threshold=threshold)
    (x, _, nfe), = calls
    given, empty = prompt != 9, (prompt == 9).sum(1)
    assert x.shape == (20, 81) and (x[given] == prompt[given]).all() and (x < 9).all()
    assert (nfe >= 1).all() and (nfe <= empty).all() and len(set(nfe.tolist())) > 3  # a row its own
    assert out["all"]["nfe"] == pytest.approx(nfe.double().mean().item())
    assert out["all"]["nfe_max"] == nfe.max() and out["givens 30-34"]["nfe_max"] <= nfe.max()


def test_train_and_solve_commands(root, tmp_path, capfd, monkeypatch):
    """train: train.py with the preset (L = 81, pos_emb, low_var; the command line wins); solve:
    every model x alpha0 x order x threshold, written to sudoku.json."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as end:
        sudoku.main(["train", f"--data_dir={root}", f"--out_dir={out}", "--alpha0=0.5",
                     "--max_iters=4", "--eval_interval=4", "--n_layer=1", "--n_embd=32",
                     "--n_head=2", "--batch_size=8", "--eval_iters=1", "--device=cpu"])
    config = json.loads(next(line for line in capfd.readouterr().out.splitlines()
                             if line.startswith("{")))
    assert end.value.code == 0 and config["block_size"] == 81 and config["pos_emb"] is True
    assert (config["loss_type"], config["batch_size"], config["max_iters"]) == ("low_var", 8, 4)
    seen, timed = [], sudoku.timed_generate
    monkeypatch.setattr(sudoku, "timed_generate", lambda *a, **kw: seen.append(kw) or timed(*a, **kw))
    sudoku.main(["solve", f"--out_dir={out}", "--puzzles=12", "--alpha0s=0,0.5", "--steps=200",
                 "--thresholds=0.9", "--device=cpu", "--temperature=0.5"])
    cells = json.loads((out / "sudoku.json").read_text())["cells"]
    assert [(kw["alpha0"], kw["adaptive"], kw["threshold"], kw["steps"], kw["temperature"]) for kw in seen] == [
        (c["alpha0"], c["order"] if c["order"] in sudoku.ADAPTIVE else None, c["threshold"], 200, 0.5)
        for c in cells]  # what each cell says reached generate
    assert [(c["alpha0"], c["order"], c["threshold"]) for c in cells] == [
        (0.5, "random", None), (0.5, "confidence", None), (0.5, "confidence", 0.9),
        (0.5, "margin", None), (0.5, "margin", 0.9), (0, "left to right", None)]
    for c in cells:
        assert c["all"]["n"] == 12 and 0 <= c["all"]["solved"] <= 1 and c["all"]["nfe"] >= 1
        assert sum(v["n"] for k, v in c.items() if k.startswith("givens")) == 12
    assert "margin tau=0.9" in capfd.readouterr().out
    assert (out / "sudoku.png").exists() == bool(importlib.util.find_spec("matplotlib"))


@pytest.mark.parametrize("cuda", [False, True])
def test_the_preset_then_the_command_line(cuda, monkeypatch):
    ran = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(sudoku.subprocess, "run", lambda cmd: ran.append(cmd) or SimpleNamespace(
        returncode=3))
    with pytest.raises(SystemExit) as end:
        sudoku.main(["train", "--alpha0=1", "--max_iters=10"])
    (cmd,) = ran
    assert end.value.code == 3 and cmd[1].endswith("train.py")  # train.py's status
    assert cmd[-2:] == ["--alpha0=1", "--max_iters=10"]  # last: they win
    flags = dict(a[2:].split("=") for a in cmd[2:-2])
    assert flags.items() >= {"dataset": "sudoku", "block_size": "81", "pos_emb": "True",
                             "loss_type": "low_var"}.items()
    assert (flags["batch_size"], flags["learning_rate"], flags["max_iters"]) == (
        ("256", "0.0005", "50000") if cuda else ("32", "0.002", "7000"))
    assert ("n_layer" in flags) == cuda  # on the CPU, train.py's own preset: 4 layers x 128


@pytest.mark.parametrize("argv, message", [
    ([], "the first argument is a command"),
    (["build", "--givens=10,20"], "--givens=10,20: must be a,b with 17 <= a <= b <= 81"),
    (["solve", "--orders=random,best"], "--orders=random,best: are random, confidence, margin"),
    (["solve", "--dtype=half"], "--dtype=half: is auto, bfloat16, float32"),
    (["solve", "--out_dir=nowhere"], "no checkpoint at nowhere/ckpt.pt"),
    (["build", "--name=../x"], "--name=../x: is not a plain name"), (["build", "--name="], "--name=: is not"),
    (["build", "--seed=-1"], "--seed=-1: must be at least 0"),
    (["solve", "--alpha0s=1,2"], r"--alpha0s=1.0,2.0: must each be in \[0, 1\]"),
    pytest.param(["solve", "--device=cuda"], "--device=cuda: is not a device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"))])
def test_bad_settings_end_in_one_line(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        sudoku.main(argv)
    assert not list(tmp_path.iterdir())


def test_mdlm_is_sampled_at_alpha0_1_only(root, tmp_path, monkeypatch):
    model = EsoLM(EsoLMConfig(vocab_size=9, block_size=81, n_layer=1, n_head=2, n_embd=16,
                              variant="MDLM", alpha0=1.0, pos_emb=True)).eval()
    ckpt = {"train_config": {"data_dir": str(root), "dataset": "sudoku"},
            "dataset_meta": {"tokenizer": "sudoku"}}
    monkeypatch.setattr(sudoku, "load_model", lambda d, device: (model, ckpt))
    argv = ["solve", f"--out_dir={tmp_path}", "--puzzles=3", "--alpha0s=0,0.5", "--orders=margin"]
    sudoku.main(argv)
    cells = json.loads((tmp_path / "sudoku.json").read_text())["cells"]
    assert [(c["alpha0"], c["order"]) for c in cells] == [(1.0, "margin")]
    sudoku.main(argv + ["--dtype=bfloat16"])  # autocast, on the CPU too
    assert json.loads((tmp_path / "sudoku.json").read_text())["dtype"] == "bfloat16"
    text = {**ckpt, "dataset_meta": {"tokenizer": "bytes"}}  # a model of text: no digits
    monkeypatch.setattr(sudoku, "load_model", lambda d, device: (model, text if d == "txt" else ckpt))
    with pytest.raises(SystemExit, match="--baselines=txt: txt is not a Sudoku model"):
        sudoku.main(argv + ["--baselines=txt"])
    with pytest.raises(SystemExit, match="--out_dir=txt: txt is not a Sudoku model"):
        sudoku.main([*argv, "--out_dir=txt"])
