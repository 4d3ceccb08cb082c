"""Exact and near-duplicate detection with the on-disk MinHash LSH index."""

import random

import numpy as np
import pytest
import rensa

from drafter.traces.dedup import MINHASH_SEED, DedupIndexError, Deduper, normalize, shingles, signature_bytes

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
    sigs = signature_bytes(prompts, 128)
    assert len(sigs) == 5 and all(len(sig) == 128 * 4 for sig in sigs)  # 128 uint32 each
    assert signature_bytes(prompts[2:3], 128)[0] == sigs[2]  # a row does not depend on the batch
    assert len(set(sigs)) == 5


def _run_batches(path, monkeypatch, filter_bits=1 << 27, flush_keys=None):
    """Three batches (one prompt forgotten after the first) and a later run: the verdicts, the
    index's rows and its file."""
    import sqlite3

    import drafter.traces.dedup as dedup_mod

    rng = random.Random(1)
    base = [prose(rng) for _ in range(40)]
    batches = [base[:20], base[20:] + [base[3].upper(), base[25] + " extra words here"], base[5:15] + [prose(rng)]]
    monkeypatch.setattr(dedup_mod, "FILTER_BITS", filter_bits)
    if flush_keys is not None:
        monkeypatch.setattr(dedup_mod, "FLUSH_KEYS", flush_keys)
    verdicts, d = [], Deduper(path, 0.85, 128)
    for b, prompts in enumerate(batches):
        ids = [f"b{b}p{i}" for i in range(len(prompts))]
        verdicts.append(d.check(ids, d.keys([normalize(p) for p in prompts])))
        if b == 0:
            d.forget("b0p7")  # forgotten: its prompt is new again in batch 2
        d.settle()
    d.close()
    again = Deduper(path, 0.85, 128)  # keys of the earlier run, loaded into the filter
    verdicts.append(again.check(["later1", "later2"], again.keys([normalize(base[30]), normalize(base[7])])))
    again.close()
    with sqlite3.connect(path) as db:
        rows = [db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("prompts", "seen", "meta")]
    return verdicts, rows


def _check_verdicts(verdicts):
    assert verdicts[1][-2] == ("exact", "b0p3") and verdicts[1][-1] == ("near", "b1p5")
    assert verdicts[2][2] is None and verdicts[2][0] == ("exact", "b0p5")  # b0p7 was forgotten
    assert verdicts[3] == [("exact", "b1p10"), ("exact", "b2p2")]


@pytest.mark.parametrize("bits", [8, 1 << 27])
def test_key_filter_never_hides_a_key(tmp_path, monkeypatch, bits):
    # The filter only spares lookups: with 8 bits (every key collides) and with the default,
    # the verdicts and the index's rows are those of looking every key up.
    import drafter.traces.dedup as dedup_mod

    class Always(dedup_mod.KeyFilter):
        def may_hold(self, keys):
            return super().may_hold(keys) | True

    got = _run_batches(tmp_path / "a.sqlite", monkeypatch, bits)
    monkeypatch.setattr(dedup_mod, "KeyFilter", Always)
    want = _run_batches(tmp_path / "b.sqlite", monkeypatch)
    assert got == want
    _check_verdicts(got[0])


def test_rows_waiting_in_memory_answer_like_written_ones(tmp_path, monkeypatch):
    # FLUSH_KEYS=1 writes every batch at once (the forgotten prompt is deleted from SQLite);
    # the default keeps all of them in memory until close (it is dropped there).
    written = _run_batches(tmp_path / "a.sqlite", monkeypatch, flush_keys=1)
    waiting = _run_batches(tmp_path / "b.sqlite", monkeypatch)
    assert written == waiting
    _check_verdicts(written[0])
    prompts, seen, _ = written[1]
    assert "b0p7" not in {ref for _, ref in prompts} and len(seen) == 9 * len(prompts)


def _dict_verdicts(ids, keys, owner):
    """The verdicts of a plain dict of the keys of every kept prompt (`owner`: key -> id, updated)."""
    want = []
    for cid, (exact, *bands) in zip(ids, keys.tolist()):
        near = [owner[k] for k in bands if k in owner]
        want.append(("exact", owner[exact]) if exact in owner else ("near", near[0]) if near else None)
        if want[-1] is None:
            owner.update(dict.fromkeys((exact, *bands), cid))
    return want


