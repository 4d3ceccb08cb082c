"""Every plot the product draws (PNG, headless): evaluation, calibration, training, the gate's
candidate-vs-production view and monitoring. Each function takes plain data and a path,
writes the PNG atomically and returns the path (None when there is nothing to plot)."""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from drafter.manifest import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    _pyplot().close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ----- evaluation ------------------------------------------------------------------------------
def acceptance_per_position(report: dict[str, Any], path: Path) -> Path:
    """accept_rate@k per dataset and overall, by draft position."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(range(1, report["drafter"]["gamma"] + 1))
    for name, m in report["datasets"].items():
        ax.plot(ks, m["accept_rate_at_k"], marker="o", markersize=3, linewidth=1, label=name)
    ax.plot(ks, report["overall"]["accept_rate_at_k"], color="black", linewidth=2.5, label="overall")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("accept_rate@k (prefix survival)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{report['drafter']['algorithm']} on {report['target']['name']}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def tau_per_dataset(report: dict[str, Any], path: Path) -> Path:
    """Pooled tau per dataset with its bootstrap interval, and the macro mean."""
    plt = _pyplot()
    names = list(report["datasets"])
    taus = [report["datasets"][n]["tau_pooled"] for n in names]
    cis = [m["tau_ci"] or [t, t] for t, m in zip(taus, report["datasets"].values())]
    errs = [[t - ci[0] for t, ci in zip(taus, cis)], [ci[1] - t for t, ci in zip(taus, cis)]]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names) + 2), 4))
    ax.bar(names, taus, yerr=errs, capsize=3, color="#4c72b0")
    ax.axhline(report["macro_tau"], color="black", linestyle="--", linewidth=1, label=f"macro {report['macro_tau']:.2f}")
    ax.set_ylabel("tau (pooled, tokens per round)")
    ax.set_ylim(0, report["drafter"]["gamma"] + 1)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, path)


def accepted_length_histogram(emitted_per_round: Sequence[int], gamma: int, path: Path) -> Path | None:
    """How many tokens each verification round emitted (accepted drafts + the bonus token)."""
    if not emitted_per_round:
        return None
    plt = _pyplot()
    counts = Counter(emitted_per_round)
    xs = list(range(1, gamma + 2))
    total = len(emitted_per_round)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(xs, [counts.get(x, 0) / total for x in xs], color="#55a868")
    ax.set_xticks(xs)
    ax.set_xlabel("tokens emitted in a round (accepted drafts + 1)")
    ax.set_ylabel("share of rounds")
    ax.set_title(f"{total} rounds, tau {sum(emitted_per_round) / total:.2f}")
    return _save(fig, path)


def candidate_vs_production(candidate: dict[str, Any], production: dict[str, Any] | None, path: Path) -> Path:
    """accept_rate@k by position and tau per dataset: the candidate beside production."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    reports = [("candidate", candidate, "#55a868")] + ([("production", production, "#4c72b0")] if production else [])
    for label, report, color in reports:
        rates = report["overall"]["accept_rate_at_k"]
        left.plot(range(1, len(rates) + 1), rates, marker="o", color=color, label=label)
    left.set_xlabel("draft position k")
    left.set_ylabel("accept_rate@k")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=8)
    names = sorted(set(candidate["datasets"]) | set(production["datasets"] if production else []))
    width = 0.8 / len(reports)
    for i, (label, report, color) in enumerate(reports):
        taus = [report["datasets"].get(n, {}).get("tau_pooled") or 0.0 for n in names]
        right.bar([j + (i - (len(reports) - 1) / 2) * width for j in range(len(names))], taus, width,
                  color=color, label=f"{label} (macro {report['macro_tau'] or float('nan'):.2f})")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set_ylabel("tau (tokens per round)")
    right.legend(fontsize=8)
    return _save(fig, path)


# ----- calibration -----------------------------------------------------------------------------
def reliability(before: list[dict], after: list[dict], path: Path) -> Path:
    """Reliability diagrams of the confidence head per position, raw and after STS."""
    plt = _pyplot()
    shown = [i for i, b in enumerate(before) if b["count"]]
    cols = min(4, max(len(shown), 1))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, i in zip(axes.flat, shown):
        ax.set_visible(True)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for data, label in ((before[i], "raw"), (after[i], "STS")):
            pts = data["reliability"]
            ax.plot([p["confidence"] for p in pts], [p["survival"] for p in pts], marker="o", markersize=3,
                    label=f"{label} (ECE {data['ece']:.3f})")
        ax.set_title(f"position {before[i]['position']} (n={before[i]['count']})", fontsize=9)
        ax.set_xlabel("predicted prefix survival a_k", fontsize=8)
        ax.set_ylabel("observed survival", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("Reliability of the confidence head, before and after STS")
    return _save(fig, path)


# ----- training --------------------------------------------------------------------------------
def training_curves(history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss by step, and the held-out simulated tau at each evaluation."""
    if not history and not evals:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot([h["step"] for h in history], [h["loss"] for h in history], linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    for key, label in (("sim_tau", "temperature 1"), ("sim_tau_greedy", "greedy")):
        right.plot([e["step"] for e in evals], [e.get(key) for e in evals], marker="o", label=label)
    right.set_xlabel("step")
    right.set_ylabel("held-out simulated tau")
    right.legend(fontsize=8)
    return _save(fig, path)


# ----- monitoring ------------------------------------------------------------------------------
def tau_history(history: list[tuple[float, float]], evaluated: float | None, path: Path) -> Path | None:
    """Production tau per scrape interval against the tau the drafter was evaluated at."""
    if not history:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    times = [datetime.fromtimestamp(t, timezone.utc) for t, _ in history]
    ax.plot(times, [tau for _, tau in history], marker="o", label="production (per scrape interval)")
    if evaluated is not None:
        ax.axhline(evaluated, color="gray", linestyle="--", label="evaluated")
    ax.set_ylabel("tau (tokens per round)")
    ax.legend(loc="lower left", fontsize=8)
    fig.autofmt_xdate()
    return _save(fig, path, dpi=100)


def production_acceptance(production: list[float | None], evaluated: list[float | None], path: Path) -> Path | None:
    """Per-position acceptance seen in production beside the evaluated one."""
    if not production and not evaluated:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.4
    for offset, values, label in ((-width / 2, production, "production"), (width / 2, evaluated, "evaluated")):
        if values:  # a position no round reached (None) has no bar
            ax.bar([i + 1 + offset for i in range(len(values))], [v if v is not None else 0.0 for v in values],
                   width, label=label)
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / drafts")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi=100)


def traffic_mix(reference: dict[str, int], current: dict[str, int], path: Path) -> Path | None:
    """Domain shares of the training data and of new traffic."""
    if not reference and not current:
        return None
    plt = _pyplot()
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
    return _save(fig, path, dpi=100)
