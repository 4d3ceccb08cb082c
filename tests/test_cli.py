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
