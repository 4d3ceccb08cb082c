"""`drafter export`: a training folder's best/ (or last/) as a standalone speculators folder."""

import json

import torch
from typer.testing import CliRunner

from drafter.cli import app
from drafter.config import load_config
from drafter.models import TargetHeads, build, load_drafter
from tests.conftest import ROOT


def test_export_command(tiny_target, tmp_path):
    heads = TargetHeads.from_target(tiny_target)
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = build(cfg, heads, tiny_target.layer_ids)
    model.export(tmp_path / "run" / "best")
    (tmp_path / "run" / "calibration.json").write_text(json.dumps({"temperatures": [1.0] * 4}))

    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "serve"),
                                      "--verifier", "HuggingFaceTB/SmolLM2-135M-Instruct", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["algorithm"] == "dspark" and summary["block_size"] == 4
    config = json.loads((tmp_path / "serve" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (tmp_path / "serve" / "calibration.json").is_file()
    again = load_drafter(tmp_path / "serve", heads)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())

    missing = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert missing.exit_code != 0 and not (tmp_path / "x").exists()
