"""
The core scripts as a user runs them: prepare_data.py (the split, shards, errors), data.py's
windows, train.py and sample.py on a tiny model (resume, EMA, DDP, NaN stop, eval mode, bad
settings), the configurator, the README's examples, and which file imports which.
"""
import argparse
import ast
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

import data
import prepare_data
from configurator import configure, parse
from data import Windows, get_tokenizer, read_shard
from esolm import EsoLM, EsoLMConfig
from lab.common import load_model
from lab.conftest import ROOT, TINY, records, run, subprocess_run, train
from prepare_data import ShardWriter

SEED, VAL = 0, 0.5  # 0.5: the small corpus below gets documents in both splits


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.fixture
def corpus(tmp_path):
    """A small corpus, and the bytes each non-empty document should tokenize to, by its key."""
    root = tmp_path / "corpus"
    write(root / "a.txt", "To be, or not to be: that is the question.\n")
    write(root / "sub" / "b.txt", b"caf\xe9 \xff ok\x00 end \xef\xbf\xbd\n")  # bad UTF-8, a NUL, a U+FFFD
    write(root / "empty.txt", "")
    write(root / "blank.txt", "  \n\n")
    docs = [{"text": "first line document"}, {"text": "na\u00efve \u2603 snow\nman"}, {"text": ""},
            {"text": "fourth", "meta": 1}, {"text": "fifth"}, {"text": "sixth document, longer than the others"}]
    lone = '{"text": "a lone \\ud800 surrogate"}'  # valid JSON, no UTF-8 encoding: replaced
    write(root / "docs.jsonl", "\n".join([json.dumps(d) for d in docs] + [lone]) + "\n\n")
    expected = {"a.txt": b"To be, or not to be: that is the question.\n",
                "sub/b.txt": "caf\ufffd \ufffd ok end \ufffd\n".encode(), "docs.jsonl:7": "a lone \ufffd surrogate".encode()}
    expected |= {f"docs.jsonl:{i + 1}": d["text"].encode() for i, d in enumerate(docs) if d["text"]}
    return root, expected


def build(root, tmp_path, *args, name="tiny"):
    argv = [f"--input={root}", f"--name={name}", f"--data_dir={tmp_path / 'data'}", f"--seed={SEED}",
            f"--val_fraction={VAL}", *args]
    return prepare_data.main(argv), tmp_path / "data" / name


def split_tokens(folder, meta, split):
    return np.concatenate([read_shard(folder / s) for s in meta[f"{split}_shards"]])


def held_out(key):  # the split rule, written again: blake2b of "seed:key" as a fraction of 2**64
    return int.from_bytes(hashlib.blake2b(f"{SEED}:{key}".encode(), digest_size=8).digest(), "big") / 2**64 < VAL


# ---------------------------------------------------------------------------------------------------------------
# prepare_data.py and the shards

def test_a_bytes_corpus(corpus, tmp_path):
    root, expected = corpus
    meta, folder = build(root, tmp_path, "--workers=1")
    assert json.loads((folder / "meta.json").read_text()) == meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("bytes", 256, 0, "uint16")
    assert meta["train_docs"] + meta["val_docs"] == len(expected) == 8  # the empty documents are skipped
    for split in ("train", "val"):
        want = [v for k, v in sorted(expected.items()) if held_out(k) == (split == "val")]
        tokens = split_tokens(folder, meta, split)
        assert want and len(tokens) == meta[f"{split}_tokens"] == sum(len(d) + 1 for d in want)
        ends = np.flatnonzero(tokens == 0)  # each document is followed by the end-of-text byte
        docs = [tokens[a + 1:b] for a, b in zip(np.r_[-1, ends[:-1]], ends)]
        assert ends[-1] == len(tokens) - 1 and [d.astype(np.uint8).tobytes() for d in docs] == want


def test_the_split_does_not_depend_on_workers_or_runs(corpus, tmp_path):
    root, _ = corpus
    write(root / "0big.txt", "a slow first task, " * 100_000)  # taken as they come, results would reorder
    runs = [build(root, tmp_path, f"--workers={w}", name=f"run{i}") for i, w in enumerate([1, 1, 2])]
    shards = [[(f / s).read_bytes() for s in m["train_shards"] + m["val_shards"]] for m, f in runs]
    assert runs[0][0] == runs[1][0] == runs[2][0] and shards[0] == shards[1] == shards[2]


