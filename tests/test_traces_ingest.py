"""The ingest stage end to end on tiny targets: accounting, idempotence, increments, bad input, validation."""

import gc
import gzip
import threading
import json
import os
import shutil
from pathlib import Path

import pytest
import zstandard
from datasets import load_from_disk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drafter.config import BUNDLED_EVAL_DIR, load_config
from drafter.manifest import OutputDirError, check_accounting, read_manifest, sha256_tree
from drafter.reports import Manifest, parse
from drafter.traces.ingest import ingest
from drafter.traces.prepare import Preparer
from drafter.traces.validate import ValidationFailed

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ["jane.doe@gmail.com", "AKIAQ7XK3MZ4PL2N8RTW", "(415) 867-5309", "ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8"]
TOPICS = ["volcanoes", "the Roman empire", "jazz history", "sourdough bread", "black holes", "chess openings",
          "coral reefs", "the printing press", "honey bees", "glaciers", "origami", "the Silk Road"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs" / "tiny.yaml")


def chat_line(user, answer="Here is a clear and helpful answer to that question.", **extra):
    line = {"timestamp": "2026-11-20T10:00:00Z", "tenant": "acme", "route": "/v1/chat/completions",
            "request": {"model": "m", "messages": [{"role": "user", "content": user}]},
            "response": {"model": "m", "created": 1763632800,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}}
    line.update(extra)
    return json.dumps(line)


def prompt(i):
    return f"Tell me three surprising facts about {TOPICS[i % len(TOPICS)]}, number {i}, in plain words please."


def write_mixed(root: Path) -> dict:
    """A folder of every supported format, with broken, duplicate, contaminated and secret-bearing lines.
    Returns what each line should become, for the checks."""
    root.mkdir(parents=True, exist_ok=True)
    gsm8k = json.loads((BUNDLED_EVAL_DIR / "gsm8k.jsonl").read_text().rstrip("\n").split("\n")[3])["turns"][0]
    lines = [chat_line(prompt(i)) for i in range(12)]
    lines += [
        chat_line(prompt(0)),  # exact duplicate of line 1
        chat_line(prompt(1).upper() + "!!"),  # same prompt after normalisation
        chat_line("Quick question: " + gsm8k),  # evaluation prompt
        chat_line("Please write me a haiku about rain and umbrellas", answer=""),  # no assistant text
        json.dumps({"request": {"messages": [{"role": "user", "content": "hello there friend"}]}, "status": 500,
                    "error": {"message": "timeout"}}),
        chat_line(f"My email is {SECRETS[0]} and my phone is {SECRETS[2]}; what is a good password manager?"),
        chat_line(f"Why does boto3 reject my key {SECRETS[1]} with an access denied error?"),
        '{"request": {"messages": [',  # cut short
        "",  # blank
        json.dumps({"event": "healthcheck", "status": "ok"}),  # JSON, unknown shape
        json.dumps([1, 2, 3]),  # JSON, not an object
        json.dumps({"request": {"messages": [{"role": "user", "content": "Hi"}]}, "response": {"choices": "nope"}}),
    ]
    (root / "gateway.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"request": "caf\xe9"}\n')
    # a 50 MB single line between two good ones
    with (root / "huge.jsonl").open("wb") as f:
        f.write(chat_line(prompt(20)).encode() + b"\n")
        f.write(b'{"request": {"messages": [{"role": "user", "content": "' + b"y" * 50_000_000 + b'"}]}}\n')
        f.write(chat_line(prompt(21)).encode() + b"\n")
    # gzip cut short
    body = "\n".join(chat_line(prompt(30 + i)) for i in range(400)).encode() + b"\n"
    gz = gzip.compress(body)
    (root / "rotated.jsonl.gz").write_bytes(gz[: int(len(gz) * 0.6)])
    # zstd, complete
    (root / "archive.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        ("\n".join(chat_line(prompt(500 + i)) for i in range(3)) + "\n").encode()))
    # ShareGPT as one JSON array
    share = [{"id": f"s{i}", "conversations": [{"from": "human", "value": prompt(600 + i)},
                                               {"from": "gpt", "value": "A good answer with several words."}]}
             for i in range(3)]
    share.append({"id": "broken-roles", "conversations": [{"from": "gpt", "value": "I start the talk, oddly."},
                                                          {"from": "human", "value": "That is not how it works."}]})
    (root / "sharegpt.json").write_text(json.dumps(share, indent=1))
    # plain {"messages"} lines
    (root / "finetune.ndjson").write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": "You are concise."}, {"role": "user", "content": prompt(700 + i)},
        {"role": "assistant", "content": "Short answer with some words in it."}]}) for i in range(2)) + "\n")
    # OpenAI Batch API: input and output joined by custom_id (r3 has no output, x9 has no input)
    batch_in = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": "m", "messages": [{"role": "user", "content": prompt(800 + i)}]}})
                for i in range(4)]
    batch_out = [json.dumps({"id": f"b{i}", "custom_id": cid, "response": {"status_code": 200, "body": {
        "model": "m", "created": 1763632800,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Batch answer {cid} in words."}}]}},
        "error": None}) for i, cid in enumerate(["r0", "r1", "r2", "x9"])]
    (root / "batch_input.jsonl").write_text("\n".join(batch_in) + "\n")
    (root / "batch_output.jsonl").write_text("\n".join(batch_out) + "\n")
    # OpenTelemetry: one line with a GenAI span and an HTTP span, one with no GenAI span
    def span(sid, attrs):
        return {"traceId": "t", "spanId": sid, "startTimeUnixNano": "1763632800000000000",
                "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()]}
    otel = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [
        span("a", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                   "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": prompt(900)}]}]),
                   "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [
                       {"type": "text", "content": "An answer from a span."}]}])}),
        span("b", {"http.method": "GET"})]}]}]}
    no_genai = {"resourceSpans": [{"scopeSpans": [{"spans": [span("c", {"db.system": "postgres"})]}]}]}
    (root / "traces.otlp.json").write_text(json.dumps(otel) + "\n" + json.dumps(no_genai) + "\n")
    return {"gsm8k": gsm8k}


