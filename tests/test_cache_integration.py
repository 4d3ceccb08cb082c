"""The cache with real components: two ranks under `accelerate launch`, the real SmolLM2 target."""

import socket
import subprocess
import sys

import pytest
import torch

from drafter import chat
from drafter.cache import CacheMismatchError, build_cache, open_split
from drafter.manifest import read_manifest
from tests.conftest import ROOT
from tests.regen_data import make_rows, write_regenerated

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_splits_the_work_across_ranks(tiny_config, tiny_target, tmp_path):
    regenerated = write_regenerated(tmp_path / "regenerated", {"train": make_rows(9), "holdout": make_rows(2, 50)})
    sets = ["cache.dtype=float32", "cache.shard_samples=2"]
    # --multi_gpu launches one process per rank through torchrun; on a CPU-only machine the
    # ranks talk over gloo, on GPUs each rank takes its own device.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "drafter", "build-cache",
           "-c", str(ROOT / "configs" / "tiny.yaml"), "--in", str(regenerated), "--out", str(tmp_path / "cache"),
           "-s", f"cache.root={tmp_path / 'root'}"] + [a for s in sets for a in ("-s", s)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    launched = open_split(tmp_path / "cache", "train", expect_fingerprint=tiny_target.fingerprint)
    assert {shard["rank"] for shard in launched.shards} == {0, 1}  # both ranks wrote shards
    assert launched.meta["ranks"] == 2
    manifest = read_manifest(tmp_path / "cache")
    assert manifest.params["world_size"] == 2 and manifest.counts["train"]["samples"] == 9

    from drafter.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets + [f"cache.root={tmp_path / 'single'}"])
    build_cache(cfg, regenerated, tmp_path / "single-cache", target=tiny_target)
    single = open_split(tmp_path / "single-cache", "train")
    assert launched.meta["key"] == single.meta["key"]  # the same content address
    assert launched.ids == single.ids == [r["id"] for r in make_rows(9)]
    for i in range(len(single)):
        a, b = launched[i], single[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        torch.testing.assert_close(a["features"], b["features"], atol=1e-5, rtol=1e-4)


def test_smollm2_cache(smollm2_target, tmp_path):
    from drafter.config import load_config

    answers = ["The capital of France is Paris.", "def reverse(s):\n    return s[::-1]"]
    rows = make_rows(2)
    rows[0]["messages"] = [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": answers[0]}]
    rows[1]["messages"] = [{"role": "system", "content": "You write Python."},
                           {"role": "user", "content": "Reverse a string."},
                           {"role": "assistant", "content": answers[1]}]
    regenerated = write_regenerated(tmp_path / "regenerated", {"train": rows, "holdout": rows[:1]})
    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml", [f"cache.root={tmp_path / 'root'}"])
    manifest = build_cache(cfg, regenerated, tmp_path / "cache", target=smollm2_target)

    reader = open_split(tmp_path / "cache", "train", expect_fingerprint=smollm2_target.fingerprint)
    meta = reader.meta
    assert (meta["dtype"], meta["hidden_size"], meta["layer_ids"]) == ("bfloat16", 576, [1, 7, 14, 20, 27])
    assert meta["plain_bytes_per_token"] == 6 + 2 * 576 * 6
    # the default layout: bf16 features + the top-64 p_t (int32 ids + float16 probabilities), no final hidden
    assert (meta["target_top_k"], meta["final_hidden"], meta["target_dtype"]) == (64, False, "bfloat16")
    expected = 6 + 2 * 576 * 5 + 64 * 6
    assert 0.99 < manifest.size["train"]["bytes_per_token"] / expected < 1.05
    assert manifest.size["train"]["size_vs_plain"] < 0.9
    tok = smollm2_target.tokenizer
    for i, answer in enumerate(answers):
        sample = reader[i]
        masked = tok.decode(sample["input_ids"][sample["loss_mask"]])
        assert masked == answer + "<|im_end|>"  # the answer and its end-of-turn token, nothing else
        ref = smollm2_target.capture(sample["input_ids"].unsqueeze(0))
        scale = ref.layers[0].abs().amax(dim=-1, keepdim=True)
        # bf16 storage, and a bf16 forward: a row padded in the cache's batch differs from this lone
        # forward by rounding compounded over 28 layers (measured: at most 0.024 of the row's max when
        # both run the bf16 kernel, 0.043 where the batch's products run in float32 and this lone
        # forward's few rows in bf16, `runtime.wide_float32`); a wrong layer or position would be
        # off by the order of the scale.
        assert ((sample["features"] - ref.layers[0]).abs() <= scale / 16).all()
        p = torch.softmax(smollm2_target.logits_from_hidden(ref.final[0]).float(), -1).topk(64)
        assert (sample["target_ids"][:, 0] == p.indices[:, 0]).float().mean() > 0.95  # the target's argmax
        # (the same rounding: at most 0.041 apart where the batch ran float32 products, measured)
        torch.testing.assert_close(sample["target_probs"], p.values, atol=0.06, rtol=0.05)
    # The default system prompt SmolLM2's template injects is part of the ids, never of the mask.
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(reader[0]["input_ids"])
    with pytest.raises(CacheMismatchError):
        open_split(tmp_path / "cache", "train", expect_fingerprint="0" * 16)
    assert chat.end_of_turn_strings(tok, smollm2_target.eos_token_ids) == ["<|im_end|>"]
