"""Preparing a batch of log records for deduplication: the part of ingestion that needs no
shared state, so batches run in any process (a Dask worker) and in any order.

    record -> quarantined (reason) | blank | stored for its pair (batch outputs) | parsed
    parsed -> redact -> filters (errors, non-text content, broken roles, empty turns, no
              assistant turn) -> token length (target tokenizer) -> decontamination
           -> dropped (reason) | kept: dedup keys (MinHash LSH), final row, domain, split

`Preparer.prepare(records, fmt)` returns a `Batch`: the quarantine and dropped entries it
made, the conversations left for deduplication and its counts, all in record order. The run
that owns the dedup index commits batches in the order they were read
(`drafter.traces.ingest`), so the output does not depend on where batches ran.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from itertools import repeat
from typing import Any, Callable, NamedTuple

import numpy as np
import orjson

from drafter.config import Config
from drafter.manifest import Timer, check_accounting
from drafter.traces import formats
from drafter.traces.dedup import lsh_params, normalize, prompt_keys
from drafter.traces.domain import classify
from drafter.traces.formats import NotAConversation, Parsed
from drafter.traces.redact import Redactor, has_leftover, mask_leftovers
from drafter.traces.schema import ROLES, conversation_row, record_id
from drafter.traces.sources import LineRange, RawRecord, range_records

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

    def add(self, other: Ledger) -> None:
        for f in fields(self):
            getattr(self, f.name).update(getattr(other, f.name))

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


class Kept(NamedTuple):
    """A conversation left for deduplication: the row it becomes if kept (serialised where it
    was prepared: a batch comes back from a worker as bytes and flat values, cheap to pickle;
    Great Expectations and the staged rows read it with Arrow). Its dedup keys are its batch's."""

    id: str
    source: str
    line: int
    offset: int
    sha256: str
    num_tokens: int | None
    num_bytes: int
    domain: str
    split: str
    row: bytes  # the dataset row, one JSON line


@dataclass
class Batch:
    """What a batch of records became, in record order."""

    ledger: Ledger = field(default_factory=Ledger)
    redactions: Counter = field(default_factory=Counter)
    durations: dict[str, float] = field(default_factory=dict)
    quarantine: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    # The kept rows' dedup keys (`prompt_keys`): int64, a row each, as bytes (pickled as one
    # buffer; a tuple of ints a row cost ~2 us to make and more to pickle and unpickle).
    keys: bytes = b""

    def dedup_keys(self) -> np.ndarray:
        """`keys` as rows, one a kept conversation."""
        return np.frombuffer(self.keys, dtype=np.int64).reshape(len(self.kept), -1) if self.kept else \
            np.empty((0, 0), dtype=np.int64)

    # A batch comes back from a worker pickled: its kept rows travel as one column per field,
    # transposed and made again as tuples are, without calling Kept's constructor (Python). 1,000
    # rows: 0.32 ms to write, 0.27 to read; as dataclasses pickled one by one 2.6 and 3.7, as
    # columns of dataclasses 2.1 and 1.8 (~2 s a million lines in the ingesting process).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "kept": list(zip(*self.kept))}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, kept=list(map(tuple.__new__, repeat(Kept), zip(*state["kept"]))))


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


