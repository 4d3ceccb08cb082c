"""The serving registry on a real MLflow SQLite store: register, approve, reject, rollback, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lifecycle_fixtures import make_drafter, make_eval, passing_gate, verdict

from drafter import registry
from drafter.config import Config, load_config
from drafter.dvcpipe import dvc_lock_hashes
from drafter.lineage import collect_lineage, lineage_tags

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, name: str) -> Config:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"registry.model_name={name}", f"run.data_dir={tmp_path / 'data'}"])
    return cfg


def register(cfg: Config, tmp_path: Path, tag: str, taus=None, **kw) -> registry.Candidate:
    # A seed that differs for every tag (hash() is salted per process: two tags could share weights).
    folder = make_drafter(tmp_path / f"drafter-{tag}", seed=int.from_bytes(tag.encode(), "little"))
    eval_dir = make_eval(tmp_path / f"eval-{tag}", taus or {"gsm8k": 2.5, "humaneval": 2.1})
    return registry.register_candidate(cfg, folder, eval_dir=eval_dir, gate_verdict=passing_gate(), **kw)


def test_model_name_defaults_to_target():
    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml")
    assert registry.model_name(cfg) == "drafter-SmolLM2-135M-Instruct"
    assert registry.model_name(load_config(ROOT / "configs" / "tiny.yaml")) == "drafter-tiny-llama"


def test_register_logs_folder_reports_lineage_and_sets_candidate(module_store, tmp_path):
    cfg = config(tmp_path, "reg-basic")
    lineage = collect_lineage(cfg)
    lineage["target_fingerprint"] = "abc123"
    sps = tmp_path / "sps_cost_table.json"
    sps.write_text(json.dumps({"sps": {"1": 100.0, "8": 80.0}}))
    cand = register(cfg, tmp_path, "a", sps_table=sps, lineage=lineage)
    assert cand.version == "1"
    assert registry.aliases("reg-basic") == {"candidate": "1"}

    c = registry.client()
    mv = c.get_model_version("reg-basic", "1")
    assert mv.tags["approval.state"] == "pending"
    assert mv.tags["lineage.target_fingerprint"] == "abc123"
    assert mv.tags["lineage.config_hash"] == cfg.hash()
    assert mv.tags["lineage.packages.mlflow"].startswith("3.")
    assert mv.tags["eval.tau_macro"] == "2.3000"
    assert mv.tags["drafter.algorithm"] == "dspark" and mv.tags["drafter.num_speculative_tokens"] == "4"
    assert mv.run_id == cand.run_id
    # The run has the metrics and the evidence; the version has the files vLLM needs.
    run = c.get_run(cand.run_id)
    assert run.data.metrics["tau.gsm8k"] == pytest.approx(2.5)
    assert {a.path for a in c.list_artifacts(cand.run_id)} >= {"reports", "lineage.json", "sps_cost_table.json"}
    out = registry.export_alias("reg-basic", "candidate", tmp_path / "export", allow_unapproved=True)
    files = {p.relative_to(tmp_path / "export").as_posix() for p in (tmp_path / "export").rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "calibration.json", "sps_cost_table.json", "lineage.json",
            "reports/eval/report.json", "reports/eval/acceptance.csv", "reports/gate/verdict.json",
            "speculative_config.json", "registry.json", "SERVE.md"} <= files
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == (tmp_path / "drafter-a" / "model.safetensors").read_bytes()
    spec = json.loads((tmp_path / "export" / "speculative_config.json").read_text())
    assert spec == {"method": "dspark", "model": str((tmp_path / "export").resolve()), "num_speculative_tokens": 4}
    assert out["speculative_config"] == spec
    serve = (tmp_path / "export" / "SERVE.md").read_text()
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in serve and "**Not approved**" in serve
    assert out["approved"] is False


def test_train_output_folder_uses_best(module_store, tmp_path):
    cfg = config(tmp_path, "reg-best")
    make_drafter(tmp_path / "train-out" / "best", tokens=6)
    (tmp_path / "train-out" / "metrics.json").write_text("{}")
    registry.register_candidate(cfg, tmp_path / "train-out", gate_verdict=passing_gate())
    registry.export_alias("reg-best", "candidate", tmp_path / "x", allow_unapproved=True)
    assert json.loads((tmp_path / "x" / "speculative_config.json").read_text())["num_speculative_tokens"] == 6
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_failed_gate_leaves_registry_unchanged(module_store, tmp_path):
    cfg = config(tmp_path, "reg-gate")
    register(cfg, tmp_path, "ok")
    before = registry.list_versions("reg-gate")
    with pytest.raises(registry.GateFailed, match="tau below production"):
        registry.register_candidate(
            cfg, make_drafter(tmp_path / "bad"), gate_verdict=verdict(False, ["tau below production"])
        )
    assert registry.list_versions("reg-gate") == before


@pytest.mark.parametrize("mutate, message", [
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}"), "not a safetensors"),
    (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
])
def test_bad_drafter_folder_is_refused(module_store, tmp_path, mutate, message):
    folder = make_drafter(tmp_path / "d")
    mutate(folder)
    with pytest.raises(registry.RegistryError, match=message):
        registry.register_candidate(config(tmp_path, "reg-bad"), folder)


def test_missing_evidence_is_refused_before_anything_is_logged(module_store, tmp_path):
    cfg = config(tmp_path, "reg-noeval")
    with pytest.raises(registry.RegistryError, match="no evaluation folder"):
        registry.register_candidate(cfg, make_drafter(tmp_path / "d"), eval_dir=tmp_path / "missing")
    with pytest.raises(registry.RegistryError, match="not found"):
        registry.register_candidate(cfg, make_drafter(tmp_path / "d"), sps_table=tmp_path / "sps_cost_table.json")
    with pytest.raises(registry.RegistryError, match="no registered model"):
        registry.aliases("reg-noeval")


def test_approve_promotes_and_rollback_returns(module_store, tmp_path):
    cfg = config(tmp_path, "reg-life")
    v1 = register(cfg, tmp_path, "1").version
    registry.approve("reg-life", v1, by="alice", reason="first drafter, tau 2.3")
    assert registry.aliases("reg-life") == {"production": "1"}
    v2 = register(cfg, tmp_path, "2", taus={"gsm8k": 3.0, "humaneval": 2.6}).version
    assert registry.aliases("reg-life") == {"production": "1", "candidate": "2"}
    registry.approve("reg-life", v2, by="bob", reason="better on gsm8k")
    assert registry.aliases("reg-life") == {"production": "2", "previous": "1"}

    rows = {r["version"]: r for r in registry.list_versions("reg-life")}
    assert rows["2"]["approval"] == "approved" and rows["2"]["by"] == "bob" and rows["2"]["aliases"] == ["production"]
    history = json.loads(registry.client().get_model_version("reg-life", "2").tags["approval.history"])
    assert [h["decision"] for h in history] == ["approved"] and history[0]["reason"] == "better on gsm8k"

    result = registry.rollback("reg-life", by="carol", reason="latency regression")
    assert result["production"] == "1" and result["rolled_back"] == "2"
    assert registry.aliases("reg-life") == {"production": "1"}
    assert registry.client().get_model_version("reg-life", "2").tags["rollback.by"] == "carol"
    # Rolling back the first promotion leaves nothing in production (plain decoding).
    result = registry.rollback("reg-life", by="carol", reason="drafter off")
    assert result["production"] is None and result["rolled_back"] == "1"
    assert registry.aliases("reg-life") == {}
    assert all(r["rolled_back"] for r in registry.list_versions("reg-life"))
    with pytest.raises(registry.RegistryError, match="no version in production"):
        registry.rollback("reg-life")
    registry.approve("reg-life", "1", by="alice", reason="re-checked")  # approved again: no longer rolled back
    assert [r["rolled_back"] == "" for r in registry.list_versions("reg-life")] == [False, True]


def test_reject_removes_candidate_and_never_promotes(module_store, tmp_path):
    cfg = config(tmp_path, "reg-reject")
    v1 = register(cfg, tmp_path, "1").version
    registry.reject("reg-reject", v1, by="alice", reason="regresses on code")
    assert registry.aliases("reg-reject") == {}
    assert registry.list_versions("reg-reject")[0]["approval"] == "rejected"
    with pytest.raises(registry.ApprovalRequired):
        registry.promote("reg-reject", v1)
    with pytest.raises(registry.ApprovalRequired, match="rejected by alice"):
        registry.approve("reg-reject", v1, by="alice", reason="changed my mind")
    registry.approve("reg-reject", v1, by="alice", reason="re-checked: the regression was a bad eval set", force=True)
    assert registry.aliases("reg-reject") == {"production": "1"}
    with pytest.raises(registry.RegistryError, match="in production"):
        registry.reject("reg-reject", v1, by="bob", reason="x")
    history = json.loads(registry.client().get_model_version("reg-reject", "1").tags["approval.history"])
    assert [h["decision"] for h in history] == ["rejected", "approved"]


def test_nothing_moves_production_without_an_approval_record(module_store, tmp_path):
    """Every route to `production` is tried: none works without a recorded approval."""
    cfg = config(tmp_path, "reg-guard")
    v1 = register(cfg, tmp_path, "1").version
    with pytest.raises(registry.ApprovalRequired):
        registry.promote("reg-guard", v1)  # pending candidate
    for by, reason in [("", "looks fine"), ("alice", ""), ("  ", "  ")]:
        with pytest.raises(registry.RegistryError, match="--by.*--reason"):
            registry.approve("reg-guard", v1, by=by, reason=reason)
    assert "production" not in registry.aliases("reg-guard")

    # A `previous` alias set behind the product's back onto an unapproved version:
    # rollback refuses to promote it.
    registry.approve("reg-guard", v1, by="alice", reason="ok")
    v2 = register(cfg, tmp_path, "2").version
    registry.client().set_registered_model_alias("reg-guard", "previous", v2)
    with pytest.raises(registry.ApprovalRequired):
        registry.rollback("reg-guard")
    assert registry.aliases("reg-guard")["production"] == "1"

    # Structural: outside registry._set_production, aliases are only ever set to `candidate`.
    src = (ROOT / "drafter" / "registry.py").read_text().splitlines()
    start = next(i for i, l in enumerate(src) if l.startswith("def _set_production"))
    end = next(i for i in range(start + 1, len(src)) if src[i].startswith("def "))
    offenders = []
    for folder in ("drafter", "flows", "monitoring"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines()):
                if "set_registered_model_alias(" not in line:
                    continue
                inside = path.name == "registry.py" and path.parent.name == "drafter" and start <= i < end
                if not inside and "CANDIDATE" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not offenders, f"aliases moved outside registry._set_production: {offenders}"


def test_same_weights_reuse_the_version(module_store, tmp_path):
    cfg = config(tmp_path, "reg-reuse")
    folder = make_drafter(tmp_path / "d")
    first = registry.register_candidate(cfg, folder, gate_verdict=passing_gate())
    again = registry.register_candidate(cfg, folder, gate_verdict=passing_gate())
    assert (again.version, again.reused, first.reused) == (first.version, True, False)
    assert len(registry.list_versions("reg-reuse")) == 1
    other = registry.register_candidate(cfg, make_drafter(tmp_path / "e", seed=7), gate_verdict=passing_gate())
    assert other.version == "2" and registry.aliases("reg-reuse") == {"candidate": "2"}


def test_unknown_model_and_version_are_clear_errors(module_store, tmp_path):
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.list_versions("nope")
    register(config(tmp_path, "reg-err"), tmp_path, "1")
    with pytest.raises(registry.RegistryError, match="has no version 9"):
        registry.approve("reg-err", 9, by="a", reason="b")
    with pytest.raises(registry.RegistryError, match="no version with alias 'production'"):
        registry.export_alias("reg-err", "production", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_lineage_reads_manifests_and_dvc_lock(tmp_path, monkeypatch):
    cfg = config(tmp_path, "x")
    data = cfg.data_dir
    (data / "cache").mkdir(parents=True)
    (data / "cache" / "manifest.json").write_text(json.dumps({"stage": "build_cache", "target": {"target_fingerprint": "fp1", "template_hash": "th1"}}))
    (data / "cache" / "train.json").write_text(json.dumps({"key": "k-train", "path": "/x"}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"ingest": {
        "cmd": "drafter ingest", "deps": [{"path": "data/raw", "hash": "md5", "md5": "aaa.dir"}],
        "outs": [{"path": "data/ingested", "hash": "md5", "md5": "bbb.dir"}]}}}))
    lineage = collect_lineage(cfg, dvc_root=tmp_path)
    assert lineage["target_fingerprint"] == "fp1" and lineage["template_hash"] == "th1"
    assert lineage["cache_keys"] == {"train": "k-train"}
    assert lineage["dvc"] == {"data/raw": "aaa.dir", "data/ingested": "bbb.dir"}
    assert dvc_lock_hashes(tmp_path / "missing.lock") == {}
    tags = lineage_tags(lineage)
    assert tags["lineage.dvc.data/ingested"] == "bbb.dir" and tags["lineage.manifests.cache"]


def test_reports_are_read_in_the_one_shape_their_stage_writes(tmp_path):
    from drafter.reports import GateVerdict, ReportError, parse, read_eval_report

    (tmp_path / "report.json").write_text(json.dumps(
        {"datasets": {"a": {"tau": 2.0}}, "macro": {"tau": 2.5, "accept_rate": [0.9, 0.5]}}))
    report = read_eval_report(tmp_path)
    assert (report.macro.tau, report.tau_by_dataset, report.macro.accept_rate) == (2.5, {"a": 2.0}, [0.9, 0.5])
    assert read_eval_report(tmp_path / "none") is None and read_eval_report(None) is None
    (tmp_path / "report.json").write_text(json.dumps({"datasets": [{"dataset": "a", "tau": 2}], "macro": {"tau": 2}}))
    with pytest.raises(ReportError, match="datasets"):  # a list of datasets is no report of ours
        read_eval_report(tmp_path)
    assert parse(GateVerdict, {"passed": True}, "v").passed and not parse(GateVerdict, {"passed": False}, "v").passed
    with pytest.raises(ReportError, match="passed"):  # no guessing from other keys
        parse(GateVerdict, {"verdict": "pass"}, "v")


def test_processes_starting_together_share_a_fresh_store(tmp_path):
    """DDP ranks and parallel jobs open a fresh SQLite store at once: without the lock in
    `ensure_store` MLflow's schema migrations collide ('Online migration expected to match
    one row')."""
    import os
    import subprocess
    import sys

    code = "from drafter import registry; print(len(registry.client().search_experiments()))"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [(rc, out.strip()) for rc, out, _ in results] == [(0, "1")] * 4, [err[-500:] for _, _, err in results]


