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
"""

from __future__ import annotations

import json
from array import array
from functools import lru_cache
from pathlib import Path

import numpy as np

from drafter.errors import DrafterError
from drafter.traces.dedup import KeyFilter, normalize

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


class EvalIndex:
    """The n-grams of the evaluation prompts (a sorted array of hashes) and a Bloom filter of their
    k-gram probes: ~26 MB for the bundled sets, where Python sets and dicts took ~90 MB a process."""

    def __init__(self, paths: list[Path], n: int = 13) -> None:
        self.n = n
        self.files = eval_files(paths)
        self.names = [p.stem for p in self.files]
        self.k = (n + 1) // 2
        self.stride = n - self.k + 1  # every window of n words holds a k-gram starting at a multiple of this
        keys, owners, probes = array("q"), array("h"), array("q")  # each prompt's distinct n-grams, in reading order
        self.short: dict[str, int] = {}
        self.prompts = 0
        for idx, path in enumerate(self.files):
            for prompt in read_prompts(path):
                self.prompts += 1
                words = normalize(prompt).split()
                if len(words) < n:
                    if words:
                        self.short.setdefault(" ".join(words), idx)
                    continue
                grams = {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}
                keys.extend(grams)
                owners.extend([idx] * len(grams))
                probes.extend(hash(tuple(words[i : i + self.k])) for i in range(len(words) - self.k + 1))
        keys, owners = np.frombuffer(keys, dtype=np.int64), np.frombuffer(owners, dtype=np.int16)
        order = np.argsort(keys, kind="stable")  # equal keys stay in reading order: the first file owns one
        unique, first, holders = np.unique(keys[order], return_index=True, return_counts=True)
        kept = holders < BOILERPLATE_PROMPTS  # prompts holding each n-gram
        self.gram_keys, self.gram_owners = unique[kept], owners[order][first[kept]]
        self.boilerplate = len(unique) - int(kept.sum())
        # The probes (k-grams of every n-gram, boilerplate's too) as a Bloom filter, two bits each
        # (the low and the high half of the hash): a text none of whose probes has both bits set
        # holds no evaluation n-gram; one that has them (~0.4% of texts without) is scanned.
        probes = np.frombuffer(probes, dtype=np.int64)
        bloom = KeyFilter(PROBE_BITS)
        bloom.add(probes)
        bloom.add(probes >> 32)
        self.probe_bits = bloom.bits.tobytes()  # (bytes: read inline in `match`, faster than numpy there)

    def match(self, texts: list[str]) -> str | None:
        """Name of the first evaluation set one of the texts (`normalize`d) overlaps, else None."""
        n, k, bits, mask = self.n, self.k, self.probe_bits, PROBE_BITS - 1
        for text in texts:
            words = text.split()
            if len(words) < n:
                hit = self.short.get(" ".join(words))
                if hit is not None:
                    return self.names[hit]
                continue
            # (the filter read inline: a call per probe would cost more than the lookup)
            if not any(bits[(lo := (h := hash(tuple(words[p : p + k]))) & mask) >> 3] >> (lo & 7) & 1
                       and bits[(hi := h >> 32 & mask) >> 3] >> (hi & 7) & 1
                       for p in range(0, len(words) - k + 1, self.stride)):
                continue
            if not len(self.gram_keys):
                continue
            windows = np.array([hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)], dtype=np.int64)
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
