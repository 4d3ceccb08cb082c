"""The monitoring report: markdown with PNG plots (rendered here, no CDN), plus report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drafter import plots
from drafter.manifest import atomic_write_json, atomic_write_text


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def write_report(out: Path, result: dict[str, Any], tau_history: list[tuple[float, float]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    acc, mix = result["acceptance"], result["mix"]
    figures = {
        "tau_history.png": plots.tau_history(tau_history, acc["evaluated_tau"], out / "tau_history.png"),
        "acceptance.png": plots.production_acceptance(acc["production_per_position"], acc["evaluated_per_position"],
                                                      out / "acceptance.png"),
        "mix.png": plots.traffic_mix(mix["reference"], mix["current"], out / "mix.png"),
    }
    drift = result["drift"]
    lines = [
        f"# Monitoring `{result['model']}` (production version {result['production_version'] or 'none'})",
        "",
        f"{result['at']} - **{'DRIFT: ' + ', '.join(drift) if drift else 'no drift'}**",
        "",
        "## Acceptance",
        "",
        f"Source: {result['telemetry']['source'] or 'none'}; window {result['telemetry']['window_s']} s "
        f"(covered {_fmt(result['telemetry']['span_s'], 0)} s), {int(acc['drafts'])} drafts.",
        f"Status **{acc['status']}**: {acc['message']}.",
        "",
        "| | production | evaluated |",
        "|---|---|---|",
        f"| tau | {_fmt(acc['production_tau'])} | {_fmt(acc['evaluated_tau'])} |",
    ]
    n = max(len(acc["production_per_position"]), len(acc["evaluated_per_position"]))
    for k in range(n):
        p = acc["production_per_position"][k] if k < len(acc["production_per_position"]) else None
        e = acc["evaluated_per_position"][k] if k < len(acc["evaluated_per_position"]) else None
        lines.append(f"| accepted at position {k + 1} | {_fmt(p)} | {_fmt(e)} |")
    lines += ["", "## Traffic mix", "", f"Status **{mix['status']}**: {mix['message']}.", "",
              "| domain | training data | new traffic |", "|---|---|---|"]
    ref_total, cur_total = sum(mix["reference"].values()) or 1, sum(mix["current"].values()) or 1
    for d in sorted(set(mix["reference"]) | set(mix["current"])):
        lines.append(f"| {d} | {mix['reference'].get(d, 0)} ({mix['reference'].get(d, 0) / ref_total:.0%}) | "
                     f"{mix['current'].get(d, 0)} ({mix['current'].get(d, 0) / cur_total:.0%}) |")
    if result.get("actions"):
        lines += ["", "## Actions", ""]
        for key, value in result["actions"].items():
            lines.append(f"- {key}: {value}")
    lines.append("")
    lines += [f"![{name}]({name})" for name, path in figures.items() if path is not None]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "report.json", result)
    return out / "report.md"
