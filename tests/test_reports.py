"""The project's JSON files are strict JSON: an undefined figure is null, never NaN."""

import json
import math

from drafter.manifest import atomic_write_json
from drafter.reports import read_eval_report


def refuse_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def test_undefined_figures_are_written_as_null_and_read_back(tmp_path):
    # accept_rate@7 of a run where no round verified 7 drafts: 0 / 0
    report = {"datasets": {"gsm8k": {"tau": 1.8, "ci": (1.7, float("inf"))}},
              "macro": {"tau": 1.8, "accept_rate": [0.4, 0.15, float("nan")]}, "note": "kept"}
    atomic_write_json(tmp_path / "report.json", report)
    text = (tmp_path / "report.json").read_text()
    data = json.loads(text, parse_constant=refuse_constants)  # what jq or JavaScript would read
    assert data["macro"]["accept_rate"] == [0.4, 0.15, None]
    assert data["datasets"]["gsm8k"]["ci"] == [1.7, None] and data["note"] == "kept"
    typed = read_eval_report(tmp_path)
    assert typed.macro.accept_rate == [0.4, 0.15, None] and typed.tau_by_dataset == {"gsm8k": 1.8}
    assert math.isclose(typed.macro.tau, 1.8)


def test_a_report_with_nan_from_an_older_writer_still_reads(tmp_path):
    (tmp_path / "report.json").write_text('{"datasets": {}, "macro": {"tau": 1.5, "accept_rate": [0.3, NaN]}}')
    rates = read_eval_report(tmp_path).macro.accept_rate
    assert rates[0] == 0.3 and math.isnan(rates[1])
