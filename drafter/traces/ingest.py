"""The ingest stage: production logs -> clean, split Conversation datasets.

`ingest(cfg, inputs, out_dir)` reads every new line of the given log files and folders
and sends each to exactly one place:

    record (line)  -> quarantined (reason) | blank | batch output joined to its input
                    | parsed into conversations
    conversation   -> train | holdout | duplicate | decontaminated | filtered (reason)
                    | quarantined (failed a row-level expectation)

in this order: parse -> redact -> filters (errors, non-text content, broken roles,
empty turns, no assistant turn) -> token length (target tokenizer) -> decontamination
-> dedup -> domain tag -> split -> Great Expectations -> write. Everything streams in
small batches; the dedup index is on disk, so memory stays bounded.

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

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from drafter.config import Config
from drafter.manifest import (
    Timer,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_accounting,
    check_replaceable,
    write_manifest,
)
from drafter.traces import formats
from drafter.traces.dedup import Deduper, normalize
from drafter.traces.domain import classify
from drafter.traces.formats import NotAConversation, Parsed
from drafter.traces.redact import Redactor, has_leftover, mask_leftovers
from drafter.traces.schema import COLUMNS, ROLES, Conversation, record_id
from drafter.traces.sources import RawRecord, SourceReader, Watermark, discover, head_hash
from drafter.traces.validate import Validator, ValidationFailed, markdown

log = logging.getLogger(__name__)

# Bytes of a bad record read beyond the excerpt kept, so that a secret across the excerpt's
# end is seen whole by redaction (the excerpt is cut after redacting, never before).
EXCERPT_MARGIN = 4096
# The run of characters at the end of a record cut short may be the first part of a secret
# that no detector recognises any more: it is left out of the excerpt. (Matched on the
# reversed text: a regex anchored at the end would rescan every run before it.)
PARTIAL_TAIL = re.compile(r"[^\s\"',;{}\[\]<>`]*")

# Which role may follow which (None = start of the conversation).
NEXT_ROLES = {
    None: {"system", "user"},
    "system": {"user"},
    "user": {"assistant"},
    "assistant": {"user", "tool"},
    "tool": {"tool", "assistant"},
}


@dataclass
class Candidate:
    """A parsed conversation on its way through the filters."""

    id: str
    source: str
    line: int
    parsed: Parsed
    num_tokens: int | None = None  # counted only when the size alone cannot decide the bounds
    num_bytes: int = 0
    offset: int = 0  # of its record in the decompressed file
    sha256: str = ""  # of its record's bytes
    users: list[str] = field(default_factory=list)  # its user turns, `normalize`d (after redaction)


@dataclass
class Ledger:
    """Where every record and every conversation went (this run)."""

    records: Counter = field(default_factory=Counter)  # read, parsed, quarantined, blank, joined
    conversations: Counter = field(default_factory=Counter)  # parsed, train, holdout, duplicate, ...
    quarantined: Counter = field(default_factory=Counter)  # by reason
    filtered: Counter = field(default_factory=Counter)  # by reason
    duplicates: Counter = field(default_factory=Counter)  # exact / near
    decontaminated: Counter = field(default_factory=Counter)  # by evaluation set
    domains: Counter = field(default_factory=Counter)  # kept, by domain

    def check(self) -> None:
        r, c = self.records, self.conversations
        check_accounting(r["read"], {k: r[k] for k in ("parsed", "quarantined", "blank", "joined")}, "records")
        check_accounting(c["parsed"], {k: c[k] for k in ("train", "holdout", "duplicate", "decontaminated",
                                                            "filtered", "quarantined")}, "conversations")

    def counts(self) -> dict[str, Any]:
        keys_r = ("read", "parsed", "quarantined", "blank", "joined")
        keys_c = ("parsed", "train", "holdout", "duplicate", "decontaminated", "filtered", "quarantined")
        return {
            "records": {k: self.records[k] for k in keys_r},
            "conversations": {k: self.conversations[k] for k in keys_c},
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "filtered_by_reason": dict(sorted(self.filtered.items())),
            "duplicates_by_kind": dict(sorted(self.duplicates.items())),
            "decontaminated_by_set": dict(sorted(self.decontaminated.items())),
            "domains": dict(sorted(self.domains.items())),
            "tokenized_exactly": self.records["tokenized"],  # the rest were decided by their size
        }


class JsonlWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = path.open("ab")
        self.count = 0

    def write(self, obj: dict) -> None:
        self.f.write(orjson.dumps(obj) + b"\n")
        self.count += 1

    def close(self) -> None:
        self.f.close()


def split_of(first_user_turn: str, fraction: float, seed: int) -> str:
    """Deterministic split by the normalised opening prompt (`normalize`d already): a
    conversation, its longer continuations and its exact repeats always land on the same side."""
    digest = hashlib.blake2b(f"{seed}\0{first_user_turn}".encode(), digest_size=8).digest()
    return "holdout" if int.from_bytes(digest, "big") / 2**64 < fraction else "train"


def role_problem(messages: list[dict]) -> str | None:
    prev = None
    for msg in messages:
        role = msg["role"]
        if role not in ROLES:
            return "role_unknown"
        if role not in NEXT_ROLES[prev]:
            return "role_order"
        prev = role
    return None


class TokenSize:
    """Token counts, or bounds on them from a text's size alone.

    Without a normaliser, every token of a byte-level (or byte-fallback) tokenizer is a
    piece of the text at least one byte long, so a text has at most `bytes` tokens (plus
    one prefix token per message, for SentencePiece-style tokenizers) and at least
    `bytes / longest token`. The longest tokens are runs of one character ("\\n" + 80
    spaces, "####..."); a text without such a run can only use the others, which are much
    shorter. Tokenizers with a normaliser are always counted exactly.
    """

    RUN = re.compile(r"(.)\1\1", re.S)

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.exact_only = backend is None or backend.normalizer is not None
        ids = sorted(tokenizer.get_vocab().values())
        if backend is not None:  # decoded in Rust: a Python loop over the vocabulary takes seconds
            pieces = backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
        else:
            pieces = [tokenizer.decode([i]) for i in ids]
        self.longest = max(len(p.encode()) for p in pieces)
        self.longest_plain = max(len(p.encode()) for p in pieces if not self.RUN.search(p))

    def bounds(self, texts: list[str], nbytes: int, floor: int = 0) -> tuple[int, int]:
        """(at least, at most) tokens; the run search (slow) only when `floor` needs it."""
        if self.exact_only:
            return 0, 1 << 62
        low = -(-nbytes // self.longest)
        if low < floor and not any(self.RUN.search(t) for t in texts):
            low = -(-nbytes // self.longest_plain)
        return low, nbytes + len(texts)

    def count(self, texts: list[str]) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):  # Rust, no offsets: lengths only
            return [len(enc.ids) for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


class IngestRun:
    def __init__(self, cfg: Config, out_dir: Path, work: Path) -> None:
        self.cfg, self.icfg, self.out_dir, self.work = cfg, cfg.ingest, out_dir, work
        self.ledger = Ledger()
        self.redactor = Redactor(phone_regions=tuple(self.icfg.phone_regions))
        self.timer = Timer()
        if (out_dir / "index.sqlite").is_file():
            shutil.copyfile(out_dir / "index.sqlite", work / "index.sqlite")
        self.dedup = Deduper(work / "index.sqlite", self.icfg.near_dup_threshold, self.icfg.num_perm)
        self.quarantine = JsonlWriter(work / "quarantine.new.jsonl")
        self.dropped = JsonlWriter(work / "dropped.new.jsonl")
        self.staged = {s: JsonlWriter(work / f"{s}.new.jsonl") for s in ("train", "holdout")}
        self.pending: list[Candidate] = []
        self.pending_bytes = 0  # raw bytes of the records behind `pending` (bounds a batch's memory)
        self.to_validate: list[tuple[Candidate, dict, str]] = []
        self.files: dict[str, dict[str, Any]] = {}
        self._tokenizer = None
        self._eval = None
        self._validator: Validator | None = None
        self._batch_out = None
        self._size: TokenSize | None = None
        self._fields: dict[str, tuple[str, Counter]] = {}

    # ----- lazily built helpers (a run with nothing new needs none of them) -----------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from drafter.target import load_tokenizer

            with self.timer("load_tokenizer"):
                self._tokenizer = load_tokenizer(self.cfg)
        return self._tokenizer

    @property
    def eval_index(self):
        if self._eval is None:
            from drafter.traces.decontam import eval_index

            with self.timer("load_eval_sets"):
                self._eval = eval_index(list(self.icfg.eval_sets), self.icfg.ngram)
        return self._eval

    @property
    def validator(self) -> Validator:
        if self._validator is None:
            with self.timer("load_great_expectations"):
                self._validator = Validator(self.icfg.min_tokens, self.icfg.max_tokens, self.icfg.max_invalid_fraction,
                                            max_bytes=self.icfg.max_tokens * TokenSize(self.tokenizer).longest)
        return self._validator

    # ----- quarantine / dropped ---------------------------------------------------------------
    def redact_text(self, text: str) -> str:
        return self.redactor.redact(text)[0]

    def redact_field(self, text: str | None) -> str | None:
        """A short field (tenant, route, model): the same few values on every line, redacted once."""
        if not text or len(text) > 256:
            return self.redact_text(text) if text else text
        hit = self._fields.get(text)
        if hit is None:
            if len(self._fields) > 10_000:
                self._fields.clear()
            hit = self._fields[text] = self.redactor.redact(text)
        else:
            self.redactor.totals.update(hit[1])  # counted as often as it occurs
        return hit[0]

    def excerpt(self, data: bytes, cut: bool = False, obj: Any = None) -> dict[str, Any]:
        """A bad record's excerpt for the quarantine: redacted first, then cut to
        `quarantine_keep_bytes`. JSON is parsed and every string in it redacted (escapes
        cannot hide a secret then); other text is redacted as text (with its JSON-unescaped
        views). Whatever the validation's secret patterns still flag is masked; if one
        still matches, no excerpt is kept at all (the hash and reason remain)."""
        keep = self.icfg.quarantine_keep_bytes
        text = None
        if obj is None and not cut:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
        if obj is not None:
            try:
                text = orjson.dumps(self.redactor.redact_json(obj)).decode()
            except (TypeError, RecursionError):  # ints past 64 bits, very deep nesting: as text
                text = None
        if text is None:
            text = self.redact_text(data.decode("utf-8", errors="replace"))
            if cut:
                text = text[: len(text) - PARTIAL_TAIL.match(text[::-1]).end()]
        text = mask_leftovers(text)
        short = text.encode()[:keep].decode("utf-8", errors="ignore")
        if has_leftover(short):
            return {"excerpt": None, "excerpt_dropped": "a secret pattern survived redaction"}
        return {"excerpt": short, "excerpt_truncated": cut or len(short) < len(text)}

    def bad_record(self, rec: RawRecord) -> dict[str, Any]:
        """Where a bad record is, its hash and its redacted excerpt (no raw bytes)."""
        digest = rec.sha256 or (hashlib.sha256(rec.data).hexdigest() if rec.data or rec.size else None)
        return {"source": rec.source, "line": rec.line, "offset": rec.offset, "bytes": rec.size, "sha256": digest,
                **self.excerpt(rec.data, rec.cut, rec.obj)}

    def write_quarantine(self, entry: dict[str, Any], reason: str, detail: str, stage: str = "parse") -> None:
        detail = mask_leftovers(self.redact_text(detail))[:2000]
        self.quarantine.write({**entry, "reason": reason, "detail": detail, "stage": stage})

    def quarantine_record(self, rec: RawRecord, reason: str, detail: str) -> None:
        self.write_quarantine(self.bad_record(rec), reason, detail)
        self.ledger.records["quarantined"] += 1
        self.ledger.quarantined[reason] += 1

    def drop(self, cand: Candidate, outcome: str, reason: str, of: str | None = None) -> None:
        entry = {"id": cand.id, "source": cand.source, "line": cand.line, "outcome": outcome, "reason": reason}
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

    def decode(self, rec: RawRecord) -> Any:
        """The record's JSON value, or None after quarantining / counting it."""
        if rec.error:
            self.quarantine_record(rec, rec.error, rec.detail)
            return None
        if rec.obj is not None:
            return rec.obj
        if not rec.data.strip():
            self.ledger.records["blank"] += 1
            return None
        try:
            text = rec.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.quarantine_record(rec, "invalid_utf8", f"invalid UTF-8: {exc}")
            return None
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.quarantine_record(rec, "malformed_json", f"malformed JSON: {exc}")
            return None

    def reader(self, path: Path, previous: Watermark | None) -> SourceReader:
        icfg = self.icfg
        return SourceReader(path, previous, icfg.max_line_bytes, icfg.quarantine_keep_bytes + EXCERPT_MARGIN,
                            icfg.max_decompressed_bytes, icfg.max_compression_ratio)

    def read_file(self, path: Path, previous: Watermark | None, fmt: str | None) -> Watermark:
        reader = self.reader(path, previous)
        before = self.ledger.records["read"]
        from tqdm import tqdm

        with tqdm(reader.records(), desc=f"ingest {path.name}", unit=" lines", disable=None, leave=False) as bar:
            for rec in bar:
                self.ledger.records["read"] += 1
                obj = self.decode(rec)
                if obj is None:
                    continue
                if fmt is None:
                    self.quarantine_record(rec, "unknown_shape", "no record of this file has a known log format")
                    continue
                if fmt == "openai-batch-output":
                    self.store_batch_output(rec, obj)
                    continue
                try:
                    parsed = formats.parse(obj, fmt)
                except NotAConversation as exc:
                    self.quarantine_record(rec, exc.reason, exc.detail)
                    continue
                self.ledger.records["parsed"] += 1
                digest = hashlib.sha256(rec.data).hexdigest()
                for item in parsed:
                    if fmt == "openai-batch-input":
                        self.join_batch_output(item)
                    self.ledger.conversations["parsed"] += 1
                    self.pending.append(Candidate(record_id(rec.data, item.sub), str(path), rec.line, item,
                                                  offset=rec.offset, sha256=digest))
                self.pending_bytes += rec.size
                if len(self.pending) >= self.icfg.batch_size or self.pending_bytes >= self.icfg.max_pending_bytes:
                    self.flush()
        self.flush()
        wm = reader.watermark
        wm.format = fmt
        self.files[str(path)] = {
            "format": fmt, "compression": reader.compression, "sha256_read": wm.sha256, "bytes_read": wm.offset,
            "records_new": self.ledger.records["read"] - before,
            "resumed_after_record": previous.records if previous and not reader.restarted else 0,
            "restarted": reader.restarted, "pending_partial_line": reader.pending_partial,
        }
        return wm

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
            self.quarantine_record(rec, exc.reason, exc.detail)
            return
        if message is not None:
            message = {"role": message["role"], "content": self.redact_text(message["content"])}
        # kept for the quarantine in case no input comes: located, hashed and redacted already
        bad = json.dumps(self.bad_record(dataclasses.replace(rec, obj=obj)))
        cur = self.batch_out.execute("INSERT OR IGNORE INTO out VALUES (?, ?, ?, ?, ?, ?, 0)", (
            custom_id, rec.source, rec.line, json.dumps(message), json.dumps(meta), bad))
        if cur.rowcount == 0:
            self.quarantine_record(rec, "duplicate_custom_id", f"custom_id {custom_id!r} already seen in a batch output")

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

    # ----- the conversation pipeline ------------------------------------------------------------
    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending, self.pending_bytes = self.pending, [], 0
        with self.timer("redact_filter"):
            survivors = [c for c in batch if self.clean(c)]
        with self.timer("tokenize"):
            survivors = self.token_filter(survivors)
        with self.timer("decontaminate"):
            kept = []
            for cand in survivors:
                cand.users = [normalize(m["content"]) for m in cand.parsed.messages if m["role"] == "user"]
                hit = self.eval_index.match(cand.users)
                if hit is None:
                    kept.append(cand)
                else:
                    self.ledger.decontaminated[hit] += 1
                    self.drop(cand, "decontaminated", hit)
        with self.timer("dedup"):
            prompts = [" ".join(u for u in c.users if u) for c in kept]  # = normalize() of the user turns joined
            verdicts = self.dedup.check([c.id for c in kept], prompts)
        for cand, verdict in zip(kept, verdicts):
            if verdict is not None:
                kind, original = verdict
                self.ledger.duplicates[kind] += 1
                self.drop(cand, "duplicate", kind, of=original)
                continue
            self.to_validate.append(self.finish(cand))
        if len(self.to_validate) >= self.icfg.validate_rows:
            self.validate()

    def clean(self, cand: Candidate) -> bool:
        """Redact in place, then the cheap filters; False when the conversation is dropped."""
        p = cand.parsed
        for msg in p.messages:
            if isinstance(msg.get("content"), str):
                msg["content"] = self.redact_text(msg["content"])
        p.tenant, p.route, p.model = self.redact_field(p.tenant), self.redact_field(p.route), self.redact_field(p.model)
        reason = None
        if "error_response" in p.flags:
            reason = "error_response"
        elif "non_text" in p.flags:
            reason = "non_text_content"
        elif not p.messages:
            reason = "empty"
        else:
            reason = role_problem(p.messages)
            if reason is None:
                if any(not m["content"].strip() for m in p.messages if m["role"] in ("user", "system")):
                    reason = "empty_turn"
                elif not any(m["role"] == "assistant" and m["content"].strip() for m in p.messages):
                    reason = "no_assistant" if self.icfg.require_assistant else None
        if reason is not None:
            self.ledger.filtered[reason] += 1
            self.drop(cand, "filtered", reason)
            return False
        return True

    def token_filter(self, cands: list[Candidate]) -> list[Candidate]:
        """Token length bounds with the target tokenizer; only conversations whose size does not
        already settle the bounds are tokenized (see `TokenSize`)."""
        if not cands:
            return []
        lo_bound, hi_bound = self.icfg.min_tokens, self.icfg.max_tokens
        if self._size is None:
            self._size = TokenSize(self.tokenizer)
        undecided = []
        for cand in cands:
            texts = [m["content"] for m in cand.parsed.messages]
            cand.num_bytes = sum(len(t.encode()) for t in texts)
            low, high = self._size.bounds(texts, cand.num_bytes, lo_bound)
            if low < lo_bound or high > hi_bound:
                undecided.append(cand)
        if undecided:
            counts = self._size.count([m["content"] for c in undecided for m in c.parsed.messages])
            i = 0
            for cand in undecided:
                n = len(cand.parsed.messages)
                cand.num_tokens = sum(counts[i : i + n])
                i += n
        self.ledger.records["tokenized"] += len(undecided)
        out = []
        for cand in cands:
            if cand.num_tokens is not None and cand.num_tokens < lo_bound:
                reason = "too_few_tokens"
            elif cand.num_tokens is not None and cand.num_tokens > hi_bound:
                reason = "too_many_tokens"
            else:
                out.append(cand)
                continue
            self.ledger.filtered[reason] += 1
            self.drop(cand, "filtered", reason)
        return out

    def finish(self, cand: Candidate) -> tuple[Candidate, dict, str]:
        p = cand.parsed
        users = [m["content"] for m in p.messages if m["role"] == "user"]
        conv = Conversation(
            id=cand.id, source=cand.source, line=cand.line, timestamp=p.timestamp, model=p.model,
            tenant=p.tenant, route=p.route, domain=classify(users), messages=p.messages,
        )
        return cand, conv.row(), split_of(cand.users[0], self.icfg.holdout_fraction, self.cfg.run.seed)

    def validate(self) -> None:
        if not self.to_validate:
            return
        chunk, self.to_validate = self.to_validate, []
        frame_rows = [{
            **{k: row[k] for k in ("id", "source", "line", "timestamp", "model", "tenant", "route", "domain")},
            "roles": " ".join(m["role"] for m in row["messages"]),
            "n_messages": len(row["messages"]),
            "num_tokens": cand.num_tokens,
            "num_bytes": cand.num_bytes,
            "text": "\n".join(m["content"] for m in row["messages"]),
        } for cand, row, _ in chunk]
        with self.timer("validate"):
            result = self.validator.validate(frame_rows)
        if result.batch_failures:
            raise _Stop(result.batch_failures)
        for i, (cand, row, split) in enumerate(chunk):
            failed = result.bad_rows.get(i)
            if failed:
                self.dedup.forget(cand.id)
                # The row was redacted, yet it may hold what no_secret_left flagged: the excerpt masks it.
                entry = {"source": cand.source, "line": cand.line, "offset": cand.offset, "sha256": cand.sha256,
                         "id": cand.id, **self.excerpt(b"", obj=row)}
                self.write_quarantine(entry, "validation", ", ".join(failed), stage="validate")
                self.ledger.quarantined["validation:" + failed[0]] += 1
                self.ledger.conversations["quarantined"] += 1
                continue
            self.staged[split].write(row)
            self.ledger.conversations[split] += 1
            self.ledger.domains[row["domain"]] += 1
        self.dedup.settle()

    def close(self) -> None:
        self.dedup.close()
        for w in (self.quarantine, self.dropped, *self.staged.values()):
            w.close()