def test_approve_requires_a_gate_passed_against_todays_production(module_store, tmp_path):
    cfg = config(tmp_path, "reg-gate")
    folder = make_drafter(tmp_path / "ungated", seed=11)
    v1 = registry.register_candidate(cfg, folder).version  # no verdict: gate.passed=unknown
    with pytest.raises(registry.ApprovalRequired, match="gate has not passed"):
        registry.approve("reg-gate", v1, by="alice", reason="looks fine")
    assert "production" not in registry.aliases("reg-gate")
    v2, v3 = register(cfg, tmp_path, "2").version, register(cfg, tmp_path, "3").version  # both gated against none
    registry.approve("reg-gate", v2, by="alice", reason="first")
    with pytest.raises(registry.ApprovalRequired, match=f"gated against production none; production is now {v2}"):
        registry.approve("reg-gate", v3, by="bob", reason="also good")
    # Gated again (same weights) against today's production: approvable without force.
    registry.register_candidate(cfg, tmp_path / "drafter-3", eval_dir=tmp_path / "eval-3", gate_verdict=passing_gate())
    registry.approve("reg-gate", v3, by="bob", reason="passed against 2")
    assert registry.aliases("reg-gate") == {"production": v3, "previous": v2}
    # --force goes through and says so: on the version and in the decision log.
    registry.approve("reg-gate", v1, by="carol", reason="emergency", force=True)
    assert "gate has not passed" in registry.client().get_model_version("reg-gate", v1).tags["approval.forced"]
    log = registry.decision_log("reg-gate")
    assert [(e["decision"], e["version"], e["complete"]) for e in log] == [
        ("approved", v2, True), ("approved", v3, True), ("approved", v1, True)]
    assert "gate has not passed" in log[-1]["forced"] and log[-1]["production_before"] == v3
    assert log[-1]["os_user"] and log[-1]["host"] and log[-1]["production_after"] == v1