def test_shards_roll_over_and_their_header_is_checked(corpus, tmp_path):
    root, _ = corpus
    ref, ref_folder = build(root, tmp_path, name="ref")
    small, folder = build(root, tmp_path, "--shard_tokens=7", name="small")
    for split in ("train", "val"):
        shards = [read_shard(folder / s) for s in small[f"{split}_shards"]]
        assert len(shards) == -(-ref[f"{split}_tokens"] // 7) > 1 and all(len(s) == 7 for s in shards[:-1])
        assert np.array_equal(np.concatenate(shards), split_tokens(ref_folder, ref, split))
    writer = ShardWriter(tmp_path, "big", np.dtype(np.uint32), 600)  # a vocabulary over 65,536
    writer.write(np.arange(1000) * 1000)
    writer.close()
    assert writer.names == ["big_000.bin", "big_001.bin"] and np.array_equal(
        np.concatenate([read_shard(tmp_path / n) for n in writer.names]), np.arange(1000) * 1000)
    raw = (tmp_path / "big_001.bin").read_bytes()
    for name, bad, match in [("cut", raw[:-3], "truncated"), ("long", raw + b"\0\0", "not 400 tokens"),
                             ("foreign", b"\0" * 100, "not a version-1 token shard"),
                             ("v2", raw[:8] + (2).to_bytes(4, "little") + raw[12:], "not a version-1"),
                             *[(f"item{k}", raw[:12] + k.to_bytes(4, "little") + raw[16:], "not a version-1")
                               for k in (1, 8)]]:
        with pytest.raises(ValueError, match=match):
            read_shard(write(tmp_path / f"{name}.bin", bad))


def test_windows_are_every_contiguous_slice_of_every_shard(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    writers = [ShardWriter(folder, s, np.dtype(np.uint16), 10) for s in ("train", "val")]
    writers[0].write(np.arange(25))  # shards of 10, 10 and 5 tokens
    writers[1].write(np.arange(4))
    for w in writers:
        w.close()
    (folder / "meta.json").write_text(json.dumps({"train_shards": writers[0].names, "val_shards": writers[1].names}))
    windows = Windows(tmp_path, "w", "train", 4)
    want = [list(range(s, s + 4)) for s in (0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 20, 21)]
    assert [windows[i].tolist() for i in range(len(windows))] == want  # each start once, none across shards
    assert windows.batch([0, 15]).tolist() == [want[0], want[15]]
    with pytest.raises(ValueError, match="no val shard holds block_size=5"):
        Windows(tmp_path, "w", "val", 5)
    meta = json.loads((folder / "meta.json").read_text()) | {"record_len": 5}
    (folder / "meta.json").write_text(json.dumps(meta))
    assert [w.tolist()[0] for w in Windows(tmp_path, "w", "train", 5)] == [0, 5, 10, 15, 20]  # whole records
    for L in (4, 10):  # a window must be one record, no more, no less
        with pytest.raises(ValueError, match="records of 5 tokens: block_size must be that"):
            Windows(tmp_path, "w", "train", L)


def test_gpt2_tokens(corpus, tmp_path):
    try:
        tok = get_tokenizer("gpt2")
    except ValueError as e:
        pytest.skip(f"tiktoken's GPT-2 BPE is not available: {e}")
    root, expected = corpus
    meta, folder = build(root, tmp_path, "--tokenizer=gpt2")
    assert (meta["vocab_size"], meta["eot_id"]) == (50257, 50256) and tok.encode("Hello world") == [15496, 995]
    want = [v.decode().replace("\0", "") for k, v in sorted(expected.items()) if not held_out(k)]
    assert split_tokens(folder, meta, "train").tolist() == [t for d in want for t in tok.encode(d) + [50256]]


@pytest.mark.parametrize("where", ["writing shards", "between the renames"])
def test_an_interrupt_leaves_the_dataset_as_it_was(corpus, tmp_path, monkeypatch, where):
    root, _ = corpus
    _, folder = build(root, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_shard, rename = ShardWriter.write, os.rename
    if where == "writing shards":
        monkeypatch.setattr(ShardWriter, "write", lambda self, t: write_shard(self, t) or (_ for _ in ()).throw(
            KeyboardInterrupt))
    else:
        monkeypatch.setattr(data.os, "rename", lambda a, b: rename(a, b) if ".new" not in str(a) else (
            _ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build(root, tmp_path, "--workers=1")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert os.listdir(tmp_path / "data") == ["tiny"]


@pytest.mark.parametrize("files, message", [
    ({"e.txt": "", "s.txt": " \n"}, "0 train and 0 val documents"),
    ({"only.txt": "one document"}, "(1 train and 0 val|0 train and 1 val) documents"),
    ({"bad.jsonl": '{"text": "a"}\n{"txt": "c"}\n'}, r"bad\.jsonl:2: expected a JSON object"),
    ({"bad.jsonl": '{"text": "a"}\nnot json\n'}, r"bad\.jsonl:2: expected a JSON object"),
])
def test_a_failed_rebuild_leaves_the_dataset_as_it_was(corpus, tmp_path, files, message):
    root, _ = corpus
    _, folder = build(root, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name, text in files.items():
        write(tmp_path / "new" / name, text)
    with pytest.raises(ValueError, match=message):
        build(tmp_path / "new", tmp_path)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and os.listdir(tmp_path / "data") == ["tiny"]


def test_the_built_in_corpus(tmp_path):
    meta = prepare_data.main([f"--data_dir={tmp_path}"])
    assert meta["train_docs"] + meta["val_docs"] == 38 and meta["val_docs"] >= 1 and "38 Shakespeare plays" in meta[
        "source"] and 4_500_000 < meta["train_tokens"] + meta["val_tokens"] < 6_000_000
    val = get_tokenizer("bytes").decode(split_tokens(tmp_path / "shakespeare", meta, "val"))
    assert val.startswith("# ") and val.count("<|endoftext|>") == meta["val_docs"] and " \n" not in val


# ---------------------------------------------------------------------------------------------------------------
# train.py and sample.py

def test_train_then_sample_with_a_prompt_and_an_infill(tiny_data, trained):
    evals = [r for r in records(trained) if "val" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6] and evals[-1]["val"] < evals[0]["val"]
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["model_config"]["alpha0"] == 0.25  # the model knows its alpha0
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    _, out, _ = run("sample.py", f"--out_dir={trained}", "--num_samples=3", "--batch_size=2", "--prompt=To be",
                    "--steps=4")
    samples = re.findall(r"---------- sample \d\n(.*?)(?=\n---------- )", out, re.S)
    assert len(samples) == 3 and all(s.startswith("To be") for s in samples) and out.count("NFE") == 2
    _, out, _ = run("sample.py", f"--out_dir={trained}", "--num_samples=1", "--infill=To [[5]] or", "--kv_cache=False",
                    "--alpha0=1", "--steps=2", "--cut_eot=False")
    sample = out.split("---------- sample 1\n")[1]
    assert sample.startswith("To ") and sample[8:].startswith(" or")


def test_sample_prints_what_generate_gives_with_every_setting(tiny_data, trained):
    """The script's settings reach generate unchanged: its samples, at non-default settings
    everywhere, are generate's, called directly from Python."""
    _, out, _ = run("sample.py", f"--out_dir={trained}", "--num_samples=3", "--batch_size=2", "--prompt=To",
                    "--alpha0=0.5", "--steps=5", "--adaptive=margin", "--threshold=0.3", "--temperature=0.7",
                    "--top_p=0.8", "--seed=4", "--cut_eot=False", "--ema=False")
    model, _ = load_model(trained, ema=False)
    tok, prompt = get_tokenizer("bytes"), torch.tensor(list(b"To"))
    want = [model.generate(n, 0.5, 5, prompt=prompt, adaptive="margin", threshold=0.3, temperature=0.7, top_p=0.8,
                           seed=s).x for n, s in ((2, 4), (1, 6))]
    texts = [tok.decode(row) for x in want for row in x.tolist()]
    assert re.findall(r"---------- sample \d\n(.*?)(?=\n---------- )", out, re.S) == texts


def test_validation_runs_in_eval_mode(tiny_data):
    """With dropout 0.1, two evaluations of the same model agree exactly, and they are the eval-mode
    NELBO of the documented windows and noise (seeded from --seed, 2**31, 0 and 1)."""
    outs = [train(tiny_data, f"out_eval_{i}", "--max_iters=0", "--eval_interval=1", "--dropout=0.1",
                  "--eval_iters=2") for i in range(2)]
    vals = [records(o)[0]["val"] for o in outs]
    model, ckpt = load_model(outs[0])

    seed_for = draws_of(ckpt["train_config"]["seed"])
    windows, rng = Windows(tiny_data / "data", "tiny", "val", 32), np.random.default_rng(seed_for(1 << 31, 0))
    gen = torch.Generator().manual_seed(seed_for(1 << 31, 1))
    with torch.no_grad():
        want = [model.nelbo(windows.batch(rng.integers(0, len(windows), 4)), generator=gen).mean() for _ in range(2)]
    assert vals[0] == vals[1] and vals[0] == pytest.approx(torch.stack(want).mean().item() / 32, abs=1e-6)


def draws_of(seed):  # train.py's seed_for, written again: the stream of (rank, iteration, ...)
    return lambda *keys: int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


@pytest.mark.parametrize("argv", [[], ["--device=cpu"]])
def test_without_a_gpu_or_with_device_cpu_the_cpu_preset_applies(tiny_data, monkeypatch, argv):
    """docs/training.md: without a GPU (or with --device=cpu), the CPU preset: 4 x 128, L = 128,
    batch 8, 2800 iterations; the command line still wins (--max_iters)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, out, _ = run("train.py", "--dataset=tiny", f"--out_dir={tiny_data / f'out_preset{len(argv)}'}", "--max_iters=0",
                    "--eval_iters=1", *argv, cwd=tiny_data)
    config = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert "CPU preset" in out and config["max_iters"] == 0
    assert [config[k] for k in ("n_layer", "n_embd", "block_size", "batch_size")] == [4, 128, 128, 8]
    assert "--max_iters=2800 " in run("train.py", "--help", *argv)[1]


@pytest.mark.parametrize("a,b", [("--loss_type=elbo", "--loss_type=low_var"), ("--batch_split=0.25", "--batch_split=0.75")])
def test_the_settings_reach_the_objective(tiny_data, a, b):
    """One iteration from the same init and draws: the logged terms move as the setting says they
    must."""
    alpha0 = "--alpha0=1" if "loss_type" in a else "--alpha0=0.5"
    logs = [[r for r in records(train(tiny_data, f"out_obj_{x[2:].replace('=', '_')}", alpha0, x, "--max_iters=1",
                                      "--log_interval=1", "--eval_interval=5")) if "loss" in r][0] for x in (a, b)]
    if "loss_type" in a:  # the weighted MDM term 1/t > 1 times the unweighted one, on the same masks
        assert logs[0]["mdm"] > logs[1]["mdm"] > 0 and logs[0]["ar"] == logs[1]["ar"] == 0
    else:  # a quarter against three quarters of the rows on the MDM term: other rows, other sums
        assert logs[0]["mdm"] != logs[1]["mdm"] and logs[0]["ar"] != logs[1]["ar"]


@pytest.mark.parametrize("ema, clip", [(0.0, 0.0), (0.9, 1e-3)])
def test_train_py_is_the_documented_loop(tiny_data, ema, clip):
    """train.py against its loop written again here from the documented draws, at settings away
    from their defaults (dropout, weight decay, two micro-steps, warmup then cosine, no clip or a
    tight one, an EMA or none): each iteration's lr, loss, grad norm (before the clip), tokens/s and
    MFU, each evaluation (eval mode, fixed windows and noise, the EMA when there is one), the best
    validation NELBO and the final weights."""
    out = train(tiny_data, f"out_loop_{ema}", "--max_iters=4", "--eval_interval=2", "--log_interval=1",
                "--dropout=0.1", "--weight_decay=0.5", "--gradient_accumulation_steps=2", "--warmup_iters=2",
                "--lr_decay_iters=5", f"--grad_clip={clip}", f"--ema={ema}", "--batch_size=3", "--eval_iters=2",
                "--peak_flops=1e12")
    log, ckpt = records(out), torch.load(out / "ckpt.pt", weights_only=True)
    cfg, L = ckpt["train_config"], 32
    windows = {s: Windows(tiny_data / "data", "tiny", s, L) for s in ("train", "val")}

    seed_for = draws_of(cfg["seed"])
    def batch(split, rng):
        return windows[split].batch(rng.integers(0, len(windows[split]), size=3))

    def evaluate(m):  # both splits from the same fixed draws, in eval mode
        m.eval()
        out = {}
        for split in ("train", "val"):
            rng, gen = np.random.default_rng(seed_for(2**31, 0)), torch.Generator().manual_seed(seed_for(2**31, 1))
            with torch.no_grad():
                out[split] = sum(m.nelbo(batch(split, rng), generator=gen).mean().item() for _ in range(2)) / 2 / L
        return out

    torch.manual_seed(cfg["seed"])
    model = EsoLM(EsoLMConfig(**ckpt["model_config"]))
    average = EsoLM(EsoLMConfig(**ckpt["model_config"])) if ema else None
    if average:
        average.load_state_dict(model.state_dict())
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.5},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0}],
                                  betas=(0.9, 0.999))
    lr_max, lr_min, logged = cfg["learning_rate"], cfg["min_lr"], {r["iter"]: r for r in log if "loss" in r}
    evals = {r["iter"]: r for r in log if "val" in r}
    for it in range(5):
        if it % 2 == 0:
            assert evaluate(average or model) == pytest.approx({k: evals[it][k] for k in ("train", "val")}, rel=1e-5)
        if it == 4:
            break
        # warmup: lr (it + 1) / 2; then a cosine from lr_max at it = 2 to lr_min at it = 5
        lr = lr_max * (it + 1) / 2 if it < 2 else lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * (it - 2) / 3)) / 2
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        torch.manual_seed(seed_for(0, it))
        rng, terms = np.random.default_rng(seed_for(0, it, 0)), 0.0
        for _ in range(2):
            mdm, ar = model.loss(batch("train", rng), cfg["batch_split"], cfg["loss_type"])
            ((mdm + ar) / 2).backward()
            terms += (mdm + ar).item() / 2
        norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters()))
        if clip:
            assert norm > clip  # the clip acts: every gradient scaled to norm clip
            for p in model.parameters():
                p.grad *= clip / norm
        optimizer.step()
        optimizer.zero_grad()
        if average:  # the official warm-up: update n = it + 1 decays by min(ema, (1 + n) / (10 + n))
            with torch.no_grad():
                for a, p in zip(average.parameters(), model.parameters()):
                    a.lerp_(p, 1 - min(ema, (it + 2) / (it + 11)))
        r = logged[it + 1]
        assert (r["lr"], r["loss"], r["grad_norm"]) == pytest.approx((lr, terms, norm), rel=1e-5)
        # tokens: 3 rows x L x 2 micro-steps; FLOPs, as train.py documents them: 6 a weight but the
        # embedding's and a token, 12 n_layer C L for attention, an AR row feeding (2 - alpha0) L
        flops = 6 * (sum(p.numel() for p in model.parameters()) - model.wte.weight.numel()) + 12 * 1 * 32 * L
        share = cfg["batch_split"] + (1 - cfg["batch_split"]) * (2 - cfg["alpha0"])
        seconds = r["ms_per_iter"] / 1000
        assert (r["tokens_per_s"] * seconds, r["mfu"] * 1e12 * seconds) == pytest.approx(
            (3 * L * 2, flops * 3 * L * 2 * share), rel=1e-9)
    assert ckpt["best_val_loss"] == min(r["val"] for r in evals.values())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-5, atol=1e-6)
        if average:
            torch.testing.assert_close(ckpt["ema"][k], average.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_one_ema_update_and_its_warm_up(tiny_data):
    """One step with --ema: the EMA is init + (1 - d)(trained - init), d = min(ema, 2 / 11) (the
    official warm-up, update n = 1); 30 steps at 0.9999 end far closer to the trained weights than
    to the init."""
    init = torch.load(train(tiny_data, "out_ema_0", "--max_iters=0", "--eval_interval=1", "--ema=0.9") / "ckpt.pt",
                      weights_only=True)["model"]
    step = torch.load(train(tiny_data, "out_ema_1", "--max_iters=1", "--eval_interval=1", "--ema=0.9") / "ckpt.pt",
                      weights_only=True)
    d = min(0.9, 2 / 11)
    for k in init:
        want = init[k].double() + (1 - d) * (step["model"][k].double() - init[k].double())
        torch.testing.assert_close(step["ema"][k].double(), want, atol=1e-6, rtol=1e-5)
    long = torch.load(train(tiny_data, "out_ema_30", "--max_iters=30", "--eval_interval=30", "--ema=0.9999") / "ckpt.pt",
                      weights_only=True)

    def distance(a, b):
        return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))

    assert distance(long["ema"], long["model"]) < 0.25 * distance(long["ema"], init)


def test_resume_repeats_the_uninterrupted_run(tiny_data):
    common = ["--eval_interval=4", "--log_interval=1", "--ema=0.9", "--dropout=0.1", "--lr_decay_iters=8"]
    whole = train(tiny_data, "out_whole", "--max_iters=8", *common)
    part = train(tiny_data, "out_part", "--max_iters=4", *common)
    run("train.py", "--dataset=tiny", f"--out_dir={part}", *TINY, "--max_iters=8", "--init_from=resume", *common,
        cwd=tiny_data)
    a, b = records(whole), records(part)
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k in ("loss", "val", "grad_norm")} == pytest.approx(
            {k: v for k, v in rb.items() if k in ("loss", "val", "grad_norm")}, rel=1e-6)


def test_resume_keeps_the_best_validation_nelbo(tiny_data):
    out = train(tiny_data, "out_best", "--max_iters=2", "--eval_interval=2")
    run("train.py", "--dataset=tiny", f"--out_dir={out}", *TINY, "--max_iters=4", "--eval_interval=2",
        "--init_from=resume", "--learning_rate=3", cwd=tiny_data)  # steps too large: worse after
    vals = [r["val"] for r in records(out) if "val" in r]
    assert len(vals) == 3 and vals[-1] > min(vals)
    assert torch.load(out / "ckpt.pt", weights_only=True)["best_val_loss"] == min(vals)


def test_sample_uses_the_ema_weights_unless_told(tiny_data):
    out_dir = train(tiny_data, "out_ema_sample", "--ema=0.5", "--max_iters=3", "--eval_interval=3")
    tok, texts = get_tokenizer("bytes"), {}
    for ema in (True, False):
        _, out, _ = run("sample.py", f"--out_dir={out_dir}", "--num_samples=1", "--steps=4", f"--ema={ema}",
                        "--cut_eot=False", "--temperature=1", "--top_p=1")
        texts[ema] = out.split("---------- sample 1\n")[1].split("\n---------- ")[0]
        model, _ = load_model(out_dir, ema=ema)
        assert texts[ema] == tok.decode(model.generate(1, steps=4, seed=0).x[0].tolist())
    assert texts[True] != texts[False]


def test_training_with_one_row_at_alpha0_0_or_1(tiny_data):
    for alpha0 in (0, 1):  # one term only: a batch of one row is enough, as the error for 0.25 says
        train(tiny_data, f"out_one_row_{alpha0}", f"--alpha0={alpha0}", "--batch_size=1", "--max_iters=1",
              "--eval_interval=1")


def test_a_prompt_of_exactly_L_tokens_is_the_sample(trained):
    _, out, _ = run("sample.py", f"--out_dir={trained}", "--num_samples=1", "--prompt=" + "ab" * 16)
    assert out.split("---------- sample 1\n")[1].startswith("ab" * 16)


def test_fine_tuning_starts_from_a_checkpoints_weights(tiny_data, trained):
    out = train(tiny_data, "out_tune", f"--init_from={trained}/ckpt.pt", "--max_iters=0", "--eval_interval=1")
    start, source = (torch.load(p / "ckpt.pt", weights_only=True) for p in (out, trained))
    assert all(torch.equal(source["model"][k], start["model"][k]) for k in source["model"])
    assert start["iter_num"] == 0 and start["model_config"] == source["model_config"]
    (tiny_data / "out_tune_a").mkdir()  # an empty folder is no run: train.py writes in it
    tuned = train(tiny_data, "out_tune_a", f"--init_from={trained}/ckpt.pt", "--alpha0=0.5", "--max_iters=0",
                  "--eval_interval=1")  # the command line's alpha0 wins over the checkpoint's
    assert torch.load(tuned / "ckpt.pt", weights_only=True)["model_config"]["alpha0"] == 0.5
    status, _, err = run("train.py", "--dataset=tiny", f"--init_from={trained}/ckpt.pt", *TINY, "--n_layer=2",
                         cwd=tiny_data, ok=False)
    assert status and "--n_layer=2: the checkpoint's is 1" in err
    # a converted model's network (biases, tanh GELU) is kept, not the defaults
    config = EsoLMConfig(**{**source["model_config"], "bias": True, "gelu": "tanh"})
    model = EsoLM(config)
    model.load_state_dict(source["model"], strict=False)
    data.save_checkpoint(str(tiny_data / "converted.pt"), **{**source, "model": model.state_dict(), "ema": None,
                                                            "model_config": dataclasses.asdict(config)})
    tuned = train(tiny_data, "out_tune_tanh", f"--init_from={tiny_data / 'converted.pt'}", "--max_iters=0",
                  "--eval_interval=1")
    assert torch.load(tuned / "ckpt.pt", weights_only=True)["model_config"] == dataclasses.asdict(config)


def test_ddp_two_processes_on_the_cpu(tiny_data):
    """torchrun, 2 processes x 2 micro-steps: process r draws iteration i from seed_for(r, i), and
    the step averages the gradients of all 4 micro-steps: the final weights against that loop,
    written again here (one process, constant lr, no clip)."""
    out = tiny_data / "out_ddp"
    p = subprocess_run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"{ROOT}/train.py",
                       "--dataset=tiny", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3", "--log_interval=1",
                       "--gradient_accumulation_steps=4", *TINY, "--warmup_iters=0", "--min_lr=1e-2",
                       "--grad_clip=0", cwd=tiny_data)
    assert p.returncode == 0 and "2 process(es) (gloo)" in p.stdout, p.stderr[-3000:]
    assert [r["iter"] for r in records(out) if "loss" in r] == [1, 2, 3]  # rank 0 logs
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    cfg, windows = ckpt["train_config"], Windows(tiny_data / "data", "tiny", "train", 32)

    seed_for = draws_of(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = EsoLM(EsoLMConfig(**ckpt["model_config"]))
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0}],
                                  1e-2, weight_decay=cfg["weight_decay"], betas=cfg["betas"])
    for it in range(3):
        for rank in range(2):
            torch.manual_seed(seed_for(rank, it))
            rng = np.random.default_rng(seed_for(rank, it, 0))
            for _ in range(2):
                x = windows.batch(rng.integers(0, len(windows), size=cfg["batch_size"]))
                mdm, ar = model.loss(x, cfg["batch_split"], cfg["loss_type"])
                ((mdm + ar) / 4).backward()
        optimizer.step()
        optimizer.zero_grad()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", ["--compile=True", "--dtype=bfloat16"])
def test_the_gpu_paths_on_the_cpu(tiny_data, setting):
    """CPU stand-ins for the GPU's training: torch.compile (inductor) and bf16 autocast run, log
    finite losses and train about as the float32 run does from the same draws."""
    plain = [r for r in records(train(tiny_data, "out_plain", "--max_iters=3", "--eval_interval=3",
                                      "--log_interval=1")) if "loss" in r]
    name = "out_" + setting[2:].replace("=", "_")
    gpu = [r for r in records(train(tiny_data, name, "--max_iters=3", "--eval_interval=3", "--log_interval=1",
                                    setting)) if "loss" in r]
    assert [r["iter"] for r in gpu] == [1, 2, 3]
    assert all(b["loss"] == pytest.approx(a["loss"], rel=0.03) for a, b in zip(plain, gpu))
    assert setting == "--compile=True" or any(a["loss"] != b["loss"] for a, b in zip(plain, gpu))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_nan_or_inf_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, monkeypatch, bad):
    """NaN: an absurd learning rate blows the weights up; inf: a loss that is inf (gradients finite)."""
    out = train(tiny_data, f"out_{bad}", "--max_iters=2", "--eval_interval=2", "--log_interval=1")
    before, loss = (out / "ckpt.pt").read_bytes(), EsoLM.loss
    if bad == "inf":
        monkeypatch.setattr(EsoLM, "loss", lambda *a, **kw: tuple(t + math.inf for t in loss(*a, **kw)))
    status, _, err = run("train.py", "--dataset=tiny", f"--out_dir={out}", *TINY, "--max_iters=40", "--eval_interval=2",
                         "--log_interval=1", "--init_from=resume", "--grad_clip=0",
                         "--learning_rate=" + ("1e30" if bad == "nan" else "1e-3"), cwd=tiny_data, ok=False)
    assert status and "NaN or inf" in err and (out / "ckpt.pt").read_bytes() == before


# one bad value a row, on a run that would otherwise work: one line that names the setting, nothing written
BAD = {"train.py": ["--batch_size=0", "--n_head=5", "--eval_interval=0", "--log_interval=0", "--learning_rate=-1",
                    "--gradient_accumulation_steps=0", "--batch_split=1.5", "--dropout=1.5", "--out_dir=/proc/nope",
                    "--eval_iters=0", "--max_iters=-1", "--ema=2", "--warmup_iters=-5", "--n_layer=0", "--block_size=0",
                    "--min_lr=-1", "--min_lr=1.0", "--lr_decay_iters=-1", "--weight_decay=-0.1", "--betas=0.9,1",
                    "--grad_clip=-1", "--peak_flops=-1", "--seed=-1", "--alpha0=1.5", "--alpha0=nan",
                    "--learning_rate=1e999", "--variant=C", "--loss_type=mse",
                    "--dtype=float16", "--init_from=elsewhere", "--dataset=a/b", "--dataset=nowhere", "--compile=yes",
                    "--betas=0.9", "--betas=0.9,0.99,0.5", "--dataset=..", "--dataset=.tiny.new",
                    "--init_from={other_vocab}",
                    "--device=tpu", "--bogus=1", "--n_layr=2", "max_iters=3", "--max_iters", "--dataset",
                    ("--batch_size=1", "--alpha0=0.25"),
                    ("--variant=MDLM", "--alpha0=0.25"), ("--init_from=resume", "--out_dir=empty"),
                    "--out_dir={trained}", "--out_dir={log_is_a_folder}", ("--init_from=resume", "--out_dir={converted}")],
       "sample.py": ["--num_samples=0", "--batch_size=-1", "--alpha0=2", "--steps=0", "--temperature=-1",
                     "--top_p=0", "--top_p=1.5", "--num_samples=x", "--adaptive=best", "--threshold=0.5",
                     ("--prompt=a", "--infill=b"), "--out_dir=missing", "--prompt", "--infill",
                     "--infill=" + "x" * 30 + "[[5]]", "--device=gpu", *["--device=cuda:0"] * (not torch.cuda.is_available()), "--prompt=" + "x" * 40],
       "prepare_data.py": ["--val_fraction=0", "--val_fraction=1.5", "--val_fraction=nan", "--shard_tokens=0",
                           "--workers=0", "--seed=-1", "--name=a/b", "--name=.hidden", "--data_dir={file}",
                           "--data_dir={file}/sub", "--data_dir=/proc/nope", "--input={tmp}/nothing*.txt",
                           "--input={file}", "--tokenizer=sentencepiece"]}
BASE = {"train.py": ["--dataset=tiny", "--out_dir={tmp}/out", "--max_iters=2", "--eval_interval=1", *TINY],
        "sample.py": ["--out_dir={trained}", "--num_samples=1", "--steps=2"],
        "prepare_data.py": ["--input=corpus", "--name=tiny2", "--data_dir={tmp}/data"]}


def files(folder):  # every file with its size and time: what a failed run must leave as it was
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("script,bad", [(s, b) for s, rows in BAD.items() for b in rows])
def test_a_bad_setting_is_one_line_that_names_it(tiny_data, trained, tmp_path, script, bad, request):
    bad = [bad] if isinstance(bad, str) else list(bad)
    file = write(tmp_path / "a_file", "not a folder")
    fill = {"tmp": tmp_path, "file": file, "trained": trained, "log_is_a_folder": tmp_path / "ro",
            "converted": tmp_path / "converted"}
    (tmp_path / "ro" / "log.jsonl").mkdir(parents=True)  # a folder where train.py cannot write its log
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)  # a run with no optimizer: lab.convert's
    data.save_checkpoint(str(write(tmp_path / "converted" / "ckpt.pt", b"")), **ckpt | {"optimizer": None})
    config = ckpt["model_config"] | {"vocab_size": 9}  # a model of another vocabulary (Sudoku's)
    data.save_checkpoint(str(tmp_path / "other.pt"), **ckpt | {"model": EsoLM(EsoLMConfig(**config)).state_dict(),
                                                           "ema": None, "model_config": config})
    fill["other_vocab"] = tmp_path / "other.pt"
    hidden = tiny_data / "data" / ".tiny.new"  # prepare_data's build folder: a whole dataset, but not one to train on
    if ".tiny.new" in str(bad):
        shutil.copytree(tiny_data / "data" / "tiny", hidden)
        request.addfinalizer(lambda: shutil.rmtree(hidden))
    before = files(tiny_data) | files(tmp_path)
    status, out, err = run(script, *[a.format(**fill) for a in BASE[script] + bad], cwd=tiny_data, ok=False)
    keys = [a.split("=")[0] for a in bad]
    line = err.strip()
    assert status and len(line.splitlines()) == 1 and line.startswith(f"{script}: "), err
    assert any(k.lstrip("-") in line for k in keys), line
    assert files(tiny_data) | files(tmp_path) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_a_dataset_it_cannot_write_is_one_line_and_the_old_one_stays(tiny_data, monkeypatch):
    def read_only(*args):
        raise OSError(30, "Read-only file system", args[0])
    before = files(tiny_data / "data")
    monkeypatch.setattr(os, "rename", read_only)  # the swap of the finished dataset
    status, _, err = run("prepare_data.py", "--input=corpus", "--name=tiny", "--data_dir=data", cwd=tiny_data,
                         ok=False)
    assert status and err.strip().startswith("prepare_data.py: [Errno 30] Read-only file system"), err
    assert files(tiny_data / "data") == before


def test_a_bad_setting_prints_no_traceback(tiny_data):
    p = subprocess_run(f"{ROOT}/train.py", "--n_head=5", *TINY[:1], cwd=tiny_data)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_sample_rejects_what_is_not_our_checkpoint(tmp_path):
    for content, message in [({"model": {}}, "not a checkpoint of this project"),
                             ({"format": "esolm", "version": 2}, "lacks dataset_meta, ema, model"),
                             ({"format": "esolm", "version": 1, **dict.fromkeys(["model", "ema", "model_config",
                               "train_config", "dataset_meta"])}, "(format esolm, version 2)"),
                             ({"format": "esolm", "payload": argparse.Namespace(x=1)}, "not a checkpoint")]:
        torch.save(content, tmp_path / "ckpt.pt")
        status, _, err = run("sample.py", f"--out_dir={tmp_path}", ok=False)
        assert status and message in err, err


def eot_checkpoint(trained, folder):
    """The tiny checkpoint with an output bias that makes every generated token the end of a
    document."""
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    config = EsoLMConfig(**{**ckpt["model_config"], "bias": True})
    model = EsoLM(config)
    model.load_state_dict(ckpt["model"], strict=False)  # the biases start at 0
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias[0] = 100.0
    folder.mkdir(exist_ok=True)
    data.save_checkpoint(str(folder / "ckpt.pt"), **{**ckpt, "model": model.state_dict(), "ema": None,
                                                     "model_config": dataclasses.asdict(config)})
    return folder


class Payload:  # a pickle that would run code when loaded: it makes a file
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_cannot_run_code(tmp_path):
    torch.save({"format": "esolm", "version": 2, "model": Payload(str(tmp_path / "ran"))}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project, or damaged"):
        data.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert not (tmp_path / "ran").exists()


def test_the_split_follows_the_seed_and_the_name_the_input(corpus, tmp_path):
    root, expected = corpus
    meta, folder = build(root, tmp_path, "--seed=7", name="seeded")
    val = {k for k in expected if int.from_bytes(hashlib.blake2b(f"7:{k}".encode(), digest_size=8).digest(),
                                                 "big") / 2**64 < VAL}
    want = sum(len(v) + 1 for k, v in expected.items() if k in val)
    assert meta["val_tokens"] == want and val != {k for k in expected if held_out(k)}  # seed 0's split differs
    prepare_data.main([f"--input={root}/*", f"--data_dir={tmp_path / 'data'}", f"--val_fraction={VAL}"])
    assert (tmp_path / "data" / "corpus" / "meta.json").exists()  # no --name: the input's folder


def test_sample_cuts_at_the_end_of_text(tiny_data, trained):
    out_dir = eot_checkpoint(trained, tiny_data / "out_eot")
    _, out, _ = run("sample.py", f"--out_dir={out_dir}", "--num_samples=3", "--prompt=To be", "--steps=4")
    assert re.findall(r"---------- sample \d\n(.*)\n", out) == ["To be"] * 3 and "3 cut at an end" in out
    assert "<|endoftext|>" not in out  # cut before the end-of-text token, not after
    _, out, _ = run("sample.py", f"--out_dir={out_dir}", "--num_samples=1", "--prompt=To be", "--cut_eot=False")
    assert out.split("---------- sample 1\n")[1].count("<|endoftext|>") == 32 - len("To be")


def test_sample_shows_the_canvas_after_each_call(trained):
    _, out, _ = run("sample.py", f"--out_dir={trained}", "--num_samples=2", "--show", "--infill=To [[12]] be",
                    "--steps=4", "--alpha0=0.5", "--cut_eot=False", "--batch_size=1")  # sample 1's frames only
    shown, samples = out.split("---------- sample 1\n")
    frames = re.findall(r"---------- after call (\d+) of (\d+): \d+ new token\(s\), (\d+) masked\n(.*?)(?=\n-{10} |$)",
                        shown, re.S)
    assert [int(f[0]) for f in frames] == list(range(int(frames[0][1]) + 1))  # every call: fewer than 24
    masked = [int(f[2]) for f in frames]
    assert masked[0] == 12 + 14 and masked[-1] == 0 and masked == sorted(masked, reverse=True)
    assert all(f[3].startswith("To ") and f[3].count("\u2591") == int(f[2]) for f in frames)
    assert frames[-1][3] == samples.split("\n---------- ")[0] and "after call" not in samples


def test_the_readme_worked_example_is_what_explain_prints():
    with open(os.path.join(ROOT, "README.md")) as f:
        block = f.read().split("<!-- sample.py --explain -->\n```\n", 1)[1].split("```", 1)[0]
    _, out, _ = run("sample.py", "--explain")
    assert block == out and "call  phase" in block


def test_the_readme_python_example_runs(trained, tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        code = f.read().split("## From Python\n\n```python\n", 1)[1].split("```", 1)[0]
    os.makedirs(tmp_path / "out", exist_ok=True)
    (tmp_path / "out" / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------------------------------------------------------
# The configurator, and the house: which file imports which

def test_the_configurator_parses_by_type_and_lists_every_setting(capsys):
    @dataclasses.dataclass
    class S:
        n: int = 1  # a count
        x: float = 0.5
        flag: bool = False
        name: str = "a"
        maybe: float | None = None
        many: tuple[int, ...] = (1, 2)

    assert configure(S, argv=[]) == S()
    assert [parse("flag", t, bool) for t in ("true", "FALSE", "True", "false")] == [True, False, True, False]
    got = configure(S, argv=["--n=3", "--x=1e-3", "--flag", "--name=b=c", "--maybe=2", "--many=4,5,6"])
    assert got == S(3, 1e-3, True, "b=c", 2.0, (4, 5, 6))
    assert configure(S, argv=["--flag=False", "--maybe=None", "--many="]) == S(flag=False, many=())
    for argv, message in [(["--n=2.5"], "--n=2.5: must be int"), (["--x=nan"], "--x=nan: must be a finite number"),
                          (["--flag=yes"], "--flag=yes: must be bool"), (["--nn=1"], "did you mean --n?"),
                          (["n=1"], "unknown setting 'n=1'")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            configure(S, argv=argv)
    with pytest.raises(SystemExit):
        configure(S, "doc", argv=["--help"])
    assert "--n=1" in capsys.readouterr().out and parse("k", "1,2", tuple[float, ...]) == (1.0, 2.0)


def imports(path):
    tree = ast.parse(open(path).read())
    return {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
            for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)}


def test_imports_run_one_way():
    """esolm.py imports torch only; the core never imports the lab; prepare_data.py, nothing of the
    model."""
    core = ["esolm.py", "train.py", "sample.py", "prepare_data.py", "configurator.py", "data.py"]
    project = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"lab"}
    for f in core:
        assert "lab" not in imports(os.path.join(ROOT, f)), f
    assert imports(os.path.join(ROOT, "esolm.py")) & project == set()
    assert imports(os.path.join(ROOT, "prepare_data.py")) & project == {"configurator", "data"}
    assert imports(os.path.join(ROOT, "data.py")) & project == set()
