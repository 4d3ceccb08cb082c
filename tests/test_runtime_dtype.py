"""runtime.dtype: bf16 where the hardware has it; lossless decoding and training in both dtypes."""

from __future__ import annotations

import json

import pytest
import torch

import drafter.runtime as runtime
from drafter.cache import cache_key
from drafter.config import TargetConfig, TinyTargetConfig, load_config
from drafter.decoding import SpecEngine
from drafter.evaluate import classify_divergence
from drafter.models import TargetHeads
from drafter.target import load_target
from drafter.train import train
from tests.conftest import ROOT
from tests.drafters import lively_target
from tests.test_decoding import ALPHA, QUESTIONS, chat, make_small_world, reference, sample_pvalue
from tests.test_decoding_models import drafter_for
from tests.tiny_data import collate, make_dataset, sharp_target


def test_auto_follows_the_hardware_and_the_work(monkeypatch):
    assert runtime.resolve_dtype("float32") == torch.float32
    assert runtime.resolve_dtype("bfloat16", work="batch") == torch.bfloat16
    timed = []
    monkeypatch.setattr(runtime, "bf16_matmul_faster", lambda: timed.append(1) or False)
    for flags, decode, batch in [({"amx_bf16", "avx512_bf16"}, torch.bfloat16, torch.bfloat16),
                                 ({"avx512_bf16"}, torch.bfloat16, torch.float32),  # the timed matmul lost
                                 ({"avx512f"}, torch.float32, torch.float32)]:
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert runtime.resolve_dtype("auto", "cpu") == runtime.resolve_dtype(None, "cpu") == decode, flags
        assert runtime.resolve_dtype("auto", "cpu", "batch") == batch, flags
    assert len(timed) == 1  # only AVX-512 BF16 without AMX is timed, and only for batches
    monkeypatch.setattr(runtime, "bf16_matmul_faster", lambda: True)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert runtime.resolve_dtype("auto", "cpu", "batch") == torch.bfloat16


@pytest.mark.parametrize("bf16_seconds, faster", [(0.85, True), (0.95, False), (1.2, False)])
def test_bf16_must_beat_float32_by_a_margin_on_the_timed_matmul(monkeypatch, bf16_seconds, faster):
    clock = [0.0]
    real_matmul = torch.matmul

    def timed_matmul(x, y):
        clock[0] += bf16_seconds if x.dtype == torch.bfloat16 else 1.0
        return real_matmul(x, y)

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(runtime.torch, "matmul", timed_matmul)
    assert runtime.bf16_matmul_faster.__wrapped__(rows=8, reps=2) is faster


def test_stages_load_the_target_for_their_work(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(runtime, "bf16_matmul_faster", lambda: False)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["runtime.dtype=auto"])
    assert load_target(cfg).dtype == torch.bfloat16  # decoding stages
    assert load_target(cfg, work="batch").dtype == torch.float32  # build-cache, train


def test_target_dtype_overrides_the_runtime():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["runtime.dtype=bfloat16"])
    assert load_target(cfg).dtype == torch.bfloat16
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["runtime.dtype=bfloat16", "target.dtype=float32"])
    assert load_target(cfg).dtype == torch.float32


def test_the_target_dtype_is_part_of_the_cache_key():
    fp32 = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig()))
    bf16 = load_target(TargetConfig(source="tiny", dtype="bfloat16", tiny=TinyTargetConfig()))
    bf16.weights_hash = fp32.weights_hash  # a real target's hash is its files': the same in both dtypes
    assert fp32.fingerprint == bf16.fingerprint
    assert cache_key(fp32, "d", "bfloat16", 64) != cache_key(bf16, "d", "bfloat16", 64)  # other hidden states


def bf16(target):
    target.model.to(torch.bfloat16)
    return target


@pytest.mark.parametrize("algorithm", ["eagle3", "dspark"])
def test_greedy_equality_in_bf16(algorithm):
    """Lossless relative to the target as it runs: a bf16 target's own greedy generate()."""
    lively = bf16(lively_target("llama"))
    prompts = [chat(lively, q) for q in QUESTIONS]
    refs = [reference(lively, p, 20) for p in prompts]
    drafter = drafter_for(lively, algorithm)  # fp32 drafter weights, bf16 target heads and features
    engine = SpecEngine(lively, drafter, gamma=3)
    assert [engine.generate(p, 20).tokens for p in prompts] == refs  # one request: exact
    # A padded batch runs other bf16 kernels than one row: it may only part at a float tie.
    batch = engine.generate_batch(prompts, 20)
    divergences = [classify_divergence(lively, p, r, g.tokens, 0.0) for p, r, g in zip(prompts, refs, batch)]
    assert all(d is None or d["tie"] for d in divergences), divergences


def test_sampling_preserves_a_bf16_target():
    target, drafter, joint = make_small_world(dtype=torch.bfloat16)
    pvalue, totals = sample_pvalue(target, drafter, joint)
    assert totals["tau"] > 1.2 and pvalue > ALPHA


def test_heads_accept_fp32_hidden_states_with_a_bf16_target():
    target = load_target(TargetConfig(source="tiny", dtype="bfloat16", tiny=TinyTargetConfig()))
    heads = TargetHeads.from_target(target)
    logits = heads.logits(torch.randn(3, target.hidden_size))  # crashed before: fp32 input, bf16 head
    assert logits.shape == (3, target.vocab_size) and logits.dtype == torch.bfloat16


def test_training_with_a_bf16_target_autocasts(tmp_path):
    """A bf16 target (its frozen heads) + runtime bf16: bf16 autocast, fp32 master weights, and it learns."""
    target = sharp_target(sharpness=60.0, dtype="bfloat16")
    data = make_dataset(target, 32, seed=1), make_dataset(target, 8, seed=2)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "runtime.dtype=bfloat16", "drafter.block_size=4", "train.batch_size=8", "train.lr=3e-3",
        "train.max_steps=24", "train.eval_every=12", "train.checkpoint_every=100", "train.system_metrics=false"])
    manifest = train(cfg, out_dir=tmp_path, target=target, data=data, collate=collate)
    assert manifest.params["mixed_precision"] == "bf16"
    evals = json.loads((tmp_path / "metrics.json").read_text())["evals"]
    assert evals[-1]["sim_tau_greedy"] > evals[0]["sim_tau_greedy"] + 0.1
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())


def test_build_cache_and_training_load_the_target_for_batch_work(monkeypatch, tmp_path):
    """Where `auto` would pick bf16 for decoding only, the cache build and training run in float32."""
    import drafter.target
    from drafter.cache import build_cache
    from drafter.train import _accelerator

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(runtime, "bf16_matmul_faster", lambda: False)
    asked = []

    class Loaded(Exception):
        pass

    def spy(config, work="decode"):
        asked.append(work)
        raise Loaded

    monkeypatch.setattr(drafter.target, "load_target", spy)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["runtime.dtype=auto"])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.jsonl").write_text("")
    with pytest.raises(Loaded):
        build_cache(cfg, tmp_path / "in", tmp_path / "cache")
    with pytest.raises(Loaded):
        train(cfg, tmp_path / "cache", tmp_path / "drafter")
    assert asked == ["batch", "batch"]
    assert _accelerator(cfg).mixed_precision == "no"  # no bf16 autocast either
