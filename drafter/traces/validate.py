"""Great Expectations validation of the normalised conversations.

Rows are validated in chunks (one GX batch each) against one suite, in an ephemeral
GX context:
- row-level expectations (id format, role sequence, domain, token bounds, timestamp
  format, no secret pattern left, at least two messages): the rows they flag go to the
  quarantine; each allows at most `max_invalid_fraction` of a chunk to fail (`mostly`),
- batch-level expectations (the column set, unique ids): no failure allowed.
A chunk where any expectation fails (a batch-level one, or a row-level one beyond its
`mostly`) stops the stage: something is systematically wrong with the input or the
parser, and publishing would hide it. The aggregated results are saved as JSON and as a
readable markdown summary; they hold counts and expectation names, never row values
(which could hold what redaction missed).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from drafter.errors import DrafterError, ExitCode
from drafter.traces.redact import secret_patterns
from drafter.traces.schema import DOMAINS, ROLES

ROLE_SEQUENCE = r"^(" + "|".join(ROLES) + r")( (" + "|".join(ROLES) + r"))*$"
ISO_8601 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$"
ID_FORMAT = r"^[0-9a-f]{16}$"
FRAME_COLUMNS = ["id", "source", "line", "timestamp", "model", "tenant", "route", "domain",
                 "roles", "n_messages", "num_tokens", "num_bytes", "text"]


def rows_frame(table, num_tokens: list[int | None], num_bytes: list[int]):
    """What Great Expectations checks of dataset rows (a `schema.rows_table`), in `FRAME_COLUMNS`
    order: their fields, roles joined by spaces, message count, token and byte counts, and text
    (the contents joined by newlines), made by Arrow from the parsed rows."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    messages = table.column("messages").combine_chunks()

    def joined(name: str, sep: str):
        return pc.binary_join(pa.ListArray.from_arrays(messages.offsets, messages.values.field(name)), sep)

    columns = {name: table.column(name) for name in FRAME_COLUMNS[:8]}
    columns.update(roles=joined("role", " "), n_messages=pc.list_value_length(messages).cast(pa.int64()),
                   num_bytes=pa.array(num_bytes, pa.int64()), text=joined("content", "\n"))
    frame = pa.table(columns).to_pandas()
    # ints, and None where the size alone settled the bounds (from Arrow they would be floats)
    frame.insert(FRAME_COLUMNS.index("num_tokens"), "num_tokens", pd.Series(num_tokens, dtype=object))
    return frame


@contextlib.contextmanager
def unfingerprinted():
    """GX labels each pandas batch with an MD5 of all its values hashed (its
    "pandas_data_fingerprint" marker), unless the frame is at least `HASH_THRESHOLD` bytes; a
    chunk is never looked up by that label, and it cost 0.08 s a 20,000-row chunk (3.8 s per
    million lines). The threshold is set to 0 for the call and restored after."""
    from great_expectations.execution_engine import pandas_execution_engine as engine

    saved, engine.HASH_THRESHOLD = engine.HASH_THRESHOLD, 0
    try:
        yield
    finally:
        engine.HASH_THRESHOLD = saved


class ValidationFailed(DrafterError, RuntimeError):
    """A batch-level expectation failed: the stage stops and publishes nothing."""

    exit_code = ExitCode.VALIDATION


@dataclass
class ChunkResult:
    bad_rows: dict[int, list[str]]  # row index in the chunk -> failed row-level expectations
    batch_failures: list[str]  # descriptions of failed expectations that stop the stage


