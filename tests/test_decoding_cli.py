"""The commands: generate streams and reports tau, evaluate/profile/gate write their outputs."""

import json

import pytest

from typer.testing import CliRunner

from drafter.cli import app
from tests.conftest import ROOT
from tests.drafters import BigramDrafter

TINY = str(ROOT / "configs" / "tiny.yaml")
runner = CliRunner()


def exported(tmp_path, tiny_target, confidences=True):
    folder = tmp_path / "drafter"
    BigramDrafter.random(tiny_target.vocab_size, seed=0, concentration=0.05, confidences=confidences).export(folder / "best")
    return folder


def test_generate_streams_and_reports_tau(tiny_target, tmp_path):
    folder = exported(tmp_path, tiny_target)
    res = runner.invoke(app, ["generate", "-c", TINY, "-p", "Write a function", "-n", "12", "-d", str(folder)])
    assert res.exit_code == 0, res.output
    assert "tokens/s, tau" in res.stderr and "12 tokens in" in res.stderr
    plain = runner.invoke(app, ["generate", "-c", TINY, "-p", "Write a function", "-n", "12"])
    assert plain.exit_code == 0 and "plain decoding" in plain.stderr
    assert plain.stdout == res.stdout  # greedy: the drafter changes the speed, never the text
    as_json = runner.invoke(app, ["generate", "-c", TINY, "-p", "Write a function", "-n", "12", "-d", str(folder),
                                  "--json"])
    answer = json.loads(as_json.stdout)  # nothing streamed before the JSON
    assert answer["text"] == res.stdout.rstrip("\n") and answer["tokens"] == 12 and answer["tau"] >= 1


def test_evaluate_profile_gate_commands(tiny_target, tmp_path):
    folder = exported(tmp_path, tiny_target)
    sets = ["-s", "evaluate.samples_per_dataset=1", "-s", "evaluate.bootstrap=20", "-s", "evaluate.max_new_tokens=8",
            "-s", f"run.data_dir={tmp_path}"]
    res = runner.invoke(app, ["evaluate", "-c", TINY, "-d", str(folder), "--json", *sets])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert set(summary) >= {"tau gsm8k", "tau humaneval", "macro tau", "lossless"} and summary["lossless"] is True
    assert (tmp_path / "eval" / "report.json").is_file()  # default output under run.data_dir
    # Run from the CLI alone, the stage gets its own parent run in MLflow, as in a flow run.
    from drafter import registry
    from drafter.config import load_config

    c = registry.client()
    exp = registry.experiment_id(load_config(TINY, sets[1::2]), c)
    parent = c.search_runs([exp], "attributes.run_name = 'evaluate (cli)'", order_by=["attributes.start_time DESC"])[0]
    nested = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [r.info.run_name for r in nested] == ["evaluate"] and parent.info.status == "FINISHED"
    assert parent.data.metrics["evaluate.macro_tau"] == pytest.approx(summary["macro tau"], abs=1e-3)
    assert parent.data.tags["mlflow.source.name"] == "drafter evaluate" and parent.data.tags.get("mlflow.source.git.commit")
    assert "outputs/report.md" in {a.path for a in c.list_artifacts(nested[0].info.run_id, "outputs")}

    res = runner.invoke(app, ["profile", "-c", TINY, "-s", "scheduler.profile_rows=[1,2]", "-s", "scheduler.profile_reps=1",
                              "-s", "scheduler.profile_context=8", *sets])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "profile" / "cost_table.json").read_text())
    assert table["rows"] == [1, 2] and table["widths"] == [1, 2, 3, 4, 5]  # block_size 4 + 1
    assert (tmp_path / "profile" / "manifest.json").is_file()

    # Algorithm 1 with the profiled table, through evaluate: still lossless, cost table saved with the run.
    res = runner.invoke(app, ["evaluate", "-c", TINY, "-d", str(folder), "-o", str(tmp_path / "eval-prefix"),
                              "-s", "scheduler.mode=prefix", *sets])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval-prefix" / "report.json").read_text())
    assert report["lossless"]["passed"] and report["settings"]["scheduler"] == "prefix"
    assert (tmp_path / "eval-prefix" / "sps_cost_table.json").is_file()

    res = runner.invoke(app, ["gate", "-c", TINY, "--candidate", str(tmp_path / "eval"), "-s", "gate.min_tau=1.0",
                              "-s", "gate.min_speedup=0.0001", "-s", f"run.data_dir={tmp_path}"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["gate", "-c", TINY, "--candidate", str(tmp_path / "eval"), "-s", "gate.min_tau=9",
                              "-s", f"run.data_dir={tmp_path}"])
    assert res.exit_code == 6 and "FAIL" in res.stdout
    assert json.loads((tmp_path / "gate" / "gate.json").read_text())["passed"] is False  # DATA_DIR/gate


def test_missing_drafter_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    import pytest

    from drafter.cli import main

    monkeypatch.setattr(sys, "argv", ["drafter", "evaluate", "-c", TINY, "-d", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "no drafter at" in err and "Traceback" not in err


def test_generate_exposes_vllm_counters_that_monitor_reads(tiny_target, tmp_path):
    """Our engine publishes the counters a vLLM server does; the monitor's reader agrees with it."""
    import re

    from monitoring.telemetry import scrape

    import torch

    from drafter.decoding import SpecEngine
    from drafter.evaluate import encode_chat

    # A bigram drafter counted from the target's own greedy answer: most drafts are accepted.
    prompt = encode_chat(tiny_target.tokenizer, [{"role": "user", "content": "Write a function"}])
    answer = prompt[-1:] + SpecEngine(tiny_target, None).generate(prompt, 40).tokens
    table = torch.full((tiny_target.vocab_size, tiny_target.vocab_size), 1e-3)
    for prev, nxt in zip(answer, answer[1:]):
        table[prev, nxt] += 1.0
    folder = tmp_path / "drafter"
    BigramDrafter(table).export(folder / "best")
    prom = tmp_path / "metrics.prom"
    res = runner.invoke(app, ["generate", "-c", TINY, "-p", "Write a function", "-n", "40", "-d", str(folder),
                              "-g", "4", "--metrics-file", str(prom)])
    assert res.exit_code == 0, res.output
    assert "vllm:spec_decode_num_accepted_tokens_per_pos_total" in prom.read_text()
    rounds = int(re.search(r"over (\d+) rounds", res.stderr).group(1))
    counts = scrape(str(prom))
    # Every round that verified drafts is one vLLM "draft" (the engine may shorten the last).
    assert rounds - 1 <= counts.drafts <= rounds and counts.draft_tokens > 4 * (counts.drafts - 1)
    assert counts.accepted > 0
    assert sum(counts.accepted_per_pos) == counts.accepted  # each accepted token counted at its position
    assert all(a >= b for a, b in zip(counts.accepted_per_pos, counts.accepted_per_pos[1:]))  # survival decays
    printed_tau = float(re.search(r"tau ([\d.]+)", res.stderr).group(1))
    # vLLM's 1 + accepted/drafts equals the engine's tau except for the last, length-cut round.
    assert abs(counts.tau - printed_tau) <= 4 / rounds + 0.01
