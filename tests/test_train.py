"""The training stage: learning, exact resume, DDP = one process, accumulation, MLflow, outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import mlflow
import pytest
import torch

from drafter.config import load_config
from drafter.manifest import read_manifest
from drafter.models import TargetHeads, load_drafter
from drafter.train import train
from tests.conftest import ROOT
from tests.tiny_data import collate, make_dataset, sharp_target

SHARPNESS = 60.0


def tiny_cfg(*sets):
    base = ["drafter.block_size=4", "train.batch_size=4", "train.lr=3e-3", "train.system_metrics=false"]
    return load_config(ROOT / "configs" / "tiny.yaml", base + list(sets))


@pytest.fixture(scope="module")
def target():
    return sharp_target(sharpness=SHARPNESS)


@pytest.fixture(scope="module")
def data(target):
    return make_dataset(target, 48, seed=1), make_dataset(target, 8, seed=2)


def losses(out_dir):
    return [h["loss"] for h in json.loads((out_dir / "metrics.json").read_text())["history"]]


def test_tiny_drafter_learns_held_out_tau_rises(target, data, tmp_path):
    cfg = tiny_cfg("train.max_steps=40", "train.batch_size=8", "train.eval_every=20", "train.checkpoint_every=100")
    manifest = train(cfg, out_dir=tmp_path, target=target, data=data, collate=collate)
    evals = json.loads((tmp_path / "metrics.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    start, best = evals[0]["sim_tau_greedy"], manifest.outputs["best_tau"]
    assert start < 1.1 and best > 1.35, (start, best)  # held-out tau rises well above 1
    assert manifest.outputs["best_step"] in (20, 40)
    # outputs: best/ and last/ load back; counts add up; nothing pickled anywhere
    heads = TargetHeads.from_target(target)
    best_model = load_drafter(tmp_path / "best", heads)
    assert best_model.meta["step"] == manifest.outputs["best_step"]
    assert load_drafter(tmp_path / "last", heads).meta["step"] == 40
    counts = manifest.counts
    assert counts["sequences_seen"] == 40 * 8 == counts["sequences_with_targets"] + counts["sequences_without_targets"]
    assert (tmp_path / "config.yaml").is_file() and manifest.params["selected_by"] == "sim_tau_greedy"
    suffixes = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".yaml", ".png"}, suffixes
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # idempotent: the same config and data again is a no-op
    calls = []
    again = train(cfg, out_dir=tmp_path, target=target, data=data, collate=collate,
                  callback=lambda step, rec: calls.append(step))
    assert calls == [] and again.params["run_key"] == manifest.params["run_key"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("algo", ["dspark", "eagle3"])
def test_resume_is_exact(target, data, tmp_path, algo):
    cfg = tiny_cfg(f"drafter.algorithm={algo}", "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=2")
    whole = tmp_path / "whole"
    train(cfg, out_dir=whole, target=target, data=data, collate=collate)

    def stop(step, record):
        if step == 5:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train(cfg, out_dir=cut, target=target, data=data, collate=collate, callback=stop)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    manifest = train(cfg, out_dir=cut, target=target, data=data, collate=collate)
    assert manifest.outputs["resumed_from"] == "step-00000004"
    assert losses(cut) == losses(whole)  # bit-identical on CPU
    heads = TargetHeads.from_target(target)
    a, b = load_drafter(whole / "last", heads), load_drafter(cut / "last", heads)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_other_run_in_the_same_folder_is_refused(target, data, tmp_path):
    from drafter.train import TrainError

    cfg = tiny_cfg("train.max_steps=2", "train.checkpoint_every=1", "train.eval_every=2")

    def stop(step, record):
        raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, out_dir=tmp_path, target=target, data=data, collate=collate, callback=stop)
    with pytest.raises(TrainError, match="different run"):
        train(tiny_cfg("train.max_steps=2", "train.lr=1e-3"), out_dir=tmp_path, target=target, data=data, collate=collate)


def test_gradient_accumulation_matches_one_big_batch(target, data, tmp_path):
    common = ["train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=10"]
    train(tiny_cfg(*common), out_dir=tmp_path / "one", target=target, data=data, collate=collate)
    train(tiny_cfg(*common, "train.grad_accum=2"), out_dir=tmp_path / "acc", target=target, data=data, collate=collate)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "acc"), rel=1e-5)


def test_mlflow_run_nested_with_params_and_metrics(target, data, tmp_path):
    mlflow.set_experiment("lifecycle-test")
    with mlflow.start_run(run_name="lifecycle") as parent:
        manifest = train(tiny_cfg("train.max_steps=2", "train.eval_every=2", "train.log_every=1"), out_dir=tmp_path,
                         target=target, data=data, collate=collate)
    run = mlflow.get_run(manifest.outputs["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["drafter.algorithm"] == "dspark" and run.data.params["train.max_anchors"] == "512"
    keys = set(run.data.metrics)
    for key in ("train/loss", "train/loss_ce", "train/loss_tv", "train/loss_bce", "train/accuracy_pos1",
                "train/accept_rate_pos4", "train/sim_tau", "holdout/sim_tau", "holdout/sim_tau_greedy",
                "holdout/accuracy_pos2", "lr", "tokens_per_s", "grad_norm"):
        assert key in keys, key
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "lr")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "train")}
    assert "train/manifest.json" in artifacts


@pytest.mark.integration
def test_two_processes_match_one(target, data, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, what `accelerate launch` does on GPUs) gives
    the losses of one process with the same global batch."""
    sets = ["train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=10"]
    train(tiny_cfg(*sets), out_dir=tmp_path / "single", target=target, data=data, collate=collate)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "ddp"), str(SHARPNESS), *sets]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ddp")
    assert manifest.counts["processes"] == 2
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


