"""Reading sources: compression, damaged data, long lines, JSON arrays, watermarks; fuzzed line splitting."""

import gzip
import json
import random

import zstandard
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drafter.traces.sources import LineRange, SourceChanged, SourceReader, discover, is_log_name, range_records

LINES = [json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}).encode() for i in range(20)]
BODY = b"\n".join(LINES) + b"\n"


def read(path, previous=None, **kw):
    reader = SourceReader(path, previous, **kw)
    return list(reader.records()), reader


def test_plain_gzip_zstd_give_the_same_records(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(BODY)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(BODY))
    # two zstd frames back to back, as an appending writer produces
    half = len(BODY) // 2
    (tmp_path / "c.log.zst").write_bytes(zstandard.ZstdCompressor().compress(BODY[:half])
                                         + zstandard.ZstdCompressor().compress(BODY[half:]))
    results = {}
    for name in ("a.jsonl", "b.jsonl.gz", "c.log.zst"):
        records, reader = read(tmp_path / name)
        assert [r.line for r in records] == list(range(1, 21)) and not any(r.error for r in records)
        results[name] = [r.data for r in records]
        assert reader.watermark.records == 20 and reader.watermark.offset == len(BODY)
    assert results["a.jsonl"] == results["b.jsonl.gz"] == results["c.log.zst"] == LINES


def test_truncated_gzip_and_zstd_are_reported_once(tmp_path):
    rng = random.Random(0)
    body = b"".join(json.dumps({"x": rng.getrandbits(128)}).encode() + b"\n" for _ in range(20000))  # several zstd blocks
    gz = gzip.compress(body)
    zs = zstandard.ZstdCompressor().compress(body)
    (tmp_path / "t.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "t.jsonl.zst").write_bytes(zs[: len(zs) // 2])
    for name in ("t.jsonl.gz", "t.jsonl.zst"):
        records, reader = read(tmp_path / name)
        assert records[-1].error == "truncated_file" and not any(r.error for r in records[:-1])
        assert len(records) > 1 and reader.watermark.damaged
        again, _ = read(tmp_path / name, reader.watermark)
        assert again == []  # not quarantined a second time while the file is unchanged


def test_long_line_is_skipped_through_not_held(tmp_path):
    big = b'{"messages": "' + b"x" * 3_000_000 + b'"}'
    (tmp_path / "big.jsonl").write_bytes(LINES[0] + b"\n" + big + b"\n" + LINES[1] + b"\n")
    records, _ = read(tmp_path / "big.jsonl", max_line_bytes=100_000, keep_bytes=1000)
    assert [r.error for r in records] == [None, "line_too_long", None]
    assert records[1].size == len(big) + 1 and len(records[1].data) == 1000 and records[2].line == 3


def test_unterminated_last_line_waits_for_the_writer(tmp_path):
    path = tmp_path / "live.jsonl"
    path.write_bytes(BODY + LINES[0][:10])
    records, reader = read(path)
    assert len(records) == 20 and reader.pending_partial
    with path.open("ab") as f:
        f.write(LINES[0][10:] + b"\n" + LINES[1] + b"\n")
    more, reader2 = read(path, reader.watermark)
    assert [r.line for r in more] == [21, 22] and more[0].data == LINES[0] and not reader2.restarted


def test_watermark_resumes_and_detects_rewrites(tmp_path):
    path = tmp_path / "app.log"
    path.write_bytes(BODY)
    _, first = read(path)
    assert read(path, first.watermark)[0] == []  # nothing new
    with path.open("ab") as f:
        f.write(LINES[0] + b"\n")
    new, second = read(path, first.watermark)
    assert [r.line for r in new] == [21] and second.watermark.records == 21
    path.write_bytes(LINES[5] + b"\n" + BODY)  # rewritten (rotated): read again from the start
    again, third = read(path, second.watermark)
    assert third.restarted and len(again) == 21 and again[0].line == 1


def test_json_array_files(tmp_path):
    items = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(5)]
    (tmp_path / "share.json").write_text(json.dumps(items, indent=2))
    records, reader = read(tmp_path / "share.json", max_line_bytes=10_000)
    assert [r.obj for r in records] == items and records[0].line == 2
    assert read(tmp_path / "share.json", reader.watermark)[0] == []
    (tmp_path / "cut.json").write_text(json.dumps(items)[:-30])  # cut off, like the packaged ShareGPT dump
    records, _ = read(tmp_path / "cut.json")
    assert [r.error for r in records][-1] == "malformed_json" and sum(r.obj is not None for r in records) == 4


