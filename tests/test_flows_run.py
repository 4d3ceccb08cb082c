"""`drafter run` and `drafter schedule` without a Prefect server: the temporary local API."""

from __future__ import annotations

from pathlib import Path

import pytest
from lifecycle_fixtures import install_standin_stages, migrated_database
from typer.testing import CliRunner

from drafter import registry
from drafter.cli import app
from drafter.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_schedule_needs_a_server_and_builds_the_cron_deployment(tmp_path):
    from flows.schedule import NoPrefectServer, deployment_name, retraining_deployment, serve

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["schedule.cron=30 2 * * *", "schedule.timezone=Europe/Paris"])
    with pytest.raises(NoPrefectServer, match="prefect server start"):
        serve(cfg, ROOT / "configs" / "tiny.yaml")
    deployment = retraining_deployment(cfg, ROOT / "configs" / "tiny.yaml", ["train.lr=1e-4"])
    assert deployment_name(cfg) == "drafter-retrain/drafter-retrain"
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("30 2 * * *", "Europe/Paris")
    assert deployment.parameters == {"config": str((ROOT / "configs" / "tiny.yaml").resolve()),
                                     "overrides": ["train.lr=1e-4"], "wait_for_approval": False}
    assert deployment.concurrency_limit == 1  # scheduled and drift-triggered runs never overlap
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"


def test_schedule_on_a_work_pool_registers_a_deployment_a_process_worker_can_run(tmp_path, monkeypatch):
    """`drafter schedule --work-pool`: the pool is created (process type), the deployment points at
    this checkout's flow with the cron schedule and one run at a time (read back from a real
    Prefect API: the temporary local one)."""
    from prefect.client.orchestration import get_client

    from flows.schedule import ENTRYPOINT, deploy_to_work_pool

    monkeypatch.setenv("PREFECT_HOME", str(migrated_database("prefect", tmp_path / "prefect" / "prefect.db").parent))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["schedule.cron=0 3 * * 1"])
    first = deploy_to_work_pool(cfg, ROOT / "configs" / "tiny.yaml", ["train.lr=1e-4"], "drafter-test-pool")
    again = deploy_to_work_pool(cfg, ROOT / "configs" / "tiny.yaml", ["train.lr=1e-4"], "drafter-test-pool")
    assert again == first  # re-running updates the same deployment
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("drafter-test-pool")
        deployment = client.read_deployment(first)
    assert pool.type == "process"
    assert deployment.work_pool_name == "drafter-test-pool" and deployment.entrypoint == ENTRYPOINT
    assert deployment.schedules[0].schedule.cron == "0 3 * * 1"
    assert deployment.parameters["overrides"] == ["train.lr=1e-4"]
    assert deployment.global_concurrency_limit.limit == 1
    assert str(ROOT) in str(deployment.pull_steps)  # the worker runs this checkout's code


@pytest.mark.integration
def test_drafter_run_without_a_server_ends_awaiting_approval(store, tmp_path, monkeypatch):
    """The README's main command on the temporary local API: demo logs in, a candidate awaiting
    `drafter approve` out, then approve promotes it (stages are stand-ins until they merge)."""
    from flows import retrain

    calls: list = []
    install_standin_stages(monkeypatch, calls, {"default": {"gsm8k": 2.2, "humaneval": 1.8}})
    monkeypatch.setattr(retrain, "code_version", lambda: "test-code")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    sets = ["-s", "registry.model_name=cli-run", "-s", f"run.data_dir={tmp_path / 'data'}",
            "-s", f"ingest.inputs=[{tmp_path / 'raw'}]"]
    refused = CliRunner().invoke(app, ["run", "-c", str(ROOT / "configs" / "tiny.yaml"), *sets])
    assert isinstance(refused.exception, ConfigError) and "--demo" in str(refused.exception)
    assert calls == [] and not (tmp_path / "raw").exists()  # no demo data slipped into production inputs
    result = CliRunner().invoke(app, ["run", "-c", str(ROOT / "configs" / "tiny.yaml"), *sets, "--demo",
                                      "--demo-logs", "12"])
    assert result.exit_code == 0, result.output
    assert calls[0] == ("demo", str(tmp_path / "raw"), 12, 0)
    assert "registered cli-run version 1: awaiting" in result.stdout
    assert "drafter approve cli-run 1 --by WHO" in result.stdout
    assert registry.aliases("cli-run") == {"candidate": "1"}
    approved = CliRunner().invoke(app, ["approve", "cli-run", "1", "--by", "dana", "--reason", "demo looks right"])
    assert approved.exit_code == 0 and registry.aliases("cli-run") == {"production": "1"}
