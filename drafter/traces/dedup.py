"""Exact and near-duplicate detection on user prompts, with an on-disk index.

The prompt of a conversation is its user turns. Exact duplicates share the hash of the
normalised prompt (case, spacing and punctuation folded); near duplicates are found with
MinHash signatures over word shingles (rensa: a batch of prompts in one Rust call) and LSH
banding: two prompts whose Jaccard similarity is above the threshold share a band with high
probability. The bands and rows are datasketch's optimum for the threshold. The first
conversation seen is kept; later ones are counted as duplicates of it.

The index lives in SQLite: one row per kept prompt (its id) and one narrow row per exact hash
and per LSH band of it (the key and the prompt's row number), so memory stays flat however
many prompts were ingested, and later runs see what earlier runs kept. New rows wait in memory
(numpy arrays: 16 bytes a key) and are written in large sorted runs: random keys inserted a
batch at a time would each touch another B-tree page (two thirds of the ingest's dedup time at
a million lines). A bit filter of the keys spares most lookups; the file stores it at close.
"""

from __future__ import annotations

import re
import sqlite3
import struct
import unicodedata
from operator import itemgetter
from pathlib import Path

import numpy as np
import rensa
import xxhash

from drafter.errors import DrafterError


class DedupIndexError(DrafterError, ValueError):
    """The dedup index on disk was built with other parameters."""

WORD = re.compile(r"\w+")
LOOKUP = 512  # keys per SELECT; a varying IN-list size would cache a new large statement per size
# Bits of the in-memory filter of the keys in the index (16 MiB): a key whose bit is clear is not
# in the index and is not looked up; a set bit may be another key's, and is looked up.
FILTER_BITS = 1 << 27
LOOKUP_SQL = ("SELECT seen.key, prompts.ref FROM seen JOIN prompts ON prompts.id = seen.prompt "
              f"WHERE seen.key IN ({','.join('?' * LOOKUP)})")
SHINGLE = 3  # words per shingle
FLUSH_KEYS = 1 << 18  # keys held in memory (4 MiB with their prompt rows) before they are written
# Rows an INSERT statement writes: a statement's run costs about what a row does, and a row of
# executemany is one run (0.83 -> 0.33 us a key row into an empty index, 0.97 -> 0.62 into 2M keys).
INSERT_ROWS = 100


# ASCII text, lowercased with every non-word character made a space: the words `WORD` finds.
ASCII_WORDS = str.maketrans({c: c.lower() if c.isalnum() or c == "_" else " " for c in map(chr, range(128))})


def normalize(text: str) -> str:
    """Case, Unicode form, punctuation and spacing folded: what 'the same prompt' means."""
    if text.isascii():  # (NFKC leaves ASCII as it is: one pass, in C where _keys.c was built)
        return " ".join(text.translate(ASCII_WORDS).split()) if _keys is None else _keys.normalize_ascii(text)
    return " ".join(WORD.findall(unicodedata.normalize("NFKC", text).lower()))


def shingles(normalized: str) -> list[bytes]:
    # (a `normalize`d text is words of \w characters and single spaces: split once encoded, and the
    # shifted word lists zipped: the same shingles, joined without a Python loop)
    words = normalized.encode().split()
    if len(words) <= SHINGLE:
        return [b" ".join(words)]
    return list(map(b" ".join, zip(*(words[i:] for i in range(SHINGLE)))))


MINHASH_SEED = 1  # part of the index's params: another seed hashes prompts into other buckets


def signature_bytes(normalized: list[str], num_perm: int) -> list[bytes]:
    """Each prompt's MinHash signature of its word shingles: num_perm little-endian uint32."""
    matrix = rensa.RMinHash.digest_matrix_from_token_byte_sets([shingles(n) for n in normalized], num_perm, MINHASH_SEED)
    pack = struct.Struct(f"<{num_perm}I").pack  # (rensa hands out lists of ints: packed without numpy, ~3x faster)
    return [pack(*row) for row in matrix.to_rows()]


