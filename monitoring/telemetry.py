"""Production speculative-decoding telemetry: vLLM's Prometheus counters and per-request logs.

Counters are cumulative, so production tau over a window comes from a history of scrapes:
each `drafter monitor` appends one scrape to `scrapes.jsonl`, and a window sums the
increases between consecutive scrapes inside it (a decrease means the server restarted:
the counter counts again from zero, as Prometheus' `increase()` treats it).

    tau = 1 + accepted / drafts                 (vLLM's mean acceptance length, bonus included)
    acceptance at position k = accepted_per_pos[k] / drafts
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from drafter.errors import DrafterError
from monitoring.spec_metrics import ACCEPTED, ACCEPTED_PER_POS, DRAFT_TOKENS, DRAFTS


class TelemetryError(DrafterError):
    """Telemetry that cannot be read (server down, not Prometheus text, no spec-decode metrics)."""


@dataclass
class SpecCounts:
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: list[float] = field(default_factory=list)
    at: float = 0.0  # unix time of the scrape (or of the newest request)
    source: str = ""

    @property
    def tau(self) -> float | None:
        return 1 + self.accepted / self.drafts if self.drafts else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def per_position(self) -> list[float]:
        return [a / self.drafts for a in self.accepted_per_pos] if self.drafts else []

    def plus(self, other: SpecCounts) -> SpecCounts:
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = lambda xs: list(xs) + [0.0] * (n - len(xs))  # noqa: E731
        return SpecCounts(
            self.drafts + other.drafts, self.draft_tokens + other.draft_tokens, self.accepted + other.accepted,
            [a + b for a, b in zip(pad(self.accepted_per_pos), pad(other.accepted_per_pos))],
            max(self.at, other.at), self.source or other.source,
        )

    def increase_since(self, earlier: SpecCounts) -> SpecCounts:
        """Counter increase from `earlier` to this scrape; a reset (restart) counts from zero."""
        if self.drafts < earlier.drafts or self.accepted < earlier.accepted or self.draft_tokens < earlier.draft_tokens:
            return SpecCounts(self.drafts, self.draft_tokens, self.accepted, list(self.accepted_per_pos),
                              self.at, self.source)
        n = len(self.accepted_per_pos)
        before = list(earlier.accepted_per_pos) + [0.0] * (n - len(earlier.accepted_per_pos))
        return SpecCounts(
            self.drafts - earlier.drafts, self.draft_tokens - earlier.draft_tokens, self.accepted - earlier.accepted,
            [max(a - b, 0.0) for a, b in zip(self.accepted_per_pos, before)], self.at, self.source,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_prometheus(text: str, model_name: str | None = None, source: str = "") -> SpecCounts:
    """Sum vLLM's spec-decode counters over engines (optionally of one served model)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = SpecCounts(at=time.time(), source=source)
    per_pos: dict[int, float] = {}
    seen = False
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise TelemetryError(f"{source or 'metrics'}: not Prometheus text format ({exc})") from None
    for family in families:
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # skip `_created` timestamps
            if model_name and sample.labels.get("model_name", model_name) != model_name:
                continue
            name = sample.name.removesuffix("_total")
            if name == DRAFTS:
                counts.drafts += sample.value
            elif name == DRAFT_TOKENS:
                counts.draft_tokens += sample.value
            elif name == ACCEPTED:
                counts.accepted += sample.value
            elif name == ACCEPTED_PER_POS:
                position = int(sample.labels.get("position", 0))
                per_pos[position] = per_pos.get(position, 0.0) + sample.value
            else:
                continue
            seen = True
    if not seen:
        raise TelemetryError(f"{source or 'metrics'}: no {DRAFTS}_total / {ACCEPTED}_total counters "
                             "(is speculative decoding enabled on the server?)")
    counts.accepted_per_pos = [per_pos.get(i, 0.0) for i in range(max(per_pos) + 1)] if per_pos else []
    return counts


def scrape(source: str, model_name: str | None = None, timeout_s: float = 10.0) -> SpecCounts:
    """Read the counters from a `/metrics` URL or from a file holding a scrape."""
    if source.startswith(("http://", "https://")):
        import httpx

        try:
            response = httpx.get(source, timeout=timeout_s)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise TelemetryError(f"cannot scrape {source}: {exc}") from None
        text = response.text
    else:
        path = Path(source)
        if not path.is_file():
            raise TelemetryError(f"{source}: no such metrics file or URL")
        text = path.read_text()
    return parse_prometheus(text, model_name, source)