def input_lines(root: Path) -> set[tuple[str, int]]:
    """Every (file, line) that holds a record, as the reader numbers them."""
    out = set()
    for path in sorted(root.iterdir()):
        key = str(path)
        if path.name == "sharegpt.json":
            text = path.read_text()
            out |= {(key, text[: m].count("\n") + 1) for m in _element_starts(text)}
        elif path.name == "rotated.jsonl.gz":
            continue  # checked separately: how much of it is readable depends on zlib's buffering
        elif path.name == "huge.jsonl":
            out |= {(key, 1), (key, 2), (key, 3)}
        else:
            data = zstandard.ZstdDecompressor().decompress(path.read_bytes()) if path.suffix == ".zst" else path.read_bytes()
            out |= {(key, i + 1) for i in range(data.count(b"\n"))}
    return out


def _element_starts(text):
    decoder, pos, starts = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while text[pos] in " \n\t,":
            pos += 1
        if text[pos] == "]":
            return starts
        starts.append(pos)
        _, pos = decoder.raw_decode(text, pos)


def places(out: Path) -> dict[tuple[str, int], list[str]]:
    """(source, line) -> where it went: train, holdout, quarantine, dropped (several for multi-conversation lines)."""
    where: dict[tuple[str, int], list[str]] = {}
    for split in ("train", "holdout"):
        for row in load_from_disk(str(out / split)):
            where.setdefault((row["source"], row["line"]), []).append(split)
    for name in ("quarantine", "dropped"):
        for line in (out / f"{name}.jsonl").read_text().rstrip("\n").split("\n"):
            if not line:
                continue
            rec = json.loads(line)
            where.setdefault((rec["source"], rec["line"]), []).append(f"{name}:{rec['reason']}")
    return where