def _key(tag: int, data: bytes) -> int:
    """A signed 64-bit key (SQLite INTEGER) for an exact hash (tag 0) or an LSH band (tag 1 + band)."""
    return xxhash.xxh64_intdigest(data, seed=tag) - (1 << 63)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): datasketch's optimum for the threshold (fewest false positives and negatives).
    (datasketch brings scipy, ~60 MB: imported here only, in the process that owns the index.)"""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


try:  # the per-prompt arithmetic in C (_keys.c), built at install where there is a compiler
    from drafter.traces import _keys
except ImportError:  # (the same keys in Python: `prompt_keys_py`)
    _keys = None


def prompt_keys(normalized: list[str], num_perm: int, bands: int, rows: int) -> np.ndarray:
    """The keys of each `normalize`d prompt, all that the index needs of it: a row of int64 per
    prompt, its exact key then its band keys.

    The keys of `prompt_keys_py`, made in C where it was built for this rensa's R-MinHash: no
    Python object a prompt (~3 against ~20 us a prompt of ~33 words)."""
    if _keys is None or _keys.RMINHASH_VERSION != rensa.RMinHash.ALGORITHM_VERSION:
        return prompt_keys_py(normalized, num_perm, bands, rows)
    keys = _keys.keys(normalized, SHINGLE, num_perm, MINHASH_SEED, bands, rows)
    return np.frombuffer(keys, dtype=np.int64).reshape(-1, 1 + bands)


def prompt_keys_py(normalized: list[str], num_perm: int, bands: int, rows: int) -> np.ndarray:
    """`prompt_keys` in Python, as it is defined: each band key is `_key` of a slice of the prompt's
    `signature_bytes`, the exact key `_key(0, prompt)`."""
    if not normalized:
        return np.empty((0, 1 + bands), dtype=np.int64)
    width = 4 * rows
    spans = [(1 + i, i * width, (i + 1) * width) for i in range(bands)]
    h, shift = xxhash.xxh64_intdigest, 1 << 63  # = _key, inlined: 1 + bands keys a prompt
    out = []
    for text, hv in zip(normalized, signature_bytes(normalized, num_perm)):
        out.append([h(text.encode(), seed=0) - shift, *[h(hv[a:b], seed=tag) - shift for tag, a, b in spans]])
    return np.array(out, dtype=np.int64)


class KeyFilter:
    """A set of 64-bit keys that may answer "maybe" for a key it does not hold, never "no" for one
    it holds (one bit per key, from the key's low bits: the keys are hashes already)."""

    def __init__(self, bits: int) -> None:
        assert bits & (bits - 1) == 0 and bits >= 8, "a power of two"
        self.mask = np.uint64(bits - 1)
        self.bits = np.zeros(bits // 8, dtype=np.uint8)

    def _where(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = keys.view(np.uint64) & self.mask
        return idx >> np.uint64(3), (np.uint8(1) << (idx & np.uint64(7)).astype(np.uint8))

    def add(self, keys: np.ndarray) -> None:
        if len(keys):
            byte, bit = self._where(keys)
            np.bitwise_or.at(self.bits, byte, bit)

    def may_hold(self, keys: np.ndarray) -> np.ndarray:
        byte, bit = self._where(keys)
        return (self.bits[byte] & bit) != 0


class Deduper:
    """`check(ids, keys)` -> per prompt None (kept, now indexed) or (kind, id of the original)."""

    def __init__(self, path: Path, threshold: float = 0.85, num_perm: int = 128) -> None:
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.num_perm = num_perm
        self.db = sqlite3.connect(str(path))
        self.db.execute("PRAGMA journal_mode=OFF")  # the whole index file is swapped in atomically
        self.db.execute("PRAGMA synchronous=OFF")
        # 4 MiB of pages: rows are written in sorted runs (a run visits each page once, so more
        # cache does not spare reads: at a million lines 4, 8, 16 and 64 MiB took as long), and
        # random lookups are few (the filter).
        self.db.execute("PRAGMA cache_size=-4096")
        # A prompt's keys (the exact one and one per band) point at its row of `prompts`: a key row
        # holds two integers, not the prompt's id, so the B-tree that random inserts touch is half as large.
        self.db.execute("CREATE TABLE IF NOT EXISTS prompts (id INTEGER PRIMARY KEY, ref TEXT NOT NULL)")
        if "ref" in {row[1] for row in self.db.execute("PRAGMA table_info(seen)")}:
            self._migrate()
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (key INTEGER PRIMARY KEY, prompt INTEGER NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        params = (f"{threshold}:{num_perm}:{self.bands}x{self.rows}:{SHINGLE}:"
                  f"rensa{rensa.RMinHash.ALGORITHM_VERSION}-{MINHASH_SEED}:xxh64")
        row = self.db.execute("SELECT value FROM meta WHERE name='params'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('params', ?)", (params,))
        elif row[0] != params:
            # Different LSH parameters would hash the same prompt into other buckets.
            raise DedupIndexError(f"dedup index was built with {row[0]}; this run hashes with {params} (the config's "
                                  "threshold and num_perm, this drafter's MinHash): "
                                  "ingest into a fresh --out folder")
        self._added: dict[str, tuple[int, np.ndarray]] = {}  # kept since the last settle(): may still be forgotten
        # Not written yet: the keys of kept prompts, as sorted runs of (keys, prompt rows) (merged
        # as they grow: a few runs to search), and prompt row -> id. A forgotten prompt leaves the
        # latter; its keys are skipped, and left out when their run is merged or written.
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_prompts: dict[int, str] = {}
        self._forgotten: set[int] = set()  # prompt rows
        self._next_id = self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM prompts").fetchone()[0]
        # Most keys of a batch are new: the filter spares their lookups (only SELECTs are skipped).
        self._filter = self._open_filter()

    def _open_filter(self) -> KeyFilter:
        """The filter of the keys in the index, as `close` stored it in the file (16 MiB read), or
        made from the keys (an index written before it was stored, or never closed). Made from
        the keys at every open, it cost what the index holds: 2.3 s and 250 MiB more at the peak
        for the 5.7M keys a million lines leave, growing with every day ingested.

        The stored filter is taken out of the file while the index is open: a file written to
        and not closed has none, so a filter that misses keys is never read."""
        self.db.execute("CREATE TABLE IF NOT EXISTS key_filter (bits BLOB NOT NULL)")
        kf = KeyFilter(FILTER_BITS)
        stored = self.db.execute("SELECT bits FROM key_filter").fetchone()
        if stored is not None and len(stored[0]) == kf.bits.nbytes:
            kf.bits[:] = np.frombuffer(stored[0], dtype=np.uint8)
        else:  # (in slices: a list of every key held ~45 bytes a key)
            cursor = self.db.execute("SELECT key FROM seen")
            while rows := cursor.fetchmany(1 << 16):
                kf.add(np.fromiter(map(itemgetter(0), rows), dtype=np.int64, count=len(rows)))
        del stored
        self.db.execute("DELETE FROM key_filter")
        self.db.commit()
        return kf

    def _migrate(self) -> None:
        """An index of the earlier layout (the prompt's id in every key row) rewritten in place."""
        self.db.executescript("""
            INSERT INTO prompts (ref) SELECT DISTINCT ref FROM seen ORDER BY ref;
            CREATE INDEX prompts_ref ON prompts (ref);
            CREATE TABLE seen_keys (key INTEGER PRIMARY KEY, prompt INTEGER NOT NULL);
            INSERT INTO seen_keys SELECT seen.key, prompts.id FROM seen JOIN prompts ON prompts.ref = seen.ref;
            DROP TABLE seen;
            DROP INDEX prompts_ref;
            ALTER TABLE seen_keys RENAME TO seen;
        """)

    def keys(self, normalized: list[str]) -> np.ndarray:
        return prompt_keys(normalized, self.num_perm, self.bands, self.rows)

    def check(self, ids: list[str], keys: np.ndarray) -> list[tuple[str, str] | None]:
        """In order: each prompt (its row of `prompt_keys`) is checked against the index and the
        prompts kept before it."""
        if len(ids) != len(keys):
            raise ValueError(f"{len(ids)} ids for {len(keys)} rows of keys")
        n = len(ids)
        if not n:
            return []
        known: dict[int, str] = {}  # key -> id of the prompt that holds it
        # Exact keys first: the bands of a prompt whose exact key is in the index are never read.
        self._lookup(np.unique(keys[:, 0]), known)
        exact = np.isin(keys[:, 0], np.fromiter(known, dtype=np.int64, count=len(known)))
        self._lookup(np.unique(keys[~exact, 1:]), known)
        near = np.isin(keys[:, 1:], np.fromiter(known, dtype=np.int64, count=len(known)))  # bands in the index
        # A prompt none of whose keys an earlier prompt of the batch holds is decided by the index
        # alone, all at once. The others (`later`) are decided one by one, in order, once `known`
        # has the keys that the first kind's kept prompts share with them (whoever shares a key
        # with one of the first kind comes after it, so it is of the second kind).
        flat = keys.ravel()
        _, first, inverse, holders = np.unique(flat, return_index=True, return_inverse=True, return_counts=True)
        row = np.arange(n)
        later = ((first // keys.shape[1])[inverse].reshape(keys.shape) < row[:, None]).any(axis=1)
        kept = ~later & ~exact & ~near.any(axis=1)
        shared = kept[:, None] & (holders[inverse].reshape(keys.shape) > 1)
        known.update(zip(flat[shared.ravel()].tolist(), np.repeat(np.asarray(ids, dtype=object), shared.sum(axis=1))))
        out: list[tuple[str, str] | None] = [None] * n
        for i in np.flatnonzero(~later & ~kept).tolist():
            out[i] = ("exact", known[int(keys[i, 0])]) if exact[i] else \
                ("near", known[int(keys[i, 1 + np.argmax(near[i])])])
        for i in np.flatnonzero(later).tolist():
            head, *bands = keys[i].tolist()
            if head in known:
                out[i] = ("exact", known[head])
                continue
            for band in bands:
                if band in known:
                    out[i] = ("near", known[band])
                    break
            else:  # kept: its keys are all new (none of them was known)
                known.update(dict.fromkeys((head, *bands), ids[i]))
                kept[i] = True
        taken = np.flatnonzero(kept)
        if len(taken):
            pids = np.arange(self._next_id, self._next_id + len(taken))
            self._next_id += len(taken)
            cids = [ids[i] for i in taken.tolist()]
            self._pending_prompts.update(zip(pids.tolist(), cids))
            keys_new = keys[taken]
            self._added.update(zip(cids, zip(pids.tolist(), keys_new)))
            self._filter.add(keys_new.ravel())
            self._add_run(keys_new.ravel(), np.repeat(pids, keys.shape[1]))
        if sum(len(k) for k, _ in self._runs) >= FLUSH_KEYS:
            self._flush()
        return out

    def _add_run(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """A sorted run of new keys, merged with the last ones while they are no larger (a binary
        counter: each key is merged ~log2(runs) times, and at most ~log2 runs are searched)."""
        order = np.argsort(keys)
        keys, rows = keys[order], rows[order]
        while self._runs and len(self._runs[-1][0]) <= len(keys):
            keys, rows = self._merged([self._runs.pop(), (keys, rows)])
        self._runs.append((keys, rows))

    def _merged(self, runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Sorted runs as one, without the keys of forgotten prompts (a key a forgotten prompt
        held may be held again by a later one: one live row per key)."""
        keys, rows = (np.concatenate(arrays) for arrays in zip(*runs))
        if self._forgotten:
            live = ~np.isin(rows, np.fromiter(self._forgotten, dtype=np.int64, count=len(self._forgotten)))
            keys, rows = keys[live], rows[live]
        order = np.argsort(keys, kind="stable")  # (sorted runs: a merge)
        return keys[order], rows[order]

    def _flush(self) -> None:
        """The rows waiting in memory written in key order: each B-tree page is visited once."""
        self._insert("INSERT INTO prompts", [v for item in self._pending_prompts.items() for v in item])
        if self._runs:
            keys, rows = self._merged(self._runs)
            self._insert("INSERT OR IGNORE INTO seen", np.column_stack([keys, rows]).ravel().tolist())
        self._runs.clear()
        self._pending_prompts.clear()
        self._forgotten.clear()

    def _insert(self, head: str, values: list) -> None:
        """Rows of two values (flat, in order) inserted `INSERT_ROWS` a statement, the rest one a statement."""
        per = 2 * INSERT_ROWS
        full = len(values) // per * per
        many = f"{head} VALUES " + ",".join(["(?, ?)"] * INSERT_ROWS)
        self.db.executemany(many, (values[i : i + per] for i in range(0, full, per)))
        self.db.executemany(f"{head} VALUES (?, ?)", (values[i : i + 2] for i in range(full, len(values), 2)))

    def _lookup(self, wanted: np.ndarray, known: dict[int, str]) -> None:
        """known[key] = ref for the wanted keys in the index (those the filter may hold)."""
        if not len(wanted):
            return
        arr = wanted[self._filter.may_hold(wanted)]
        prompts = self._pending_prompts
        for keys, rows in self._runs:
            at = np.minimum(np.searchsorted(keys, arr), len(keys) - 1)
            hit = keys[at] == arr
            for k, pid in zip(arr[hit].tolist(), rows[at[hit]].tolist()):
                if pid in prompts:  # (not forgotten)
                    known[k] = prompts[pid]
        wanted = arr.tolist()
        for i in range(0, len(wanted), LOOKUP):
            chunk = wanted[i : i + LOOKUP]
            chunk += chunk[-1:] * (LOOKUP - len(chunk))  # one statement shape: prepared once, cached once
            known.update(self.db.execute(LOOKUP_SQL, chunk))

    def forget(self, cid: str) -> None:
        """Drop a prompt kept since the last `settle` from the index (it was quarantined after all)."""
        if cid not in self._added:
            return
        pid, keys = self._added.pop(cid)
        if self._pending_prompts.pop(pid, None) is not None:  # not written yet
            self._forgotten.add(pid)
            return
        self.db.executemany("DELETE FROM seen WHERE key = ? AND prompt = ?", [(k, pid) for k in keys.tolist()])
        self.db.execute("DELETE FROM prompts WHERE id = ?", (pid,))

    def settle(self) -> None:
        self._added.clear()

    def count(self) -> int:
        self._flush()
        return self.db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]

    def close(self) -> None:
        self._flush()
        self.db.execute("INSERT INTO key_filter VALUES (?)", (memoryview(self._filter.bits),))
        self.db.commit()
        self.db.close()
