"""
The data the scripts share: tokenizers, the token-shard format (written by prepare_data.py, read by train.py and
evaluate.py), a dataset's folder written whole or not at all, the windows training and evaluation draw, and the
Sudoku dataset (solved grids from a randomized solver, and held-out puzzles).

A shard is a 32-byte header (magic b"ESOLMTOK", uint32 version, uint32 itemsize, uint64 token count, uint64
reserved) then the tokens, little-endian; a dataset is <data_dir>/<name>/ with train_*.bin, val_*.bin and meta.json.
"""
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import struct
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import tiktoken
import torch

MAGIC = b"ESOLMTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, token count, reserved: 32 bytes
EOT_TEXT = "\n<|endoftext|>\n"  # how decode shows the end of a document
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_CACHE_NAME = hashlib.sha1(R50K_URL.encode()).hexdigest()  # tiktoken's cache names a file by its URL's SHA-1


class DataError(ValueError):
    """A problem with the input or a dataset that the user can fix; the scripts print it without a traceback."""


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: the model reserves one more id, vocab_size, for the mask token

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
            raise DataError(f"could not load tiktoken's r50k_base BPE for --tokenizer=gpt2 ({type(e).__name__}: {e}). "
                            f"tiktoken downloads {R50K_URL} once and caches it; without network, save that file "
                            f"as <folder>/{R50K_CACHE_NAME} and set TIKTOKEN_CACHE_DIR=<folder>") from e

    def encode(self, text):
        return np.array(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids):  # tiktoken shows EOT as <|endoftext|>, as does a document that holds that text
        return self.enc.decode(list(ids)).replace("<|endoftext|>", EOT_TEXT)


class SudokuTokenizer:
    """One token per cell: digits 1-9 are ids 0-8. In a prompt, "." or "0" is an empty cell, the mask id 9 (a
    position to generate); other characters (spaces, new lines, |) are skipped. No end-of-text token."""
    name, vocab_size, eot_id = "sudoku", 9, None

    def encode(self, text):
        return np.array([9 if c in ".0" else int(c) - 1 for c in text if c in ".0123456789"], dtype=np.int64)

    def decode(self, ids):  # 9 cells a line; a mask (or anything else) shows as "."
        cells = "".join(str(i + 1) if 0 <= i < 9 else "." for i in ids)
        return "\n".join(cells[r:r + 9] for r in range(0, len(cells), 9))


def encode_template(text, tokenizer, mask_id):
    """Text with [[n]] markers -> token ids, each marker replaced by n mask ids (positions to generate)."""
    ids = []
    for i, piece in enumerate(re.split(r"\[\[(\d+)\]\]", text)):
        ids += [mask_id] * int(piece) if i % 2 else list(tokenizer.encode(piece))
    return ids


TOKENIZERS = {"bytes": ByteTokenizer, "gpt2": GPT2Tokenizer, "sudoku": SudokuTokenizer}


def get_tokenizer(name):
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


# ----------------------------------------------------------------------------------------------------------
# Shards and datasets

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


@contextlib.contextmanager
def dataset_folder(data_dir, name):
    """A hidden folder to write <data_dir>/<name> in, swapped in by two renames when the block ends without error:
    <name> is always the old dataset or the whole new one. An error or Ctrl-C drops the new folder, and an old
    dataset stays as it was. Write meta.json last: a folder with meta.json is complete."""
    out = os.path.join(data_dir, name)
    partial, old = (os.path.join(data_dir, f".{name}.{s}-{os.getpid()}") for s in ("partial", "old"))
    os.makedirs(partial)
    try:
        yield partial
        if os.path.exists(out):
            os.rename(out, old)
        os.rename(partial, out)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(out):  # stopped between the two renames
            os.rename(old, out)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_meta(data_dir, name):
    folder = os.path.join(data_dir, name)
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        hint = " (train.py builds this default dataset by itself)" if name == "shakespeare" else ""
        raise FileNotFoundError(f"no dataset at {folder} (missing meta.json): build it with "
                                f"`python prepare_data.py --name={name} --data_dir={data_dir}`{hint}")
    meta = json.loads(Path(path).read_text())
    shards = meta["train_shards"] + meta["val_shards"] + meta.get("puzzle_shards", [])
    missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
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


# ----------------------------------------------------------------------------------------------------------
# Windows: what training and evaluation read

