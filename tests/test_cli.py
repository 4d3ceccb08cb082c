"""The command line as a user meets it: --version, verbosity, help in pipeline order, --json."""

from __future__ import annotations

import json
import logging
import re

from typer.testing import CliRunner

from drafter import __version__
from drafter.cli import HELP_PANELS, app


def test_version_and_verbosity():
    assert CliRunner().invoke(app, ["--version"]).stdout.strip() == f"drafter {__version__}"
    CliRunner().invoke(app, ["-q", "params", "--help"])
    assert logging.getLogger("drafter").level == logging.ERROR
    CliRunner().invoke(app, ["-vv", "params", "--help"])
    assert logging.getLogger("drafter").level == logging.DEBUG
    CliRunner().invoke(app, ["params", "--help"])
    assert logging.getLogger("drafter").level == logging.WARNING


def test_libraries_info_lines_show_with_verbose_only():
    """distributed and Great Expectations set their own loggers to INFO (a Dask cluster's start
    is ~30 lines): the root handler's level keeps them out of a plain run; -v shows them."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = logging.getLogger()
    root.addHandler(handler)
    library = logging.getLogger("distributed.scheduler.test")
    library.setLevel(logging.INFO)
    try:
        for flags in (["params", "--help"], ["-v", "params", "--help"]):
            CliRunner().invoke(app, flags)
            library.info("State start")
            library.warning("a worker died")
        assert seen == ["a worker died", "State start", "a worker died"]
    finally:
        root.removeHandler(handler)
        CliRunner().invoke(app, ["params", "--help"])


def test_help_lists_every_command_in_pipeline_order():
    text = CliRunner().invoke(app, ["--help"], terminal_width=200).stdout
    names = [n for names in HELP_PANELS.values() for n in names]
    registered = {i.name for i in app.registered_commands} | {g.name for g in app.registered_groups}
    assert registered == set(names)  # a new command must be given a place
    positions = [re.search(rf"│ {re.escape(n)}\s", text).start() for n in names]
    assert positions == sorted(positions)
    for title in HELP_PANELS:
        assert title in text


def test_params_json(tmp_path):
    res = CliRunner().invoke(app, ["params", "--out", str(tmp_path / "p.yaml"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == {"wrote": str(tmp_path / "p.yaml")}


def _drafter(*args: str, tmp_path=None):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if tmp_path is not None:
        env["DRAFTER_HOME"] = str(tmp_path / "state")
    return subprocess.run([sys.executable, "-m", "drafter", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_exit_codes_are_distinct_and_errors_come_as_json(tmp_path):
    """Usage 2, bad config 3 (validation 5 below; partial input 4 and gate 6 are tested with
    their commands); with --json the error is JSON on stdout."""
    usage = _drafter("approve", "m", "1", tmp_path=tmp_path)  # --by/--reason missing
    assert usage.returncode == 2
    usage_json = _drafter("approve", "m", "1", "--json", tmp_path=tmp_path)
    err = json.loads(usage_json.stdout)
    assert usage_json.returncode == 2 and err["exit_code"] == 2 and "--by" in err["error"]
    bad = _drafter("params", "--out", str(tmp_path / "p.yaml"), "-s", "train.lr=-1", tmp_path=tmp_path)
    assert bad.returncode == 3 and "train.lr" in bad.stderr and "Traceback" not in bad.stderr
    as_json = _drafter("params", "--out", str(tmp_path / "p.yaml"), "-s", "train.lr=-1", "--json", tmp_path=tmp_path)
    err = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and err["type"] == "ConfigError" and err["exit_code"] == 3 and "train.lr" in err["error"]


def test_validation_failure_exits_5(tmp_path, monkeypatch):
    import sys

    import pytest

    from drafter.cli import main
    from tests.conftest import ROOT
    from tests.test_traces_ingest import chat_line, prompt

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("\n".join(chat_line(prompt(i)) for i in range(5)) + "\n")
    # a bug that gives every conversation the same id: the unique-id expectation stops the stage
    monkeypatch.setattr("drafter.traces.prepare.record_id", lambda *args: "0" * 16)
    monkeypatch.setattr(sys, "argv", ["drafter", "ingest", str(raw), "--out", str(tmp_path / "out"),
                                      "-c", str(ROOT / "configs" / "tiny.yaml")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 5 and not (tmp_path / "out" / "manifest.json").exists()


def test_out_folder_not_written_by_drafter_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    res = _drafter("ingest", str(tmp_path), "--out", str(mine), "-c", "configs/tiny.yaml", tmp_path=tmp_path)
    assert res.returncode == 1 and "--force" in res.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    as_json = _drafter("ingest", str(tmp_path), "--out", str(mine), "-c", "configs/tiny.yaml", "--json",
                       tmp_path=tmp_path)
    err = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and err["type"] == "OutputDirError" and "--force" in err["error"]


def test_unexpected_failure_with_json_is_still_json(tmp_path, monkeypatch, capsys):
    """A failure that is no DrafterError (a bug, a full disk): JSON on stdout, the traceback on stderr."""
    import sys

    import pytest

    from drafter.cli import main
    from tests.conftest import ROOT

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("drafter.dvcpipe.write_params", full_disk)
    monkeypatch.setattr(sys, "argv", ["drafter", "params", "--out", str(tmp_path / "p.yaml"), "--json",
                                      "-c", str(ROOT / "configs" / "tiny.yaml")])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    err = json.loads(captured.out)
    assert exit_.value.code == 1 and err == {"error": "OSError: [Errno 28] No space left on device",
                                             "type": "OSError", "exit_code": 1}
    assert "Traceback" in captured.err


def test_every_command_answers_json():
    """A new command must take --json (scripts drive the CLI); groups are walked down to their commands."""
    import typer

    def commands(group: typer.Typer, prefix: str = ""):
        for info in group.registered_commands:
            yield prefix + (info.name or info.callback.__name__), info.callback
        for sub in group.registered_groups:
            yield from commands(sub.typer_instance, prefix + sub.name + " ")

    import inspect

    found = dict(commands(app))
    assert {"run", "generate", "schedule", "registry export", "target info"} <= found.keys()
    lacking = [name for name, fn in found.items() if "as_json" not in inspect.signature(fn).parameters]
    assert lacking == []
    help_text = CliRunner().invoke(app, ["generate", "--help"], terminal_width=200).stdout
    assert "--json" in help_text