def test_version_strings_are_normalised(module_store, tmp_path):
    cfg = config(tmp_path, "reg-norm")
    register(cfg, tmp_path, "1")
    registry.approve("reg-norm", "1", by="a", reason="first")
    v2 = register(cfg, tmp_path, "2").version
    registry.approve("reg-norm", f"0{v2}", by="a", reason="second")  # "02" is version 2, and v1 stays previous
    assert registry.aliases("reg-norm") == {"production": "2", "previous": "1"}
    for bad in ("two", "-1", "0", "1.0", ""):
        with pytest.raises(registry.RegistryError, match="expected a version number"):
            registry.approve("reg-norm", bad, by="a", reason="b")


def test_every_decision_is_logged_and_history_is_never_silently_cut(module_store, tmp_path):
    cfg = config(tmp_path, "reg-log")
    v1 = register(cfg, tmp_path, "1").version
    registry.approve("reg-log", v1, by="alice", reason="x" * 900)
    v2 = register(cfg, tmp_path, "2").version
    registry.reject("reg-log", v2, by="bob", reason="worse")
    for i in range(6):  # rollbacks and re-approvals: more history than a tag holds
        registry.rollback("reg-log", by="carol", reason=f"off {i}")
        registry.approve("reg-log", v1, by="alice", reason=f"back {i} " + "y" * 800)
    log = registry.decision_log("reg-log")
    assert [e["decision"] for e in log] == ["approved", "rejected"] + ["rollback", "approved"] * 6
    assert all(e["complete"] for e in log) and log[2]["version"] == "1" and log[2]["production_after"] == ""
    tags = registry.client().get_model_version("reg-log", v1).tags
    history = json.loads(tags["approval.history"])
    assert history[-1]["decision"] == "approved" and "rolled_back" in [h["decision"] for h in history]
    assert int(tags["approval.history_dropped"]) + len(history) == 13  # 7 approvals + 6 rollbacks of v1


