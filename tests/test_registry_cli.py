"""The registry commands a user types: approve, reject, rollback, registry list/export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lifecycle_fixtures import make_drafter, make_eval, passing_gate
from typer.testing import CliRunner

from drafter import registry
from drafter.cli import app
from drafter.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registered(module_store, tmp_path, request):
    """Two registered candidates of a model named after the test."""
    name = "cli-" + request.node.name.removeprefix("test_")[:40].replace("_", "-")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"registry.model_name={name}", f"run.data_dir={tmp_path}/data"])
    for i in (1, 2):
        registry.register_candidate(cfg, make_drafter(tmp_path / f"d{i}", seed=i),
                                    eval_dir=make_eval(tmp_path / f"e{i}", {"gsm8k": 2.0 + i}),
                                    gate_verdict=passing_gate())
    return name


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_approve_list_rollback_export(registered, tmp_path):
    name = registered
    assert invoke("approve", name, "1", "--by", "alice", "--reason", "baseline").exit_code == 0
    with pytest.raises(registry.ApprovalRequired, match="run the gate again"):  # gated before 1 was in production
        invoke("approve", name, "2", "--by", "bob", "--reason", "tau +33%")
    assert registry.aliases(name)["production"] == "1"
    assert invoke("approve", name, "2", "--by", "bob", "--reason", "tau +33%", "--force").exit_code == 0
    listed = json.loads(invoke("registry", "list", name, "--json").stdout)
    assert [(r["version"], r["aliases"], r["approval"], r["by"]) for r in listed] == [
        ("2", ["production"], "approved", "bob"), ("1", ["previous"], "approved", "alice")]
    table = invoke("registry", "list", name).stdout
    assert "production" in table and "tau +33%" in table

    assert invoke("rollback", name, "--by", "carol", "--reason", "latency").exit_code == 0
    assert registry.aliases(name) == {"production": "1"}
    exported = invoke("registry", "export", name, "--alias", "production", "--out", str(tmp_path / "serve"))
    assert exported.exit_code == 0 and "--speculative-config" in exported.stdout
    spec = json.loads((tmp_path / "serve" / "speculative_config.json").read_text())
    assert spec["method"] == "dspark" and spec["model"] == str((tmp_path / "serve").resolve())
    assert json.loads((tmp_path / "serve" / "registry.json").read_text())["version"] == "1"
    with pytest.raises(registry.RegistryError, match="no version with alias 'candidate'"):
        invoke("registry", "export", name, "--alias", "candidate", "--out", str(tmp_path / "cand"))
    log = json.loads(invoke("registry", "log", name, "--json").stdout)
    assert [(e["decision"], e["version"]) for e in log] == [("approved", "1"), ("approved", "2"), ("rollback", "2")]
    assert "bob" in invoke("registry", "log", name).stdout


def test_reject_and_missing_options(registered):
    name = registered
    assert invoke("reject", name, "2", "--by", "alice", "--reason", "worse on code").exit_code == 0
    assert registry.aliases(name) == {}
    missing = invoke("approve", name, "1", "--by", "alice")
    assert missing.exit_code == 2 and "--reason" in missing.output  # typer refuses: no approval without a reason
    assert "production" not in registry.aliases(name)


def test_errors_are_clear_messages_not_tracebacks(module_store, registered):
    name = registered
    """The real entry point: a refused action prints `error: ...` and exits 2."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": module_store, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "drafter", "rollback", name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a refused action
    assert "error:" in proc.stderr and "no version in production to roll back" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_of_a_candidate_needs_allow_unapproved(module_store, registered, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": module_store, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "drafter", "registry", "export", registered, "--alias", "candidate",
           "--out", str(tmp_path / "cand")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is not approved" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cand").exists()
    proc = subprocess.run(cmd + ["--allow-unapproved"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "**Not approved**" in (tmp_path / "cand" / "SERVE.md").read_text()