def test_mixed_partly_broken_input_every_line_ends_in_one_place(cfg, tmp_path):
    raw = tmp_path / "raw"
    write_mixed(raw)
    out = tmp_path / "ingested"
    m = ingest(cfg, [raw], out)
    c, r = m.counts["conversations"], m.counts["records"]
    check_accounting(r["read"], {k: r[k] for k in ("parsed", "quarantined", "blank", "joined")})
    check_accounting(c["parsed"], {k: c[k] for k in ("train", "holdout", "duplicate", "decontaminated", "filtered",
                                                     "quarantined")})
    assert json.loads((out / "manifest.json").read_text())["counts"]["records"] == r

    where = places(out)
    gw = str(raw / "gateway.jsonl")
    blank = {(gw, 21)}
    joined = {(str(raw / "batch_output.jsonl"), i) for i in (1, 2, 3)}
    expected = input_lines(raw)
    placed = {k for k in where if not k[0].endswith(".gz")}
    assert placed | blank | joined == expected  # nothing lost ...
    assert not placed & (blank | joined)
    assert all(len(v) == 1 for v in where.values())  # ... nothing twice (one conversation per line here)

    def reason(path, line):
        return where[(str(raw / path), line)][0]

    assert reason("gateway.jsonl", 13) == "dropped:exact" and reason("gateway.jsonl", 14) == "dropped:exact"
    assert reason("gateway.jsonl", 15) == "dropped:gsm8k"
    assert reason("gateway.jsonl", 16) == "dropped:no_assistant"
    assert reason("gateway.jsonl", 17) == "dropped:error_response"
    assert reason("gateway.jsonl", 20) == "quarantine:malformed_json"
    assert reason("gateway.jsonl", 22) == "quarantine:unknown_shape"
    assert reason("gateway.jsonl", 23) == "quarantine:not_a_conversation"  # [1, 2, 3]
    assert reason("gateway.jsonl", 24) == "quarantine:not_a_conversation"  # choices is not a list
    assert reason("gateway.jsonl", 25) == "quarantine:invalid_utf8"
    assert reason("huge.jsonl", 2) == "quarantine:line_too_long"
    assert {reason("huge.jsonl", 1), reason("huge.jsonl", 3)} <= {"train", "holdout"}
    last_element = max(line for src, line in expected if src.endswith("sharegpt.json"))
    assert reason("sharegpt.json", last_element) == "dropped:role_order"
    assert reason("batch_output.jsonl", 4) == "quarantine:batch_output_without_input"
    assert reason("batch_input.jsonl", 4) == "dropped:no_assistant"
    assert reason("traces.otlp.json", 2) == "quarantine:not_a_conversation"
    assert m.counts["quarantined_by_reason"]["truncated_file"] == 1
    gz_rows = [k for k in where if k[0].endswith(".gz")]
    assert len(gz_rows) > 100 and where[max(gz_rows)] == ["quarantine:truncated_file"]

    # joined batch conversations carry the output's answer; redaction reached every output file
    rows = [row for split in ("train", "holdout") for row in load_from_disk(str(out / split))]
    batch = [row for row in rows if row["source"].endswith("batch_input.jsonl")]
    assert sorted(row["messages"][-1]["content"] for row in batch) == [f"Batch answer r{i} in words." for i in range(3)]
    assert m.counts["redactions"] == {"aws_access_key": 1, "email": 1, "phone": 1}
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".sqlite":
            data = path.read_bytes()
            assert not any(s.encode() in data for s in SECRETS), path
    assert {row["domain"] for row in rows} <= {"chat", "code", "math", "other"}
    assert len({row["id"] for row in rows}) == len(rows)
    assert (out / "validation.json").is_file() and "PASSED" in (out / "validation.md").read_text()
    assert m.inputs[str(raw / "sharegpt.json")]["format"] == "sharegpt"
    assert m.inputs[str(raw / "traces.otlp.json")]["format"] == "otlp"