def test_concurrent_decisions_serialise(module_store, tmp_path):
    """Approve and reject racing from separate processes: production ends on the approved
    version only if its approval was the last word, and the log agrees with the aliases."""
    import subprocess
    import sys

    cfg = config(tmp_path, "reg-race")
    v1 = register(cfg, tmp_path, "1").version
    registry.approve("reg-race", v1, by="a", reason="first")
    v2, v3 = register(cfg, tmp_path, "2").version, register(cfg, tmp_path, "3").version
    code = ("import sys; from drafter import registry; op, v = sys.argv[1:]\n"
            "try:\n"
            "    getattr(registry, op)('reg-race', v, by=op, reason='race')\n"
            "except registry.RegistryError as e:\n"
            "    print('refused', e)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, op, v], cwd=ROOT)
             for op, v in [("approve", v2), ("reject", v2), ("approve", v3), ("reject", v3)]]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    log = [e for e in registry.decision_log("reg-race") if e["complete"]]
    state = {}
    for e in log:  # replay the log: the last word on each version
        state[e["version"]] = e["decision"]
        assert e["production_after"] == (e["version"] if e["decision"] == "approved" else e["production_before"])
    assert registry.aliases("reg-race").get("production") == log[-1]["production_after"]
    prod = registry.aliases("reg-race").get("production")
    assert prod == "1" or state[prod] == "approved"
    for v in (v2, v3):
        mv = registry.client().get_model_version("reg-race", v)
        assert mv.tags["approval.state"] == state.get(v, "pending")