def test_discover(tmp_path):
    (tmp_path / "logs" / "old").mkdir(parents=True)
    for name in ("a.jsonl", "b.log.1", "old/c.ndjson.gz", "notes.txt", ".hidden.jsonl"):
        (tmp_path / "logs" / name).write_text("{}\n")
    (tmp_path / "empty").mkdir()
    files, errors = discover([tmp_path / "logs", tmp_path / "logs" / "a.jsonl", tmp_path / "empty", tmp_path / "nope"])
    assert sorted(p.name for p in files) == ["a.jsonl", "b.log.1", "c.ndjson.gz"]
    assert [e[0] for e in errors] == [str(tmp_path / "empty"), str(tmp_path / "nope")]
    assert is_log_name("x.jsonl.zst") and not is_log_name("x.txt")


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=30),
       limit=st.integers(min_value=1024, max_value=2048), compress=st.sampled_from(["none", "gzip", "zstd"]))
def test_fuzz_every_line_comes_out_once(tmp_path_factory, lines, limit, compress):
    """Arbitrary bytes: one record per line, in order, with the exact bytes, whatever the compression."""
    body = b"\n".join(lines) + b"\n"
    assume(body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"[")  # a JSON array file: tested above
    assume(not body.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd")))  # compressed data, by its magic bytes
    data = {"none": body, "gzip": gzip.compress(body), "zstd": zstandard.ZstdCompressor().compress(body)}[compress]
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(data)
    records, reader = read(path, max_line_bytes=limit)
    assert [r.line for r in records] == list(range(1, len(lines) + 1))
    assert [r.data for r in records] == [line.rstrip(b"\r") for line in lines]
    assert reader.watermark.offset == len(body)


def read_ranged(path, previous=None, ranges=(3, 1 << 20), **kw):
    """What a pool that reads files gets: the ranges, each read back as a worker reads it."""
    reader = SourceReader(path, previous, **kw)
    shards = list(reader.records(ranges))
    assert all(isinstance(s, LineRange) for s in shards)
    records = [r for s in shards for r in range_records(s, reader.max_line_bytes, reader.keep_bytes)]
    return records, reader, shards


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.one_of(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
                                st.sampled_from([b"", b"\r", LINES[0], b"x" * 90, b'{"long": "' + b"y" * 80 + b'"}'])),
                      min_size=0, max_size=25),
       tail=st.sampled_from([b"", LINES[1], LINES[1][:9], b"z" * 70, b"z" * 200]),
       chunk=st.integers(min_value=1, max_value=200), max_lines=st.integers(min_value=1, max_value=6),
       max_bytes=st.integers(min_value=1, max_value=300), resume_at=st.integers(min_value=0, max_value=25))
def test_line_ranges_read_back_to_the_same_records_and_watermark(tmp_path_factory, lines, tail, chunk, max_lines,
                                                                 max_bytes, resume_at):
    """Ranges of whole lines, hashed and counted in blocks here and read back where they are
    prepared, give `records()`' records and watermark exactly: lines over the limit (taken
    whole, also as the last line), carriage returns, blank lines, an unterminated last line
    (JSON: read; otherwise left for the writer), blocks of any size, and a resumed read."""
    from unittest import mock

    from drafter.traces import sources

    body = b"".join(line + b"\n" for line in lines) + tail
    assume(body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"[")
    assume(not body.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd")))
    path = tmp_path_factory.mktemp("ranges") / "f.jsonl"
    cut = sum(len(line) + 1 for line in lines[:resume_at])
    path.write_bytes(body[:cut])
    previous = read(path, max_line_bytes=64)[1].watermark  # what an earlier run read
    path.write_bytes(body)
    want, plain = read(path, previous, max_line_bytes=64, keep_bytes=16)
    with mock.patch.object(sources, "CHUNK", chunk):
        got, ranged, shards = read_ranged(path, previous, (max_lines, max_bytes), max_line_bytes=64, keep_bytes=16)
    assert got == want
    assert ranged.watermark == plain.watermark and ranged.pending_partial == plain.pending_partial
    assert all(s.lines <= max_lines for s in shards)
    assert all(s.lines == max_lines or s.length >= max_bytes for s in shards[:-1])  # cut as soon as one is reached
    assert [s.offset for s in shards[1:]] == [s.offset + s.length for s in shards[:-1]]  # contiguous


def test_a_range_rewritten_before_its_worker_reads_it_is_refused(tmp_path):
    import pytest

    path = tmp_path / "app.jsonl"
    path.write_bytes(BODY)
    _, _, shards = read_ranged(path, ranges=(5, 1 << 20))
    path.write_bytes(BODY.replace(b"hi 7", b"hi 8"))  # same length, other bytes
    with pytest.raises(SourceChanged, match="changed while it was ingested"):
        range_records(shards[1], 1 << 20, 1000)
    assert range_records(shards[0], 1 << 20, 1000)[0].data == LINES[0]  # the bytes it hashed are still there