def test_rerun_changes_nothing_and_increments_read_only_new_lines(cfg, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    log = raw / "app.jsonl"
    log.write_text("\n".join(chat_line(prompt(i)) for i in range(30)) + "\n")
    out = tmp_path / "out"
    thresholds = gc.get_threshold()
    first = ingest(cfg, [raw], out)
    assert gc.get_threshold() == thresholds  # the collector's thresholds are the caller's again
    before = sha256_tree(out)
    again = ingest(cfg, [raw], out)
    assert again.changed is False and again.counts["records"]["read"] == 0
    assert sha256_tree(out) == before
    # the same file under another name (copied or rotated) is recognised by its content
    (raw / "app-copy.jsonl").write_bytes(log.read_bytes())
    assert ingest(cfg, [raw], out).counts["records"]["read"] == 0

    with log.open("a") as f:
        f.write(chat_line(prompt(100)) + "\n" + chat_line(prompt(3)) + "\n")  # one new, one seen in run 1
    third = ingest(cfg, [log], out)
    assert third.counts["records"]["read"] == 2
    assert third.counts["conversations"]["duplicate"] == 1  # the index remembers earlier runs
    kept = first.counts["totals"]["train"] + first.counts["totals"]["holdout"]
    assert third.counts["totals"]["train"] + third.counts["totals"]["holdout"] == kept + 1
    marks = json.loads((out / "watermarks.json").read_text())["files"]
    assert marks[str(log.resolve())]["records"] == 32


def test_an_incremental_run_links_the_published_rows_and_adds_its_own(cfg, tmp_path):
    """A later run does not rewrite the rows already published: the new version's split holds
    the same data files (hard links: the same inodes) and then a file of its own rows, and loads
    as the earlier rows followed by the new ones; a run with no new row adds no file."""
    raw = tmp_path / "raw"
    raw.mkdir()
    log = raw / "app.jsonl"
    log.write_text("\n".join(chat_line(prompt(i)) for i in range(30)) + "\n")
    out = tmp_path / "out"
    ingest(cfg, [raw], out)
    first = {split: [r["id"] for r in load_from_disk(str(out / split))] for split in ("train", "holdout")}
    inodes = {p.name: p.stat().st_ino for p in (out / "train").glob("*.arrow")}
    assert len(inodes) == 1
    with log.open("a") as f:
        f.write("\n".join(chat_line(prompt(i)) for i in range(100, 110)) + "\n")
    m = ingest(cfg, [raw], out)
    files = sorted((out / "train").glob("*.arrow"))
    assert {p.name: p.stat().st_ino for p in files if p.name in inodes} == inodes
    assert len(files) == 2 and not (tmp_path / ".out.old").exists()
    rows = {split: [r["id"] for r in load_from_disk(str(out / split))] for split in ("train", "holdout")}
    for split in ("train", "holdout"):
        assert rows[split][: len(first[split])] == first[split]
    assert len(rows["train"]) + len(rows["holdout"]) == 40 == m.counts["totals"]["train"] + m.counts["totals"]["holdout"]
    with log.open("a") as f:  # repeats only: nothing new to add
        f.write("\n".join(chat_line(prompt(i)) for i in range(100, 103)) + "\n")
    ingest(cfg, [raw], out)
    assert sorted(p.name for p in (out / "train").glob("*.arrow")) == [p.name for p in files]
    assert [r["id"] for r in load_from_disk(str(out / "train"))] == rows["train"]


def test_fewer_collections_holds_while_any_thread_is_inside():
    from drafter.traces.prepare import FewerCollections

    fewer, before = FewerCollections(), gc.get_threshold()
    inside, leave = threading.Event(), threading.Event()

    def other():
        with fewer:
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    with fewer:  # entered second, left first: the thresholds stay raised for the other thread
        assert gc.get_threshold() == FewerCollections.THRESHOLDS
    assert gc.get_threshold() == FewerCollections.THRESHOLDS
    leave.set()
    thread.join()
    assert gc.get_threshold() == before


def test_published_rows_are_the_rows_as_parsed_timestamps_included(cfg, tmp_path):
    """The datasets hold the rows exactly as they were made: ISO 8601 timestamps stay strings
    with their 'T', fraction and 'Z' (a JSON reader left to infer types would turn them into
    Arrow timestamps and write them back as '2026-11-20 10:00:00')."""
    raw = tmp_path / "raw"
    raw.mkdir()
    stamps = ["2026-11-20T10:00:00Z", 1763632800250, None, "2026-11-20T12:00:00+02:00"]
    (raw / "chats.jsonl").write_text("\n".join(chat_line(prompt(i) + ' \u00e9t\u00e9 "quoted"', timestamp=t)
                                               for i, t in enumerate(stamps)) + "\n")
    ingest(cfg, [raw], tmp_path / "out")
    rows = [r for split in ("train", "holdout") for r in load_from_disk(str(tmp_path / "out" / split))]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4]
    got = {r["line"]: r["timestamp"] for r in rows}
    # (a missing timestamp is looked for in the response's `created`)
    assert got == {1: "2026-11-20T10:00:00Z", 2: "2025-11-20T10:00:00.250000Z", 3: "2025-11-20T10:00:00Z",
                   4: "2026-11-20T10:00:00Z"}
    assert all(r["messages"][0]["content"].endswith(' \u00e9t\u00e9 "quoted"') for r in rows)
    from datasets import Features, List, Value

    text = Value("string")
    expected = Features({"id": text, "source": text, "line": Value("int64"), "timestamp": text, "model": text,
                         "tenant": text, "route": text, "domain": text, "messages": List({"role": text, "content": text})})
    assert all(load_from_disk(str(tmp_path / "out" / split)).features == expected for split in ("train", "holdout"))


def test_an_empty_split_loads_and_the_next_run_adds_to_it(cfg, tmp_path):
    """A run whose conversations all land in train publishes a holdout of 0 rows that loads,
    and the next run adds to it; one saved before with no data file at all (what save_to_disk
    writes for 0 rows by default, which does not load) is taken as empty."""
    from datasets import Dataset

    from drafter.traces.schema import COLUMNS, features

    raw = tmp_path / "raw"
    raw.mkdir()
    log = raw / "chats.jsonl"
    log.write_text(chat_line(prompt(0)) + "\n")
    out = tmp_path / "out"
    m = ingest(cfg, [raw], out)
    assert m.counts["totals"] == {"train": 1, "holdout": 0, "quarantine": 0, "dropped": 0}
    assert len(load_from_disk(str(out / "holdout"))) == 0
    empty = Dataset.from_dict({c: [] for c in COLUMNS}, features=features())
    shutil.rmtree(out / "holdout")
    empty.save_to_disk(str(out / "holdout"))
    assert not list((out / "holdout").glob("*.arrow"))
    with log.open("a") as f:
        f.write(chat_line(prompt(1)) + "\n")
    m = ingest(cfg, [raw], out)
    assert m.counts["totals"]["train"] + m.counts["totals"]["holdout"] == 2
    assert sum(len(load_from_disk(str(out / s))) for s in ("train", "holdout")) == 2