@pytest.mark.integration
def test_real_smollm2_target_trains_exports_and_drafts(smollm2_target, tmp_path):
    """The real SmolLM2-135M target: its own answers to two prompts, captured, a few DSpark
    steps at the real width and vocabulary, export, load, and drafting on real features."""
    from tests.tiny_data import MemoryDataset

    target = smollm2_target
    tok = target.tokenizer
    prompts = [json.loads(line)["turns"][0][:200] for line in (ROOT / "drafter/data/eval_datasets/gsm8k.jsonl").open()][:3]
    samples = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = target.model.generate(ids, max_new_tokens=20, do_sample=False)
        feats = target.capture(full)
        mask = torch.zeros(full.shape[1], dtype=torch.bool)
        mask[ids.shape[1]:] = True
        samples.append({"input_ids": full[0], "loss_mask": mask, "features": feats.layers[0], "final_hidden": feats.final[0]})
    meta = {"layer_ids": target.layer_ids}
    data = MemoryDataset(samples[:2], meta), MemoryDataset(samples[2:], meta)
    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml", [
        "train.max_steps=2", "train.batch_size=2", "train.max_anchors=8", "train.eval_every=2",
        "train.system_metrics=false"])
    manifest = train(cfg, out_dir=tmp_path, target=target, data=data, collate=collate)
    assert manifest.counts["steps"] == 2 and manifest.counts["sequences_with_targets"] == 4
    from drafter.runtime import resolve_dtype

    assert manifest.params["mixed_precision"] == ("bf16" if resolve_dtype("auto", work="batch") == torch.bfloat16 else "no")  # runtime.dtype auto
    assert manifest.params["vocabulary"]["coverage"] == 1.0  # every answer token is in the 8k draft vocabulary
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in json.loads((tmp_path / "metrics.json").read_text())["history"])
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["aux_hidden_state_layer_ids"] == [2, 8, 15, 21, 28]  # layers [1, 7, 14, 20, 27]
    assert config["transformer_layer_config"]["hidden_size"] == 576 and config["draft_vocab_size"] == 8192  # the default config's
    assert config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    model = load_drafter(tmp_path / "best", TargetHeads.from_target(target))
    state = model.init_state()
    s = samples[2]
    model.extend(state, s["features"][None, :-5], s["input_ids"][None, :-5])
    prop = model.propose(state, s["input_ids"][-5:-4], 7, 0.0)
    assert prop.tokens.shape == (1, 7) and prop.confidences.shape == (1, 7)
    assert prop.probs is None  # greedy: verification compares tokens only


def test_cli_trains_from_the_cache_api(tmp_path, monkeypatch):
    """`drafter train --cache DIR --out DIR` through drafter.cache's reader API
    (open_split + collate), stood in here by an in-memory module."""
    import types

    import drafter
    from typer.testing import CliRunner

    from drafter.cli import app
    from drafter.target import load_target

    cfg_path = ROOT / "configs" / "tiny.yaml"
    target = load_target(load_config(cfg_path))
    splits = {"train": make_dataset(target, 6, answer_len=12, seed=1), "holdout": make_dataset(target, 2, seed=2)}
    opened = []

    def open_split(cache_dir, split, expect_fingerprint=None):
        assert expect_fingerprint == target.fingerprint  # the trainer checks the cache's target
        opened.append((str(cache_dir), split))
        return splits[split]

    fake = types.ModuleType("drafter.cache")
    fake.open_split, fake.collate = open_split, collate
    monkeypatch.setitem(sys.modules, "drafter.cache", fake)
    monkeypatch.setattr(drafter, "cache", fake, raising=False)
    result = CliRunner().invoke(app, ["train", "-c", str(cfg_path), "--cache", str(tmp_path / "cache"),
                                      "--out", str(tmp_path / "out"), "-s", "train.max_steps=2", "--json"])
    assert result.exit_code == 0, result.output
    assert opened == [(str(tmp_path / "cache"), "train"), (str(tmp_path / "cache"), "holdout")]
    summary = json.loads(result.stdout)  # (the progress bar goes to stderr)
    assert summary["steps"] == 2 and summary["algorithm"] == "dspark"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["cache"] == str(tmp_path / "cache")


