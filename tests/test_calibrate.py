"""STS calibration: metrics, the sequential fit, and ECE falling on an over-confident head."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from drafter.calibrate import Survival, auroc, brier, calibrate, calibrate_drafter, ece, fit_sts
from drafter.config import load_config
from drafter.decoding import Round, SpecEngine
from drafter.scheduler import load_temperatures
from drafter.manifest import read_manifest
from tests.conftest import ROOT
from tests.drafters import BigramDrafter, LMDrafter, ScriptedDrafter, perturbed_copy
from tests.test_decoding import chat


def tiny_cfg(*overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", ["calibrate.max_new_tokens=48", "calibrate.concurrency=16", *overrides])


def test_metrics_on_known_cases():
    conf = np.array([0.1, 0.1, 0.9, 0.9])
    assert ece(conf, np.array([0.0, 0.0, 1.0, 1.0]), 10) == pytest.approx(0.1)
    assert ece(np.array([0.25, 0.75]), np.array([0.0, 1.0]), 2) == pytest.approx(0.25)
    assert auroc(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.8, 0.6, 0.4, 0.2]), np.array([0, 1, 0, 1])) == pytest.approx(0.25)
    assert auroc(np.array([0.5, 0.5]), np.array([1, 1])) != auroc(np.array([0.5, 0.5]), np.array([1, 1]))  # nan
    assert brier(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == 0.5


def test_sts_recovers_a_known_temperature():
    """Synthetic rounds whose true conditional survival is sigmoid(z); the head reports
    sigmoid(3 z) at position 1 and sigmoid(z / 2) at position 2: STS finds ~3 and ~1/2."""
    rng = np.random.default_rng(0)
    rounds = []
    for _ in range(6000):
        z = rng.normal(0, 1.5, size=2)
        true = 1 / (1 + np.exp(-z))
        accepted = 0
        while accepted < 2 and rng.random() < true[accepted]:
            accepted += 1
        reported = [1 / (1 + np.exp(-3 * z[0])), 1 / (1 + np.exp(-z[1] / 2))]
        rounds.append(Round(2, 2, accepted, accepted + 1, reported))
    temps = fit_sts(Survival(rounds, 2), np.geomspace(0.05, 20, 400), 20)
    assert temps[0] == pytest.approx(3.0, rel=0.15)
    assert temps[1] == pytest.approx(0.5, rel=0.2)


@pytest.fixture(scope="module")
def scripted_world(tiny_target):
    """64 held-out prompts and the target's greedy answers (what the scripted drafter follows)."""
    from drafter.config import BUNDLED_EVAL_DIR

    texts = []
    for name in ("gsm8k", "humaneval", "mt-bench", "mbpp"):
        with open(BUNDLED_EVAL_DIR / f"{name}.jsonl") as f:
            texts += [json.loads(next(f))["turns"][0][:120] for _ in range(16)]
    prompts = [chat(tiny_target, t) for t in texts]
    answers = SpecEngine(tiny_target, None).generate_batch(prompts, 48)  # batched greedy decoding
    return prompts, {tuple(p): g.tokens for p, g in zip(prompts, answers)}


def test_ece_falls_on_an_overconfident_head(tiny_target, scripted_world, tmp_path):
    prompts, scripts = scripted_world
    torch.manual_seed(0)
    drafter = ScriptedDrafter(scripts, tiny_target.vocab_size, overconfidence=3.0, shift=1.5)
    result = calibrate_drafter(tiny_cfg(), drafter, tiny_target, prompts, tmp_path / "cal")
    s = result["summary"]
    assert result["evaluated_on"] == "held-out prompts"
    assert s["ece_after"] < 0.6 * s["ece_before"]  # on prompts the fit never saw
    assert s["brier_after"] < s["brier_before"]
    assert result["temperatures"][0] > 1.5  # an over-confident head gets softened
    assert result["after"][0]["auroc"] == pytest.approx(result["before"][0]["auroc"])  # ranking kept
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert saved["temperatures"] == result["temperatures"] and len(saved["temperatures"]) == 4
    assert (tmp_path / "cal" / "reliability.png").stat().st_size > 10_000
    assert "| 1 |" in (tmp_path / "cal" / "report.md").read_text()
    counts = read_manifest(tmp_path / "cal").counts
    assert counts["fit_prompts"] + counts["eval_prompts"] == counts["used"] == 64


