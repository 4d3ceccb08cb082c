"""The promotion gate: may a candidate drafter be proposed for promotion?

Policy (config `gate`), every check named in the verdict with its numbers:
- comparable (with a production report): same target fingerprint, decoding temperature and
  answer length, and at least one dataset in common; figures are compared on the common
  datasets only;
- macro_tau: candidate macro tau >= production macro tau x (1 + margin); with no
  production drafter yet, >= the absolute floor `min_tau`;
- domain:<name>: no domain's tau below production x (1 - domain_tolerance) (floor `min_tau`
  with no production);
- calibration: mean per-position ECE of the confidence head (with its STS temperatures)
  <= max_ece; passes as not applicable for drafters without a confidence head;
- lossless: the evaluation's greedy losslessness check passed;
- speedup: wall-clock speedup over plain decoding > min_speedup.

The gate returns the verdict (with its markdown and the failed checks' reasons) and, given
`out_dir`, writes it as `gate.json` + `gate.md`; it never touches the registry, so a failed
gate changes nothing there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from drafter.config import Config
from drafter.errors import DrafterError
from drafter.manifest import atomic_write_json, atomic_write_text, provenance
from drafter.reports import GateVerdict, parse


class GateError(DrafterError, ValueError):
    """A report the gate cannot read."""


def _load(report: Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(report, dict):
        return report, "<in memory>"
    path = Path(report)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateError(f"no evaluation report at {path}: run `drafter evaluate` first") from None
    except json.JSONDecodeError as exc:
        raise GateError(f"{path}: not valid JSON ({exc})") from None
    for key in ("tau", "domains", "lossless", "overall"):
        if key not in data:
            raise GateError(f"{path}: not an evaluation report (no {key!r})")
    return data, str(path)


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def _num(x: Any) -> float:
    """A figure of a report: null (undefined, e.g. no rounds) reads as NaN and fails its check."""
    return float("nan") if x is None else x


def _check(name: str, passed: bool, value: Any, threshold: Any, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "value": value, "threshold": threshold, "detail": detail}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def gate(
    cfg: Config,
    candidate_report: Path | dict[str, Any],
    production_report: Path | dict[str, Any] | None = None,
    out_dir: Path | None = None,
) -> GateVerdict:
    """Apply the policy; with `out_dir`, also write `gate.json` and `gate.md` there."""
    g = cfg.gate
    cand, cand_src = _load(candidate_report)
    prod, prod_src = _load(production_report) if production_report is not None else (None, None)
    checks: list[dict[str, Any]] = []

    if prod is None:
        common = list(cand["tau"])
        macro = cand.get("macro_tau", _mean([_num(cand["tau"][d]) for d in common]))
        checks.append(_check("macro_tau", _ok(macro) and macro >= g.min_tau, macro, g.min_tau,
                             f"no production drafter: absolute floor min_tau {g.min_tau}"))
        for domain, m in sorted(cand["domains"].items()):
            tau = _num(m["tau_pooled"])
            checks.append(_check(f"domain:{domain}", _ok(tau) and tau >= g.min_tau, tau, g.min_tau,
                                 f"absolute floor min_tau {g.min_tau}"))
    else:
        common = [d for d in cand["tau"] if d in prod["tau"]]
        problems = []
        if cand["target"].get("fingerprint") != prod["target"].get("fingerprint"):
            problems.append(f"target {cand['target'].get('fingerprint')} vs {prod['target'].get('fingerprint')}")
        for key in ("temperature", "max_new_tokens"):
            if cand["settings"].get(key) != prod["settings"].get(key):
                problems.append(f"{key} {cand['settings'].get(key)} vs {prod['settings'].get(key)}")
        if not common:
            problems.append("no dataset in common")
        checks.append(_check("comparable", not problems, len(common), None,
                             "; ".join(problems) or f"same target and settings; {len(common)} datasets in common"))
        c_macro = _mean([_num(cand["tau"][d]) for d in common])
        p_macro = _mean([_num(prod["tau"][d]) for d in common])
        need = p_macro * (1 + g.margin)
        checks.append(_check("macro_tau", _ok(c_macro) and _ok(need) and c_macro >= need, c_macro, need,
                             f"production macro tau {p_macro:.4f} x (1 + margin {g.margin}) over {', '.join(common)}"))
        for domain in sorted(set(cand["domains"]) | set(prod["domains"])):
            if domain not in cand["domains"]:
                checks.append(_check(f"domain:{domain}", False, None, None, "evaluated for production but not for the candidate"))
                continue
            tau = _num(cand["domains"][domain]["tau_pooled"])
            if domain not in prod["domains"]:
                checks.append(_check(f"domain:{domain}", _ok(tau) and tau >= g.min_tau, tau, g.min_tau,
                                     f"new domain (no production figure): absolute floor min_tau {g.min_tau}"))
                continue
            p_tau = _num(prod["domains"][domain]["tau_pooled"])
            floor = p_tau * (1 - g.domain_tolerance)
            checks.append(_check(f"domain:{domain}", _ok(tau) and _ok(floor) and tau >= floor, tau, floor,
                                 f"production {p_tau:.4f} x (1 - tolerance {g.domain_tolerance})"))

    cal = cand.get("calibration") or {}
    if cal.get("applicable"):
        ece = cal.get("ece")
        kind = "with STS temperatures" if cal.get("temperatures") else "raw: the drafter has not been calibrated"
        checks.append(_check("calibration", _ok(ece) and ece <= g.max_ece, ece, g.max_ece,
                             f"mean per-position ECE of the confidence head ({kind})"))
    else:
        checks.append(_check("calibration", True, None, g.max_ece, "not applicable: no confidence head"))

    lossless = cand["lossless"]
    checks.append(_check("lossless", lossless.get("passed", False), lossless.get("identical"), lossless.get("checked"),
                         f"{lossless.get('identical')}/{lossless.get('checked')} greedy outputs identical to plain decoding, "
                         f"{lossless.get('ties', 0)} float ties, {lossless.get('mismatches', 0)} mismatches"))

    speedup = cand["overall"].get("speedup")
    checks.append(_check("speedup", _ok(speedup) and speedup > g.min_speedup, speedup, g.min_speedup,
                         "wall-clock tokens/s with the drafter / without it, same engine and run"
                         if _ok(speedup) else "speedup was not measured (evaluate.measure_speedup=false)"))

    verdict = {
        "passed": all(c["passed"] for c in checks),
        "failed": [c["name"] for c in checks if not c["passed"]],
        "reasons": [f"{c['name']}: {_fmt(c['value'])} vs {_fmt(c['threshold'])} ({c['detail']})"
                    for c in checks if not c["passed"]],
        "checks": checks,
        "policy": g.model_dump(mode="json"),
        "candidate": {"report": cand_src, "algorithm": cand.get("drafter", {}).get("algorithm"),
                      "path": cand.get("drafter", {}).get("path")},
        "production": None if prod is None else {"report": prod_src, "algorithm": prod.get("drafter", {}).get("algorithm"),
                                                 "path": prod.get("drafter", {}).get("path")},
        "provenance": provenance(),
    }
    verdict["markdown"] = render_markdown(verdict)
    typed = parse(GateVerdict, verdict, "the verdict")  # the shape the registry and the flow read
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "gate.json", verdict)
        atomic_write_text(Path(out_dir) / "gate.md", verdict["markdown"])
    return typed


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return "" if x is None else str(x)


def render_markdown(v: dict[str, Any]) -> str:
    head = "PASSED" if v["passed"] else f"FAILED ({', '.join(v['failed'])})"
    prod = v["production"]["report"] if v["production"] else "none (absolute floors)"
    lines = [
        f"# Promotion gate: {head}",
        "",
        f"Candidate: {v['candidate']['algorithm']} ({v['candidate']['report']}); production: {prod}.",
        "",
        "| check | result | value | threshold | detail |",
        "|---|---|---|---|---|",
    ]
    for c in v["checks"]:
        lines.append(f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {_fmt(c['value'])} | "
                     f"{_fmt(c['threshold'])} | {c['detail']} |")
    return "\n".join(lines) + "\n"