def test_split_is_deterministic_and_keeps_conversation_prefixes_together(cfg, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = []
    for i in range(60):
        opening = prompt(i)
        lines.append(chat_line(opening))
        # the same session logged again with a follow-up turn (gateways log the whole history)
        follow = json.loads(chat_line(opening))
        follow["request"]["messages"] += [{"role": "assistant", "content": "First answer in a few words."},
                                          {"role": "user", "content": f"Now explain item {i} in more depth with examples."}]
        lines.append(json.dumps(follow))
    (raw / "a.jsonl").write_text("\n".join(lines) + "\n")
    outs = [ingest(cfg, [raw], tmp_path / f"out{k}") for k in range(2)]
    sides = []
    for k in range(2):
        side = {}
        for split in ("train", "holdout"):
            for row in load_from_disk(str(tmp_path / f"out{k}" / split)):
                side.setdefault(row["messages"][0]["content"], set()).add(split)
        sides.append(side)
    assert sides[0] == sides[1]  # deterministic
    assert all(len(s) == 1 for s in sides[0].values())  # a session never straddles the split
    assert outs[0].counts["totals"]["holdout"] > 0


def test_unreadable_file_is_named_and_the_rest_ingests(cfg, tmp_path):
    from typer.testing import CliRunner

    from drafter.cli import app

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.jsonl").write_text("\n".join(chat_line(prompt(i)) for i in range(5)) + "\n")
    bad = tmp_path / "locked.jsonl"  # named on the command line (a folder refuses symlinks that leave it)
    bad.write_text(chat_line(prompt(9)) + "\n")
    os.chmod(bad, 0)
    if os.access(bad, os.R_OK):  # running as root: permissions do not stop us; use a file reads fail on
        bad.unlink()
        bad.symlink_to("/proc/self/mem")
    result = CliRunner().invoke(app, ["ingest", str(raw), str(bad), "--out", str(tmp_path / "out"),
                                      "-c", str(ROOT / "configs" / "tiny.yaml")])
    assert result.exit_code == 4  # partial input: the rest ingested
    assert "locked.jsonl" in result.output and "cannot read" in result.output
    manifest = read_manifest(tmp_path / "out")
    assert manifest.errors[0]["path"].endswith("locked.jsonl")
    assert manifest.counts["totals"]["train"] + manifest.counts["totals"]["holdout"] == 5


@pytest.mark.parametrize("workers, read", [(1, 26), (2, 28)])
def test_what_was_read_before_a_read_error_is_ingested(tmp_path, monkeypatch, workers, read):
    """A file whose reading fails part way: the lines read (and counted) before the error are
    prepared and committed, also those still waiting for a batch or a pool task, and the error
    is reported; the accounting adds up."""
    from drafter.traces import sources

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("\n".join(chat_line(prompt(i)) for i in range(40)) + "\n")
    records = sources.SourceReader.records

    def failing(self, ranges=None):  # (the format sniff reads 20 records: it gets them all)
        lines = 0
        for rec in records(self, ranges):
            if lines >= 26:
                raise OSError(5, "Input/output error")
            lines += rec.lines if isinstance(rec, sources.LineRange) else 1
            yield rec

    monkeypatch.setattr(sources.SourceReader, "records", failing)
    overrides = [f"ingest.workers={workers}", "ingest.batch_size=4"]  # ranges of 4 lines, 4 a task
    m = ingest(load_config(ROOT / "configs" / "tiny.yaml", overrides), [raw], tmp_path / "out")
    assert m.errors == [{"path": str(raw / "a.jsonl"), "error": "cannot read: Input/output error"}]
    assert m.counts["records"]["read"] == read
    assert m.counts["totals"]["train"] + m.counts["totals"]["holdout"] == read


def test_row_level_failures_go_to_quarantine(cfg, tmp_path):
    """A token that looks like a JWT but is not one passes redaction; the validation suite's
    secret check still catches it and quarantines that row only."""
    raw = tmp_path / "raw"
    raw.mkdir()
    fake_jwt = "eyJhbGciOiJIUzI1NiJ9zz.eyJzdWIiOiIxMjM0NTY3ODkwIn0zz.c2lnbmF0dXJl"
    lines = [chat_line(prompt(i)) for i in range(30)] + [chat_line(f"Is this token safe to share? {fake_jwt}")]
    (raw / "a.jsonl").write_text("\n".join(lines) + "\n")
    m = ingest(cfg, [raw], tmp_path / "out")
    assert m.counts["conversations"]["quarantined"] == 1
    assert m.counts["quarantined_by_reason"] == {"validation:no_secret_left": 1}
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().rstrip("\n").split("\n")]
    assert q[0]["line"] == 31 and q[0]["stage"] == "validate"
    assert json.loads((tmp_path / "out" / "validation.json").read_text())["row_failures_quarantined"] == 1