def test_stop_at_and_export_steps(target, data, tmp_path):
    """stop_at ends a run at a checkpoint and the next call continues it exactly; export steps
    leave loadable drafters with their step, held-out estimate and CPU time."""
    cfg = tiny_cfg("train.max_steps=6", "train.eval_every=100", "train.checkpoint_every=100", "train.export_steps=[2,4]")
    whole = train(cfg, out_dir=tmp_path / "whole", target=target, data=data, collate=collate)
    first = train(cfg, out_dir=tmp_path / "split", target=target, data=data, collate=collate, stop_at=4)
    assert first.stopped_at == 4 and first.params == {"run_key": whole.params["run_key"]} and not first.outputs
    assert (tmp_path / "split" / "checkpoints" / "step-00000004").is_dir() and not (tmp_path / "split" / "last").exists()
    rest = train(cfg, out_dir=tmp_path / "split", target=target, data=data, collate=collate)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert rest.outputs["resumed_from"] == "step-00000004"
    heads = TargetHeads.from_target(target)
    for step in (2, 4):
        model = load_drafter(tmp_path / "split" / "steps" / f"step-{step:08d}", heads)
        assert model.meta["step"] == step and model.meta["train_cpu_s"] > 0 and model.meta["holdout_sim_tau"] >= 1
    assert rest.outputs["train_cpu_s"] >= model.meta["train_cpu_s"]


def test_init_from_continues_the_given_drafter(target, data, tmp_path):
    """A retrain from an exported drafter starts where it ended: its weights and its draft
    vocabulary (even when this run's data would pick another), recorded in the manifest."""
    first_cfg = tiny_cfg("train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=100",
                         "drafter.draft_vocab_size=64")
    first = train(first_cfg, out_dir=tmp_path / "first", target=target, data=data, collate=collate)
    start = tmp_path / "first" / "last"
    other_data = (data[0][: len(data[0]) // 2], data[1])  # other token counts: another draft vocabulary
    cfg = tiny_cfg("train.max_steps=2", "train.eval_every=100", "train.checkpoint_every=100",
                   "drafter.draft_vocab_size=64", f"train.init_from={start}")
    second = train(cfg, out_dir=tmp_path / "second", target=target, data=other_data, collate=collate)
    evals = json.loads((tmp_path / "second" / "metrics.json").read_text())["evals"]
    assert evals[0]["step"] == 0 and evals[0]["sim_tau"] == pytest.approx(first.outputs["final_holdout"]["sim_tau"])
    heads = TargetHeads.from_target(target)
    assert torch.equal(load_drafter(tmp_path / "second" / "last", heads).d2t, load_drafter(start, heads).d2t)
    init = second.params["init_from"]
    assert init["step"] == 20 and init["algorithm"] == "dspark" and len(init["weights_sha256"]) == 64
    # a random init from the same data drafts far worse at step 0
    cold = train(tiny_cfg("train.max_steps=2", "train.eval_every=100", "train.checkpoint_every=100",
                          "drafter.draft_vocab_size=64"), out_dir=tmp_path / "cold", target=target, data=other_data,
                 collate=collate)
    assert cold.params["run_key"] != second.params["run_key"]
    assert json.loads((tmp_path / "cold" / "metrics.json").read_text())["evals"][0]["sim_tau"] < evals[0]["sim_tau"]


@pytest.mark.parametrize("change, message", [("drafter.num_layers=2", "does not match"),
                                             ("drafter.algorithm=dflash", "is a dspark drafter")])
def test_init_from_a_drafter_of_another_shape_is_refused(target, data, tmp_path, change, message):
    from drafter.config import ConfigError

    train(tiny_cfg("train.max_steps=2", "train.eval_every=100"), out_dir=tmp_path / "a", target=target, data=data,
          collate=collate)
    with pytest.raises(ConfigError, match=message):
        train(tiny_cfg("train.max_steps=2", change, f"train.init_from={tmp_path / 'a' / 'last'}"),
              out_dir=tmp_path / "b", target=target, data=data, collate=collate)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        train(tiny_cfg(f"train.init_from={tmp_path}"), out_dir=tmp_path / "c", target=target, data=data,
              collate=collate)


def test_damaged_checkpoint_is_a_clear_error(target, data, tmp_path):
    from drafter.checkpoint import CheckpointError

    cfg = tiny_cfg("train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=100")
    train(cfg, out_dir=tmp_path, target=target, data=data, collate=collate, stop_at=2)
    weights = tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as a full disk would leave it
    with pytest.raises(CheckpointError, match="step-00000002.*cannot be read.*delete that folder"):
        train(cfg, out_dir=tmp_path, target=target, data=data, collate=collate)
