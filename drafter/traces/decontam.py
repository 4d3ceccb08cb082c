"""Decontamination: drop conversations whose user turns overlap the evaluation prompts.

An evaluation prompt contaminates a conversation when a user turn shares a word n-gram
(default 13 words, the GPT-3 / Llama convention) with it after normalisation; prompts
shorter than n words must match a user turn exactly. N-grams shared by many evaluation
prompts are instruction boilerplate ("You are an expert Python programmer ...", "Please
reason step by step ..."), not content, and are ignored so that ordinary prompts using
the same phrasing stay.

Most texts share no n-gram with any evaluation prompt, so a text is first probed with its
k-grams (k = (n + 1) // 2) at every (n - k + 1)-th word: every window of n words holds one of
them, so a text none of whose probes is a k-gram of an evaluation n-gram cannot match, and
only the others are scanned window by window.

A gram is known by its key, the XXH64 of its words joined by one space (`gram_keys_py`). The
keys and the probes are made in C where `_keys.c` was built (~1 against ~4 us a conversation).
"""

from __future__ import annotations

import json
from array import array
from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash

from drafter.errors import DrafterError
from drafter.traces.dedup import KeyFilter, _keys, normalize

BOILERPLATE_PROMPTS = 5  # an n-gram in this many evaluation prompts or more is boilerplate
PROBE_BITS = 1 << 25  # 4 MiB of Bloom filter for the probes (the bundled sets have 450k)


class EvalSetError(DrafterError, ValueError):
    """An evaluation set to decontaminate against cannot be read."""


def eval_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise EvalSetError(f"ingest.eval_sets: {path} does not exist")
    if not files:
        raise EvalSetError(f"ingest.eval_sets: no *.jsonl files in {', '.join(map(str, paths))}")
    return files


def read_prompts(path: Path) -> list[str]:
    """Prompts of one evaluation file: `{"turns": [...]}` lines (also `prompt`/`question`)."""
    prompts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise EvalSetError(f"{path}:{n}: not JSON ({exc})") from None
            turns = obj.get("turns") if isinstance(obj, dict) else None
            if turns is None and isinstance(obj, dict):
                turns = [obj[k] for k in ("prompt", "question", "problem") if isinstance(obj.get(k), str)][:1]
            prompts += [t for t in turns or [] if isinstance(t, str)]
    return prompts