class _Stop(Exception):
    def __init__(self, failures: list[str]) -> None:
        super().__init__("; ".join(failures))
        self.failures = failures


# ----- datasets ----------------------------------------------------------------------------------
def build_split(old: Path, staged: Path, dest: Path, cache: Path) -> int:
    """old dataset (if any) + staged rows -> dest, written with save_to_disk."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    from drafter.traces.schema import features

    feats = features()
    parts = []
    if (old / "dataset_info.json").is_file():
        parts.append(load_from_disk(str(old)))
    if staged.is_file() and staged.stat().st_size:
        # Arrow's JSON reader (C++, in blocks): several times faster than a Python generator.
        parts.append(Dataset.from_json(str(staged), features=feats, cache_dir=str(cache)))
    if not parts:
        ds = Dataset.from_dict({c: [] for c in COLUMNS}, features=feats)
    else:
        ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds.save_to_disk(str(dest))
    n = len(ds)
    del ds, parts
    return n


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
           force: bool = False) -> dict[str, Any]:
    """Ingest new log lines into `out_dir` (default `<data_dir>/ingested`); returns the manifest.

    Unreadable inputs are reported in `manifest["errors"]` (the other files still ingest).
    Raises `ValidationFailed` when a batch-level expectation fails (nothing is published), and
    `OutputDirError` before any work when `out_dir` is a folder drafter did not write (unless
    `force`).
    """
    from filelock import FileLock

    started = time.time()
    inputs = [Path(p) for p in (inputs or cfg.ingest.inputs)]
    out_dir = Path(out_dir or cfg.data_dir / "ingested")
    check_replaceable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        return _ingest_locked(cfg, inputs, out_dir, started, force)


def _ingest_locked(cfg: Config, inputs: list[Path], out_dir: Path, started: float,
                   force: bool = False) -> dict[str, Any]:
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
    run = IngestRun(cfg, out_dir, work)
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
                with run.timer("read_parse"):
                    wm = run.read_file(path, previous, fmt)
            except OSError as exc:
                errors.append((str(path), f"cannot read: {exc.strerror or exc}"))
                continue
            new_marks[str(path.resolve())] = wm
        run.settle_batch_outputs()
        run.flush()
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
    counts["redactions"] = dict(sorted(run.redactor.totals.items()))
    params = cfg.ingest.model_dump(mode="json")
    if counts["records"]["read"] == 0 and (out_dir / "manifest.json").is_file():
        # Nothing new: the published output stays exactly as it is.
        shutil.rmtree(work, ignore_errors=True)
        return {"stage": "ingest", "changed": False, "counts": counts, "errors": _errors(errors),
                "out_dir": str(out_dir), "inputs": {str(p): run.files.get(str(p), {}) for p in files}}

    with run.timer("write_datasets"), atomic_dir(out_dir, force=force) as tmp:
        totals = {
            split: build_split(out_dir / split, work / f"{split}.new.jsonl", tmp / split, work / "cache")
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
        manifest_path = write_manifest(
            tmp, "ingest",
            inputs={str(p): run.files.get(str(p), {}) for p in files},
            params=params,
            counts=counts,
            durations={**run.timer.durations, "total": round(time.time() - started, 3)},
            outputs={"train": "train/", "holdout": "holdout/", "quarantine": "quarantine.jsonl",
                     "dropped": "dropped.jsonl", "validation": "validation.json", "watermarks": "watermarks.json"},
            extra={"errors": _errors(errors), "config_hash": cfg.hash()},
        )
        manifest = json.loads(manifest_path.read_text())
    shutil.rmtree(work, ignore_errors=True)
    for stale in ("validation.failed.json", "validation.failed.md"):
        (out_dir / stale).unlink(missing_ok=True)
    manifest["changed"] = True
    manifest["out_dir"] = str(out_dir)
    return manifest


def _errors(errors: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"path": p, "error": e} for p, e in errors]


def _empty_validation() -> dict[str, Any]:
    return {"suite": "ingest.conversations", "great_expectations": _gx_version(), "success": True, "chunks": 0,
            "rows": 0, "row_failures_quarantined": 0, "stopped_by": [], "expectations": {}}


def _gx_version() -> str:
    from importlib import metadata

    return metadata.version("great-expectations")


__all__ = ["ingest", "ValidationFailed"]
