"""Exact and near-duplicate detection with the on-disk MinHash LSH index."""

import random

import pytest

from drafter.traces.dedup import DedupIndexError, Deduper, normalize, signatures, shingles

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def prose(rng: random.Random, n: int = 80) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(n))


def jaccard(a: str, b: str) -> float:
    x, y = set(shingles(a)), set(shingles(b))
    return len(x & y) / len(x | y)


def test_exact_near_and_distinct_prompts(tmp_path):
    rng = random.Random(0)
    base = [prose(rng) for _ in range(50)]
    near = base[0].split()
    near[40] = "changed"  # one word of 80: Jaccard ~0.93, above the 0.85 threshold
    near = " ".join(near)
    far = base[1].split()[:40] + prose(rng, 40).split()  # half rewritten: Jaccard ~0.3
    far = " ".join(far)
    assert jaccard(normalize(near), normalize(base[0])) > 0.9 and jaccard(normalize(far), normalize(base[1])) < 0.5
    dedup = Deduper(tmp_path / "index.sqlite", 0.85, 128)
    ids = [f"c{i}" for i in range(len(base))]
    assert dedup.check(ids, dedup.keys([normalize(p) for p in base])) == [None] * len(base)
    got = dedup.check(["exact", "near", "far", "inbatch"],
                      dedup.keys([normalize(base[2].upper() + "!!"), normalize(near), normalize(far), normalize(far)]))
    assert got == [("exact", "c2"), ("near", "c0"), None, ("exact", "far")]
    dedup.close()
    again = Deduper(tmp_path / "index.sqlite", 0.85, 128)  # a later run sees what this one kept
    assert again.check(["later"], again.keys([normalize(near)])) == [("near", "c0")]
    assert again.count() == len(base) + 1
    again.close()
    with pytest.raises(DedupIndexError, match="fresh --out"):
        Deduper(tmp_path / "index.sqlite", 0.7, 128)


def test_signatures_are_a_deterministic_batch():
    prompts = [normalize(prose(random.Random(i))) for i in range(5)]
    sigs = signatures(prompts, 128)
    assert sigs.shape == (5, 128) and sigs.dtype.name == "uint32"
    assert (signatures(prompts[2:3], 128)[0] == sigs[2]).all()  # a row does not depend on the batch
    assert len({row.tobytes() for row in sigs}) == 5