def test_batch_level_failure_stops_and_publishes_nothing(cfg, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("\n".join(chat_line(prompt(i)) for i in range(5)) + "\n")
    out = tmp_path / "out"
    ingest(cfg, [raw], out)
    before = sha256_tree(out)
    with (raw / "a.jsonl").open("a") as f:
        f.write("\n".join(chat_line(prompt(50 + i)) for i in range(5)) + "\n")
    # a bug that gives every conversation the same id: the unique-id expectation stops the stage
    monkeypatch.setattr("drafter.traces.prepare.record_id", lambda *args: "0" * 16)
    with pytest.raises(ValidationFailed, match="unique_ids"):
        ingest(cfg, [raw], out)
    report = (out / "validation.failed.md").read_text()
    assert "FAILED" in report and "unique_ids" in report
    (out / "validation.failed.md").unlink()
    (out / "validation.failed.json").unlink()
    assert sha256_tree(out) == before  # previous output and watermarks untouched
    monkeypatch.undo()
    assert ingest(cfg, [raw], out).counts["records"]["read"] == 5  # the lines are read again once fixed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=300), min_size=1, max_size=3))
def test_fuzz_token_size_bounds_hold(tiny_tokenizer_size, texts):
    """The size bounds that spare most conversations from tokenization never contradict the count."""
    nbytes = sum(len(t.encode()) for t in texts)
    low, high = tiny_tokenizer_size.bounds(texts, nbytes, floor=1 << 30)
    n = sum(tiny_tokenizer_size.count(texts))
    assert low <= n <= high


@pytest.fixture(scope="module")
def tiny_tokenizer_size():
    from drafter.tiny import tiny_tokenizer
    from drafter.traces.prepare import TokenSize

    size = TokenSize(tiny_tokenizer())
    assert not size.exact_only and size.longest_plain <= size.longest
    return size


def test_a_batch_pickles_with_its_kept_rows_as_they_were():
    import pickle

    from drafter.traces.prepare import Batch, Kept

    import numpy as np

    kept = [Kept(f"{i:016x}", "app.jsonl", i + 1, 100 * i, "ab" * 32, None if i % 2 else 40, 300 + i,
                 "chat", "train" if i % 3 else "holdout", b'{"id": %d}\n' % i)
            for i in range(5)]
    keys = np.arange(-15, 30, dtype=np.int64).reshape(5, 9)
    batch = Batch(quarantine=[{"line": 9, "reason": "malformed_json"}], dropped=[{"id": "a", "outcome": "filtered"}],
                  kept=kept, keys=keys.tobytes(), durations={"finish": 0.5})
    batch.ledger.records["read"] = 7
    again = pickle.loads(pickle.dumps(batch))
    assert again == batch and isinstance(again.kept[0], Kept)
    assert again.dedup_keys().tolist() == keys.tolist()  # a row of keys a kept row
    assert pickle.loads(pickle.dumps(Batch())) == Batch() and Batch().dedup_keys().shape == (0, 0)


def test_the_checked_frame_is_made_from_the_rows_as_python_would():
    """What Great Expectations checks (made by Arrow from the serialised rows) holds each row's
    fields, its roles joined by spaces, its message count and its contents joined by newlines,
    and the token counts as given (None where the size settled the bounds)."""
    import orjson
    import pandas as pd

    from drafter.traces.schema import conversation_row, rows_table
    from drafter.traces.validate import FRAME_COLUMNS, rows_frame

    rows = [conversation_row(id=f"{i:016x}", source=f"logs/{i}.jsonl", line=i + 1, domain=d,
                             timestamp=None if i % 2 else "2026-01-01T00:00:00Z", tenant="acme" if i else None,
                             messages=[{"role": r, "content": c} for r, c in msgs])
            for i, (d, msgs) in enumerate([
                ("chat", [("user", "hi"), ("assistant", "hello")]),
                ("code", [("system", "be brief"), ("user", 'é "q"\nline'), ("assistant", ""), ("user", "x"),
                          ("assistant", "\u4e2d\u6587 \U0001F600")]),
                ("math", [("user", "2+2?"), ("assistant", "<tool_call>{}</tool_call>"), ("tool", "4"),
                          ("assistant", "4")]),
            ])]
    tokens, sizes = [None, 17, 3], [7, 40, 12]
    frame = rows_frame(rows_table([orjson.dumps(r) + b"\n" for r in rows]), tokens, sizes)
    expected = pd.DataFrame([
        (r["id"], r["source"], r["line"], r["timestamp"], r["model"], r["tenant"], r["route"], r["domain"],
         " ".join(m["role"] for m in r["messages"]), len(r["messages"]), t, b,
         "\n".join(m["content"] for m in r["messages"])) for r, t, b in zip(rows, tokens, sizes)], columns=FRAME_COLUMNS)
    assert list(frame.columns) == FRAME_COLUMNS
    assert frame.astype(object).where(frame.notna(), None).values.tolist() == \
        expected.astype(object).where(expected.notna(), None).values.tolist()
    assert frame["num_tokens"].tolist() == [None, 17, 3] and frame["n_messages"].dtype == "int64"


def test_arrow_allocates_from_malloc_during_ingest_only(cfg, tmp_path, monkeypatch):
    """Arrow's buffers come from glibc's malloc while ingest runs (its default pool kept freed
    validation chunks), and the default pool is the process's own again afterwards."""
    import pyarrow as pa

    from drafter.traces.validate import Validator

    before = pa.default_memory_pool().backend_name
    seen = []
    validate = Validator.validate
    monkeypatch.setattr(Validator, "validate", lambda self, frame: seen.append(pa.default_memory_pool().backend_name)
                        or validate(self, frame))
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "chats.jsonl").write_text("\n".join(chat_line(prompt(i)) for i in range(5)) + "\n")
    ingest(cfg, [raw], tmp_path / "out")
    assert seen == ["system"] and before != "system" and pa.default_memory_pool().backend_name == before