@dataclass
class Validator:
    min_tokens: int
    max_tokens: int
    max_invalid_fraction: float = 0.05
    max_bytes: int = 1 << 40  # a conversation within max_tokens holds at most this many bytes
    totals: dict[str, dict[str, Any]] = field(default_factory=dict)
    chunks: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import great_expectations as gx
            import great_expectations.expectations as gxe
            from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        logging.getLogger("great_expectations").setLevel(logging.ERROR)  # GX sets its own levels on import
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("ingest").add_dataframe_asset("conversations")
        batch = asset.add_batch_definition_whole_dataframe("chunk")
        mostly = 1.0 - self.max_invalid_fraction
        self.row_level = {
            "id_format": gxe.ExpectColumnValuesToMatchRegex(column="id", regex=ID_FORMAT, mostly=mostly),
            "source_present": gxe.ExpectColumnValuesToNotBeNull(column="source", mostly=mostly),
            "line_positive": gxe.ExpectColumnValuesToBeBetween(column="line", min_value=1, mostly=mostly),
            "role_set": gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLE_SEQUENCE, mostly=mostly),
            "two_messages": gxe.ExpectColumnValuesToBeBetween(column="n_messages", min_value=2, mostly=mostly),
            "domain_set": gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=list(DOMAINS), mostly=mostly),
            # num_tokens is counted only near the bounds (null elsewhere: GX skips nulls);
            # the byte size bounds every row: min_tokens <= tokens <= bytes.
            "token_bounds": gxe.ExpectColumnValuesToBeBetween(
                column="num_tokens", min_value=self.min_tokens, max_value=self.max_tokens, mostly=mostly),
            "size_bounds": gxe.ExpectColumnValuesToBeBetween(
                column="num_bytes", min_value=self.min_tokens, max_value=self.max_bytes, mostly=mostly),
            "timestamp_iso8601": gxe.ExpectColumnValuesToMatchRegex(column="timestamp", regex=ISO_8601, mostly=mostly),
            # (the patterns as one alternation: Arrow scans the text once, not once a pattern;
            # 0.19 -> 0.15 s a 20,000-row chunk)
            "no_secret_left": gxe.ExpectColumnValuesToNotMatchRegexList(
                column="text", regex_list=["|".join(f"(?:{p})" for p in secret_patterns())], mostly=mostly),
        }
        self.batch_level = {
            "columns": gxe.ExpectTableColumnsToMatchOrderedList(column_list=FRAME_COLUMNS),
            "unique_ids": gxe.ExpectColumnValuesToBeUnique(column="id"),
            "id_present": gxe.ExpectColumnValuesToNotBeNull(column="id"),
        }
        suite = gx.ExpectationSuite(name="ingest.conversations")
        self.names: dict[str, str] = {}
        for name, exp in {**self.row_level, **self.batch_level}.items():
            exp.meta = {"name": name}
            suite.add_expectation(exp)
        self.suite = context.suites.add(suite)
        self.batch_definition = batch

    def validate(self, frame) -> ChunkResult:
        """`frame`: a pandas DataFrame of `FRAME_COLUMNS` (`rows_frame`)."""
        with warnings.catch_warnings(), unfingerprinted():
            warnings.simplefilter("ignore")
            # batch.validate (not a ValidationDefinition run): results are not kept in the
            # context's store, so memory does not grow with the number of chunks.
            batch = self.batch_definition.get_batch(batch_parameters={"dataframe": frame})
            result = batch.validate(self.suite, result_format={"result_format": "COMPLETE"})
        self.chunks += 1
        self.rows += len(frame)
        bad: dict[int, list[str]] = {}
        failures: list[str] = []
        for res in result.results:
            name = (res.expectation_config.meta or {}).get("name", res.expectation_config.type)
            info = res.result or {}
            unexpected = int(info.get("unexpected_count") or 0)
            total = self.totals.setdefault(name, {
                "expectation": res.expectation_config.type,
                "level": "row" if name in self.row_level else "batch",
                "column": res.expectation_config.kwargs.get("column"),
                "mostly": res.expectation_config.kwargs.get("mostly"),
                "evaluated": 0, "unexpected": 0, "failed_chunks": 0, "success": True,
            })
            total["evaluated"] += int(info.get("element_count") or len(frame))
            total["unexpected"] += unexpected
            if res.exception_info and res.exception_info.get("raised_exception"):
                failures.append(f"{name}: raised {res.exception_info.get('exception_message')}")
                total["success"] = False
                continue
            if name in self.row_level:
                for idx in info.get("unexpected_index_list") or []:
                    bad.setdefault(int(idx), []).append(name)
            if not res.success:
                total["failed_chunks"] += 1
                total["success"] = False
                if name in self.row_level:
                    failures.append(f"{name}: {unexpected} of {len(frame)} rows failed "
                                    f"(more than ingest.max_invalid_fraction={self.max_invalid_fraction})")
                else:
                    observed = info.get("observed_value")
                    failures.append(f"{name}: failed" + (f" (observed {observed})" if name == "columns" else
                                                          f" ({unexpected} rows)"))
        return ChunkResult(bad, failures)

    def report(self, stopped: list[str] | None = None) -> dict[str, Any]:
        return {
            "suite": "ingest.conversations",
            "great_expectations": self._gx.__version__,
            "success": not stopped,
            "chunks": self.chunks,
            "rows": self.rows,
            "row_failures_quarantined": sum(t["unexpected"] for t in self.totals.values() if t["level"] == "row"),
            "stopped_by": stopped or [],
            "expectations": self.totals,
        }


def markdown(report: dict[str, Any]) -> str:
    status = "PASSED" if report["success"] else "FAILED"
    lines = [
        f"# Ingest validation: {status}",
        "",
        f"Great Expectations {report['great_expectations']}, suite `{report['suite']}`: "
        f"{report['rows']:,} rows in {report['chunks']} chunk(s); "
        f"{report['row_failures_quarantined']:,} row-level failure(s) sent to quarantine.",
        "",
    ]
    if report["stopped_by"]:
        lines += ["**The stage stopped; nothing was published.** Batch-level failures:", ""]
        lines += [f"- {item}" for item in report["stopped_by"]] + [""]
    lines += ["| expectation | level | column | rows checked | unexpected | result |", "|---|---|---|---:|---:|---|"]
    for name, t in report["expectations"].items():
        ok = "pass" if t["failed_chunks"] == 0 and t["unexpected"] == 0 else (
            "rows quarantined" if t["failed_chunks"] == 0 else "FAIL")
        lines.append(f"| {name} (`{t['expectation']}`) | {t['level']} | {t['column'] or ''} | "
                     f"{t['evaluated']:,} | {t['unexpected']:,} | {ok} |")
    return "\n".join(lines) + "\n"
