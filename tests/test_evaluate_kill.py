"""`drafter evaluate` killed with a real SIGKILL (no Python cleanup runs: no `with` exit, no
flush of buffered writes) once it has written part of `samples.partial.jsonl`, then run
again to completion: the result equals an uninterrupted run of the same command.

Both runs are the real CLI in a subprocess (tiny in-process target, a fresh DSpark drafter
exported once), sampling at temperature 1 so that every prompt's answer and rounds differ
and a prompt lost, repeated or swapped between prompts would show.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from bench import kill_campaign as kc

pytestmark = pytest.mark.integration

PROMPTS = 6  # 2 datasets x 3
# Figures measured with a clock: they differ between any two runs of the same command.
TIMING = {"seconds", "prefill_seconds", "breakdown", "tokens_per_s", "plain_tokens_per_s", "speedup",
          "decode_tokens_per_s", "plain_decode_tokens_per_s", "decode_speedup", "round_ms", "plain_step_ms",
          "round_cost_in_plain_steps"}


@pytest.fixture(scope="module")
def drafter_dir(tiny_target, tmp_path_factory):
    """A fresh (untrained, seeded) DSpark drafter for the tiny target, in the speculators format."""
    import torch

    from drafter.config import load_config
    from drafter.models import TargetHeads, build

    cfg = load_config(kc.TINY)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("evaluate-kill") / "drafter"
    build(cfg, TargetHeads.from_target(tiny_target), tiny_target.layer_ids).export(folder / "best")
    return folder


def command(drafter: Path, out: Path, work: Path) -> list[str]:
    return [kc.PY, "-m", "drafter", "-v", "evaluate", "-c", str(kc.TINY), "-d", str(drafter), "-o", str(out), "--no-holdout",
            "-s", f"run.data_dir={work / 'data'}", "-s", f"evaluate.samples_per_dataset={PROMPTS // 2}",
            "-s", "evaluate.max_new_tokens=12", "-s", "evaluate.temperature=1.0", "-s", "evaluate.bootstrap=50"]


def finished_records(partial: Path) -> list[dict]:
    """The records of `samples.partial.jsonl` that reached the disk whole (header and a torn
    last line left out)."""
    if not partial.is_file():
        return []
    lines = partial.read_bytes().split(b"\n")[:-1]  # the part after the last newline is torn
    out = []
    for line in lines[1:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def run_and_kill(cmd: list[str], env: dict[str, str], out: Path, log: Path, at_least: int,
                 timeout: float) -> bool:
    """Start `cmd` and SIGKILL its process group as soon as `at_least` prompts are on disk.
    -> True if the kill landed; False if the run ended first."""
    partial = out / "samples.partial.jsonl"
    proc = kc.launch(cmd, env, log)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if len(finished_records(partial)) >= at_least:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            if time.monotonic() > deadline:
                pytest.fail(f"no {at_least} evaluated prompt(s) on disk after {timeout:.0f} s:\n{kc.tail(log)}")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"the run to be killed failed ({proc.returncode}):\n{kc.tail(log)}"
    return False


def untimed(obj):
    """`obj` without the clock-measured figures (nested dicts and lists)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def canonical(obj) -> str:
    return json.dumps(untimed(obj), sort_keys=True)  # NaN compares equal as text, not as a float


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_evaluate_killed_with_sigkill_resumes_to_the_uninterrupted_report(drafter_dir, tmp_path):
    env = kc.stage_env(tmp_path)
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run, side by side with the killed one (it only has to finish by the end).
    ref_log = tmp_path / "reference.log"
    reference = kc.launch(command(drafter_dir, ref_out, tmp_path), env, ref_log)
    try:
        log = tmp_path / "killed.log"
        before: list[dict] = []
        tries = []
        for at_least in (2, 1):  # a run that ends before the kill: once more, killed earlier
            shutil.rmtree(out, ignore_errors=True)
            landed = run_and_kill(command(drafter_dir, out, tmp_path), env, out, log, at_least, timeout=240)
            before = finished_records(out / "samples.partial.jsonl")
            tries.append({"kill_after": at_least, "landed": landed, "on_disk": len(before)})
            if landed and 0 < len(before) < PROMPTS and not (out / "report.json").exists():
                break
        else:
            pytest.fail(f"no SIGKILL landed mid-evaluation ({tries}): the runs end before a prompt is on disk")
        assert not (out / "manifest.json").exists()

        rc, _ = kc.run_to_end(command(drafter_dir, out, tmp_path), env, log, timeout=300)  # the resume
        assert rc == 0, f"the resumed run failed ({rc}):\n{kc.tail(log)}"
        assert "resuming: %d of %d prompts" % (len(before), PROMPTS) in log.read_text()
        assert reference.wait(timeout=300) == 0, f"the uninterrupted run failed:\n{kc.tail(ref_log)}"
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()

    want, got = read_jsonl(ref_out / "samples.jsonl"), read_jsonl(out / "samples.jsonl")
    ids = [s["id"] for s in got]
    assert len(ids) == len(set(ids)) == PROMPTS, ids  # none duplicated
    assert ids == [s["id"] for s in want]  # none lost, same order
    # The prompts finished before the kill were kept as they were (timings included), not redone.
    assert [s for s in got if s["id"] in {r["id"] for r in before}] == before
    for a, b in zip(want, got):  # the same answers, rounds, confidences and lossless checks
        assert canonical(a) == canonical(b), a["id"]
    assert len({json.dumps(s["spec"]["tokens"]) for s in want}) == PROMPTS  # prompts tell apart

    ref_report = json.loads((ref_out / "report.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["tau"] == ref_report["tau"] and report["macro_tau"] == ref_report["macro_tau"]
    for key in ("samples", "rounds", "tokens", "tau_pooled", "tau_per_sample_mean", "tau_ci", "accept_rate_at_k"):
        assert report["overall"][key] == ref_report["overall"][key], key
    assert canonical(report) == canonical(ref_report)  # every figure not measured with a clock
    assert json.loads((out / "manifest.json").read_text())["counts"] == \
        json.loads((ref_out / "manifest.json").read_text())["counts"]
    assert not (out / "samples.partial.jsonl").exists()
