"""The typed heads of the reports stages hand to each other: what `drafter evaluate` writes in
report.json and `drafter gate` in gate.json, as far as the registry, the release flow and
monitoring read them. The producers validate what they write against these models and the
readers parse with them, so there is one shape of each file, checked at both ends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from drafter.errors import DrafterError


class ReportError(DrafterError, ValueError):
    """A report that is not in the shape its stage writes."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # the reports carry more than their readers need

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (what Prefect persists and MLflow logs), the extra sections included."""
        return self.model_dump(mode="json")


class DatasetFigures(_Open):
    tau: float | None  # None: undefined (no rounds)


class MacroFigures(_Open):
    tau: float | None
    accept_rate: list[float | None] = []  # None: no round verified that many drafts


class EvalReport(_Open):
    """report.json of `drafter evaluate`: tau per eval set and the macro figures."""

    datasets: dict[str, DatasetFigures]
    macro: MacroFigures

    @property
    def tau_by_dataset(self) -> dict[str, float | None]:
        return {name: figures.tau for name, figures in self.datasets.items()}


class Manifest(_Open):
    """manifest.json of every stage, and what every stage function returns: what went in, the
    settings, the counts that add up, the durations, what came out and the headline metrics
    (flat, finite; rolled up in MLflow). A stage's own sections (ingest's `errors`, build-cache's
    `size`...) are extra fields, read as attributes."""

    stage: str
    inputs: dict[str, Any] = {}
    params: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    durations_s: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    provenance: dict[str, Any] = {}


class GateVerdict(_Open):
    """gate.json of `drafter gate`, and what `gate()` returns."""

    passed: bool
    failed: list[str] = []
    reasons: list[str] = []
    checks: list[dict[str, Any]] = []
    markdown: str = ""


def parse(model: type[_Open], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()[:5])
        raise ReportError(f"{what} is not a {model.__name__} as drafter writes it: {problems}") from None


def read_json(path: Path, error: type[DrafterError] = ReportError) -> Any:
    """One of the project's own JSON files; `error` says clearly when it is missing or not JSON."""
    if not path.is_file():
        raise error(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def read_eval_report(folder: str | Path | None) -> EvalReport | None:
    """The report.json in an evaluation folder, typed; None when there is no folder or no report."""
    path = Path(folder) / "report.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    return parse(EvalReport, read_json(path), str(path))
