"""The promotion gate: each policy check passes and fails where it should, with its numbers."""

import json

import pytest

from drafter.config import load_config
from drafter.gates import GateError, gate
from tests.conftest import ROOT


def cfg_with(*overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def report(tau, domains, speedup=1.4, lossless=True, ece=0.03, temps=(1.2, 1.0), fingerprint="abc", temperature=0.0):
    return {
        "target": {"fingerprint": fingerprint},
        "drafter": {"algorithm": "dspark", "path": "/x"},
        "settings": {"temperature": temperature, "max_new_tokens": 128},
        "tau": tau,
        "macro_tau": sum(tau.values()) / len(tau),
        "domains": {d: {"tau_pooled": t} for d, t in domains.items()},
        "overall": {"speedup": speedup},
        "lossless": {"passed": lossless, "checked": 8, "identical": 8 if lossless else 6, "ties": 0,
                     "mismatches": 0 if lossless else 2},
        "calibration": {"applicable": ece is not None, "ece": ece, "temperatures": list(temps) if temps else None},
    }


GOOD = report({"gsm8k": 3.0, "humaneval": 2.6, "mt-bench": 2.0}, {"math": 3.0, "code": 2.6, "chat": 2.0})


def by_name(verdict):
    return {c["name"]: c for c in verdict.checks}


def test_absolute_floors_without_production(tmp_path):
    v = gate(cfg_with("gate.min_tau=1.5"), GOOD, out_dir=tmp_path)
    assert v.passed and set(by_name(v)) == {"macro_tau", "domain:math", "domain:code", "domain:chat",
                                              "calibration", "lossless", "speedup"}
    v = gate(cfg_with("gate.min_tau=2.2"), GOOD, out_dir=tmp_path)
    assert v.failed == ["domain:chat"]  # macro 2.53 clears 2.2; chat's 2.0 does not
    assert by_name(v)["domain:chat"]["value"] == 2.0 and by_name(v)["domain:chat"]["threshold"] == 2.2
    v = gate(cfg_with("gate.min_tau=2.6"), GOOD, out_dir=tmp_path)
    assert "macro_tau" in v.failed


def test_margin_over_production(tmp_path):
    prod = report({"gsm8k": 2.8, "humaneval": 2.4, "mt-bench": 1.9}, {"math": 2.8, "code": 2.4, "chat": 1.9})
    assert gate(cfg_with("gate.margin=0.05"), GOOD, prod, tmp_path).passed  # 2.53 >= 2.37 x 1.05
    v = gate(cfg_with("gate.margin=0.1"), GOOD, prod, tmp_path)  # needs 2.603
    assert v.failed == ["macro_tau"]
    assert by_name(v)["macro_tau"]["threshold"] == pytest.approx(7.1 / 3 * 1.1)


def test_no_domain_may_regress_beyond_tolerance(tmp_path):
    prod = report({"gsm8k": 2.8, "humaneval": 2.9, "mt-bench": 1.5}, {"math": 2.8, "code": 2.9, "chat": 1.5})
    v = gate(cfg_with("gate.domain_tolerance=0.05"), GOOD, prod, tmp_path)
    assert v.failed == ["domain:code"]  # 2.6 < 2.9 x 0.95; the macro still improved
    assert gate(cfg_with("gate.domain_tolerance=0.15"), GOOD, prod, tmp_path).passed
    missing = report({"gsm8k": 3.0}, {"math": 3.0})
    assert "domain:code" in gate(cfg_with(), missing, prod, tmp_path).failed


def test_reports_must_be_comparable(tmp_path):
    other_target = report({"gsm8k": 2.0}, {"math": 2.0}, fingerprint="zzz")
    v = gate(cfg_with(), GOOD, other_target, tmp_path)
    assert "comparable" in v.failed and "target abc vs zzz" in by_name(v)["comparable"]["detail"]
    hot = report({"gsm8k": 2.0}, {"math": 2.0}, temperature=1.0)
    assert "temperature 0.0 vs 1.0" in by_name(gate(cfg_with(), GOOD, hot, tmp_path))["comparable"]["detail"]


def test_calibration_lossless_and_speedup_checks(tmp_path):
    cfg = cfg_with("gate.max_ece=0.05")
    assert gate(cfg, report({"a": 3.0}, {"chat": 3.0}, ece=0.08), out_dir=tmp_path).failed == ["calibration"]
    no_head = gate(cfg, report({"a": 3.0}, {"chat": 3.0}, ece=None), out_dir=tmp_path)
    assert no_head.passed and "not applicable" in by_name(no_head)["calibration"]["detail"]
    raw = gate(cfg, report({"a": 3.0}, {"chat": 3.0}, temps=None), out_dir=tmp_path)
    assert "not been calibrated" in by_name(raw)["calibration"]["detail"]
    assert gate(cfg, report({"a": 3.0}, {"chat": 3.0}, lossless=False), out_dir=tmp_path).failed == ["lossless"]
    assert gate(cfg, report({"a": 3.0}, {"chat": 3.0}, speedup=1.0), out_dir=tmp_path).failed == ["speedup"]
    v = gate(cfg, report({"a": 3.0}, {"chat": 3.0}, speedup=None), out_dir=tmp_path)
    assert "not measured" in by_name(v)["speedup"]["detail"]


def test_verdict_files_name_every_check(tmp_path):
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand" / "report.json").write_text(json.dumps(GOOD))
    v = gate(cfg_with("gate.min_tau=2.2"), tmp_path / "cand", out_dir=tmp_path / "gate")  # a folder holding report.json
    saved = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert saved["passed"] is False and saved["failed"] == v.failed == ["domain:chat"]
    assert v.reasons == ["domain:chat: 2.0000 vs 2.2000 (absolute floor min_tau 2.2)"]
    md = (tmp_path / "gate" / "gate.md").read_text()
    assert md == v.markdown
    assert not (tmp_path / "cand" / "gate.json").exists()  # nothing written beside the report
    assert md.startswith("# Promotion gate: FAILED (domain:chat)")
    for c in v.checks:
        assert f"| {c['name']} |" in md
    assert "| domain:chat | **FAIL** | 2.0000 | 2.2000 |" in md


def test_unreadable_reports(tmp_path):
    with pytest.raises(GateError, match="drafter evaluate"):
        gate(cfg_with(), tmp_path / "missing.json")
    (tmp_path / "x.json").write_text(json.dumps({"tau": {}}))
    with pytest.raises(GateError, match="not an evaluation report"):
        gate(cfg_with(), tmp_path / "x.json")


def test_gate_reads_a_real_evaluation_report(tiny_target, tmp_path):
    from drafter.evaluate import evaluate_drafter
    from tests.drafters import LMDrafter

    evaluate_drafter(cfg_with("evaluate.bootstrap=50"), LMDrafter(tiny_target.model), tiny_target, tmp_path)
    v = gate(cfg_with("gate.min_tau=1.5"), tmp_path / "report.json")
    assert by_name(v)["lossless"]["passed"] and by_name(v)["macro_tau"]["value"] > 1.5
    assert {c["name"] for c in v.checks} >= {"macro_tau", "lossless", "speedup", "calibration", "domain:math"}
