"""The ingest stage: production logs -> clean, split Conversation datasets.

`ingest(cfg, inputs, out_dir)` reads every new line of the given log files and folders
and sends each to exactly one place:

    record (line)  -> quarantined (reason) | blank | batch output joined to its input
                    | parsed into conversations
    conversation   -> train | holdout | duplicate | decontaminated | filtered (reason)
                    | quarantined (failed a row-level expectation)

in this order: parse -> redact -> filters (errors, non-text content, broken roles,
empty turns, no assistant turn) -> token length (target tokenizer) -> decontamination
-> domain tag, split -> dedup -> Great Expectations -> write. Records are read here in
batches of `ingest.batch_size`; each batch is prepared up to the dedup step
(`drafter.traces.prepare`) in this process or, with `ingest.workers` > 1 or
`ingest.scheduler_address`, on the Dask workers of a prefect-dask `DaskTaskRunner`
(flows/ingest.py), and batches are committed (dedup index,
validation, writes) in the order they were read: the output is the same wherever they ran.
Workers that see the inputs (the LocalCluster; `ingest.workers_read_files`) are sent byte
ranges of whole lines of plain files instead of records, a few batches' ranges a task: this
process hashes and counts the bytes (the watermark), the worker reads them and checks their hash.
The dedup index is on disk and at most a few batches are in flight, so memory stays bounded.

Output (see drafter/CONTRACTS.md): `train/` and `holdout/` (datasets `save_to_disk`),
`quarantine.jsonl` (source, line, byte offset, reason, the sha256 of the record's bytes and
a redacted excerpt of at most `quarantine_keep_bytes`: never the raw record),
`dropped.jsonl` (id, source, line and reason of every duplicate, decontaminated and
filtered conversation: no text), `validation.json` / `.md`,
`watermarks.json`, `index.sqlite` (dedup index), `config.yaml` and `manifest.json`.
A run builds the next version of the whole folder beside it and swaps it in at the
end, so a killed run leaves the previous output (and its watermarks) untouched and the
next run redoes the lost work. A run that finds nothing new changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import shutil
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import orjson

from drafter.config import Config, IngestConfig
from drafter.manifest import (
    Timer,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    link_or_copy,
    write_manifest,
)
from drafter.reports import Manifest
from drafter.traces import formats
from drafter.traces.dedup import Deduper
from drafter.traces.formats import NotAConversation, Parsed
from drafter.traces.prepare import EXCERPT_MARGIN, Batch, Kept, Ledger, Preparer, fewer_collections, prepare_remote
from drafter.traces.schema import COLUMNS, rows_table
from drafter.traces.sources import LineRange, RawRecord, SourceReader, Watermark, discover, head_hash
from drafter.traces.validate import Validator, ValidationFailed, markdown, rows_frame

log = logging.getLogger(__name__)

# Batch API inputs and outputs are paired by custom_id across lines and files: their batches
# are prepared in this process, where the stored outputs are.
BATCH_FORMATS = ("openai-batch-input", "openai-batch-output")


class JsonlWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = path.open("ab")

    def write(self, obj: dict) -> None:
        self.f.write(orjson.dumps(obj) + b"\n")

    def close(self) -> None:
        self.f.close()


class StagedRows:
    """The rows of one split that passed validation, appended as Arrow record batches to a stream
    file (the datasets' schema) chunk by chunk: the dataset is made from it at the end without
    parsing anything again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = None  # opened at the first rows

    def write(self, table) -> None:
        if not len(table):
            return
        if self.writer is None:
            import pyarrow as pa

            self.writer = pa.ipc.new_stream(str(self.path), table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class DaskPool:
    """Batches prepared on Dask workers, through the client of a prefect-dask `DaskTaskRunner`
    (see flows/ingest.py). At most `window` tasks are in flight (bounded memory)."""

    # Byte ranges (one batch each) sent per task: a task costs Dask bookkeeping in this process
    # and in the worker (~4 ms each). 300,000 lines, two workers: 29.4-30.2 s with one range a task,
    # 26.2-26.6 s with four (eight: no faster, 60 MiB more). Batches of 4,096 lines instead
    # were as fast on the pool, but 2% slower in one process and 30 MiB larger.
    RANGES_PER_TASK = 4

    def __init__(self, client, icfg: IngestConfig, on_close: Callable[[], Any] | None = None) -> None:
        self.client = client
        self.workers = len(client.scheduler_info().get("workers", {})) or icfg.workers
        self.window = 2 * self.workers
        # Workers that see the inputs are sent LineRanges, not records: by default those of a
        # LocalCluster, not those of a cluster elsewhere.
        self.read_files = not icfg.scheduler_address if icfg.workers_read_files is None else icfg.workers_read_files
        self.on_close = on_close  # stops the cluster started for this run

    def submit(self, cfg: Config, records: list[RawRecord] | list[LineRange], fmt: str | None, lsh: tuple[int, int]):
        return self.client.submit(prepare_remote, cfg, records, fmt, lsh, pure=False)

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()


class IngestRun:
    """Reads the files, has their batches prepared (here or on a `DaskPool`) and commits them
    in read order: dedup index, Great Expectations, staged rows, quarantine and dropped files."""

    def __init__(self, cfg: Config, out_dir: Path, work: Path, pool: DaskPool | None = None) -> None:
        self.cfg, self.icfg, self.out_dir, self.work = cfg, cfg.ingest, out_dir, work
        self.ledger = Ledger()
        self.redactions: Counter = Counter()  # of the batches committed
        self.timer = Timer()
        self.pool = pool
        self.inflight: deque = deque()  # Batch (prepared here) or a future of one or a list, in read order
        self.ranges: list[LineRange] = []  # waiting to be sent to the pool together
        if (out_dir / "index.sqlite").is_file():
            shutil.copyfile(out_dir / "index.sqlite", work / "index.sqlite")
        self.dedup = Deduper(work / "index.sqlite", self.icfg.near_dup_threshold, self.icfg.num_perm)
        self.lsh = (self.dedup.bands, self.dedup.rows)  # the index's LSH shape, for every preparer
        self.local = Preparer(cfg, self.lsh)  # batches prepared here, and the quarantine entries written here
        self.quarantine = JsonlWriter(work / "quarantine.new.jsonl")
        self.dropped = JsonlWriter(work / "dropped.new.jsonl")
        self.staged = {s: StagedRows(work / f"{s}.new.arrow") for s in ("train", "holdout")}
        self.to_validate: list[Kept] = []
        self.to_validate_bytes = 0  # text bytes of the rows in to_validate
        self.files: dict[str, dict[str, Any]] = {}
        self._validator: Validator | None = None
        self._loader: threading.Thread | None = None
        self._loaded: Validator | None = None  # by the loader thread
        self._batch_out = None

    @property
    def validator(self) -> Validator:
        if self._loader is not None:
            self._loader.join()
            self._loader = None
        if self._validator is None:
            self._validator = self._loaded or self._load_validator()  # (loaded again here if the thread failed)
        return self._validator

    def _load_validator(self) -> Validator:
        with self.timer("load_great_expectations"):
            longest = self.local.size.longest
            if self.pool is not None:  # batches are tokenized on the workers: the tokenizer let go here
                self.local.drop_tokenizer()
            return Validator(self.icfg.min_tokens, self.icfg.max_tokens, self.icfg.max_invalid_fraction,
                             max_bytes=self.icfg.max_tokens * longest)

    def load_validator_in_background(self) -> None:
        """Great Expectations loaded (~2.5 s) in a thread while the first batches are read and
        prepared on the pool: loaded at the first validation, it would stop the reading, and
        the workers would wait for batches meanwhile."""
        def load() -> None:
            try:
                self._loaded = self._load_validator()
            except Exception:  # loaded again, and its error raised, where it is first needed
                log.debug("loading Great Expectations in the background failed", exc_info=True)

        self._loader = threading.Thread(target=load, name="load-great-expectations", daemon=True)
        self._loader.start()

    def redaction_counts(self) -> Counter:
        return self.redactions + self.local.redactor.totals  # batches + what was redacted here

    # ----- quarantine / dropped ---------------------------------------------------------------
    def excerpt(self, data: bytes, cut: bool = False, obj: Any = None) -> dict[str, Any]:
        return self.local.excerpt(data, cut, obj)

    def write_quarantine(self, entry: dict[str, Any], reason: str, detail: str, stage: str = "parse") -> None:
        self.quarantine.write(self.local.quarantine_entry(entry, reason, detail, stage))

    def drop(self, kept: Kept, outcome: str, reason: str, of: str | None = None) -> None:
        entry = {"id": kept.id, "source": kept.source, "line": kept.line, "outcome": outcome, "reason": reason}
        if of:
            entry["of"] = of
        self.dropped.write(entry)
        self.ledger.conversations[outcome] += 1

    # ----- reading -----------------------------------------------------------------------------
    def detect_format(self, path: Path, previous: Watermark | None) -> str | None:
        if previous is not None and previous.format and previous.offset > 0:
            return previous.format
        samples = []
        reader = self.reader(path, None)
        gen = reader.records()
        try:
            for rec in gen:
                if rec.error:
                    continue
                obj = rec.obj
                if obj is None and rec.data.strip():
                    try:
                        obj = orjson.loads(rec.data)
                    except orjson.JSONDecodeError:
                        continue
                if obj is not None:
                    samples.append(obj)
                if len(samples) >= self.icfg.sniff_records:
                    break
        except OSError:
            return None
        finally:
            gen.close()
        return formats.detect(samples)

    def reader(self, path: Path, previous: Watermark | None) -> SourceReader:
        icfg = self.icfg
        return SourceReader(path, previous, icfg.max_line_bytes, icfg.quarantine_keep_bytes + EXCERPT_MARGIN,
                            icfg.max_decompressed_bytes, icfg.max_compression_ratio)

    def read_file(self, path: Path, previous: Watermark | None, fmt: str | None) -> Watermark:
        reader = self.reader(path, previous)
        before = self.ledger.records["read"]
        from tqdm import tqdm

        records, size = [], 0
        # Plain files on a pool that reads them: shards of whole lines, read by the workers.
        ranges = (self.icfg.batch_size, self.icfg.max_pending_bytes) \
            if self.pool is not None and self.pool.read_files and fmt not in BATCH_FORMATS else None
        try:
            with tqdm(desc=f"ingest {path.name}", unit=" lines", disable=None, leave=False) as bar:
                for rec in reader.records(ranges):
                    if isinstance(rec, LineRange):
                        self.ledger.records["read"] += rec.lines
                        bar.update(rec.lines)
                        self.ranges.append(rec)
                        if len(self.ranges) == self.pool.RANGES_PER_TASK:
                            self.submit_ranges(fmt)
                        continue
                    bar.update()
                    self.ledger.records["read"] += 1
                    records.append(rec)
                    size += rec.size
                    if len(records) >= self.icfg.batch_size or size >= self.icfg.max_pending_bytes:
                        self.submit(records, fmt)
                        records, size = [], 0
        except OSError:  # the file ends here (the caller reports it): what was read and counted goes on
            self.submit_read(records, fmt)
            raise
        self.submit_read(records, fmt)
        wm = reader.watermark
        wm.format = fmt
        self.files[str(path)] = {
            "format": fmt, "compression": reader.compression, "sha256_read": wm.sha256, "bytes_read": wm.offset,
            "records_new": self.ledger.records["read"] - before,
            "resumed_after_record": previous.records if previous and not reader.restarted else 0,
            "restarted": reader.restarted, "pending_partial_line": reader.pending_partial,
        }
        return wm

    # ----- batches: prepared here or on the pool, committed in read order -----------------------
    def submit(self, records: list[RawRecord], fmt: str | None) -> None:
        if self.pool is None or fmt in BATCH_FORMATS:
            join = self.join_batch_output if fmt == "openai-batch-input" else None
            self.inflight.append(self.local.prepare(records, fmt, join=join, store=self.store_batch_output))
        else:
            self.inflight.append(self.pool.submit(self.cfg, records, fmt, self.lsh))
        self.commit_ready(self.pool.window if self.pool is not None else 0)

    def submit_read(self, records: list[RawRecord], fmt: str | None) -> None:
        """At the end of a file: its last records or ranges, however few."""
        if records:
            self.submit(records, fmt)
        if self.ranges:
            self.submit_ranges(fmt)

    def submit_ranges(self, fmt: str | None) -> None:
        self.inflight.append(self.pool.submit(self.cfg, self.ranges, fmt, self.lsh))
        self.ranges = []
        self.commit_ready(self.pool.window)

    def commit_ready(self, keep: int = 0) -> None:
        """Commit the oldest batches until at most `keep` items are in flight."""
        while len(self.inflight) > keep:
            item = self.inflight.popleft()
            if not isinstance(item, Batch):
                with self.timer("wait_for_workers"):
                    item = item.result()
            for batch in item if isinstance(item, list) else [item]:
                self.commit(batch)

    def commit(self, batch: Batch) -> None:
        self.ledger.add(batch.ledger)
        self.redactions.update(batch.redactions)
        for name, seconds in batch.durations.items():  # summed over batches (and workers)
            self.timer.durations[name] = round(self.timer.durations.get(name, 0.0) + seconds, 4)
        for entry in batch.quarantine:
            self.quarantine.write(entry)
        for entry in batch.dropped:
            self.dropped.write(entry)
        with self.timer("dedup"):
            verdicts = self.dedup.check([k.id for k in batch.kept], batch.dedup_keys())
        for kept, verdict in zip(batch.kept, verdicts):
            if verdict is not None:
                kind, original = verdict
                self.ledger.duplicates[kind] += 1
                self.drop(kept, "duplicate", kind, of=original)
                continue
            self.to_validate.append(kept)
            self.to_validate_bytes += kept.num_bytes
        # Rows wait for validation in chunks of validate_rows, or less when they are large:
        # memory stays bounded by max_pending_bytes however long the conversations are.
        if len(self.to_validate) >= self.icfg.validate_rows or self.to_validate_bytes >= self.icfg.max_pending_bytes:
            self.validate()

    # ----- OpenAI Batch API: outputs are kept (redacted) until their inputs come by ---------------
    @property
    def batch_out(self):
        if self._batch_out is None:
            import sqlite3

            self._batch_out = sqlite3.connect(str(self.work / "batch_outputs.sqlite"))
            self._batch_out.execute("CREATE TABLE IF NOT EXISTS out (custom_id TEXT PRIMARY KEY, source TEXT, "
                                    "line INTEGER, message TEXT, meta TEXT, bad TEXT, used INTEGER)")
        return self._batch_out

    def store_batch_output(self, rec: RawRecord, obj: Any) -> None:
        try:
            custom_id, message, meta = formats.batch_output_message(obj if isinstance(obj, dict) else {})
        except NotAConversation as exc:
            self.local.quarantine_record(rec, exc.reason, exc.detail)  # into the batch being prepared
            return
        if message is not None:
            message = {"role": message["role"], "content": self.local.redact_text(message["content"])}
        # kept for the quarantine in case no input comes: located, hashed and redacted already
        bad = json.dumps(self.local.bad_record(dataclasses.replace(rec, obj=obj)))
        cur = self.batch_out.execute("INSERT OR IGNORE INTO out VALUES (?, ?, ?, ?, ?, ?, 0)", (
            custom_id, rec.source, rec.line, json.dumps(message), json.dumps(meta), bad))
        if cur.rowcount == 0:
            self.local.quarantine_record(rec, "duplicate_custom_id", f"custom_id {custom_id!r} already seen in a batch output")

    def join_batch_output(self, item: Parsed) -> None:
        if self._batch_out is None or not item.custom_id:
            return
        row = self.batch_out.execute("SELECT message, meta FROM out WHERE custom_id = ? AND used = 0",
                                     (item.custom_id,)).fetchone()
        if row is None:
            return
        self.batch_out.execute("UPDATE out SET used = 1 WHERE custom_id = ?", (item.custom_id,))
        self.ledger.records["joined"] += 1
        message, meta = json.loads(row[0]), json.loads(row[1])
        if message is None:
            item.flags.add("error_response")
        else:
            item.messages.append(message)
        item.model = item.model or meta.get("model")
        item.timestamp = item.timestamp or meta.get("timestamp")
        item.flags.update(meta.get("flags", []))

    def settle_batch_outputs(self) -> None:
        """Batch output lines whose input never came: quarantined (nothing to pair them with)."""
        if self._batch_out is None:
            return
        for custom_id, bad in self.batch_out.execute(
            "SELECT custom_id, bad FROM out WHERE used = 0 ORDER BY source, line"
        ):
            reason = "batch_output_without_input"
            self.write_quarantine(json.loads(bad), reason, f"no batch input line with custom_id {custom_id!r} in this run")
            self.ledger.records["quarantined"] += 1
            self.ledger.quarantined[reason] += 1
        self._batch_out.close()

    def validate(self) -> None:
        if not self.to_validate:
            return
        chunk, self.to_validate, self.to_validate_bytes = self.to_validate, [], 0
        with self.timer("validate"):
            table = rows_table([kept.row for kept in chunk])
            result = self.validator.validate(rows_frame(table, [k.num_tokens for k in chunk], [k.num_bytes for k in chunk]))
        if result.batch_failures:
            raise _Stop(result.batch_failures)
        splits = []  # of each row of the chunk; None: quarantined
        for i, kept in enumerate(chunk):
            failed = result.bad_rows.get(i)
            if failed:
                self.dedup.forget(kept.id)
                # The row was redacted, yet it may hold what no_secret_left flagged: the excerpt masks it.
                entry = {"source": kept.source, "line": kept.line, "offset": kept.offset, "sha256": kept.sha256,
                         "id": kept.id, **self.excerpt(b"", obj=orjson.loads(kept.row))}
                self.write_quarantine(entry, "validation", ", ".join(failed), stage="validate")
                self.ledger.quarantined["validation:" + failed[0]] += 1
                self.ledger.conversations["quarantined"] += 1
                splits.append(None)
                continue
            splits.append(kept.split)
            self.ledger.conversations[kept.split] += 1
            self.ledger.domains[kept.domain] += 1
        with self.timer("stage_rows"):
            for split, staged in self.staged.items():
                staged.write(table.filter([s == split for s in splits]))
        self.dedup.settle()

    def close(self) -> None:
        if self._loader is not None:  # (a failed run: the thread is let finish before anything is removed)
            self._loader.join()
        self.dedup.close()
        for w in (self.quarantine, self.dropped, *self.staged.values()):
            w.close()
        if self.pool is not None:  # (before the datasets are written: the workers' memory is freed)
            self.pool.close()


class _Stop(Exception):
    def __init__(self, failures: list[str]) -> None:
        super().__init__("; ".join(failures))
        self.failures = failures


# ----- datasets ----------------------------------------------------------------------------------
def build_split(old: Path, staged: Path, dest: Path) -> int:
    """dest = the previous version's rows (`old`, if any) and then the rows this run staged (a
    `StagedRows` file), as a folder `load_from_disk` reads; returns its row count.

    The previous version's data files are hard-linked into dest, not rewritten: a run costs what
    its new rows cost however large the dataset has grown (rewriting 382 MB of rows took most of a
    3,000-line incremental run, and their mapped pages counted in its memory). The new rows are
    saved with `save_to_disk`, and its `state.json` then lists the previous files first."""
    from datasets import Dataset, DatasetInfo, load_from_disk

    from drafter.traces.schema import features

    previous = json.loads((old / "state.json").read_text()) if (old / "state.json").is_file() else None
    # (an empty split saved with no data file, which does not load, lists none: taken as no rows)
    earlier = [entry["filename"] for entry in previous["_data_files"]] if previous else []
    if staged.is_file() or not earlier:
        feats = features()
        new = Dataset.from_file(str(staged), info=DatasetInfo(features=feats)) if staged.is_file() \
            else Dataset.from_dict({c: [] for c in COLUMNS}, features=feats)
        new.save_to_disk(str(dest), num_shards=1 if len(new) == 0 else None)  # (0 rows: one empty file, or it would not load)
        del new
        state = json.loads((dest / "state.json").read_text())
    else:  # nothing new: the earlier files alone
        dest.mkdir(parents=True)
        shutil.copyfile(old / "dataset_info.json", dest / "dataset_info.json")
        state = {**previous, "_data_files": []}
    if earlier:
        taken, n = set(earlier), len(earlier)
        for entry in state["_data_files"]:  # this run's files, named after the earlier ones
            while f"data-{n:05d}.arrow" in taken:
                n += 1
            (dest / entry["filename"]).rename(dest / f"data-{n:05d}.arrow")
            entry["filename"] = f"data-{n:05d}.arrow"
            taken.add(entry["filename"])
        for name in earlier:
            link_or_copy(old / name, dest / name)  # (published files are never written again)
        state["_data_files"] = [{"filename": name} for name in earlier] + state["_data_files"]
        atomic_write_json(dest / "state.json", state)
    return len(load_from_disk(str(dest)))  # (maps the files: reads their batches' headers, not the rows)


def _append(old: Path, new: Path, dest: Path) -> int:
    """dest = old + new (JSONL files); returns the line count of dest."""
    with dest.open("wb") as out:
        for part in (old, new):
            if part.is_file():
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    with dest.open("rb") as f:
        return sum(1 for _ in f)


# ----- the stage -------------------------------------------------------------------------------
def load_watermarks(out_dir: Path) -> dict[str, Watermark]:
    path = out_dir / "watermarks.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: Watermark.from_json(v) for k, v in data.get("files", {}).items()}


def previous_for(path: Path, marks: dict[str, Watermark]) -> Watermark | None:
    """This file's watermark, or that of an already-read file it is a copy or rename of."""
    key = str(path.resolve())
    if key in marks:
        return marks[key]
    heads: dict[int, str | None] = {}
    best = None
    for wm in marks.values():
        n = min(wm.offset, 4096)
        if n == 0:
            continue
        if n not in heads:
            heads[n] = head_hash(path, n)
        if heads[n] == wm.head and (best is None or wm.offset > best.offset):
            best = wm
    return best


def ingest(cfg: Config, inputs: list[Path] | None = None, out_dir: Path | None = None,
           force: bool = False) -> Manifest:
    """Ingest new log lines into `out_dir` (default `<data_dir>/ingested`); returns the manifest
    (with `changed`: False when there was nothing new, and `out_dir`).

    Unreadable inputs are reported in `manifest.errors` (the other files still ingest).
    Raises `ValidationFailed` when a batch-level expectation fails (nothing is published), and
    `OutputDirError` before any work when `out_dir` is a folder drafter did not write (unless
    `force`).
    """
    from filelock import FileLock

    if cfg.ingest.on_dask:
        from flows.ingest import needs_subflow, run_ingest_flow

        if needs_subflow():  # in a Prefect run: as the drafter-ingest subflow, on its DaskTaskRunner
            return run_ingest_flow(cfg, inputs, out_dir, force)
    started = time.time()
    inputs = [Path(p) for p in (inputs or cfg.ingest.inputs)]
    out_dir = Path(out_dir or cfg.data_dir / "ingested")
    check_replaceable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")), fewer_collections, arrow_from_malloc():
        return _ingest_locked(cfg, inputs, out_dir, started, force)


@contextlib.contextmanager
def arrow_from_malloc():
    """Arrow allocates from glibc's malloc while ingest runs. Its default pool (mimalloc) kept the
    buffers of the validation chunks it had freed: 100,000 rows in chunks of 20,000 peaked 119 MiB
    above the start instead of 60, as fast; and `release_memory` hands glibc's back to the OS."""
    import pyarrow as pa

    saved = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(saved)


def _ingest_locked(cfg: Config, inputs: list[Path], out_dir: Path, started: float,
                   force: bool = False) -> Manifest:
    files, errors = discover(inputs)
    marks = load_watermarks(out_dir)
    previous_hash = json.loads((out_dir / "manifest.json").read_text()).get("config_hash") \
        if (out_dir / "manifest.json").is_file() else None
    if previous_hash not in (None, cfg.hash()):
        log.warning("the config differs from the one that wrote %s: lines ingested before are not "
                    "processed again (ingest into a fresh --out to apply it to everything)", out_dir)
    work = out_dir.parent / f".{out_dir.name}.work"
    shutil.rmtree(work, ignore_errors=True)  # what a killed run left: redone from the watermarks
    work.mkdir(parents=True)
    pool = None
    if cfg.ingest.on_dask:
        from flows.ingest import dask_pool

        pool = dask_pool(cfg.ingest)
    run = IngestRun(cfg, out_dir, work, pool)
    if pool is not None:
        run.load_validator_in_background()
    new_marks = dict(marks)
    plan = []
    for path in files:
        previous = previous_for(path, marks)
        fmt = run.detect_format(path, previous)
        plan.append((path, previous, fmt))
    # Batch outputs first, so that their inputs find them.
    plan.sort(key=lambda item: item[2] != "openai-batch-output")
    try:
        for path, previous, fmt in plan:
            try:
                with run.timer("read_and_commit"):
                    wm = run.read_file(path, previous, fmt)
            except OSError as exc:
                errors.append((str(path), f"cannot read: {exc.strerror or exc}"))
                continue
            new_marks[str(path.resolve())] = wm
        with run.timer("read_and_commit"):
            run.commit_ready()
        run.settle_batch_outputs()
        run.validate()
    except _Stop as stop:
        run.close()
        report = run.validator.report(stop.failures)
        atomic_write_json(out_dir / "validation.failed.json", report)
        atomic_write_text(out_dir / "validation.failed.md", markdown(report))
        shutil.rmtree(work, ignore_errors=True)
        raise ValidationFailed(
            "ingest stopped: a batch-level expectation failed (" + "; ".join(stop.failures) + "). "
            f"Nothing was published; see {out_dir / 'validation.failed.md'}"
        ) from None
    except BaseException:
        run.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    run.close()
    run.ledger.check()

    counts = run.ledger.counts()
    counts["redactions"] = dict(sorted(run.redaction_counts().items()))
    params = cfg.ingest.model_dump(mode="json")
    if counts["records"]["read"] == 0 and (out_dir / "manifest.json").is_file():
        # Nothing new: the published output stays exactly as it is.
        shutil.rmtree(work, ignore_errors=True)
        return Manifest(stage="ingest", counts=counts, inputs={str(p): run.files.get(str(p), {}) for p in files},
                        params=params, changed=False, errors=_errors(errors), out_dir=str(out_dir))

    release_memory()
    with run.timer("write_datasets"), atomic_dir(out_dir, force=force) as tmp:
        totals = {
            split: build_split(out_dir / split, work / f"{split}.new.arrow", tmp / split)
            for split in ("train", "holdout")
        }
        totals["quarantine"] = _append(out_dir / "quarantine.jsonl", work / "quarantine.new.jsonl", tmp / "quarantine.jsonl")
        totals["dropped"] = _append(out_dir / "dropped.jsonl", work / "dropped.new.jsonl", tmp / "dropped.jsonl")
        shutil.move(str(work / "index.sqlite"), tmp / "index.sqlite")
        report = run.validator.report() if run._validator is not None else _empty_validation()
        previous_report = out_dir / "validation.json"
        report["runs"] = 1 + (json.loads(previous_report.read_text()).get("runs", 0) if previous_report.is_file() else 0)
        atomic_write_json(tmp / "validation.json", report)
        atomic_write_text(tmp / "validation.md", markdown(report))
        atomic_write_json(tmp / "watermarks.json", {"files": {k: v.to_json() for k, v in sorted(new_marks.items())}})
        cfg.save(tmp / "config.yaml")
        counts["totals"] = totals
        manifest = write_manifest(
            tmp, "ingest",
            inputs={str(p): run.files.get(str(p), {}) for p in files},
            params=params,
            counts=counts,
            durations={**run.timer.durations, "total": round(time.time() - started, 3)},
            outputs={"train": "train/", "holdout": "holdout/", "quarantine": "quarantine.jsonl",
                     "dropped": "dropped.jsonl", "validation": "validation.json", "watermarks": "watermarks.json"},
            extra={"errors": _errors(errors), "config_hash": cfg.hash()},
        )
    shutil.rmtree(work, ignore_errors=True)
    for stale in ("validation.failed.json", "validation.failed.md"):
        (out_dir / stale).unlink(missing_ok=True)
    manifest.changed = True
    manifest.out_dir = str(out_dir)
    return manifest


def release_memory() -> None:
    """Freed heap handed back to the OS before the datasets are written: glibc keeps it
    otherwise, and writing maps the Arrow files on top of it (two workers, a million lines:
    the ingesting process 601 -> 481 MiB, the peak while writing 1,025 -> 887 MiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def _errors(errors: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"path": p, "error": e} for p, e in errors]


def _empty_validation() -> dict[str, Any]:
    return {"suite": "ingest.conversations", "great_expectations": _gx_version(), "success": True, "chunks": 0,
            "rows": 0, "row_failures_quarantined": 0, "stopped_by": [], "expectations": {}}


def _gx_version() -> str:
    from importlib import metadata

    return metadata.version("great-expectations")


__all__ = ["ingest", "ValidationFailed"]