# Two decisions raced from separate processes: one process imports once, then forks one child
# per decision (each opens its own store connection and takes the file lock itself). The registry
# calls are slowed down so that, without the decision lock, the two interleave.
RACER = """
import json, os, sys, time, traceback
from mlflow import MlflowClient
from drafter import registry

for method in ("get_registered_model", "get_model_version", "search_runs", "create_run",
               "set_registered_model_alias", "delete_registered_model_alias", "set_model_version_tag"):
    def slow(self, *args, _real=getattr(MlflowClient, method), **kwargs):
        time.sleep(0.1)
        return _real(self, *args, **kwargs)
    setattr(MlflowClient, method, slow)

name, decisions, pids = sys.argv[1], json.loads(sys.argv[2]), []
ready, go = os.pipe(), os.pipe()
for op, args, kwargs in decisions:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            try:
                registry.aliases(name), registry.decision_log(name)  # the store opened: no head start
            finally:
                os.write(ready[1], b"r")
            os.read(go[0], 1)
            getattr(registry, op)(name, *args, **kwargs)
        except registry.RegistryError as exc:
            print("refused:", op, args, exc, flush=True)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    pids.append(pid)
for _ in decisions:
    os.read(ready[0], 1)
os.write(go[1], b"g" * len(decisions))
sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids))
"""