# ----- scrape history and windows ------------------------------------------------
def append_scrape(history: Path, counts: SpecCounts) -> None:
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a") as f:
        f.write(json.dumps(counts.to_dict()) + "\n")


def read_history(history: Path) -> list[SpecCounts]:
    if not history.is_file():
        return []
    out = []
    for line in history.read_text().splitlines():
        if line.strip():
            try:
                out.append(SpecCounts(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                continue  # a torn last line from an interrupted run
    return sorted(out, key=lambda c: c.at)


def window(history: list[SpecCounts], window_s: float, now: float | None = None) -> tuple[SpecCounts, float]:
    """Increase of the counters over the last `window_s` seconds, and the span it covers.

    Uses the scrapes inside the window plus the last one before it as the baseline; with a
    single scrape, the counters since the server started (span 0 = unknown).
    """
    if not history:
        return SpecCounts(), 0.0
    now = history[-1].at if now is None else now
    start = now - window_s
    before = [c for c in history if c.at < start]
    inside = [c for c in history if start <= c.at <= now]
    points = ([before[-1]] if before else []) + inside
    if len(points) == 1:
        return points[0], 0.0
    total = SpecCounts(source=points[-1].source)
    for a, b in zip(points, points[1:]):
        total = total.plus(b.increase_since(a))
    total.at = points[-1].at
    return total, points[-1].at - points[0].at


def interval_taus(history: list[SpecCounts]) -> list[tuple[float, float]]:
    """(time, tau) of each interval between consecutive scrapes that saw drafts."""
    out = []
    for a, b in zip(history, history[1:]):
        inc = b.increase_since(a)
        if inc.tau is not None:
            out.append((b.at, inc.tau))
    return out


# ----- per-request acceptance in response logs -------------------------------------
def _spec_block(record: dict[str, Any]) -> dict[str, Any] | None:
    for holder in (record, record.get("response") or {}):
        block = ((holder.get("metrics") or {}) if isinstance(holder, dict) else {}).get("speculative_decoding")
        if isinstance(block, dict):
            return block
    return None


def _record_time(record: dict[str, Any]) -> float | None:
    for holder in (record, record.get("response") or {}):
        if not isinstance(holder, dict):
            continue
        if isinstance(holder.get("created"), (int, float)):
            return float(holder["created"])
        if isinstance(holder.get("timestamp"), str):
            try:
                return datetime.fromisoformat(holder["timestamp"].replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
    return None


def read_request_logs(paths: list[Path], window_s: float | None = None, now: float | None = None) -> dict[str, Any]:
    """Aggregate vLLM's per-request `metrics.speculative_decoding` blocks (acceptance histograms).

    A request whose `acceptance_histogram[j]` counts steps that accepted exactly j drafts
    contributes sum_{j>k} hist[j] accepted tokens at position k. Returns the counts and how
    many lines were read / used / without the block / malformed / outside the window.
    """
    now = time.time() if now is None else now
    counts = SpecCounts(source=",".join(str(p) for p in paths))
    tally = {"lines": 0, "used": 0, "no_spec_metrics": 0, "malformed": 0, "outside_window": 0}
    files = [f for p in paths for f in (sorted(Path(p).glob("*.jsonl")) if Path(p).is_dir() else [Path(p)])]
    for file in files:
        with file.open() as f:
            for line in f:
                if not line.strip():
                    continue
                tally["lines"] += 1
                try:
                    record = json.loads(line)
                    block = _spec_block(record) if isinstance(record, dict) else None
                except json.JSONDecodeError:
                    tally["malformed"] += 1
                    continue
                if block is None:
                    tally["no_spec_metrics"] += 1
                    continue
                at = _record_time(record)
                if window_s is not None and at is not None and not now - window_s <= at <= now:
                    tally["outside_window"] += 1
                    continue
                try:
                    hist = [float(h) for h in block.get("acceptance_histogram") or []]
                    one = SpecCounts(
                        drafts=float(block["num_spec_steps"]), draft_tokens=float(block["num_draft_tokens"]),
                        accepted=float(block["num_accepted_draft_tokens"]),
                        accepted_per_pos=[sum(hist[k + 1:]) for k in range(max(len(hist) - 1, 0))],
                        at=at or 0.0,
                    )
                except (KeyError, TypeError, ValueError):
                    tally["malformed"] += 1
                    continue
                counts = counts.plus(one)
                tally["used"] += 1
    if sum(tally[k] for k in ("used", "no_spec_metrics", "malformed", "outside_window")) != tally["lines"]:
        raise TelemetryError(f"request-log accounting does not add up: {tally}")
    return {"counts": counts, "tally": tally}

