"""Monitoring: vLLM-named counters served over real HTTP, scraping and windows, per-request logs,
drift tests, and a full monitoring pass against a registered production drafter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lifecycle_fixtures import free_port, make_drafter, make_eval, passing_gate, prefect_harness
from prometheus_client import CollectorRegistry

from drafter import registry
from drafter.config import load_config
from monitoring import drift, telemetry
from monitoring.spec_metrics import SpecDecodeMetrics

ROOT = Path(__file__).resolve().parents[1]

# A scrape as vLLM exposes it (two engines of one model, another model, unrelated metrics).
VLLM_SCRAPE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="target"} 3.0
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="target"} 100.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="target"} 50.0
vllm:spec_decode_num_drafts_total{engine="0",model_name="other"} 999.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="target"} 1.7e9
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="target"} 300.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="target"} 150.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="target"} 180.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="target"} 90.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="0"} 80.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="1"} 60.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="2"} 40.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="target",position="0"} 40.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="target",position="1"} 30.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="target",position="2"} 20.0
"""


def test_vllm_scrape_is_parsed_and_summed_over_engines(tmp_path):
    path = tmp_path / "metrics.txt"
    path.write_text(VLLM_SCRAPE)
    counts = telemetry.scrape(str(path), model_name="target")
    assert (counts.drafts, counts.draft_tokens, counts.accepted) == (150, 450, 270)
    assert counts.accepted_per_pos == [120, 90, 60]
    assert counts.tau == pytest.approx(1 + 270 / 150)
    assert counts.per_position == pytest.approx([0.8, 0.6, 0.4])
    assert telemetry.scrape(str(path)).drafts == 150 + 999  # no filter: every served model
    path.write_text("# TYPE x counter\nx_total 1\n")
    with pytest.raises(telemetry.TelemetryError, match="no vllm:spec_decode_num_drafts_total"):
        telemetry.scrape(str(path))
    with pytest.raises(telemetry.TelemetryError, match="no such metrics file"):
        telemetry.scrape(str(tmp_path / "missing.txt"))


def test_engine_counters_served_over_http_read_back_exactly():
    metrics = SpecDecodeMetrics(num_spec_tokens=4, model_name="smol", registry=CollectorRegistry())
    port = free_port()
    server, thread = metrics.serve(port)
    try:
        rounds = [(4, 4), (4, 2), (4, 0), (3, 1), (4, [1, 1, 1, 0])]
        for drafted, accepted in rounds:
            metrics.observe_round(drafted, accepted)
        counts = telemetry.scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
    assert (counts.drafts, counts.draft_tokens, counts.accepted) == (5, 19, 10)
    assert counts.accepted_per_pos == [4, 3, 2, 1]
    assert counts.tau == pytest.approx(3.0)  # 1 + 10 / 5
    with pytest.raises(ValueError, match="accepted ones first"):
        metrics.observe_round(4, [1, 0, 1, 0])
    with pytest.raises(ValueError, match="at most 4"):
        metrics.observe_round(5, 1)
    with pytest.raises(ValueError):
        metrics.observe_round(2, 3)


def snap(at, drafts, accepted, per_pos):
    return telemetry.SpecCounts(drafts, drafts * 3, accepted, per_pos, at)


def test_window_sums_increases_and_survives_restarts():
    history = [
        snap(0, 100, 200, [90, 70, 40]),
        snap(100, 150, 280, [135, 100, 45]),  # +50 drafts, +80 accepted
        snap(200, 20, 20, [15, 5, 0]),  # restarted: counts from zero
        snap(300, 60, 70, [50, 15, 5]),  # +40 drafts, +50 accepted
    ]
    total, span = telemetry.window(history, window_s=250, now=300)  # baseline: the scrape at t=0
    assert (total.drafts, total.accepted, span) == (50 + 20 + 40, 80 + 20 + 50, 300)
    assert total.accepted_per_pos == [45 + 15 + 35, 30 + 5 + 10, 5 + 0 + 5]
    recent, span = telemetry.window(history, window_s=50, now=300)  # baseline: the scrape at t=200
    assert (recent.drafts, recent.accepted, span) == (40, 50, 100)
    only, span = telemetry.window(history[:1], window_s=50)
    assert (only.drafts, span) == (100, 0.0)
    assert [round(t, 3) for _, t in telemetry.interval_taus(history)] == [2.6, 2.0, 2.25]