def _rust_core(tokenizer: Any) -> Any:
    """A `tokenizers.Tokenizer` itself, a fast transformers tokenizer's, or None (a slow one)."""
    from tokenizers import Tokenizer

    return tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)


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
        self.backend = backend = _rust_core(tokenizer)
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
        if self.backend is not None:  # Rust, no offsets: lengths only
            return [len(enc.ids) for enc in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


class Preparer:
    """Turns batches of raw records into `Batch`es (see the module docstring). Holds only
    read-only helpers (tokenizer, evaluation index, redaction patterns), loaded on first use.

    One batch at a time in a process, whatever the threads (a Dask worker runs several; the
    ingesting process loads its validator in one): the batch being made is a Preparer's state,
    and transformers imported from two threads at once fails. Each helper is loaded once.
    (Redaction and domain tags scan from any thread: `hs_scan.Scanner`.)"""

    lock = threading.RLock()  # (the process's)

    def __init__(self, cfg: Config, lsh: tuple[int, int] | None = None) -> None:
        self.cfg, self.icfg = cfg, cfg.ingest
        self.redactor = Redactor(phone_regions=tuple(self.icfg.phone_regions))
        self.timer = Timer()
        # (bands, rows) of the dedup index: given by the ingesting process to its workers
        self.bands, self.rows = lsh or lsh_params(self.icfg.near_dup_threshold, self.icfg.num_perm)
        self.out = Batch()
        self._tokenizer = None
        self._eval = None
        self._size: TokenSize | None = None
        self._fields: dict[str, tuple[str, Counter]] = {}

    @property
    def ledger(self) -> Ledger:
        return self.out.ledger

    def prepare(self, records: list[RawRecord], fmt: str | None,
                join: Callable[[Parsed], None] | None = None,
                store: Callable[[RawRecord, Any], None] | None = None) -> Batch:
        """The batch these records make. `join` completes a batch input with its stored output;
        `store` keeps a batch output line until its input comes (both run where the pairs are)."""
        with self.lock:
            return self._prepare(records, fmt, join, store)

    def _prepare(self, records: list[RawRecord], fmt: str | None, join: Callable[[Parsed], None] | None,
                 store: Callable[[RawRecord, Any], None] | None) -> Batch:
        self.out, saved = Batch(), self.redactor.totals
        self.redactor.totals, self.timer.durations = self.out.redactions, self.out.durations
        try:
            cands = []
            with self.timer("read_parse"):
                for rec in records:
                    obj = self.decode(rec)
                    if obj is None:
                        continue
                    if fmt is None:
                        self.quarantine_record(rec, "unknown_shape", "no record of this file has a known log format")
                        continue
                    if fmt == "openai-batch-output":
                        store(rec, obj)
                        continue
                    try:
                        parsed = formats.parse(obj, fmt)
                    except NotAConversation as exc:
                        self.quarantine_record(rec, exc.reason, exc.detail)
                        continue
                    self.ledger.records["parsed"] += 1
                    digest = hashlib.sha256(rec.data).hexdigest()
                    for item in parsed:
                        if join is not None:
                            join(item)
                        self.ledger.conversations["parsed"] += 1
                        cands.append(Candidate(record_id(rec.data, item.sub, digest), rec.source, rec.line, item,
                                               offset=rec.offset, sha256=digest))
            self.conversations(cands)
            return self.out
        finally:
            self.redactor.totals = saved
            self.timer.durations = {}

    def conversations(self, batch: list[Candidate]) -> None:
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
        with self.timer("dedup_keys"):
            prompts = [" ".join(u for u in c.users if u) for c in kept]  # = normalize() of the user turns joined
            self.out.keys = prompt_keys(prompts, self.icfg.num_perm, self.bands, self.rows).tobytes()
        with self.timer("finish"):
            self.out.kept = [self.finish(cand) for cand in kept]

    # ----- helpers loaded on first use ----------------------------------------------------------
    def _load(self, attr: str, load: Callable[[], Any], timer: str | None = None) -> Any:
        """`self.<attr>`, made by `load` the first time: once, whatever the threads."""
        with self.lock, (self.timer(timer) if timer else contextlib.nullcontext()):
            value = getattr(self, attr)
            if value is None:
                value = load()
                setattr(self, attr, value)
        return value

    @property
    def size(self) -> TokenSize:
        """Token-count bounds of the target tokenizer (decodes its whole vocabulary once)."""
        return self._size if self._size is not None else self._load("_size", lambda: TokenSize(self.tokenizer))

    def drop_tokenizer(self) -> None:
        """The tokenizer and its size bounds let go (loaded again if needed): ~37 MiB for SmolLM2's."""
        with self.lock:
            self._tokenizer = self._size = None

    @property
    def tokenizer(self):
        if self._tokenizer is not None:
            return self._tokenizer
        from drafter.target_files import load_fast_tokenizer

        return self._load("_tokenizer", lambda: load_fast_tokenizer(self.cfg), "load_tokenizer")

    @property
    def eval_index(self):
        if self._eval is not None:
            return self._eval
        from drafter.traces.decontam import eval_index

        return self._load("_eval", lambda: eval_index(list(self.icfg.eval_sets), self.icfg.ngram), "load_eval_sets")

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
        elif hit[1]:
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

    def quarantine_entry(self, entry: dict[str, Any], reason: str, detail: str, stage: str = "parse") -> dict:
        detail = mask_leftovers(self.redact_text(detail))[:2000]
        return {**entry, "reason": reason, "detail": detail, "stage": stage}

    def quarantine_record(self, rec: RawRecord, reason: str, detail: str) -> None:
        self.out.quarantine.append(self.quarantine_entry(self.bad_record(rec), reason, detail))
        self.ledger.records["quarantined"] += 1
        self.ledger.quarantined[reason] += 1

    def drop(self, cand: Candidate, outcome: str, reason: str, of: str | None = None) -> None:
        entry = {"id": cand.id, "source": cand.source, "line": cand.line, "outcome": outcome, "reason": reason}
        if of:
            entry["of"] = of
        self.out.dropped.append(entry)
        self.ledger.conversations[outcome] += 1

    # ----- records and conversations -----------------------------------------------------------
    def decode(self, rec: RawRecord) -> Any:
        """The record's JSON value, or None after quarantining / counting it."""
        if rec.error:
            self.quarantine_record(rec, rec.error, rec.detail)
            return None
        if rec.obj is not None:
            return rec.obj
        try:  # the common case: valid UTF-8 and JSON, parsed from the bytes at once
            return orjson.loads(rec.data)
        except orjson.JSONDecodeError:
            pass  # blank, not UTF-8 or not JSON: told apart below
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
        undecided = []
        for cand in cands:
            texts = [m["content"] for m in cand.parsed.messages]
            cand.num_bytes = sum(map(len, map(str.encode, texts)))
            low, high = self.size.bounds(texts, cand.num_bytes, lo_bound)
            if low < lo_bound or high > hi_bound:
                undecided.append(cand)
        if undecided:
            counts = self.size.count([m["content"] for c in undecided for m in c.parsed.messages])
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

    def finish(self, cand: Candidate) -> Kept:
        p = cand.parsed
        users = [m["content"] for m in p.messages if m["role"] == "user"]
        row = conversation_row(
            id=cand.id, source=cand.source, line=cand.line, timestamp=p.timestamp, model=p.model,
            tenant=p.tenant, route=p.route, domain=classify(users), messages=p.messages,
        )
        return Kept(cand.id, cand.source, cand.line, cand.offset, cand.sha256, cand.num_tokens, cand.num_bytes,
                    row["domain"], split_of(cand.users[0], self.icfg.holdout_fraction, self.cfg.run.seed),
                    orjson.dumps(row) + b"\n")


class FewerCollections:
    """CPython's cycle collector tuned for a stream of short-lived containers while any user
    is inside (a worker of a shared cluster may run several threads), then restored.

    At the default thresholds (700, 10, 10) an ingest ran a full collection every few seconds,
    each rescanning every object the loaded libraries hold (Great Expectations, pandas, the
    tokenizer): 5.3 of 41 s at 300k lines, 30 full collections. A young collection every 50,000
    allocations and a full one after 10 middle ones (every ~10M allocations) free the same
    cycles, later: 0.7 s at 300k lines, the same peak memory."""

    THRESHOLDS = (50_000, 20, 10)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = gc.get_threshold()

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.saved = gc.get_threshold()
                gc.set_threshold(*self.THRESHOLDS)
            self.depth += 1

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                gc.set_threshold(*self.saved)


fewer_collections = FewerCollections()


# ----- on a worker -------------------------------------------------------------------------------
_PREPARERS: dict[str, Preparer] = {}


def prepare_remote(cfg: Config, records: list[RawRecord] | list[LineRange], fmt: str | None,
                   lsh: tuple[int, int]) -> Batch | list[Batch]:
    """`Preparer.prepare` in a worker process, its helpers loaded once per config. Records make
    one batch; each `LineRange` of a list is read here, from the file (the worker sees the
    ingesting process's files), and makes its own batch."""
    with fewer_collections:
        key = f"{cfg.hash()}:{lsh}"
        if key not in _PREPARERS:
            _PREPARERS.clear()
            _PREPARERS[key] = Preparer(cfg, lsh)
        preparer = _PREPARERS[key]
        if not records or not isinstance(records[0], LineRange):
            return preparer.prepare(records, fmt)
        batches = []
        for rng in records:
            started = time.perf_counter()
            shard = range_records(rng, cfg.ingest.max_line_bytes, cfg.ingest.quarantine_keep_bytes + EXCERPT_MARGIN)
            read_s = time.perf_counter() - started
            batches.append(preparer.prepare(shard, fmt))
            batches[-1].durations["read_range"] = round(read_s, 4)
        return batches