def many_repeats(raw: Path) -> None:
    write_mixed(raw)
    with (raw / "more.jsonl").open("w") as f:  # repeats across batches: dedup must see them in read order
        f.write("\n".join(chat_line(prompt(i % 40)) for i in range(120)) + "\n")


def ingested(out: Path, m) -> tuple:
    rows = {split: [dict(r) for r in load_from_disk(str(out / split))] for split in ("train", "holdout")}
    files = {name: (out / name).read_bytes() for name in ("quarantine.jsonl", "dropped.jsonl")}
    return rows, files, m.counts


def test_two_dask_workers_give_the_same_output_as_one_process(tmp_path, monkeypatch):
    """Batches prepared on a 2-process Dask LocalCluster (a prefect-dask DaskTaskRunner's, left
    when the run ends) and committed in read order: the same kept conversations, splits,
    quarantine, dropped entries and counts, byte for byte."""
    from flows import ingest as ingest_flows

    runners = []

    def task_runner(icfg):
        runners.append(real(icfg))
        return runners[-1]

    real = ingest_flows.task_runner
    monkeypatch.setattr(ingest_flows, "task_runner", task_runner)
    preparers = []  # of this process (the workers' are in theirs)
    real_drop = Preparer.drop_tokenizer
    monkeypatch.setattr(Preparer, "drop_tokenizer", lambda self: preparers.append(self) or real_drop(self))
    raw = tmp_path / "raw"
    many_repeats(raw)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        m = ingest(load_config(ROOT / "configs" / "tiny.yaml", [f"ingest.workers={workers}", "ingest.batch_size=16"]), [raw], out)
        outputs[workers] = ingested(out, m)
        assert ("read_range" in m.durations_s) == (workers == 2)  # the workers read their own byte ranges
        # The ingesting process lets the tokenizer go once it knows the longest token when the
        # workers tokenize the batches (it loads it again for the batch API files it prepares).
        assert len(preparers) == workers - 1
    assert outputs[2] == outputs[1]
    rows, files, counts = outputs[1]
    assert counts["conversations"]["duplicate"] >= 80 and len(rows["train"]) + len(rows["holdout"]) > 40
    assert counts["records"]["quarantined"] > 5
    (runner,) = runners  # one DaskTaskRunner, for the run with two workers, with no flow run around it
    assert runner.cluster_kwargs["n_workers"] == 2 and runner._cluster.status.name == "closed" and not runner._started


def test_threads_sharing_a_preparer_make_the_batches_of_one_thread(cfg):
    """A Dask worker's threads share one Preparer per config: batches prepared at the same time
    are those prepared one after another (kept rows, quarantine, dropped entries, counts)."""
    from concurrent.futures import ThreadPoolExecutor

    from drafter.traces.sources import RawRecord

    lines = [chat_line(prompt(i % 30) + (f" {SECRETS[i % 4]}" if i % 7 == 0 else "")).encode() for i in range(200)]
    lines[13::40] = [b'{"request": {"messages": [{"role": "user", "cont'] * len(lines[13::40])
    records = [RawRecord("log.jsonl", i + 1, line, len(line)) for i, line in enumerate(lines)]
    chunks = [records[i : i + 10] for i in range(0, len(records), 10)]

    def made(batch):
        return ([k.row for k in batch.kept], batch.quarantine, batch.dropped, batch.ledger.counts(), batch.redactions)

    alone = Preparer(cfg)
    want = [made(alone.prepare(chunk, "openai-chat-log")) for chunk in chunks]
    shared = Preparer(cfg)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda chunk: made(shared.prepare(chunk, "openai-chat-log")), chunks * 3))
    assert got == want * 3
    assert sum(len(w[1]) for w in want) == 5 and sum(w[4]["email"] for w in want) > 0