@pytest.mark.parametrize("flush_keys", [1, 300, 1 << 18])
def test_verdicts_and_rows_are_those_of_a_dict_of_every_kept_key(tmp_path, monkeypatch, flush_keys):
    # Thirty batches of repeated, extended and new prompts, a fifth of the kept ones forgotten:
    # the index (new keys in sorted runs merged as they grow, written every `flush_keys` keys)
    # answers like a plain dict of the keys of every prompt kept and not forgotten, and holds
    # exactly those keys once written.
    import sqlite3

    import drafter.traces.dedup as dedup_mod

    monkeypatch.setattr(dedup_mod, "FLUSH_KEYS", flush_keys)
    rng = random.Random(7)
    pool = [prose(rng, 30) for _ in range(60)]
    d, owner, seen = Deduper(tmp_path / "i.sqlite"), {}, set()  # owner: key -> id of the prompt holding it
    for b in range(30):
        prompts = [rng.choice(pool) + ("" if rng.random() < 0.6 else " " + prose(rng, rng.choice([2, 30])))
                   for _ in range(rng.randint(1, 20))]
        ids = [f"b{b}p{i}" for i in range(len(prompts))]
        keys = d.keys([normalize(p) for p in prompts])
        want = _dict_verdicts(ids, keys, owner)
        assert d.check(ids, keys) == want
        seen.update(v and v[0] for v in want)
        for cid, verdict in zip(ids, want):
            if verdict is None and rng.random() < 0.2:
                d.forget(cid)
                owner = {k: v for k, v in owner.items() if v != cid}
        d.settle()
    assert seen == {"exact", "near", None}
    d.close()
    with sqlite3.connect(tmp_path / "i.sqlite") as db:
        rows = dict(db.execute("SELECT seen.key, prompts.ref FROM seen JOIN prompts ON prompts.id = seen.prompt"))
        assert db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0] == len(set(owner.values()))
    assert rows == owner


def test_prompts_sharing_keys_within_a_batch_are_decided_in_order(tmp_path):
    # Keys from a few values a column: most prompts share keys with earlier ones of their batch,
    # in chains (a prompt kept after sharing a band only with a duplicate, then one near it).
    # The verdicts and the rows are those of a dict of the keys of every kept prompt.
    import sqlite3

    rng = np.random.default_rng(3)
    d, owner, kinds = Deduper(tmp_path / "i.sqlite"), {}, set()
    bands = d.bands
    for b in range(40):
        n = int(rng.integers(1, 40))
        keys = rng.integers(0, 25, size=(n, 1 + bands)) + np.arange(1 + bands) * 1000  # (no key in two columns)
        keys[:, 0] = rng.integers(0, 200, size=n)  # exact keys repeat less than bands
        ids = [f"b{b}p{i}" for i in range(n)]
        want = _dict_verdicts(ids, keys, owner)
        assert d.check(ids, keys) == want
        kinds.update(v and v[0] for v in want)
        d.settle()
    assert kinds == {"exact", "near", None}
    d.close()
    with sqlite3.connect(tmp_path / "i.sqlite") as db:
        assert dict(db.execute("SELECT seen.key, prompts.ref FROM seen JOIN prompts ON prompts.id = seen.prompt")) == owner


def test_the_filter_is_read_from_a_closed_index_and_made_from_the_keys_of_one_left_open(tmp_path, monkeypatch):
    # close() stores the filter in the file and the next open reads it (no key is added). An index
    # written to and never closed has none: its filter is made from every key it holds, so the
    # prompts kept by the run that did not close are still found.
    import drafter.traces.dedup as dedup_mod

    rng = random.Random(5)
    prompts = [normalize(prose(rng)) for _ in range(40)]
    first = Deduper(tmp_path / "i.sqlite")
    assert first.check([f"a{i}" for i in range(20)], first.keys(prompts[:20])) == [None] * 20
    first.close()
    added, add = [], dedup_mod.KeyFilter.add
    monkeypatch.setattr(dedup_mod.KeyFilter, "add", lambda self, keys: (added.append(len(keys)), add(self, keys)))
    left_open = Deduper(tmp_path / "i.sqlite")
    assert added == []  # read, not made
    assert left_open.check(["b0", "b1"], left_open.keys([prompts[3], prompts[30]])) == [("exact", "a3"), None]
    assert left_open.count() == 21  # (its rows written)
    left_open.db.commit()
    left_open.db.close()  # killed before close()
    added.clear()
    again = Deduper(tmp_path / "i.sqlite")
    assert sum(added) == 21 * 9  # made from the keys held
    assert again.check(["c0", "c1"], again.keys([prompts[30], prompts[5]])) == [("exact", "b1"), ("exact", "a5")]
    again.close()


