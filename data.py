"""
The files the scripts share: tokenizers, token shards (prepare_data.py writes them, train.py reads
windows of them) and checkpoints. A shard is a 32-byte header (b"ESOLMTOK", uint32 version, uint32
bytes per token, uint64 tokens, uint64 0) and the tokens, little-endian; a dataset is a folder of
train_*.bin, val_*.bin and meta.json, written last.
"""
import json
import os
import struct

import numpy as np
import tiktoken
import torch

HEADER = struct.Struct("<8sIIQQ")
R50K = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # tiktoken's cache name of GPT-2's BPE file


class Bytes:  # UTF-8 bytes; byte 0 (NUL), all but absent from text, ends a document
    name, vocab_size, eot_id = "bytes", 256, 0

    def encode(self, text):
        return list(text.replace("\0", "").encode())

    def decode(self, ids):
        return bytes(list(ids)).decode(errors="replace").replace("\0", "\n<|endoftext|>\n")


class GPT2:  # GPT-2's BPE: tiktoken's r50k_base has the same ids
    name, vocab_size, eot_id = "gpt2", 50257, 50256

    def __init__(self):
        try:
            self.enc = tiktoken.get_encoding("r50k_base")
        except Exception as e:
            raise ValueError(f"GPT-2's BPE could not be loaded ({e}); offline, put the file as "
                             f"<folder>/{R50K} and set TIKTOKEN_CACHE_DIR=<folder>") from None

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids)).replace("<|endoftext|>", "\n<|endoftext|>\n")


class Sudoku:  # a cell a token, digits 1-9 as ids 0-8; "." or "0" is an empty cell: the mask, 9
    name, vocab_size, eot_id = "sudoku", 9, None

    def encode(self, text):
        return [9 if c in ".0" else int(c) - 1 for c in text if c in ".0123456789"]

    def decode(self, ids):
        cells = "".join(str(i + 1) if 0 <= i < 9 else "." for i in ids)
        return "\n".join(cells[r:r + 9] for r in range(0, len(cells), 9))


def get_tokenizer(name):
    tokenizers = {"bytes": Bytes, "gpt2": GPT2, "sudoku": Sudoku}
    if name not in tokenizers:
        raise ValueError(f"unknown tokenizer {name!r}: one of {', '.join(tokenizers)}")
    return tokenizers[name]()


# --- Shards
def read_shard(path):
    """A shard's tokens as a read-only memmap, once its header agrees with the file."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    magic, version, itemsize, n, _ = HEADER.unpack(head.ljust(HEADER.size, b"\0"))
    if magic != b"ESOLMTOK" or version != 1 or itemsize not in (2, 4):
        raise ValueError(f"{path}: not a version-1 token shard")
    if os.path.getsize(path) != HEADER.size + n * itemsize:
        raise ValueError(f"{path}: truncated, or not {n} tokens as its header says")
    dtype = np.dtype(f"<u{itemsize}")
    return np.memmap(path, dtype, "r", HEADER.size, (n,)) if n else np.zeros(0, dtype)


class Windows:
    """The windows of L tokens of a split: every start in every shard (a dataset of fixed-length
    records, meta's record_len, one window per record), numbered shard after shard."""

    def __init__(self, data_dir, name, split, L):
        folder = os.path.join(data_dir, name)
        if not os.path.exists(os.path.join(folder, "meta.json")):
            raise ValueError(f"no dataset at {folder}: python prepare_data.py --name={name}")
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        self.L, self.step = L, self.meta.get("record_len", 1)
        if self.step > 1 and L != self.step:
            raise ValueError(f"{name} holds records of {self.step} tokens: block_size must be that")
        shards = [read_shard(os.path.join(folder, s)) for s in self.meta[f"{split}_shards"]]
        self.shards = [s for s in shards if len(s) >= L]
        if not self.shards:
            raise ValueError(f"{folder}: no {split} shard holds block_size={L} tokens")
        self.ends = np.cumsum([(len(s) - L) // self.step + 1 for s in self.shards])

    def __len__(self):
        return int(self.ends[-1])

    def __getitem__(self, i):  # window i: shard s, start (i - the windows before s) * step
        s = int(np.searchsorted(self.ends, i, side="right"))
        start = (i - (self.ends[s - 1] if s else 0)) * self.step
        return self.shards[s][start:start + self.L]

    def batch(self, ix):  # (len(ix), L) int64
        return torch.from_numpy(np.stack([self[i] for i in ix]).astype(np.int64))


# --- Checkpoints
def save_checkpoint(path, **fields):  # written aside, then renamed: a crash leaves the old whole
    torch.save({"format": "esolm", "version": 2, **fields}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """A checkpoint of train.py, on the CPU: weights_only, so that a file cannot run code."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a checkpoint of this project, or damaged ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "esolm" or ckpt.get("version") != 2:
        raise ValueError(f"{path} is not a checkpoint of this project (format esolm, version 2)")
    missing = {"model", "ema", "model_config", "train_config", "dataset_meta"} - set(ckpt)
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(sorted(missing))}")
    return ckpt