def gram_keys_py(texts: list[str], width: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each text's grams of `width` words (split as bytes.split splits its UTF-8 bytes) starting at
    every `stride`-th word, as keys (XXH64 of the words joined by one space, minus 2**63: int64),
    text after text; and where each text's keys start, and the end."""
    keys: list[int] = []
    offsets = [0]
    for text in texts:
        words = text.encode().split()
        keys += [xxhash.xxh64_intdigest(b" ".join(words[i : i + width])) - (1 << 63)
                 for i in range(0, len(words) - width + 1, stride)]
        offsets.append(len(keys))
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


def gram_keys(texts: list[str], width: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`gram_keys_py`, in C where it was built."""
    if _keys is None:
        return gram_keys_py(texts, width, stride)
    keys, offsets = _keys.grams(texts, width, stride)
    return np.frombuffer(keys, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64)


def probe_py(texts: list[str], n: int, k: int, stride: int, bits: bytes) -> bytes:
    """A byte a text: 1 when it has fewer than n words; 2 when one of its k-gram probes (every
    stride-th word) has both its bits in the filter `bits` (a `KeyFilter`'s: the key's low bits,
    and its bits from 32 up); else 0 (it cannot hold an indexed n-gram)."""
    mask = len(bits) * 8 - 1
    codes = bytearray()
    for text in texts:
        if len(text.encode().split()) < n:
            codes.append(1)
            continue
        hit = any(bits[(lo := key & mask) >> 3] >> (lo & 7) & 1 and bits[(hi := key >> 32 & mask) >> 3] >> (hi & 7) & 1
                  for key in gram_keys_py([text], k, stride)[0].tolist())
        codes.append(2 if hit else 0)
    return bytes(codes)


class EvalIndex:
    """The n-grams of the evaluation prompts (a sorted array of keys) and a Bloom filter of their
    k-gram probes: ~26 MB for the bundled sets, where Python sets and dicts took ~90 MB a process."""

    def __init__(self, paths: list[Path], n: int = 13) -> None:
        self.n = n
        self.files = eval_files(paths)
        self.names = [p.stem for p in self.files]
        self.k = (n + 1) // 2
        self.stride = n - self.k + 1  # every window of n words holds a k-gram starting at a multiple of this
        self.short: dict[str, int] = {}  # a prompt of fewer than n words (`normalize`d) -> its file
        self.prompts = 0
        long: list[str] = []
        files = array("h")  # of each prompt in `long`
        for idx, path in enumerate(self.files):
            for prompt in read_prompts(path):
                self.prompts += 1
                text = normalize(prompt)
                if len(text.split()) < n:
                    if text:
                        self.short.setdefault(text, idx)
                    continue
                long.append(text)
                files.append(idx)
        keys, offsets = gram_keys(long, n)
        prompt = np.repeat(np.arange(len(long)), np.diff(offsets))
        # Each key once a prompt; sorted by key, then by prompt: the first file to hold a key owns it.
        order = np.lexsort((prompt, keys))
        keys, prompt = keys[order], prompt[order]
        distinct = np.ones(len(keys), dtype=bool)
        distinct[1:] = (keys[1:] != keys[:-1]) | (prompt[1:] != prompt[:-1])
        keys, prompt = keys[distinct], prompt[distinct]
        unique, first, holders = np.unique(keys, return_index=True, return_counts=True)
        kept = holders < BOILERPLATE_PROMPTS  # prompts holding each n-gram
        self.gram_keys = unique[kept]
        self.gram_owners = np.frombuffer(files, dtype=np.int16)[prompt[first[kept]]] if len(long) else \
            np.empty(0, dtype=np.int16)
        self.boilerplate = len(unique) - int(kept.sum())
        # The probes (k-grams of every n-gram, boilerplate's too) as a Bloom filter, two bits each
        # (the low and the high half of the key): a text none of whose probes has both bits set
        # holds no evaluation n-gram; one that has them (~0.4% of texts without) is scanned.
        probes = gram_keys(long, self.k)[0]
        bloom = KeyFilter(PROBE_BITS)
        bloom.add(probes)
        bloom.add(probes >> 32)
        self.probe_bits = bloom.bits.tobytes()

    def match(self, texts: list[str]) -> str | None:
        """Name of the first evaluation set one of the texts (`normalize`d) overlaps, else None."""
        probe = probe_py if _keys is None else _keys.probe
        for text, code in zip(texts, probe(texts, self.n, self.k, self.stride, self.probe_bits)):
            if code == 1:  # fewer than n words: the same as a short prompt, or nothing
                hit = self.short.get(text)
                if hit is not None:
                    return self.names[hit]
            elif code == 2 and len(self.gram_keys):
                windows = gram_keys([text], self.n)[0]
                at = np.minimum(np.searchsorted(self.gram_keys, windows), len(self.gram_keys) - 1)
                hits = np.flatnonzero(self.gram_keys[at] == windows)  # windows that are evaluation n-grams
                if len(hits):
                    return self.names[self.gram_owners[at[hits[0]]]]
        return None


def eval_index(paths: list[Path], n: int) -> EvalIndex:
    """The index of these evaluation files, built once per process while they are unchanged."""
    files = eval_files(paths)
    stamp = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    return _cached_index(tuple(str(p) for p in paths), n, stamp)


@lru_cache(maxsize=4)
def _cached_index(paths: tuple[str, ...], n: int, stamp: tuple) -> EvalIndex:
    return EvalIndex([Path(p) for p in paths], n)