def test_key_filter_answers():
    from drafter.traces.dedup import KeyFilter

    import numpy as np

    f = KeyFilter(1 << 16)
    keys = np.array([-(1 << 63), -1, 0, 1, 12345, (1 << 63) - 1], dtype=np.int64)
    assert not f.may_hold(keys).any()
    f.add(keys[:3])
    assert f.may_hold(keys).tolist() == [True, True, True, False, False, True]  # 2**63-1 shares -1's low bits


def test_shingles_and_keys_are_the_plain_definitions():
    # shingles zips shifted word lists and prompt_keys inlines _key: the same as the plain loops.
    from drafter.traces.dedup import SHINGLE, _key, lsh_params, prompt_keys, prompt_keys_py

    rng = random.Random(2)
    prompts = ["", "one", "one two", "one two three", "one two three four", *(normalize(prose(rng, n)) for n in (5, 40, 200)),
               normalize("Ça coûte 3 € — très cher,\u2003naïve café\x1cø 東京 の 天気")]
    for p in prompts:
        words = p.split()
        plain = ([" ".join(words).encode()] if words else [b""]) if len(words) <= SHINGLE else \
            [" ".join(words[i : i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)]
        assert shingles(p) == plain
    bands, rows = lsh_params(0.85, 128)
    # the signatures as rensa gives them, little-endian uint32
    matrix = rensa.RMinHash.digest_matrix_from_token_byte_sets([shingles(p) for p in prompts], 128, MINHASH_SEED)
    sigs = np.asarray(matrix.to_rows(), dtype="<u4")
    width = sigs.itemsize * rows
    plain = [[_key(0, p.encode()), *(_key(1 + i, sig.tobytes()[i * width : (i + 1) * width]) for i in range(bands))]
             for p, sig in zip(prompts, sigs)]
    assert prompt_keys(prompts, 128, bands, rows).tolist() == plain
    assert prompt_keys_py(prompts, 128, bands, rows).tolist() == plain
    assert prompt_keys([], 128, bands, rows).shape == prompt_keys_py([], 128, bands, rows).shape == (0, 1 + bands)


def test_the_c_keys_are_those_of_python():
    # _keys.c hashes the shingles as rensa hashes bytes (every length branch of its hash: 0-3, 4-7,
    # 8-16 and longer), splits at ASCII whitespace as bytes.split does (runs of it, tabs, newlines:
    # shingles are then copied, not sliced), makes rensa's R-MinHash signatures and packs and hashes
    # the bands as Python does.
    from drafter.traces import dedup

    assert dedup._keys is not None, "drafter/traces/_keys.c was not built (pip install -e . builds it)"
    rng = random.Random(4)
    words = ["a", "bc", "def", "ghij", "klmnopq", "rstuvwxyz", "x" * 17, "y" * 40, "ça", "東京", "naïve", "a_b", "42"]
    spaces = [" ", " ", " ", "  ", "\t", "\n ", "\r\x0b\x0c"]
    texts = ["", " ", "one", "one two", "one two three", "one two three four"]
    texts += ["".join(rng.choice(words) + rng.choice(spaces) for _ in range(rng.randrange(0, 300))) for _ in range(400)]
    texts += [normalize(t) for t in texts]
    bands, rows = dedup.lsh_params(0.85, 128)
    assert dedup.prompt_keys(texts, 128, bands, rows).tolist() == dedup.prompt_keys_py(texts, 128, bands, rows).tolist()
    assert dedup.prompt_keys(texts, 64, 4, 16).tolist() == dedup.prompt_keys_py(texts, 64, 4, 16).tolist()  # other shapes
    # The signatures are rensa's: buckets filled or not by its three rounds (short and long texts,
    # one of 70,000 shingles, where rensa takes its filtered path), bucket counts not a power of two.
    texts.append(" ".join(map(str, range(70_000))))
    for num_perm in (128, 100, 7, 1):
        c = np.frombuffer(dedup._keys.signatures(texts, dedup.SHINGLE, num_perm, MINHASH_SEED), dtype=np.uint32)
        matrix = rensa.RMinHash.digest_matrix_from_token_byte_sets([shingles(t) for t in texts], num_perm, MINHASH_SEED)
        assert c.reshape(-1, num_perm).tolist() == matrix.to_rows()
    with pytest.raises(TypeError):
        dedup._keys.keys([b"bytes"], 3, 128, 1, 8, 16)
    with pytest.raises(ValueError, match="at most num_perm"):
        dedup._keys.keys(["a"], 3, 64, 1, 8, 16)
    with pytest.raises(ValueError, match="num_perm"):
        dedup._keys.signatures(["a"], 3, 0, 1)


def test_the_c_normalize_is_that_of_python():
    # Every ASCII character, words at the ends, texts longer than the C stack buffer.
    from drafter.traces import dedup

    assert dedup._keys is not None
    rng = random.Random(6)
    alphabet = [chr(i) for i in range(128)]
    texts = ["", " ", "_", "Hello, World!  x_y\tZ9 ", "a " * 3000, "".join(alphabet) * 40]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300))) for _ in range(500)]
    for text in texts:
        assert dedup.normalize(text) == " ".join(text.translate(dedup.ASCII_WORDS).split())
    with pytest.raises(TypeError):
        dedup._keys.normalize_ascii("café")