def test_per_request_logs(tmp_path):
    def line(steps, hist, created=1000.0):
        accepted = sum(j * h for j, h in enumerate(hist))
        return json.dumps({"created": created, "choices": [], "metrics": {"speculative_decoding": {
            "mean_acceptance_length": 1 + accepted / steps, "acceptance_histogram": hist,
            "num_spec_steps": steps, "num_accepted_draft_tokens": accepted,
            "num_draft_tokens": steps * (len(hist) - 1), "num_spec_tokens": len(hist) - 1}}})

    logs = tmp_path / "responses.jsonl"
    logs.write_text("\n".join([
        line(10, [2, 3, 5]),  # 10 steps of 2 drafts: 2 accepted none, 3 one, 5 both
        json.dumps({"response": json.loads(line(4, [0, 0, 4]))}),  # nested under "response"
        json.dumps({"choices": []}),  # no spec-decode block
        "{not json",
        line(7, [7, 0, 0], created=1.0),  # outside the window
    ]) + "\n")
    read = telemetry.read_request_logs([logs], window_s=100, now=1050)
    counts = read["counts"]
    assert read["tally"] == {"lines": 5, "used": 2, "no_spec_metrics": 1, "malformed": 1, "outside_window": 1}
    assert (counts.drafts, counts.accepted, counts.draft_tokens) == (14, 13 + 8, 28)
    assert counts.accepted_per_pos == [8 + 4, 5 + 4]


def test_acceptance_check():
    assert drift.acceptance_check(2.5, 500, 3.0, 0.1, 200).status == drift.DRIFT  # -16.7 %
    assert drift.acceptance_check(2.8, 500, 3.0, 0.1, 200).status == drift.OK  # -6.7 %
    assert drift.acceptance_check(1.5, 50, 3.0, 0.1, 200).status == drift.INSUFFICIENT
    assert drift.acceptance_check(2.0, 500, None, 0.1, 200).status == drift.NO_REFERENCE


def test_mix_check_needs_significance_and_effect_size():
    ref = {"chat": 600, "code": 300, "math": 100}
    same = drift.mix_check(ref, {"chat": 61, "code": 29, "math": 10}, 0.01, 0.05, 50)
    assert same.status == drift.OK and same.pvalue > 0.5
    shifted = drift.mix_check(ref, {"chat": 20, "code": 70, "math": 10}, 0.01, 0.05, 50)
    assert shifted.status == drift.DRIFT and shifted.pvalue < 1e-6 and shifted.tv_distance == pytest.approx(0.4)
    # Huge samples make a 2-point shift "significant"; the effect-size floor keeps it OK.
    tiny_shift = drift.mix_check({"chat": 600_000, "code": 400_000}, {"chat": 580_000, "code": 420_000}, 0.01, 0.05, 50)
    assert tiny_shift.pvalue < 1e-10 and tiny_shift.status == drift.OK
    new_domain = drift.mix_check({"chat": 100}, {"chat": 50, "other": 50}, 0.01, 0.05, 50)
    assert new_domain.status == drift.DRIFT
    assert drift.mix_check(ref, {"chat": 5}, 0.01, 0.05, 50).status == drift.INSUFFICIENT
    assert drift.mix_check(None, {"chat": 500}, 0.01, 0.05, 50).status == drift.NO_REFERENCE


