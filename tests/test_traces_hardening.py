"""Ingest against hostile input: no planted secret in any output file (escaped, cut at the
excerpt limit, failed validation), decompression bombs, symlinks out of an input folder,
and memory bounded by the bytes of the pending batch."""

import gzip
import hashlib
import json
import os
import re
import tracemalloc
from pathlib import Path

import zstandard
from datasets import load_from_disk

from drafter.config import load_config
from drafter.manifest import check_accounting
from drafter.traces.ingest import IngestRun, ingest
from drafter.traces.redact import Redactor
from drafter.traces import sources
from drafter.traces.sources import SourceReader, _ChunkReader, discover
from tests.test_traces_ingest import chat_line, prompt, write_mixed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LABELLED = [json.loads(line) for line in (ROOT / "tests" / "data" / "redaction_labelled.jsonl").read_text().splitlines()]
KNOWN = {s["value"] for case in LABELLED for s in case["secrets"]}

# Planted values, all from the labelled redaction set.
PASSWORD = "S4ASVYj20kxfHvSQ5"
EMAIL = "maria.garcia42@sub.domain.co.uk"
BEARER = "9wk7/zy2XLT3FJ/cOV8FWCuMMp7zCU7FkHUD5IHF"  # base64 with slashes, written as \/ in JSON
ANTHROPIC = "sk-ant-api03-IgvBCVZadPdf1V2d9lvdcv_580VdnYU-uXnLDrK6kWqMg7SKrJCmMwbhG8FMrq-7bF_vBCL-9_aj7TQuCh4ESm7Xu37YZe2"
SLACK = "xoxb-205704562994-2396266825795-qnfhalqn5emo8jyqdefopg82"
# Values that pass redaction but that the validation suite's no_secret_left check flags.
FAKE_JWT = "eyJhbGciOiJIUzI1NiJ9zz.eyJzdWIiOiIxMjM0NTY3ODkwIn0zz.c2lnbmF0dXJl"
KEY_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
PLANTED = [PASSWORD, EMAIL, BEARER, ANTHROPIC, SLACK, FAKE_JWT, KEY_BODY]
KEEP = 256  # ingest.quarantine_keep_bytes in the secrets test


def esc(text: str) -> str:
    """`text` as it appears inside a JSON string, with `@` and `/` escaped as some encoders do."""
    return json.dumps(text)[1:-1].replace("@", "\\u0040").replace("/", "\\/")


def views(data: bytes) -> list[str]:
    """A file's text and its JSON-unescaped forms (a secret can hide behind \\u0040, \\/, \\")."""
    text = data.decode("utf-8", errors="ignore")
    out = [text]
    for _ in range(4):
        text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
        text = re.sub(r'\\(["\\/])', r"\1", text).replace("\\n", "\n")
        out.append(text)
    return out


def leaks(out_dir: Path, secrets: list[str]) -> list[tuple[str, str]]:
    """(file, fragment) for every 12-character piece of a planted secret found in any output file."""
    found = []
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        texts = views(path.read_bytes())
        for secret in secrets:
            pieces = {secret[i : i + 12] for i in range(len(secret) - 11)}
            hit = next((p for p in pieces if any(p in t for t in texts)), None)
            if hit:
                found.append((str(path.relative_to(out_dir)), hit))
    return found


def quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def write_secret_traps(raw: Path) -> dict[str, int]:
    """Log files whose secrets hide behind JSON escapes, across the excerpt limit, and in rows that
    fail validation. Returns the line numbers of interest in gateway.jsonl."""
    raw.mkdir(parents=True)
    payload = json.dumps({"password": PASSWORD, "contact": EMAIL, "auth": f"Bearer {BEARER}"})
    lines = [chat_line(prompt(i)) for i in range(40)]
    where = {}

    def add(name, line):
        lines.append(line)
        where[name] = len(lines)

    # a kept conversation whose text holds escaped JSON (a pasted request body)
    add("kept_escaped", chat_line(f"Why is this config rejected? {esc(payload)} It worked yesterday."))
    # quarantined: a JSON string holding JSON (one escape level in the line) ...
    add("string_json", json.dumps({"event": "debug", "payload": payload}))
    # ... and JSON escaped twice (the parsed value still holds \" and \u0040)
    add("double_escaped", json.dumps({"event": "debug", "payload": esc(payload)}))
    # not JSON at all (cut short): masked on the text and its unescaped view
    add("malformed", '{"request": {"messages": [{"role": "user", "content": "config ' + esc(payload))
    # the excerpt limit falls inside the e-mail address: redact first, then cut
    add("cut_json", json.dumps({"event": "x" * (KEEP - 50), "note": f"mail {EMAIL} today", "more": "w" * 99}))
    add("cut_text", '{"event": "' + "x" * (KEEP - 40) + f' mail {EMAIL} and {SLACK} today')
    # rows that pass redaction but fail the no_secret_left expectation
    add("jwt", chat_line(f"Is this token safe to share? {FAKE_JWT}"))
    add("pem", chat_line("Why does ssh reject this key?\n-----BEGIN RSA PRIVATE KEY\n" + "\n".join([KEY_BODY] * 4)))
    (raw / "gateway.jsonl").write_text("\n".join(lines) + "\n")
    # a line over max_line_bytes whose kept prefix ends 13 characters into the Anthropic key
    head = '{"note": "' + "y" * (KEEP - len('{"note": "') - len("sk-ant-") - 13)
    (raw / "huge.jsonl").write_text(chat_line(prompt(90)) + "\n" + head + ANTHROPIC + " " + "z" * 3000 + '"}\n')
    # a Batch API output without its input, its answer quoting an escaped secret
    out = {"id": "b0", "custom_id": "lonely", "response": {"status_code": 200, "body": {"model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"Use {payload} in the header."}}]}}, "error": None}
    (raw / "batch_output.jsonl").write_text(json.dumps(out) + "\n")
    return where


def test_planted_secrets_reach_no_output_file(tmp_path):
    assert {PASSWORD, EMAIL, BEARER, ANTHROPIC, SLACK} <= KNOWN
    cfg = load_config(TINY, [f"ingest.quarantine_keep_bytes={KEEP}", "ingest.max_line_bytes=1024"])
    raw, out = tmp_path / "raw", tmp_path / "out"
    where = write_secret_traps(raw)
    m = ingest(cfg, [raw], out)

    assert leaks(out, PLANTED) == []
    gw = str(raw / "gateway.jsonl")
    q = {(rec["source"], rec["line"]): rec for rec in quarantine(out)}
    for name in ("string_json", "double_escaped", "malformed", "cut_json", "cut_text", "jwt", "pem"):
        assert (gw, where[name]) in q, name
    # the excerpts are still useful: redacted, not dropped
    assert "[SECRET]" in q[(gw, where["string_json"])]["excerpt"]
    assert "[EMAIL]" in q[(gw, where["double_escaped"])]["excerpt"]
    assert "[BEARER_TOKEN]" in q[(gw, where["malformed"])]["excerpt"]
    assert q[(gw, where["jwt"])]["excerpt"].startswith('{"id":')
    assert q[(gw, where["jwt"])]["detail"] == "no_secret_left" and q[(gw, where["jwt"])]["stage"] == "validate"
    for name in ("cut_json", "cut_text"):
        assert q[(gw, where[name])]["excerpt_truncated"] and len(q[(gw, where[name])]["excerpt"].encode()) <= KEEP
    long_line = q[(str(raw / "huge.jsonl"), 2)]
    assert long_line["reason"] == "line_too_long" and long_line["excerpt"].startswith('{"note": "yyy')
    assert q[(str(raw / "batch_output.jsonl"), 1)]["reason"] == "batch_output_without_input"
    # each record is identified by its byte offset and the hash of its bytes
    data = (raw / "gateway.jsonl").read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
    rec = q[(gw, where["malformed"])]
    line = data[starts[where["malformed"] - 1] : starts[where["malformed"]] - 1]
    assert rec["offset"] == starts[where["malformed"] - 1] and rec["sha256"] == hashlib.sha256(line).hexdigest()
    # the kept conversation holding escaped JSON was redacted in the dataset
    rows = [r for split in ("train", "holdout") for r in load_from_disk(str(out / split))]
    kept = [r for r in rows if r["line"] == where["kept_escaped"] and r["source"] == gw]
    assert len(kept) == 1 and "[SECRET]" in kept[0]["messages"][0]["content"]
    assert m.counts["quarantined_by_reason"]["validation:no_secret_left"] == 2


def test_validation_failed_row_keeps_a_masked_excerpt_or_none(tmp_path):
    """A row that failed no_secret_left: what the pattern flags is masked to the end of its
    token (or key body); where masking cannot be trusted, no excerpt is kept at all."""
    cfg = load_config(TINY)
    (tmp_path / "work").mkdir()
    run = IngestRun(cfg, tmp_path / "out", tmp_path / "work")
    pem = "-----BEGIN RSA PRIVATE KEY\n" + "\n".join([KEY_BODY] * 4)
    row = {"id": "0" * 16, "messages": [{"role": "user", "content": f"Is this token safe to share? {FAKE_JWT}"},
                                        {"role": "user", "content": f"Why does ssh reject this key?\n{pem}\nThanks."}]}
    got = run.excerpt(b"", obj=row)
    assert "Is this token safe to share? [SECRET]" in got["excerpt"] and "Why does ssh reject" in got["excerpt"]
    assert not any(piece in got["excerpt"] for piece in (FAKE_JWT[:12], FAKE_JWT[-12:], KEY_BODY[:12], KEY_BODY[-12:]))
    hidden = FAKE_JWT.replace(".", "\\u002e", 1)  # the pattern matches only once unescaped
    assert run.excerpt(b"", obj={"content": f"token {hidden}"}) == {
        "excerpt": None, "excerpt_dropped": "a secret pattern survived redaction"}
    run.close()


def test_escaped_labelled_secrets_are_redacted():
    """Every labelled secret the redactor finds in plain text, it also finds JSON-escaped once
    and twice; texts without secrets stay unchanged whatever their escaping."""
    redactor = Redactor()
    missed, changed = [], []
    for case in LABELLED:
        text = case["text"]
        plain, _ = redactor.redact(text)
        for variant in (esc(text), json.dumps(esc(text))[1:-1]):
            out, _ = redactor.redact(variant)
            if not case["secrets"]:
                if out != variant:
                    changed.append((variant, out))
                continue
            assert redactor.redact(out)[0] == out  # idempotent
            for secret in case["secrets"]:
                if secret["value"] in plain:
                    continue  # missed in plain text too (the recall test counts those)
                if any(secret["value"] in view for view in views(out.encode())):
                    missed.append((secret["kind"], variant, out))
    assert not missed, missed
    assert not changed, changed


def zero_bomb(path: Path, good: list[bytes], zeros: int, kind: str = "zstd") -> None:
    """Good lines, then `zeros` zero bytes with no newline, compressed a MiB at a time."""
    block = bytes(1 << 20)
    if kind == "gzip":
        with gzip.open(path, "wb", compresslevel=9) as f:
            f.write(b"".join(good))
            for _ in range(zeros >> 20):
                f.write(block)
        return
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [cobj.compress(b"".join(good))] + [cobj.compress(block) for _ in range(zeros >> 20)]
    path.write_bytes(b"".join(parts) + cobj.flush())


GOOD = [json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}).encode() + b"\n" for i in range(3)]


def read_traced(path: Path, **kw):
    tracemalloc.start()
    try:
        reader = SourceReader(path, max_line_bytes=1 << 20, **kw)
        records = list(reader.records())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return records, reader, peak


def test_zstd_bomb_stops_at_the_byte_cap_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb.jsonl.zst"
    zero_bomb(path, GOOD, 256 << 20)
    assert path.stat().st_size < 64 << 10
    records, reader, peak = read_traced(path, max_decompressed_bytes=4 << 20)
    assert [r.data + b"\n" for r in records[:3]] == GOOD and not any(r.error for r in records[:3])
    assert [r.error for r in records[3:]] == ["line_too_long", "decompression_limit"]
    assert "ingest.max_decompressed_bytes" in records[-1].detail
    assert reader.watermark.damaged and reader.watermark.offset <= 4 << 20
    assert peak < 24 << 20, peak  # the 256 MiB are never held


def test_zstd_and_gzip_bombs_stop_at_the_ratio_cap(tmp_path):
    path = tmp_path / "bomb.jsonl.zst"
    zero_bomb(path, GOOD, 64 << 20)
    records, reader, _ = read_traced(path)  # default byte cap: the ratio stops it
    assert records[-1].error == "decompression_limit" and "ingest.max_compression_ratio" in records[-1].detail
    assert reader.watermark.offset <= sources.RATIO_AFTER + (16 << 20)
    gz = tmp_path / "bomb.log.gz"
    zero_bomb(gz, GOOD, 16 << 20, kind="gzip")
    records, reader, peak = read_traced(gz, max_decompressed_bytes=2 << 20)
    assert records[-1].error == "decompression_limit" and reader.watermark.damaged
    assert len(read_traced(gz, max_compression_ratio=50)[0]) == len(records)
    assert peak < 24 << 20, peak


def test_chunk_reader_hands_out_a_large_chunk_without_copying_its_rest():
    big = b"x" * (16 << 20)
    reader = _ChunkReader(iter([big]))
    buffer = bytearray(1 << 16)
    tracemalloc.start()
    try:
        total = 0
        while n := reader.readinto(buffer):
            total += n
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == len(big) and peak < 1 << 20, peak


def test_records_know_their_byte_offsets(tmp_path):
    """JSONL lines and JSON array elements (multi-byte text, elements read across blocks)."""
    items = [{"id": i, "text": "é€😀" * (i * 5000)} for i in range(6)]
    data = ("[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n]\n").encode()
    (tmp_path / "a.json").write_bytes(data)
    records = list(SourceReader(tmp_path / "a.json").records())
    assert [r.obj for r in records] == items
    assert [r.offset for r in records] == [data.index(b'{"id": %d' % i) for i in range(6)]
    lines = [json.dumps(x, ensure_ascii=False).encode() for x in items]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    starts = [sum(len(line) + 1 for line in lines[:i]) for i in range(6)]
    assert [r.offset for r in SourceReader(tmp_path / "b.jsonl").records()] == starts


def test_bomb_in_an_ingest_run_is_quarantined_and_counted(tmp_path):
    cfg = load_config(TINY, ["ingest.max_decompressed_bytes=1048576"])
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    (raw / "good.jsonl").write_text("\n".join(chat_line(prompt(i)) for i in range(5)) + "\n")
    zero_bomb(raw / "bomb.jsonl.zst", [(chat_line(prompt(10 + i)) + "\n").encode() for i in range(2)], 64 << 20)
    m = ingest(cfg, [raw], out)
    r = m.counts["records"]
    check_accounting(r["read"], {k: r[k] for k in ("parsed", "quarantined", "blank", "joined")})
    assert r["parsed"] == 7 and m.counts["quarantined_by_reason"]["decompression_limit"] == 1
    entry = next(q for q in quarantine(out) if q["reason"] == "decompression_limit")
    assert entry["source"] == str(raw / "bomb.jsonl.zst")
    assert m.counts["totals"]["train"] + m.counts["totals"]["holdout"] == 7
    assert ingest(cfg, [raw], out).changed is False  # not quarantined again while unchanged


def test_symlinks_out_of_an_input_folder_are_refused(tmp_path):
    logs, outside = tmp_path / "logs", tmp_path / "outside"
    (logs / "sub").mkdir(parents=True)
    outside.mkdir()
    (logs / "a.jsonl").write_text(chat_line(prompt(1)) + "\n")
    (logs / "sub" / "b.jsonl").write_text(chat_line(prompt(2)) + "\n")
    (outside / "private.jsonl").write_text(chat_line(f"my mail is {EMAIL}, my key is {ANTHROPIC}") + "\n")
    (logs / "inner.jsonl").symlink_to("sub/b.jsonl")  # inside: read (once)
    (logs / "leak.jsonl").symlink_to(outside / "private.jsonl")
    (logs / "mounted").symlink_to(outside, target_is_directory=True)
    (logs / "loop").symlink_to(".", target_is_directory=True)
    files, errors = discover([logs])
    assert sorted(p.resolve().name for p in files) == ["a.jsonl", "b.jsonl"]
    refused = dict(errors)
    assert set(refused) == {str(logs / "leak.jsonl"), str(logs / "mounted")}
    assert all("leaves the input folder" in why for why in refused.values())

    m = ingest(load_config(TINY), [logs], tmp_path / "out")
    assert {e["path"] for e in m.errors} == set(refused)
    assert m.counts["records"]["read"] == 2
    assert leaks(tmp_path / "out", [EMAIL, ANTHROPIC]) == []


def test_pending_bytes_bound_flushes_early_and_changes_nothing(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_mixed(raw)
    for many in ("rotated.jsonl.gz", "huge.jsonl"):  # 240 rows of one kind, a 50 MB line: covered elsewhere
        (raw / many).unlink()
    sizes: dict[str, list[int]] = {}
    submit = IngestRun.submit

    def spy(self, records, fmt):
        sizes.setdefault(self.cfg.run.name, []).append(len(records))
        submit(self, records, fmt)

    monkeypatch.setattr(IngestRun, "submit", spy)
    results = {}
    for name, overrides in {"default": [], "tiny": ["ingest.max_pending_bytes=1"]}.items():
        out = tmp_path / name
        m = ingest(load_config(TINY, [f"run.name={name}", *overrides]), [raw], out)
        rows = {split: [dict(r) for r in load_from_disk(str(out / split))] for split in ("train", "holdout")}
        # dropped.jsonl is written batch by batch, in the order of the steps: compared as a set
        side = {"quarantine": (out / "quarantine.jsonl").read_bytes(),
                "dropped": sorted((out / "dropped.jsonl").read_text().splitlines())}
        results[name] = (rows, side, {k: v for k, v in m.counts.items()})
    assert results["tiny"] == results["default"]
    assert max(sizes["tiny"]) == 1 and max(sizes["default"]) > 10  # one record per batch: the bound held
    assert os.path.getsize(tmp_path / "tiny" / "quarantine.jsonl") > 0


def test_rows_waiting_for_validation_are_bounded_by_bytes(tmp_path, monkeypatch):
    """Kept rows wait for Great Expectations in chunks of validate_rows, or fewer once their
    text passes max_pending_bytes: long conversations cannot pile up 20,000 at a time."""
    from drafter.traces.validate import Validator

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "chats.jsonl").write_text("\n".join(chat_line(prompt(i)) for i in range(60)) + "\n")
    chunks: list[list[int]] = []
    validate = Validator.validate

    def spy(self, frame):
        chunks.append(frame["num_bytes"].tolist())
        return validate(self, frame)

    monkeypatch.setattr(Validator, "validate", spy)
    bound = 1500
    m = ingest(load_config(TINY, [f"ingest.max_pending_bytes={bound}"]), [raw], tmp_path / "out")
    kept = m.counts["totals"]["train"] + m.counts["totals"]["holdout"]
    assert kept == 60 and sum(len(c) for c in chunks) == 60 and len(chunks) > 3
    assert all(sum(c[:-1]) < bound for c in chunks)  # a chunk closes as soon as it reaches the bound


def test_chunks_are_validated_without_gx_fingerprinting_them(monkeypatch):
    """GX's batch fingerprint (an MD5 over every value) is skipped while a chunk is validated,
    and GX's own threshold is as it was afterwards; the verdicts are GX's all the same."""
    from great_expectations.execution_engine import pandas_execution_engine as engine

    import pandas as pd

    from drafter.traces.validate import FRAME_COLUMNS, Validator

    def no_fingerprint(df):
        raise AssertionError("the chunk was fingerprinted")

    monkeypatch.setattr(engine, "hash_pandas_dataframe", no_fingerprint)
    threshold = engine.HASH_THRESHOLD
    rows = [(f"{i:016x}", "app.jsonl", i + 1, "2026-01-01T00:00:00Z", None, None, None, "chat",
             "user assistant", 2, None, 40, "hello\nhi there") for i in range(31)]
    rows[30] = ("not-an-id", *rows[30][1:])
    validator = Validator(min_tokens=1, max_tokens=100)
    result = validator.validate(pd.DataFrame(rows, columns=FRAME_COLUMNS))
    assert result.bad_rows == {30: ["id_format"]} and result.batch_failures == []
    assert engine.HASH_THRESHOLD == threshold