def test_no_confidence_head_is_not_applicable(tiny_target, scripted_world, tmp_path):
    prompts, _ = scripted_world
    drafter = LMDrafter(perturbed_copy(tiny_target.model, 0.05))
    result = calibrate_drafter(tiny_cfg(), drafter, tiny_target, prompts[:2], tmp_path / "cal")
    assert not result["applicable"] and "confidence head" in result["reason"]
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["temperatures"] is None
    assert "Not applicable" in (tmp_path / "cal" / "report.md").read_text()


def test_calibrate_stage_reads_holdout_cache(tiny_target, tmp_path, monkeypatch):
    """The stage function: a drafter folder, held-out prompts from the cache (a stand-in
    reader with the CacheReader shape), temperatures written into the drafter folder."""
    ids = [chat(tiny_target, q) for q in ("hi", "Add 2 and 3.", "Sort a list in python.")]
    samples = [
        {"input_ids": torch.tensor(p + [5, 6, 7]), "loss_mask": torch.tensor([False] * len(p) + [True] * 3)} for p in ids
    ] + [{"input_ids": torch.tensor([1, 2]), "loss_mask": torch.tensor([False, False])}]  # no assistant turn
    fake = types.ModuleType("drafter.cache")
    fake.open_split = lambda cache_dir, split, **kw: samples if split == "holdout" else None
    monkeypatch.setitem(sys.modules, "drafter.cache", fake)
    folder = BigramDrafter.random(tiny_target.vocab_size, seed=0, concentration=0.05, confidences=True).export(tmp_path / "drafter" / "best")
    cfg = tiny_cfg("calibrate.max_new_tokens=12", "calibrate.eval_fraction=0.34")
    manifest = calibrate(cfg, folder.parent, tmp_path / "cache", tmp_path / "cal")
    assert manifest.applicable and len(manifest.temperatures) == 4
    assert manifest.metrics["ece_after"] == json.loads((tmp_path / "cal" / "calibration.json").read_text())["summary"]["ece_after"]
    # Saved beside the calibration report, keyed by the weights it was fitted on: the
    # scheduler finds it for this drafter and for no other, and train's output is untouched.
    assert not (tmp_path / "drafter" / "calibration.json").exists()
    assert load_temperatures(folder, tmp_path / "cal") == manifest.temperatures
    other = BigramDrafter.random(tiny_target.vocab_size, seed=1, concentration=0.05, confidences=True).export(tmp_path / "other")
    assert load_temperatures(other, tmp_path / "cal") is None
    counts = manifest.counts
    assert (counts["selected"], counts["used"], counts["skipped_no_prompt"]) == (4, 3, 1)


@pytest.mark.integration
def test_calibrate_on_smollm2(smollm2_target, tmp_path):
    """The real target: held-out chat prompts, a scripted drafter following the target's
    greedy answers with a deliberately over-confident head; STS softens it."""
    target = smollm2_target
    questions = ["What is the capital of France?", "Write a python function that adds two numbers.",
                 "Name three colours.", "What is 12 times 12?", "Explain what a list is in Python.",
                 "Give me a synonym for happy.", "How many days are in a week?", "Say hello in Spanish."]
    prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
               for q in questions]
    plain = SpecEngine(target, None)
    answers = plain.generate_batch(prompts, 24)
    torch.manual_seed(0)
    # In bf16 a verification and a plain step can round a near-tie apart: the script then follows
    # the target's greedy continuation from there, so that acceptance is the head's q alone.
    drafter = ScriptedDrafter({tuple(p): g.tokens for p, g in zip(prompts, answers)}, target.vocab_size,
                              overconfidence=3.0, shift=1.5, resync=lambda ids: plain.generate(ids, 24).tokens)
    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml",
                      ["calibrate.max_new_tokens=24", "calibrate.concurrency=8", "drafter.block_size=4"])
    result = calibrate_drafter(cfg, drafter, target, prompts, tmp_path / "cal")
    # Softened on the whole: one position's temperature, fitted on ~50 rounds, moves with the seed
    # and the target's bf16 rounding (0.24 at position 1 for one draw, 3.8-20 for others).
    temps = torch.tensor(result["temperatures"])
    assert result["applicable"] and temps.log().mean().exp() > 1.0
    assert result["summary"]["brier_after"] < result["summary"]["brier_before"]
    assert (tmp_path / "cal" / "calibration.json").is_file() and (tmp_path / "cal" / "reliability.png").is_file()
