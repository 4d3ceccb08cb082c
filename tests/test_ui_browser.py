"""The UIs as a person sees them: Debian's chromium, headless, driven by Playwright, against a
real `mlflow server` and a real `prefect server start` (with its UI). Screenshots are kept under
`test-artifacts/screenshots/` (or $DRAFTER_TEST_ARTIFACTS) for a person to look at.

`make test` installs chromium when it is missing; without it these tests are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from lifecycle_fixtures import MlflowServer, PrefectServer, install_standin_stages, make_drafter, make_eval, passing_verdict

from drafter import registry
from drafter.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test installs Debian's)")]
# What the probe of this machine found chromium needs to start in a closed network, as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def screenshots() -> Path:
    folder = Path(os.environ.get("DRAFTER_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def browser_page():
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


@pytest.fixture(scope="module")
def ui_servers(tmp_path_factory):
    """A real mlflow server and a real Prefect server with its UI (the harness has none)."""
    import mlflow

    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as ml, PrefectServer(tmp_path_factory.mktemp("prefect")) as pf:
        mp = pytest.MonkeyPatch()
        mp.setenv("MLFLOW_TRACKING_URI", ml.url)
        mlflow.set_tracking_uri(ml.url)
        try:
            yield ml, pf
        finally:
            mlflow.set_tracking_uri(None)
            mp.undo()


def retrain(tmp_path: Path, monkeypatch, prefect_server, name: str, block_size: int, taus: dict, speedup: float) -> str:
    """One retraining flow (stand-in stages, real Prefect and MLflow); its parent run id."""
    from flows import retrain as flows_retrain

    install_standin_stages(monkeypatch, [], {"default": taus}, {"default": speedup})
    # an experiment of its own: the module's other test registers into the same MLflow server
    overrides = [f"registry.model_name={name}", f"registry.experiment={name}", f"run.data_dir={tmp_path / 'data'}",
                 f"ingest.inputs=[{tmp_path / 'raw'}]", f"drafter.block_size={block_size}"]
    flows_retrain.ensure_demo_logs(load_config(ROOT / "configs" / "tiny.yaml", overrides), n=30)
    with prefect_server.settings():
        return flows_retrain.retrain_flow(str(ROOT / "configs" / "tiny.yaml"), overrides,
                                          wait_for_approval=False)["mlflow_run"]


def test_mlflow_compare_view_shows_two_retrains_side_by_side(ui_servers, tmp_path, monkeypatch):
    """Two retrains with different configs: two parent rows, every stage nested under one of them
    (no orphan), and the compare view shows their macro tau, tau per set and speedup."""
    mlflow_server, prefect_server = ui_servers
    first = retrain(tmp_path / "a", monkeypatch, prefect_server, "ui-compare", 4, {"gsm8k": 2.125, "mt-bench": 1.875}, 1.25)
    second = retrain(tmp_path / "b", monkeypatch, prefect_server, "ui-compare", 5, {"gsm8k": 2.625, "mt-bench": 2.375}, 1.375)

    c = registry.client()
    experiment = c.get_run(first).info.experiment_id
    runs = c.search_runs([experiment])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert {r.info.run_id for r in parents} == {first, second}  # no orphan run
    for run in parents:
        stages = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
        assert {"ingest", "regenerate", "build-cache", "train", "calibrate", "evaluate", "gate"} <= stages

    url = f"{mlflow_server.url}/#/compare-runs?runs={json.dumps([first, second])}&experiments={json.dumps([experiment])}"
    with browser_page() as page:
        # Our links open the experiment on its runs (the model-training view), not on GenAI traces,
        # and the run link on the run's metrics.
        page.goto(registry.experiment_url(experiment))
        for run_id in (first, second):
            page.get_by_text(c.get_run(run_id).info.run_name).first.wait_for(timeout=90_000)
        page.screenshot(path=str(screenshots() / "mlflow_experiment_runs.png"))
        page.goto(registry.run_url(first))
        page.get_by_text("evaluate.macro_tau").first.wait_for(timeout=90_000)
        page.goto(url)
        page.get_by_text("evaluate.macro_tau").first.wait_for(timeout=90_000)
        metrics = page.get_by_text("Metrics", exact=True).last
        metrics.scroll_into_view_if_needed()
        page.get_by_text("evaluate.speedup").last.wait_for(timeout=30_000)
        page.screenshot(path=str(screenshots() / "mlflow_compare_runs.png"))
        text = page.inner_text("body")
        (screenshots() / "mlflow_compare_runs.txt").write_text(text)
    # The Metrics table: the metric names, then one value per run (in the URL's order) for each.
    section = text.split("\nMetrics\nShow diff only\n", 1)[1].split("\nArtifacts", 1)[0].splitlines()
    names = [line for line in section if line.startswith(("evaluate.", "gate.", "train.", "calibrate."))]
    values = section[len(names):]
    table = {name: values[2 * i : 2 * i + 2] for i, name in enumerate(names)}
    assert table["evaluate.macro_tau"] == ["2", "2.5"]
    assert table["evaluate.speedup"] == ["1.25", "1.375"]
    assert table["evaluate.tau.gsm8k"] == ["2.125", "2.625"] and table["evaluate.tau.mt-bench"] == ["1.875", "2.375"]
    assert table["gate.passed"] == ["1", "1"]


def test_prefect_ui_resume_form_promotes_and_records_the_decision(ui_servers, tmp_path):
    """A release pauses for approval; in the Prefect UI a person opens the paused run, clicks
    Resume, switches Approve on, fills in who and why and submits: the version is promoted and the
    decision log says who, why and that it came through the Prefect UI."""
    from prefect.client.orchestration import get_client

    from flows.retrain import release_flow

    _, prefect_server = ui_servers
    name = "ui-approve"
    overrides = [f"registry.model_name={name}", f"run.data_dir={tmp_path / 'data'}", "registry.approval_poll_s=1",
                 "registry.approval_timeout_s=300", f"ingest.inputs=[{tmp_path / 'raw'}]"]
    drafter = make_drafter(tmp_path / "drafter" / "best")
    eval_dir = make_eval(tmp_path / "eval", {"gsm8k": 2.4, "mt-bench": 1.9})
    result: dict = {}

    def release():
        try:
            with prefect_server.settings():
                result["value"] = release_flow(str(ROOT / "configs" / "tiny.yaml"), overrides, str(drafter.parent),
                                               str(eval_dir), passing_verdict(), wait_for_approval=True)
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    paused = None
    with prefect_server.settings(), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120
        while paused is None and time.monotonic() < deadline and thread.is_alive():
            flows = {f.id: f.name for f in client.read_flows()}
            paused = next((r for r in client.read_flow_runs() if flows.get(r.flow_id) == "drafter-approval"
                           and r.state and r.state.is_paused()), None)
            time.sleep(0.5)
    assert paused is not None, result.get("error", "no paused approval run")
    assert registry.aliases(name) == {"candidate": "1"}

    with browser_page() as page:
        page.goto(f"{prefect_server.url}/runs/flow-run/{paused.id}")
        page.get_by_role("button", name="Resume").first.click()
        page.get_by_text("Who decides (recorded in the registry)").wait_for(timeout=60_000)
        assert page.get_by_text("Gate: PASSED").count() == 1  # the approval request is in the form
        switch = page.get_by_role("switch")
        assert switch.count() == 1 and switch.get_attribute("aria-checked") == "false"  # not approved by default
        switch.click()
        boxes = page.locator("textarea")
        assert boxes.count() == 2
        boxes.nth(0).fill("carol")
        boxes.nth(1).fill("tau up on gsm8k, checked in the UI")
        page.screenshot(path=str(screenshots() / "prefect_resume_form.png"))
        page.get_by_role("button", name="Submit").click()
        thread.join(120)
        page.reload()
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(screenshots() / "prefect_after_approval.png"))

    assert "error" not in result, result.get("error")
    assert result["value"]["approval"]["decision"] == "approved"
    assert registry.aliases(name) == {"production": "1"}
    decision = registry.decision_log(name)[-1]
    assert (decision["decision"], decision["version"], decision["by"], decision["via"]) == (
        "approved", "1", "carol", "prefect-ui")
    assert decision["reason"] == "tau up on gsm8k, checked in the UI" and decision["complete"]

