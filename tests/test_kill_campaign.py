"""The kill campaign (bench/kill_campaign.py), reduced: two SIGKILLs in a row per stage on
small inputs, then the same command to completion, compared with an uninterrupted run.

Each stage is the real CLI in a subprocess (the registry: a `python -c` driver of approve /
reject / rollback / promote decisions on a real MLflow SQLite store). Nothing may be lost,
duplicated or different; the full campaign (20 kills per stage) writes
bench/results/kill_campaign.json.
"""

from __future__ import annotations

import json

import pytest

from bench import kill_campaign as kc

pytestmark = pytest.mark.integration

KILLS = 2  # a kill, a kill of the resumed run, then the resume to completion


@pytest.fixture(scope="module")
def campaign_setup(tmp_path_factory):
    """Small inputs (20 demo conversations, 24 training steps) and every stage's input made by
    the previous stage's uninterrupted run; one MLflow store for the subprocesses and this one."""
    import mlflow

    work = tmp_path_factory.mktemp("kill-campaign")
    env = kc.stage_env(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        try:
            stages = kc.build_stages(work, env, conversations=20, seed=0, steps=24, checkpoint_every=4,
                                     names=list(kc.STAGES), log=work / "inputs.log")
            yield work, env, stages
        finally:
            mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("name", kc.STAGES)
def test_a_stage_killed_twice_in_a_row_resumes_to_the_uninterrupted_output(campaign_setup, name):
    work, env, stages = campaign_setup
    lines: list[str] = []
    got = kc.campaign(stages[name], work, env, kills=KILLS, seed=0, in_row=(KILLS, KILLS), log=lines.append)
    summary = json.dumps([{k: r[k] for k in r if k != "log_tail"} for r in got["rounds"]], default=str)[:4000]
    assert got["kills"] == KILLS
    assert (got["lost"], got["duplicated"], got["mismatches"]) == (0, 0, 0), summary
    assert all(r["exit_code"] == 0 for r in got["rounds"]), summary


def test_the_registry_check_sees_a_rollback_made_twice():
    """The comparison is not blind: the log of a rollback repeated after a kill (the bug the
    campaign found) differs from the uninterrupted sequence and is counted."""
    def entry(step, decision, version, before, after, prev_before="", prev_after=""):
        return {"via": f"kill-campaign step {step}", "decision": decision, "version": version, "complete": True,
                "production_before": before, "production_after": after, "previous_before": prev_before,
                "previous_after": prev_after}

    ref_log = [entry(0, "approved", "1", "", "1"), entry(1, "approved", "2", "1", "2", "", "1"),
               entry(2, "rollback", "2", "2", "1", "1", "")]
    ref = {"aliases": {"production": "1"}, "states": {"1": "approved", "2": "approved"}, "log": ref_log}
    twice = ref_log[:2] + [{**ref_log[2], "complete": False}, entry(2, "rollback", "1", "1", "", "", "")]
    got = {"aliases": {}, "states": {"1": "approved", "2": "approved"}, "log": twice}
    out = kc.registry_compare(ref, got)
    assert out["mismatches"] >= 2 and any("step 2 rollback" in e for e in out["examples"])
    assert kc.registry_consistency(ref) == []


def test_the_kill_window_shrinks_to_runs_that_use_less_cpu_than_the_reference(campaign_setup):
    """On a loaded machine the reference run can use more CPU than every later run (CI saw
    build-cache and train finish before each drawn kill). A whole run that ends first sets the
    window to its own CPU, and the next round's kill lands."""
    import dataclasses

    work, env, stages = campaign_setup
    stage = dataclasses.replace(stages["build-cache"], name="build-cache-window")
    ref = kc.reference(stage, work, "", env)
    info = ref["dir"] / "reference.json"
    lo, hi = ref["cpu_window_s"]
    # Far past the end of any run: on a loaded CI machine a run used 1.3x the reference's CPU.
    inflated = [round(hi * 5, 2), round(hi * 6, 2)]
    info.write_text(json.dumps(json.loads(info.read_text()) | {"cpu_window_s": inflated}))
    got = kc.campaign(stage, work, env, kills=1, seed=0, in_row=(1, 1), log=lambda _: None)
    assert got["rounds"][0]["kills"] == [], "the first run should end before a kill past its end"
    assert got["kills"] == 1 and got["kill_window_cpu_s"][1] < inflated[0]
    assert (got["lost"], got["duplicated"], got["mismatches"]) == (0, 0, 0)