class Windows:
    """The windows of L tokens of one split: every offset of every shard holding at least L tokens, numbered one
    shard after another. A dataset of fixed-size records (meta's record_len: a Sudoku grid) has a window per record,
    so that no window cuts across two."""

    def __init__(self, data_dir, name, split, L):
        self.meta, self.L = load_meta(data_dir, name), L
        self.step = self.meta.get("record_len") or 1
        if self.step > 1 and L != self.step:
            raise DataError(f"{name} holds records of {self.step} tokens: block_size must be {self.step}, not {L}")
        arrays = [read_shard(os.path.join(data_dir, name, f)) for f in self.meta[f"{split}_shards"]]
        self.arrays = [a for a in arrays if len(a) >= L]
        if not self.arrays:
            raise DataError(f"{os.path.join(data_dir, name)}: no {split} shard holds block_size={L} tokens")
        self.ends = np.cumsum([(len(a) - L) // self.step + 1 for a in self.arrays])

    def __len__(self):
        return int(self.ends[-1])

    def __getitem__(self, i):
        s = int(np.searchsorted(self.ends, i, side="right"))
        start = (i - (self.ends[s - 1] if s else 0)) * self.step
        return self.arrays[s][start:start + self.L]

    def batch(self, ix):
        """(len(ix), L) int64 tokens of the windows ix."""
        return np.stack([self[i] for i in ix]).astype(np.int64)


def held_out_windows(data_dir, name, L, n):
    """(n, L) windows evenly spaced over the validation split, as a LongTensor: the same windows for every model."""
    windows = Windows(data_dir, name, "val", L)
    return torch.from_numpy(windows.batch(np.linspace(0, len(windows) - 1, n).astype(np.int64)))


# ----------------------------------------------------------------------------------------------------------
# Sudoku: a grid is 81 cells in row-major order, ids 0-8 for the digits 1-9 (-1: an empty cell, in the solver). The
# solver keeps, for each of the 27 units (9 rows, 9 columns, 9 boxes), the bit mask of the digits it holds, in plain
# Python ints: for 81 cells that is far faster than numpy, whose per-call overhead would dominate.

CELL_UNITS = [(i // 9, 9 + i % 9, 18 + i // 27 * 3 + i % 9 // 3) for i in range(81)]  # row r, column 9 + c, box 18 + b
POPCOUNT = [m.bit_count() for m in range(512)]
BITS = [tuple(1 << d for d in range(9) if m >> d & 1) for m in range(512)]  # the one-hot bits of each 9-bit mask
BIT_ID = {1 << d: d for d in range(9)}
UNITS = np.array([[i for i in range(81) if u in CELL_UNITS[i]] for u in range(27)])  # (27, 9): the cells of each unit


def sudoku_search(grid, used, empty, n, limit, rnd):
    """Count the ways to fill the cells empty[:n] (up to limit), depth first, branching on the cell with the fewest
    candidates. grid keeps the last digit tried (one-hot), so it holds the solution when the search stops at the
    first. With rnd (a random.Random) the candidates are tried in a random order."""
    if n == 0:
        return 1
    fewest = 10
    for j in range(n):
        a, b, c = CELL_UNITS[empty[j]]
        m = ~(used[a] | used[b] | used[c]) & 511
        if POPCOUNT[m] < fewest:
            fewest, best, candidates = POPCOUNT[m], j, m
            if fewest <= 1:
                break
    if fewest == 0:
        return 0
    n -= 1
    i = empty[best]
    empty[best], empty[n] = empty[n], i  # park the branching cell past the end of the still-empty prefix
    a, b, c = CELL_UNITS[i]
    bits = list(BITS[candidates])
    if rnd is not None:
        rnd.shuffle(bits)
    count = 0
    for bit in bits:
        grid[i] = bit
        used[a], used[b], used[c] = used[a] | bit, used[b] | bit, used[c] | bit
        count += sudoku_search(grid, used, empty, n, limit, rnd)
        used[a], used[b], used[c] = used[a] ^ bit, used[b] ^ bit, used[c] ^ bit
        if count >= limit:
            break
    return count


def random_solution(rng):
    """A random solved grid, (81,) uint8, by randomized backtracking from the empty grid: not exactly uniform over all
    grids (no cheap generator is), but any grid can come out, and there is no template to relabel."""
    rnd = random.Random(int(rng.integers(2**63)))
    grid, used, empty = [0] * 81, [0] * 27, list(range(81))
    rnd.shuffle(empty)  # random ties between equally constrained cells
    sudoku_search(grid, used, empty, 81, 1, rnd)
    return np.array([BIT_ID[bit] for bit in grid], dtype=np.uint8)


def count_solutions(givens, limit=2):
    """How many solutions the puzzle givens ((81,) ids, -1 = empty) has, counted up to limit (0 if givens clash)."""
    used, empty = [0] * 27, []
    for i, d in enumerate(int(d) for d in givens):
        if d < 0:
            empty.append(i)
            continue
        for u in CELL_UNITS[i]:
            if used[u] >> d & 1:
                return 0
            used[u] |= 1 << d
    return sudoku_search([0] * 81, used, empty, len(empty), limit, None)


def make_puzzle(solution, n_givens, rng, tries=5):
    """The solution with all but n_givens cells emptied (-1), (81,) int8, its solution still unique: cells are emptied
    in a random order, skipping a cell whose removal would allow a second solution. If an order gets stuck above
    n_givens, up to `tries` orders are tried and the closest (more givens) is returned; from 30 givens up it is not."""
    best = None
    for _ in range(tries):
        cells, used, n = [int(d) for d in solution], [511] * 27, 81
        for i in rng.permutation(81):
            if n == n_givens:
                break
            bit, (a, b, c) = 1 << cells[i], CELL_UNITS[i]
            used[a], used[b], used[c] = used[a] ^ bit, used[b] ^ bit, used[c] ^ bit
            forced = POPCOUNT[~(used[a] | used[b] | used[c]) & 511] == 1  # the other givens leave it one digit
            cells[i] = -1
            if forced or count_solutions(cells) == 1:
                n -= 1
            else:
                cells[i] = BIT_ID[bit]
                used[a], used[b], used[c] = used[a] | bit, used[b] | bit, used[c] | bit
        if best is None or n < best[0]:
            best = n, cells
        if n == n_givens:
            break
    return np.array(best[1], dtype=np.int8)


def valid_sudoku(grids):
    """(N,) bool: True where every row, column and box of the (N, 81) ids holds each of 0-8 exactly once."""
    units = np.asarray(grids).reshape(-1, 81)[:, UNITS]  # (N, 27, 9)
    return (np.sort(units, axis=2) == np.arange(9)).all(axis=(1, 2))


def sudoku_chunk(seed, index, size, givens=None):
    """Chunk `index` of the training grids (givens None) or of the held-out puzzles, from its own random stream: the
    dataset does not depend on how many workers make it. Returns (solutions, puzzles or None)."""
    rng = np.random.default_rng([seed, givens is not None, index])
    solutions = np.stack([random_solution(rng) for _ in range(size)]) if size else np.zeros((0, 81), np.uint8)
    if givens is None:
        return solutions, None
    puzzles = [make_puzzle(s, int(rng.integers(givens[0], givens[1] + 1)), rng) for s in solutions]
    return solutions, np.stack(puzzles) if size else np.zeros((0, 81), np.int8)


def sudoku_rows(pool, seed, n, chunk, seen, givens=None):
    """n rows from chunks 0, 1, ... of sudoku_chunk, leaving out any grid already in `seen` (which grows): a training
    grid made twice, a puzzle whose solution is a training grid. The left-out rows are replaced from later chunks."""
    solutions, puzzles, index = [], [], 0
    while sum(map(len, solutions)) < n:
        missing = n - sum(map(len, solutions))
        tasks = [(seed, index + j, min(chunk, missing - j * chunk), givens) for j in range(-(-missing // chunk))]
        index += len(tasks)
        for s, p in pool.starmap(sudoku_chunk, tasks):
            keep = []
            for j, grid in enumerate(s):
                if grid.tobytes() not in seen:
                    seen.add(grid.tobytes())
                    keep.append(j)
            solutions.append(s[keep])
            puzzles.append(p[keep] if p is not None else None)
    return np.concatenate(solutions or [np.zeros((0, 81), np.uint8)]), puzzles


def build_sudoku(data_dir, name="sudoku", n_train=100_000, n_test=1000, givens=(30, 45), seed=0, workers=2):
    """<data_dir>/<name>: train_*.bin, n_train distinct solved grids (81 tokens each, one record per grid); val_*.bin,
    the solutions of the n_test held-out puzzles (never a training grid), in order; puzzles_*.bin, the puzzles, with
    the mask id 9 in each empty cell, n_givens drawn uniformly in `givens` (inclusive) and a unique solution."""
    seen = set()
    with Pool(workers) as pool:
        train, _ = sudoku_rows(pool, seed, n_train, 1000, seen)
        solutions, puzzles = sudoku_rows(pool, seed, n_test, 50, seen, givens)
    puzzles = np.concatenate([p for p in puzzles if p is not None] or [np.zeros((0, 81), np.int8)])
    assert valid_sudoku(train).all() and valid_sudoku(solutions).all()
    tok = SudokuTokenizer()
    with dataset_folder(data_dir, name) as folder:
        names = {}
        for split, rows in (("train", train), ("val", solutions), ("puzzles", np.where(puzzles < 0, 9, puzzles))):
            writer = ShardWriter(folder, split, shard_dtype(tok.vocab_size), 50_000_000 // 81 * 81)  # whole grids
            writer.write(rows.reshape(-1))
            writer.close()
            names[split] = writer.names
        n_givens = (puzzles >= 0).sum(1)
        meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, eot_id=None, dtype=shard_dtype(9).name,
                    record_len=81, train_shards=names["train"], val_shards=names["val"], puzzle_shards=names["puzzles"],
                    train_grids=len(train), test_puzzles=len(puzzles), givens=list(givens), seed=seed,
                    givens_histogram={int(g): int((n_givens == g).sum()) for g in np.unique(n_givens)},
                    source=f"randomized solver, seed {seed}")
        Path(folder, "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_puzzles(data_dir, name):
    """(puzzles, solutions): the held-out puzzles of a Sudoku dataset (mask id 9 where a cell is empty) and their
    solutions, (n, 81) int64 each."""
    meta = load_meta(data_dir, name)
    read = [np.concatenate([read_shard(os.path.join(data_dir, name, f)) for f in meta[key]]).astype(np.int64)
            for key in ("puzzle_shards", "val_shards")]
    return read[0].reshape(-1, 81), read[1].reshape(-1, 81)