def race(name: str, *decisions: tuple) -> None:
    """Run `(op, args, kwargs)` decisions at the same time, each in its own process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", RACER, name, json.dumps(decisions)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def end_state(name: str, versions) -> dict:
    """What the serial orders are compared on: the aliases, each version's approval state and
    who last rolled it back, and the decisions of the log (each chained on the one before)."""
    c = registry.client()
    log = registry.decision_log(name)
    assert all(e["complete"] for e in log), log
    for before, after in zip(log, log[1:]):  # no decision saw aliases another one had already moved
        assert (after["production_before"], after["previous_before"]) == (
            before["production_after"], before["previous_after"]), log
    current = registry.aliases(name)
    assert (current.get("production", ""), current.get("previous", "")) == (
        log[-1]["production_after"], log[-1]["previous_after"])
    tags = {v: c.get_model_version(name, v).tags for v in versions}
    return {"aliases": current, "log": [(e["decision"], e["version"]) for e in log],
            "state": {v: (t["approval.state"], t.get("rollback.by")) for v, t in tags.items()}}


def test_rollback_racing_approve_never_drops_the_approval(module_store, tmp_path):
    """Unserialised, both read production 2 / previous 1: the approve moved production to 3,
    then the rollback put 1 back (from its stale read), and the approval of 3 was lost with no
    rollback recorded on it. Now the end state is one of the two serial orders."""
    cfg = config(tmp_path, "reg-race-rb")
    v1, v2 = (register(cfg, tmp_path, t).version for t in ("1", "2"))
    registry.approve("reg-race-rb", v1, by="a", reason="first")
    registry.approve("reg-race-rb", v2, by="a", reason="second", force=True)
    v3 = register(cfg, tmp_path, "3").version  # gated against 2
    race("reg-race-rb", ("approve", [v3], {"by": "alice", "reason": "race", "force": True}),
         ("rollback", [], {"by": "ops", "reason": "race"}))
    first = [("approved", v1), ("approved", v2)]
    serial = [
        {"aliases": {"production": v2},  # approve, then rollback (of 3)
         "log": first + [("approved", v3), ("rollback", v3)],
         "state": {v1: ("approved", None), v2: ("approved", None), v3: ("approved", "ops")}},
        {"aliases": {"production": v3, "previous": v1},  # rollback (of 2), then approve
         "log": first + [("rollback", v2), ("approved", v3)],
         "state": {v1: ("approved", None), v2: ("approved", "ops"), v3: ("approved", None)}},
    ]
    assert end_state("reg-race-rb", (v1, v2, v3)) in serial


@pytest.mark.parametrize("force", [False, True], ids=["gated", "forced"])
def test_two_approves_racing_keep_previous_and_the_gate(module_store, tmp_path, force):
    """Unserialised, both approves read production 1: both set previous to 1, so the version
    promoted first was lost from `previous` (forced), or both passed a gate run against 1 although
    one of them replaced it (gated). Now the second approve sees the first one's production."""
    name = f"reg-race-2ap-{force}"
    cfg = config(tmp_path, name)
    v1 = register(cfg, tmp_path, "1").version
    registry.approve(name, v1, by="a", reason="first")
    v2, v3 = register(cfg, tmp_path, "2").version, register(cfg, tmp_path, "3").version  # both gated against 1
    race(name, *(("approve", [v], {"by": f"by-{v}", "reason": "race", "force": force}) for v in (v2, v3)))
    serial = []
    for a, b in ((v2, v3), (v3, v2)):
        if force:  # both approved, in turn: the first one is `previous`
            serial.append({"aliases": {"production": b, "previous": a}, "log": [("approved", v) for v in (v1, a, b)],
                           "state": {v1: ("approved", None), a: ("approved", None), b: ("approved", None)}})
        else:  # the second is refused: its gate ran against 1, production is now the first
            still_candidate = {"candidate": v3} if b == v3 else {}  # the latest registered, refused
            serial.append({"aliases": {"production": a, "previous": v1, **still_candidate},
                           "log": [("approved", v) for v in (v1, a)],
                           "state": {v1: ("approved", None), a: ("approved", None), b: ("pending", None)}})
    assert end_state(name, (v1, v2, v3)) in serial