def production_setup(tmp_path: Path, name: str, extra: list[str] | None = None):
    """A production drafter evaluated at tau 3.0 (per position 0.8/0.6/0.4/0.2), trained on 60/30/10 chat/code/math."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"registry.model_name={name}", f"run.data_dir={tmp_path / 'data'}", "monitor.min_drafts=20",
        f"monitor.traffic={tmp_path / 'traffic'}", *(extra or [])])
    registry.register_candidate(
        cfg, make_drafter(tmp_path / "drafter"), eval_dir=make_eval(tmp_path / "eval", {"gsm8k": 3.2, "mt-bench": 2.8}),
        gate_verdict=passing_gate(), data_profile={"domains": {"chat": 600, "code": 300, "math": 100}})
    registry.approve(name, "1", by="alice", reason="baseline")
    return cfg


def write_traffic(folder: Path, mix: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{d}-{i}", "domain": d, "messages": []} for d, n in mix.items() for i in range(n)]
    (folder / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_monitor_detects_acceptance_and_mix_drift(store, tmp_path):
    from monitoring.monitor import monitor

    cfg = production_setup(tmp_path, "mon-drift")
    write_traffic(tmp_path / "traffic", {"chat": 20, "code": 70, "math": 10})
    engine = SpecDecodeMetrics(num_spec_tokens=4, model_name="tiny", registry=CollectorRegistry())
    port = free_port()
    server, _ = engine.serve(port)
    try:
        for _ in range(30):
            engine.observe_round(4, 3)  # a healthy hour: tau 4.0
        first = monitor(cfg, metrics=f"http://127.0.0.1:{port}/metrics", now=1_000_000.0)
        for _ in range(40):
            engine.observe_round(4, 1)  # then acceptance collapses: tau 2.0
        second = monitor(cfg, metrics=f"http://127.0.0.1:{port}/metrics", now=1_000_000.0 + 1800)
    finally:
        server.shutdown()
    assert first["acceptance"]["status"] == "ok" and first["acceptance"]["production_tau"] == pytest.approx(4.0)
    # The one-hour window holds both scrapes: its increase is the 40 bad rounds only.
    assert second["acceptance"]["drafts"] == 40 and second["acceptance"]["production_tau"] == pytest.approx(2.0)
    assert second["acceptance"]["evaluated_tau"] == pytest.approx(3.0)
    assert second["acceptance"]["production_per_position"] == [1.0, 0.0, 0.0, 0.0]
    assert second["drift"] == ["acceptance", "traffic-mix"]
    assert "no Prefect server" in second["actions"]["event"]
    assert "would start deployment 'drafter-retrain/drafter-retrain'" in second["actions"]["retraining"]
    records = [json.loads(l) for l in (tmp_path / "data" / "monitor" / "drift.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["kinds"] == ["acceptance", "traffic-mix"]  # the mix drifted both times
    report_dir = Path(second["report"]).parent
    assert {"report.md", "report.json", "tau_history.png", "acceptance.png", "mix.png"} <= {p.name for p in report_dir.iterdir()}
    assert (report_dir / "tau_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DRIFT: acceptance, traffic-mix" in (report_dir / "report.md").read_text()
    run = registry.client().get_run(second["mlflow_run"])
    # Its own experiment: no monitor row among the retrain runs people compare.
    assert run.info.experiment_id == registry.experiment_id(cfg, kind="monitoring") != registry.experiment_id(cfg)
    assert run.data.metrics["production_tau"] == pytest.approx(2.0) and run.data.metrics["drift_traffic_mix"] == 1.0
    assert run.data.tags["drafter.drift"] == "acceptance,traffic-mix"


def test_monitor_quiet_when_nothing_changed_and_without_production(store, tmp_path):
    from monitoring.monitor import monitor

    cfg = production_setup(tmp_path, "mon-ok")
    write_traffic(tmp_path / "traffic", {"chat": 62, "code": 28, "math": 10})
    logs = tmp_path / "responses.jsonl"
    block = {"num_spec_steps": 50, "num_draft_tokens": 200, "num_accepted_draft_tokens": 100,
             "acceptance_histogram": [5, 10, 15, 20, 0]}
    logs.write_text(json.dumps({"metrics": {"speculative_decoding": block}}) + "\n")
    out = monitor(cfg, request_logs=[logs])
    assert out["drift"] == [] and out["actions"] == {}
    assert out["acceptance"]["production_tau"] == pytest.approx(3.0) and out["mix"]["status"] == "ok"
    assert not (tmp_path / "data" / "monitor" / "drift.jsonl").exists()

    from monitoring.monitor import production_reference

    assert production_reference(cfg)["approved"] is True
    registry.register_candidate(cfg, make_drafter(tmp_path / "other", seed=5), gate_verdict=passing_gate())
    registry.client().set_registered_model_alias("mon-ok", "production", "2")  # behind the product's back
    assert production_reference(cfg)["approved"] is False

    bare = load_config(ROOT / "configs" / "tiny.yaml", ["registry.model_name=mon-none", f"run.data_dir={tmp_path / 'd2'}"])
    nothing = monitor(bare)
    assert nothing["production_version"] is None and nothing["drift"] == []
    assert nothing["acceptance"]["status"] == "no-reference" and nothing["mix"]["status"] == "no-reference"


@pytest.mark.integration
def test_drift_emits_event_and_starts_the_retraining_deployment(store, tmp_path):
    """With a Prefect server: the drift event is recorded and the served deployment gets a run."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from flows.schedule import retraining_deployment
    from monitoring.monitor import DRIFT_EVENT, monitor

    cfg = production_setup(tmp_path, "mon-server", ["schedule.cron=0 4 * * *"])
    write_traffic(tmp_path / "traffic", {"chat": 10, "code": 80, "math": 10})
    with prefect_harness():
        deployment_id = retraining_deployment(cfg, ROOT / "configs" / "tiny.yaml", ["registry.model_name=mon-server"]).apply()
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(deployment_id)
            assert deployment.schedules[0].schedule.cron == "0 4 * * *"
            assert deployment.parameters["wait_for_approval"] is False
        out = monitor(cfg)
        assert out["drift"] == ["traffic-mix"]
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(out["actions"]["flow_run_id"])
            assert run.deployment_id == deployment_id and "drift" in run.tags
            events = []
            for _ in range(60):
                events = client.read_events(EventFilter(event=EventNameFilter(name=[DRIFT_EVENT])), limit=10).events
                if events:
                    break
                import time

                time.sleep(0.5)
        assert events and events[0].resource.id == "drafter.registered-model.mon-server"
        assert events[0].payload["kinds"] == ["traffic-mix"]