def test_ingest_in_a_task_on_a_dask_worker_prepares_on_its_own_workers(tmp_path):
    """A flow's tasks may run on Dask workers: ingest there, with two workers of its own, gives
    the output of one process (in the worker's fresh process the validator's loader thread and
    the batch API file prepared there both load the tokenizer first: loaded once, not twice at a time)."""
    from distributed import Client, LocalCluster

    raw = tmp_path / "raw"
    many_repeats(raw)
    tiny = str(ROOT / "configs" / "tiny.yaml")
    one = ingest(load_config(tiny, ["ingest.batch_size=16"]), [raw], tmp_path / "one")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.submit(_ingest_with_two_workers, tiny, str(raw), str(tmp_path / "in-task"), retries=0).result()
    assert ingested(tmp_path / "in-task", read_manifest(tmp_path / "in-task")) == ingested(tmp_path / "one", one)


def _ingest_with_two_workers(config: str, raw: str, out: str) -> None:
    ingest(load_config(config, ["ingest.workers=2", "ingest.batch_size=16"]), [Path(raw)], Path(out))


def test_a_running_dask_cluster_prepares_the_batches_and_keeps_running(tmp_path):
    """`ingest.scheduler_address`: the task runner connects to the cluster there (records are
    sent, as its workers may not see the files), gives the same output, and leaves it running.
    Its worker runs two threads: two batches at once in one process."""
    from distributed import Client, LocalCluster

    raw = tmp_path / "raw"
    many_repeats(raw)
    one = ingest(load_config(ROOT / "configs" / "tiny.yaml", ["ingest.batch_size=16"]), [raw], tmp_path / "one")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"ingest.scheduler_address={cluster.scheduler_address}",
                                                           "ingest.batch_size=16"])
        m = ingest(cfg, [raw], tmp_path / "remote")
        assert ingested(tmp_path / "remote", m) == ingested(tmp_path / "one", one)
        assert "read_range" not in m.durations_s  # records were sent, not byte ranges
        assert "prepare_remote" in cluster.scheduler.task_prefixes  # ... to the cluster's worker
        with Client(cluster) as client:  # still there for the next run
            assert client.submit(sum, [1, 2]).result() == 3


def test_in_a_prefect_run_parallel_ingest_is_the_drafter_ingest_subflow_on_a_dask_task_runner(store, tmp_path, monkeypatch):
    """Called from a task of a flow (the retrain flow's ingest stage), ingest with two workers
    runs as the `drafter-ingest` subflow on a DaskTaskRunner, with the same output as one process."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    raw = tmp_path / "raw"
    many_repeats(raw)
    configs = {w: load_config(ROOT / "configs" / "tiny.yaml", [f"ingest.workers={w}", "ingest.batch_size=16"]) for w in (1, 2)}

    @task
    def stage(out: Path) -> dict:
        return ingest(configs[2], [raw], out).to_json()

    @flow
    def parent(out: Path) -> dict:
        return stage(out)

    manifest = parent(tmp_path / "w2")
    one = ingest(configs[1], [raw], tmp_path / "w1")
    assert ingested(tmp_path / "w2", parse(Manifest, manifest, "result")) == ingested(tmp_path / "w1", one)
    assert "read_range" in manifest["durations_s"]  # prepared on the workers
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["drafter-ingest"])))
    (run,) = [r for r in runs if r.parameters["out_dir"] == str(tmp_path / "w2")]
    assert run.state.is_completed() and run.parent_task_run_id is not None
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not drafter's")
    with pytest.raises(OutputDirError, match="not written by drafter"):  # the stage's own error, through the subflow
        parent(foreign)


@pytest.mark.parametrize("thread_fails", [False, True])
def test_great_expectations_loads_in_the_background_or_again_where_first_needed(cfg, tmp_path, monkeypatch, thread_fails):
    """With a pool, the validator is built in a thread while the first batches run; if that
    fails, it is built again (and its error raised) where it is first needed, never lost."""
    from drafter.traces import ingest as ingest_module

    built, real = [], ingest_module.Validator

    def validator(*args, **kwargs):
        built.append(threading.current_thread().name)
        if thread_fails and len(built) == 1:
            raise RuntimeError("Great Expectations failed to load")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "Validator", validator)
    (tmp_path / "work").mkdir()
    run = ingest_module.IngestRun(cfg, tmp_path / "out", tmp_path / "work")
    run.load_validator_in_background()
    first = run.validator
    assert isinstance(first, real) and run.validator is first
    assert built == ["load-great-expectations", "MainThread"] if thread_fails else ["load-great-expectations"]
    run.close()
