"""Sequential Temperature Scaling (STS) of a drafter's confidence head (DSpark paper, section
5.4 of ALGORITHMS.md), fitted on held-out prompts.

Labels. The confidence c_k claims: "draft k survives verification given that 1..k-1 did";
its cumulative product a_k = prod_{i<=k} c_i claims "the first k drafts all survive". We
observe exactly that event by running the decoding engine (fixed block, every draft
verified, at the serving temperature) on held-out prompts: each round gives c_1..c_g and
the 0/1 prefix survival s_k = [accepted >= k]. The target cache alone cannot give these
labels: once a draft differs from the cached continuation the target's distribution along
the drafted path is unknown, so labels beyond the first position would be censored in a
biased way. The prompts come from the holdout cache (the tokens before the first
assistant token of each held-out conversation), so calibration sees production-like
traffic that training did not.

STS. For k = 1..gamma in order, grid-search T_k (log-spaced in [t_min, t_max]) minimising
the ECE of a_k = a_{k-1} * sigmoid(logit(c_k) / T_k) against s_k, with T_1..T_{k-1} fixed.
Each T_k is monotone in c_k, so rankings per position do not change.

Metrics per position, before and after, on a held-out part of the prompts (split by
prompt, seeded): ECE (equal-width bins, 20 by default), AUROC and Brier score of a_k.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from drafter.config import Config
from drafter.decoding import Round, SpecEngine, block_size_of, load_drafter, resolve_drafter_dir
from drafter.errors import DrafterError
from drafter.progress import StageProgress
from drafter import plots
from drafter.manifest import (
    Timer, atomic_write_json, atomic_write_text, check_accounting, read_manifest, sha256_file, write_manifest,
)
from drafter.reports import Manifest

log = logging.getLogger(__name__)


class CalibrationError(DrafterError, ValueError):
    """Nothing to calibrate on (no prompts, no observed rounds)."""


# ----- metrics ------------------------------------------------------------------------------
def ece(conf: np.ndarray, labels: np.ndarray, bins: int = 20) -> float:
    """Expected calibration error with equal-width bins: sum_b n_b/N |mean conf_b - mean label_b|."""
    if conf.size == 0:
        return float("nan")
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(idx):
        sel = idx == b
        total += sel.sum() * abs(conf[sel].mean() - labels[sel].mean())
    return float(total / conf.size)


def auroc(conf: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a surviving prefix scores above a failing one (ties count half)."""
    from scipy.stats import rankdata

    pos, neg = int(labels.sum()), int(labels.size - labels.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(conf)
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def brier(conf: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((conf - labels) ** 2)) if conf.size else float("nan")


def reliability(conf: np.ndarray, labels: np.ndarray, bins: int) -> list[dict[str, float]]:
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    return [
        {"bin": int(b), "confidence": float(conf[idx == b].mean()), "survival": float(labels[idx == b].mean()),
         "count": int((idx == b).sum())}
        for b in np.unique(idx)
    ]


# ----- survival data ------------------------------------------------------------------------
class Survival:
    """Rounds as arrays: raw confidence logits z [N, g] and how far each round got.

    Position k (1-based) of round n is observed when verified[n] >= k; its label is
    accepted[n] >= k.
    """

    def __init__(self, rounds: Sequence[Round], gamma: int) -> None:
        rows = [r for r in rounds if r.confidences and r.verified > 0]
        self.gamma = gamma
        self.z = np.full((len(rows), gamma), np.nan)
        for n, r in enumerate(rows):
            c = np.clip(np.asarray(r.confidences[:gamma], dtype=np.float64), 1e-6, 1 - 1e-6)
            self.z[n, : c.size] = np.log(c) - np.log1p(-c)
        self.verified = np.array([min(r.verified, gamma) for r in rows], dtype=int)
        self.accepted = np.array([r.accepted for r in rows], dtype=int)

    def __len__(self) -> int:
        return len(self.verified)

    def position(self, k: int, temps: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
        """(a_k, s_k) over the rounds that verified position k, with temperatures for 1..k."""
        sel = self.verified >= k
        t = np.ones(k) if temps is None else np.asarray(temps[:k], dtype=np.float64)
        a = np.prod(1 / (1 + np.exp(-self.z[sel, :k] / t)), axis=1)
        return a, (self.accepted[sel] >= k).astype(np.float64)


def fit_sts(data: Survival, grid: np.ndarray, bins: int) -> list[float]:
    """Sequential temperature scaling: T_k minimises ECE(a_k) with T_1..T_{k-1} fixed."""
    temps: list[float] = []
    for k in range(1, data.gamma + 1):
        sel = data.verified >= k
        if not sel.any():
            temps.append(temps[-1] if temps else 1.0)  # never observed: carry the last one
            continue
        prefix = np.prod(1 / (1 + np.exp(-data.z[sel, : k - 1] / np.asarray(temps))), axis=1) if temps else 1.0
        labels = (data.accepted[sel] >= k).astype(np.float64)
        z = data.z[sel, k - 1]
        errors = [ece(prefix / (1 + np.exp(-z / t)), labels, bins) for t in grid]
        temps.append(float(grid[int(np.argmin(errors))]))
    return temps


def position_metrics(data: Survival, temps: Sequence[float] | None, bins: int) -> list[dict[str, Any]]:
    out = []
    for k in range(1, data.gamma + 1):
        a, s = data.position(k, temps)
        out.append({
            "position": k, "count": int(a.size),
            "ece": ece(a, s, bins), "auroc": auroc(a, s), "brier": brier(a, s),
            "mean_confidence": float(a.mean()) if a.size else float("nan"),
            "survival": float(s.mean()) if s.size else float("nan"),
            "reliability": reliability(a, s, bins),
        })
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r["count"] and not math.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


# ----- the stage ----------------------------------------------------------------------------
def _open_holdout(cache_dir: Path, expect_fingerprint: str | None = None):
    try:
        from drafter.cache import open_split
    except ImportError as exc:  # the cache module ships separately
        raise CalibrationError(f"cannot read the target cache: {exc}") from None
    return open_split(Path(cache_dir), "holdout", expect_fingerprint=expect_fingerprint)


def prompts_from_cache(cache_dir: Path, limit: int, seed: int,
                       expect_fingerprint: str | None = None) -> tuple[list[list[int]], dict[str, int]]:
    """Held-out prompts: the tokens before the first assistant (loss-masked) token of each sample.

    With `expect_fingerprint`, a cache made for another target (weights, tokenizer, chat
    template) is refused: its token ids would be another tokenizer's.
    """
    reader = _open_holdout(cache_dir, expect_fingerprint)
    order = list(range(len(reader)))
    random.Random(f"{seed}:calibrate").shuffle(order)
    prompts, skipped = [], 0
    for i in order[:limit]:
        sample = reader[i]
        mask = torch.as_tensor(sample["loss_mask"]).bool()
        if not mask.any() or int(mask.nonzero()[0]) == 0:
            skipped += 1  # no assistant turn, or no prompt before it
            continue
        prompts.append(torch.as_tensor(sample["input_ids"])[: int(mask.nonzero()[0])].tolist())
    return prompts, {"selected": min(limit, len(order)), "used": len(prompts), "skipped_no_prompt": skipped}


def calibrate(cfg: Config, drafter_dir: Path, cache_dir: Path, out_dir: Path) -> Manifest:
    """`drafter calibrate`: fit STS temperatures on held-out prompts; returns the manifest
    (`applicable`, `temperatures`, and ECE/Brier/AUROC before and after in its metrics).

    They are written to `out_dir/calibration.json` together with the hash of the weights
    they were fitted on (the scheduler, the exporter and the registry find them there);
    the training output is left untouched so DVC does not see it change.
    """
    from drafter.target import load_target

    resolve_drafter_dir(drafter_dir)  # fail before loading the target
    _open_holdout(cache_dir)  # likewise for a missing or damaged cache
    timer = Timer()
    with timer("load"):
        target = load_target(cfg)
        prompts, counts = prompts_from_cache(cache_dir, cfg.calibrate.samples, cfg.run.seed, target.fingerprint)
        drafter, model_dir = load_drafter(drafter_dir, target)
    calibrate_drafter(cfg, drafter, target, prompts, Path(out_dir), counts, timer,
                      inputs={"drafter": str(model_dir), "cache": str(cache_dir)},
                      weights_hash=sha256_file(model_dir / "model.safetensors"))
    return read_manifest(out_dir)


def calibrate_drafter(
    cfg: Config,
    drafter,
    target,
    prompts: list[list[int]],
    out_dir: Path,
    counts: dict[str, int] | None = None,
    timer: Timer | None = None,
    inputs: dict[str, Any] | None = None,
    weights_hash: str | None = None,
) -> dict[str, Any]:
    """Run the engine on `prompts`, fit STS on part of them, report on the rest; returns the
    report (calibration.json), the manifest is written beside it."""
    cc = cfg.calibrate
    timer = timer or Timer()
    counts = dict(counts or {"selected": len(prompts), "used": len(prompts)})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not prompts:
        raise CalibrationError("no held-out prompts to calibrate on")
    gamma = cc.block_size or block_size_of(drafter, cfg.drafter.block_size)
    temperature = cfg.evaluate.temperature if cc.temperature is None else cc.temperature
    engine = SpecEngine(target, drafter, gamma=gamma, temperature=temperature, seed=cfg.run.seed)

    order = list(range(len(prompts)))
    random.Random(f"{cfg.run.seed}:calibrate-split").shuffle(order)
    n_eval = int(round(len(prompts) * cc.eval_fraction)) if len(prompts) > 1 else 0
    eval_ids = set(order[:n_eval])
    fit_rounds: list[Round] = []
    eval_rounds: list[Round] = []

    with timer("decode"), StageProgress(total=len(prompts), desc="calibration prompts", disable=len(prompts) < 8) as bar:
        for lo in range(0, len(prompts), cc.concurrency):
            batch = prompts[lo : lo + cc.concurrency]
            for i, gen in enumerate(engine.generate_batch(batch, cc.max_new_tokens), start=lo):
                (eval_rounds if i in eval_ids else fit_rounds).extend(gen.rounds)
            bar.update(len(batch))
    counts |= {"fit_prompts": len(prompts) - n_eval, "eval_prompts": n_eval,
               "rounds": len(fit_rounds) + len(eval_rounds)}
    check_accounting(counts["used"], {"fit": counts["fit_prompts"], "eval": counts["eval_prompts"]}, "calibration prompts")
    if "skipped_no_prompt" in counts:
        check_accounting(counts["selected"], {"used": counts["used"], "skipped": counts["skipped_no_prompt"]}, "held-out samples")

    fit, held = Survival(fit_rounds, gamma), Survival(eval_rounds or fit_rounds, gamma)
    applicable = len(fit) > 0
    result: dict[str, Any] = {
        "applicable": applicable, "gamma": gamma, "temperature": temperature, "bins": cc.bins,
        "evaluated_on": "held-out prompts" if eval_rounds else "the fit prompts (too few prompts to hold some out)",
        "drafter_weights": weights_hash,
    }
    if not applicable:
        reason = "the drafter returns no confidences (no confidence head)" if fit_rounds else "no rounds observed"
        result |= {"temperatures": None, "reason": reason}
        log.warning("calibration not applicable: %s", reason)
    else:
        grid = np.geomspace(cc.t_min, cc.t_max, cc.grid_points)
        with timer("fit"):
            temps = fit_sts(fit, grid, cc.bins)
        before, after = position_metrics(held, None, cc.bins), position_metrics(held, temps, cc.bins)
        result |= {
            "temperatures": temps,
            "before": before,
            "after": after,
            "summary": {
                "ece_before": _mean(before, "ece"), "ece_after": _mean(after, "ece"),
                "brier_before": _mean(before, "brier"), "brier_after": _mean(after, "brier"),
                "auroc_before": _mean(before, "auroc"), "auroc_after": _mean(after, "auroc"),
            },
        }
        plots.reliability(before, after, out_dir / "reliability.png")
    atomic_write_json(out_dir / "calibration.json", result)
    atomic_write_text(out_dir / "report.md", render_markdown(result))
    cfg.save(out_dir / "config.yaml")
    write_manifest(
        out_dir, "calibrate",
        inputs=inputs or {},
        params={"gamma": gamma, "temperature": temperature, "bins": cc.bins, "concurrency": cc.concurrency, "grid": [cc.t_min, cc.t_max, cc.grid_points],
                "eval_fraction": cc.eval_fraction, "max_new_tokens": cc.max_new_tokens},
        counts=counts,
        durations=timer.durations,
        outputs={"calibration": str(out_dir / "calibration.json")},
        metrics=result.get("summary") or {},
        extra={"applicable": result["applicable"], "temperatures": result.get("temperatures")},
    )
    return result


def render_markdown(result: dict[str, Any]) -> str:
    lines = ["# Confidence calibration (Sequential Temperature Scaling)", ""]
    if not result["applicable"]:
        return "\n".join(lines + [f"Not applicable: {result['reason']}.", ""])
    s = result["summary"]
    lines += [
        f"Block size {result['gamma']}, decoding temperature {result['temperature']}, {result['bins']} bins; "
        f"metrics on {result['evaluated_on']}.",
        "",
        f"Mean over positions: ECE {s['ece_before']:.4f} -> {s['ece_after']:.4f}, "
        f"Brier {s['brier_before']:.4f} -> {s['brier_after']:.4f}, AUROC {s['auroc_before']:.3f} -> {s['auroc_after']:.3f}.",
        "",
        "| position | T_k | rounds | survival | ECE before | ECE after | AUROC before | AUROC after | Brier before | Brier after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, b, a in zip(result["temperatures"], result["before"], result["after"]):
        lines.append(
            f"| {b['position']} | {t:.3f} | {b['count']} | {b['survival']:.3f} | {b['ece']:.4f} | {a['ece']:.4f} | "
            f"{b['auroc']:.3f} | {a['auroc']:.3f} | {b['brier']:.4f} | {a['brier']:.4f} |"
        )
    return "\n".join(lines + [""])


