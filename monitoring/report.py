"""The monitoring report: markdown with PNG plots (rendered here, no CDN), plus report.json."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from drafter.manifest import atomic_write_json, atomic_write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tau_history(path: Path, history: list[tuple[float, float]], evaluated: float | None) -> Path | None:
    if not history:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    times = [datetime.fromtimestamp(t, timezone.utc) for t, _ in history]
    ax.plot(times, [tau for _, tau in history], marker="o", label="production (per scrape interval)")
    if evaluated is not None:
        ax.axhline(evaluated, color="gray", linestyle="--", label="evaluated")
    ax.set_ylabel("tau (tokens per round)")
    ax.legend(loc="lower left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_acceptance(path: Path, production: list[float], evaluated: list[float]) -> Path | None:
    if not production and not evaluated:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.4
    for offset, values, label in ((-width / 2, production, "production"), (width / 2, evaluated, "evaluated")):
        if values:
            ax.bar([i + 1 + offset for i in range(len(values))], values, width, label=label)
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / drafts")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_mix(path: Path, reference: dict[str, int], current: dict[str, int]) -> Path | None:
    if not reference and not current:
        return None
    plt = _plt()
    domains = sorted(set(reference) | set(current))
    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.4
    for offset, counts, label in ((-width / 2, reference, "training data"), (width / 2, current, "new traffic")):
        total = sum(counts.values()) or 1
        ax.bar([i + offset for i in range(len(domains))], [counts.get(d, 0) / total for d in domains], width,
               label=label)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("share of traces")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def write_report(out: Path, result: dict[str, Any], tau_history: list[tuple[float, float]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    acc, mix = result["acceptance"], result["mix"]
    plots = {
        "tau_history.png": plot_tau_history(out / "tau_history.png", tau_history, acc["evaluated_tau"]),
        "acceptance.png": plot_acceptance(out / "acceptance.png", acc["production_per_position"],
                                          acc["evaluated_per_position"]),
        "mix.png": plot_mix(out / "mix.png", mix["reference"], mix["current"]),
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
    lines += [f"![{name}]({name})" for name, path in plots.items() if path is not None]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "report.json", result)
    return out / "report.md"