def test_export_refuses_unapproved_and_tampered_versions(module_store, tmp_path):
    cfg = config(tmp_path, "reg-serve")
    v1 = register(cfg, tmp_path, "1").version
    c = registry.client()
    c.set_registered_model_alias("reg-serve", "production", v1)  # as the MLflow UI's alias button would
    with pytest.raises(registry.NotServable, match="not approved"):
        registry.export_alias("reg-serve", "production", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    c.delete_registered_model_alias("reg-serve", "production")
    registry.approve("reg-serve", v1, by="a", reason="ok")
    assert registry.export_alias("reg-serve", "production", tmp_path / "out")["approved"] is True
    # The registered weights' hash no longer matches what the store serves.
    c.set_model_version_tag("reg-serve", v1, "drafter.weights_sha256", "0" * 64)
    with pytest.raises(registry.NotServable, match="sha256"):
        registry.export_alias("reg-serve", "production", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    # Approval tags written in the MLflow UI (no decision made them) do not make a version servable.
    v2 = register(cfg, tmp_path, "2").version
    for key, value in {"approval.by": "mallory", "approval.at": "2026-01-01T00:00:00Z", "approval.state": "approved"}.items():
        c.set_model_version_tag("reg-serve", v2, key, value)
    c.set_registered_model_alias("reg-serve", "production", v2)
    with pytest.raises(registry.NotServable, match="decision log"):
        registry.export_alias("reg-serve", "production", tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


class Crash(BaseException):
    """A process dying mid-decision (found by the kill campaign, bench/kill_campaign.py)."""


def crash_at(monkeypatch, method: str, when=lambda *args: True) -> None:
    """The next MLflow call `method` (matching `when`) dies instead; the calls before it are real."""
    from mlflow import MlflowClient

    real = getattr(MlflowClient, method)

    def dying(self, *args, **kwargs):
        if when(*args):
            monkeypatch.setattr(MlflowClient, method, real)
            raise Crash(method)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, dying)


def test_a_rollback_killed_after_production_moved_and_run_again_rolls_back_once(module_store, tmp_path,
                                                                                monkeypatch):
    """Killed after the aliases moved, before the log entry was closed: running `rollback` again
    used to roll back a second time (production 2 -> 1, then 1 -> none)."""
    cfg = config(tmp_path, "reg-kill-rb")
    for tag in ("1", "2"):
        registry.approve("reg-kill-rb", register(cfg, tmp_path, tag).version, by="a", reason=f"v{tag}", force=True)
    crash_at(monkeypatch, "set_terminated")
    with pytest.raises(Crash):
        registry.rollback("reg-kill-rb", by="ops", reason="latency")
    assert registry.aliases("reg-kill-rb") == {"production": "1"} and not registry.decision_log("reg-kill-rb")[-1][
        "complete"]
    result = registry.rollback("reg-kill-rb", by="ops", reason="latency")  # the same command, run again
    assert result["production"] == "1" and result["rolled_back"] == "2"
    assert registry.aliases("reg-kill-rb") == {"production": "1"}
    log = registry.decision_log("reg-kill-rb")
    assert [(e["decision"], e["complete"]) for e in log] == [("approved", True)] * 2 + [("rollback", True)]
    assert log[-1]["finished_late"] and log[-1]["production_after"] == "1"
    history = json.loads(registry.client().get_model_version("reg-kill-rb", "2").tags["approval.history"])
    assert [h["decision"] for h in history] == ["approved", "rolled_back"]  # not twice


def test_a_rollback_killed_between_its_alias_moves_never_points_previous_at_the_bad_version(
        module_store, tmp_path, monkeypatch):
    """The old rollback set previous -> the version leaving production, then deleted it: killed in
    between, the next rollback brought that version back into production."""
    cfg = config(tmp_path, "reg-kill-mid")
    for tag in ("1", "2"):
        registry.approve("reg-kill-mid", register(cfg, tmp_path, tag).version, by="a", reason=f"v{tag}", force=True)
    crash_at(monkeypatch, "set_registered_model_alias", lambda name, alias, version: alias == "production")
    with pytest.raises(Crash):
        registry.rollback("reg-kill-mid", by="ops", reason="bad answers")
    assert registry.aliases("reg-kill-mid") == {"production": "2"}  # previous cleared first, 2 not yet moved
    registry.rollback("reg-kill-mid", by="ops", reason="bad answers")
    assert registry.aliases("reg-kill-mid") == {"production": "1"}


def test_the_next_decision_finishes_an_interrupted_one_first(module_store, tmp_path, monkeypatch):
    """An approve killed after its state tag, before production moved: a different decision
    finishes it (production, previous, one history entry), then is made itself."""
    cfg = config(tmp_path, "reg-kill-next")
    v1, v2, v3 = (register(cfg, tmp_path, t).version for t in ("1", "2", "3"))
    registry.approve("reg-kill-next", v1, by="a", reason="first")
    crash_at(monkeypatch, "set_registered_model_alias", lambda name, alias, version: alias == "production")
    with pytest.raises(Crash):
        registry.approve("reg-kill-next", v2, by="b", reason="second", force=True)
    assert registry.client().get_model_version("reg-kill-next", v2).tags["approval.state"] == "approved"
    assert registry.aliases("reg-kill-next")["production"] == v1  # half done: previous moved, production not
    registry.reject("reg-kill-next", v3, by="c", reason="worse")
    assert registry.aliases("reg-kill-next") == {"production": v2, "previous": v1}
    log = registry.decision_log("reg-kill-next")
    assert [(e["decision"], e["version"], e["complete"]) for e in log] == [
        ("approved", v1, True), ("approved", v2, True), ("rejected", v3, True)]
    assert log[1]["finished_late"] and log[1]["production_after"] == v2 and not log[2]["finished_late"]
    history = json.loads(registry.client().get_model_version("reg-kill-next", v2).tags["approval.history"])
    assert [h["decision"] for h in history] == ["approved"]
    # The same approve run again after a crash is that decision, not a second one.
    crash_at(monkeypatch, "set_terminated")
    with pytest.raises(Crash):
        registry.approve("reg-kill-next", v1, by="a", reason="back", force=True)
    assert registry.approve("reg-kill-next", v1, by="a", reason="back", force=True)["production"] == v1
    assert [e["decision"] for e in registry.decision_log("reg-kill-next")].count("approved") == 3


def test_a_manifest_is_checked_when_written_and_read(tmp_path):
    """One manifest shape: metrics are numbers (what MLflow rolls up), the sections are mappings."""
    import json

    from drafter.manifest import read_manifest, write_manifest
    from drafter.reports import ReportError

    write_manifest(tmp_path, "evaluate", counts={"prompts": 3}, metrics={"macro_tau": 2.5, "nan": float("nan")})
    assert read_manifest(tmp_path).metrics == {"macro_tau": 2.5}  # non-finite figures are dropped
    with pytest.raises(ReportError, match="counts"):
        write_manifest(tmp_path, "evaluate", counts=[1, 2])  # type: ignore[arg-type]
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "evaluate", "metrics": {"macro_tau": "high"}}))
    with pytest.raises(ReportError, match="metrics.macro_tau"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("crash_key, then", [("approval.by", "approve"), ("approval.state", "approve"),
                                             ("approval.state", "rollback")])
def test_a_decision_killed_while_recording_never_pairs_a_state_with_an_older_record(
        module_store, tmp_path, monkeypatch, crash_key, then):
    """Killed while writing an approval over a rejection: with the state written first, a crash
    left `approved` beside the rejecting decider's name and reason. The state is written last,
    so the version reads as rejected until the next decision finishes the approval from its
    log entry (the run again, or another decision), with the record that entry holds."""
    name = f"reg-kill-rec-{crash_key.split('.')[1]}-{then}"
    cfg = config(tmp_path, name)
    v1, v2 = (register(cfg, tmp_path, t).version for t in ("1", "2"))
    registry.approve(name, v1, by="alice", reason="first")
    registry.reject(name, v2, by="carol", reason="worse on code")
    crash_at(monkeypatch, "set_model_version_tag", lambda model, version, key, value: key == crash_key)
    with pytest.raises(Crash):
        registry.approve(name, v2, by="bob", reason="re-checked", force=True)

    new = {"by": "bob", "reason": "re-checked", "via": "cli", "at": registry.decision_log(name)[-1]["at"]}
    tags = registry.client().get_model_version(name, v2).tags
    record = {k: tags.get(f"approval.{k}") for k in new}
    assert tags["approval.state"] == "rejected" or record == new  # never `approved` by carol
    if crash_key == "approval.state":  # the last tag: the rest of the record is already this decision's
        assert tags["approval.state"] == "rejected" and record == new
        assert json.loads(tags["approval.history"])[-1] == {"decision": "approved", **new}
    row = {r["version"]: r for r in registry.list_versions(name)}[v2]
    assert row["approval"] == "rejected" and row["aliases"] == []  # what a read sees: not approved, not served
    assert registry.aliases(name) == {"production": v1} and not registry.decision_log(name)[-1]["complete"]

    if then == "approve":  # the same command run again: finishes the approval, does not decide twice
        assert registry.approve(name, v2, by="bob", reason="re-checked", force=True)["production"] == v2
        assert registry.aliases(name) == {"production": v2, "previous": v1}
    else:  # another decision finishes the approval first, then is made itself
        assert registry.rollback(name, by="ops", reason="after the crash")["rolled_back"] == v2
        assert registry.aliases(name) == {"production": v1}
    tags = registry.client().get_model_version(name, v2).tags
    assert tags["approval.state"] == "approved" and {k: tags[f"approval.{k}"] for k in new} == new
    history = [h["decision"] for h in json.loads(tags["approval.history"])]
    assert history == ["rejected", "approved"] + (["rolled_back"] if then == "rollback" else [])
    log = registry.decision_log(name)
    assert [(e["decision"], e["version"], e["complete"]) for e in log] == [
        ("approved", v1, True), ("rejected", v2, True), ("approved", v2, True)] + (
        [("rollback", v2, True)] if then == "rollback" else [])
    assert log[2]["finished_late"] and log[2]["production_after"] == v2 and log[2]["at"] == new["at"]