def test_keys_are_made_in_python_under_another_rminhash(monkeypatch):
    # The C signatures are those of one rensa algorithm version: under another, its keys would not
    # be the ones the index's params name.
    from drafter.traces import dedup

    assert dedup._keys is not None
    bands, rows = dedup.lsh_params(0.85, 128)
    texts = ["one two three four", "five six"]
    want = dedup.prompt_keys_py(texts, 128, bands, rows).tolist()
    monkeypatch.setattr(dedup._keys, "RMINHASH_VERSION", rensa.RMinHash.ALGORITHM_VERSION + 1)
    monkeypatch.setattr(dedup._keys, "keys", None)  # (would raise if called)
    assert dedup.prompt_keys(texts, 128, bands, rows).tolist() == want


def test_an_index_of_the_earlier_layout_is_migrated_in_place(tmp_path):
    # Indexes written before prompts got their own table held the prompt's id in every key row;
    # opening one rewrites it, and it answers as the index it was.
    import sqlite3

    rng = random.Random(3)
    base = [prose(rng) for _ in range(30)]
    new = Deduper(tmp_path / "new.sqlite", 0.85, 128)
    assert new.check([f"c{i}" for i in range(30)], new.keys([normalize(p) for p in base])) == [None] * 30
    new.close()
    db = sqlite3.connect(tmp_path / "new.sqlite")
    rows = db.execute("SELECT seen.key, prompts.ref FROM seen JOIN prompts ON prompts.id = seen.prompt").fetchall()
    meta = db.execute("SELECT name, value FROM meta").fetchall()
    db.close()
    assert len(rows) == 30 * 9
    old = sqlite3.connect(tmp_path / "old.sqlite")
    old.execute("CREATE TABLE seen (key INTEGER PRIMARY KEY, ref TEXT NOT NULL)")
    old.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    old.executemany("INSERT INTO seen VALUES (?, ?)", rows)
    old.executemany("INSERT INTO meta VALUES (?, ?)", meta)
    old.commit()
    old.close()

    migrated = Deduper(tmp_path / "old.sqlite", 0.85, 128)
    assert migrated.count() == 30
    near = base[9].split()
    near[10] = "changed"
    probes = [base[4].upper(), " ".join(near), prose(rng)]
    assert migrated.check(["a", "b", "c"], migrated.keys([normalize(p) for p in probes])) == \
        [("exact", "c4"), ("near", "c9"), None]
    migrated.close()
    db = sqlite3.connect(tmp_path / "old.sqlite")
    assert [row[1] for row in db.execute("PRAGMA table_info(seen)")] == ["key", "prompt"]
    assert db.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 31 * 9
    db.close()


def test_normalize_folds_ascii_text_as_the_unicode_path_does():
    """ASCII text takes a translate-and-split path: it must give the words the regex finds after
    NFKC and lowercasing, for every ASCII character (controls, punctuation, underscores)."""
    import random
    import re
    import unicodedata

    def slow(text):
        return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower()))

    rng = random.Random(0)
    texts = ["".join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["Hello, World!", "snake_case_Name x2", "tab\tsep\x1fnewline\nend", "", "   "]
    assert [normalize(t) for t in texts] == [slow(t) for t in texts]
    assert normalize("Ünïcode ﬁle Straße") == slow("Ünïcode ﬁle Straße") == "ünïcode file straße"
