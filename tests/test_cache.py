"""Target cache: contents, precisions, reuse, resume after a kill, corruption, refusal."""

import json
import os
import shutil

import pytest
import torch

from drafter import cache as cache_mod
from drafter import chat
from drafter.cache import (
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    CacheReader,
    OnlineReader,
    ShardWriter,
    build_cache,
    bytes_per_token_plain,
    collate,
    open_split,
)
from drafter.config import TargetConfig, TinyTargetConfig
from drafter.manifest import read_manifest
from drafter.models.base import TrainBatch
from tests.regen_data import conversation, make_rows, write_regenerated

TRAIN = make_rows(10)
HOLDOUT = make_rows(3, start=100)


def config(tiny_config, tmp_path, **cache):
    cache = {"root": tmp_path / "caches", "batch_size": 3, "shard_samples": 4, **cache}
    return tiny_config.model_copy(update={"cache": tiny_config.cache.model_copy(update=cache)})


@pytest.fixture
def regenerated(tmp_path):
    return write_regenerated(tmp_path / "regenerated", {"train": TRAIN, "holdout": HOLDOUT})


@pytest.fixture(scope="module")
def built(tiny_config, tiny_target, tmp_path_factory):
    """One float32 cache shared by the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("built")
    regenerated = write_regenerated(tmp_path / "regenerated", {"train": TRAIN, "holdout": HOLDOUT})
    cfg = config(tiny_config, tmp_path, dtype="float32")
    manifest = build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    return cfg, manifest, tmp_path / "cache"


@pytest.fixture
def damageable(built, tmp_path):
    """A private copy of the train cache, to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(open_split(built[2], "train").path, copy)
    return copy


def test_samples_are_what_the_target_computes(built, tiny_target):
    cfg, manifest, out = built
    reader = open_split(out, "train", expect_fingerprint=tiny_target.fingerprint)
    assert len(reader) == 10 and reader.ids == [r["id"] for r in TRAIN]
    end = chat.end_of_turn_strings(tiny_target.tokenizer, tiny_target.eos_token_ids)
    for i, row in enumerate(TRAIN):
        sample = reader[i]
        enc = chat.encode(tiny_target.tokenizer, row["messages"], end)
        assert sample["input_ids"].tolist() == enc.input_ids
        assert sample["loss_mask"].tolist() == enc.loss_mask and sample["loss_mask"].any()
        ref = tiny_target.capture(torch.tensor([enc.input_ids]))
        assert sample["features"].dtype == torch.float32 and sample["final_hidden"].dtype == torch.float32
        torch.testing.assert_close(sample["features"], ref.layers[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sample["final_hidden"], ref.final[0], atol=1e-5, rtol=1e-4)
        # the target's top-k next-token distribution, stored so training never runs its LM head
        k = cfg.cache.target_top_k
        top = torch.softmax(tiny_target.logits_from_hidden(ref.final[0]).float(), -1).topk(k)
        assert sample["target_ids"].shape == (len(enc.input_ids), k)
        assert torch.equal(sample["target_ids"], top.indices)
        torch.testing.assert_close(sample["target_probs"], top.values, atol=1e-3, rtol=1e-3)  # float16 storage
    meta = reader.meta
    assert (meta["target_top_k"], meta["final_hidden"], meta["target_dtype"]) == (k, True, "float32")
    assert 0.0 < meta["top_k_tail_mass_mean"] < 1.0
    assert meta["target_fingerprint"] == tiny_target.fingerprint
    assert meta["template_hash"] == tiny_target.template_hash
    assert meta["layer_ids"] == tiny_target.layer_ids and meta["hidden_size"] == 64
    assert (meta["dtype"], meta["num_samples"]) == ("float32", 10)
    assert meta["num_tokens"] == sum(reader.lengths) == sum(len(reader[i]["input_ids"]) for i in range(10))
    # 3 shards of <= 4 conversations, under the content-addressed root.
    assert len(reader.shards) == 3 and reader.path.parent == cfg.cache.root


def test_manifest_and_pointers(built, tiny_target):
    _, manifest, out = built
    for split, n in (("train", 10), ("holdout", 3)):
        c = manifest.counts[split]
        assert c["input"] == c["samples"] + c["skipped"] == n and not c["reused"]
        pointer = json.loads((out / f"{split}.json").read_text())
        assert pointer["num_samples"] == n and pointer["target_fingerprint"] == tiny_target.fingerprint
    assert json.loads((out / "train.json").read_text())["key"] != json.loads((out / "holdout.json").read_text())["key"]
    size = manifest.size["train"]
    plain = bytes_per_token_plain(64, len(tiny_target.layer_ids))
    assert size["plain_bytes_per_token"] == plain
    # fp32: 4 + 1 bytes of id and mask, 4 bytes per hidden value, 6 per top-k entry, plus small headers.
    expected = 5 + 4 * 64 * (len(tiny_target.layer_ids) + 1) + 6 * built[0].cache.target_top_k
    assert expected <= size["bytes_per_token"] < expected * 1.1
    assert size["tokens_per_s"] > 0
    assert (out / "config.yaml").is_file() and read_manifest(out).stage == "build_cache"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_storage_precisions(built, tiny_config, tiny_target, regenerated, tmp_path, dtype):
    ref = open_split(built[2], "train")
    reader = open_split(*_build(tiny_config, tiny_target, regenerated, tmp_path / dtype, dtype))
    assert reader.meta["dtype"] == dtype
    for i in (0, 5, 9):
        got, want = reader[i], ref[i]
        assert got["features"].dtype == torch.float32
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["loss_mask"], want["loss_mask"])
        for key in ("features", "final_hidden"):
            err = (got[key] - want[key]).abs().max() / want[key].abs().max()
            assert err < (0.01 if dtype == "int8" else 0.005), (key, float(err))
    plain = reader.meta["plain_bytes_per_token"]
    ratio = reader.meta["bytes_per_token"] / plain
    if dtype == "int8":  # features: 1 byte a value + a 4-byte scale per token and layer; final: bf16; top-k
        n = len(reader.meta["layer_ids"])
        expected = 5 + n * (64 + 4) + 2 * 64 + 6 * reader.meta["target_top_k"]
        top_k_bytes = 6 * reader.meta["target_top_k"]  # stored on top of the plain layout
        assert expected <= reader.meta["bytes_per_token"] < expected * 1.1
        assert (reader.meta["bytes_per_token"] - top_k_bytes) / plain < 0.7
        assert torch.equal(reader[0]["final_hidden"], reader[0]["final_hidden"].bfloat16().float())
    else:
        assert 0.99 < ratio < 1.1


def _build(tiny_config, target, regenerated, where, dtype):
    cfg = config(tiny_config, where, dtype=dtype)
    build_cache(cfg, regenerated, where / "cache", target=target)
    return where / "cache", "train"


def test_top_k_only_cache_drops_the_final_hidden_state(tiny_config, tiny_target, regenerated, tmp_path):
    """The default layout: features + top-k p_t, no final hidden state; smaller, and collated."""
    cfg = config(tiny_config, tmp_path, dtype="bfloat16", target_top_k=4, final_hidden=False)
    build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    reader = open_split(tmp_path / "cache", "train")
    sample = reader[0]
    assert "final_hidden" not in sample and sample["target_ids"].shape[1] == 4
    batch = collate([reader[0], reader[1]])
    assert batch.final_hidden is None and batch.target_probs.shape[:2] == batch.input_ids.shape
    # 4 ids (int32) + 4 probabilities (float16) a token instead of H bf16 values
    h = tiny_target.hidden_size
    n = len(tiny_target.layer_ids)
    assert reader.meta["bytes_per_token"] < 6 + 2 * h * n + 4 * 6 + 64  # safetensors headers aside


def test_same_key_reuses_the_cache(built, tiny_target, tmp_path, monkeypatch):
    cfg, _, out = built
    regenerated = out.parent / "regenerated"
    reader = open_split(out, "train")
    mtimes = {p: p.stat().st_mtime_ns for p in (reader.path / "shards").iterdir()}
    monkeypatch.setattr(ShardWriter, "write", lambda *a: pytest.fail("rebuilt a cached shard"))
    manifest = build_cache(cfg, regenerated, tmp_path / "cache2", target=tiny_target)
    assert manifest.counts["train"]["reused"] and manifest.counts["holdout"]["reused"]
    assert open_split(tmp_path / "cache2", "train").path == reader.path
    assert {p: p.stat().st_mtime_ns for p in (reader.path / "shards").iterdir()} == mtimes


def test_key_covers_what_changes_the_features(tiny_target, tiny_target_any):
    base = cache_mod.cache_key(tiny_target, "d1", "bfloat16", 256)
    assert cache_mod.cache_key(tiny_target, "d1", "bfloat16", 256) == base
    others = {
        cache_mod.cache_key(tiny_target, "d2", "bfloat16", 256),
        cache_mod.cache_key(tiny_target, "d1", "int8", 256),
        cache_mod.cache_key(tiny_target, "d1", "bfloat16", 512),
    }
    if tiny_target_any.fingerprint != tiny_target.fingerprint:
        others.add(cache_mod.cache_key(tiny_target_any, "d1", "bfloat16", 256))
    assert base not in others and len(others) >= 3
    from drafter.target import load_target

    other_layers = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(), layer_ids=[1, 4]))
    assert cache_mod.cache_key(other_layers, "d1", "bfloat16", 256) != base


def test_appended_data_builds_only_its_new_chunks(tiny_config, tiny_target, tmp_path, monkeypatch):
    """Yesterday's conversations plus today's: the chunks they share are linked, not recomputed,
    and the cache equals one built from scratch; a damaged stored chunk is built again."""
    more = TRAIN + make_rows(5, start=200)  # chunks of 4: 0 and 1 unchanged, 2 grows, 3 is new
    cfg = config(tiny_config, tmp_path, dtype="float32")
    build_cache(cfg, write_regenerated(tmp_path / "day1", {"train": TRAIN}), tmp_path / "c1", target=tiny_target)
    written, original_write = [], ShardWriter.write
    monkeypatch.setattr(ShardWriter, "write", lambda self, folder, c, *a: written.append(c) or original_write(self, folder, c, *a))
    build_cache(cfg, write_regenerated(tmp_path / "day2", {"train": more}), tmp_path / "c2", target=tiny_target)
    assert written == [2, 3]
    grown = open_split(tmp_path / "c2", "train")
    fresh_cfg = config(tiny_config, tmp_path / "elsewhere", dtype="float32")  # another root: no stored chunks
    build_cache(fresh_cfg, write_regenerated(tmp_path / "day2b", {"train": more}), tmp_path / "c3", target=tiny_target)
    fresh = open_split(tmp_path / "c3", "train")
    assert grown.meta["key"] == fresh.meta["key"] and grown.ids == fresh.ids == [r["id"] for r in more]
    for i in range(len(fresh)):
        assert all(torch.equal(grown[i][k], fresh[i][k]) for k in fresh[i])
    # A stored chunk whose bytes changed is not linked: the chunk is computed again.
    shutil.rmtree(tmp_path / "caches" / grown.meta["key"])
    stored = sorted((tmp_path / "caches" / "chunks").glob("*.safetensors"))
    assert len(stored) == 3 + 2  # day 1's three chunks, day 2's two new ones
    for path in stored:  # break the links before damaging one copy
        data = bytearray(path.read_bytes())
        path.unlink()
        path.write_bytes(data)
    damaged = stored[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(data)
    written.clear()
    build_cache(cfg, write_regenerated(tmp_path / "day2c", {"train": more}), tmp_path / "c4", target=tiny_target)
    assert len(written) == 1  # only the damaged one
    assert all(torch.equal(open_split(tmp_path / "c4", "train")[i][k], fresh[i][k]) for i in range(len(fresh)) for k in fresh[i])


@pytest.mark.parametrize("kill_at", ["capture", "before_sidecar", "before_index"])
def test_killed_build_resumes_exactly(built, tiny_config, tiny_target, tmp_path, monkeypatch, kill_at):
    """Kill at several points; the resumed cache equals an uninterrupted one, sample for sample."""
    regenerated = write_regenerated(tmp_path / "regenerated", {"train": TRAIN})
    cfg = config(tiny_config, tmp_path, dtype="float32")
    shards_written, killed = [], []
    original_write, original_json, original_publish = ShardWriter.write, cache_mod.atomic_write_json, cache_mod._publish

    def write(self, folder, chunk, records, encode):
        if kill_at == "capture" and chunk == 1 and not killed:
            killed.append(chunk)
            raise KeyboardInterrupt
        shards_written.append(chunk)
        return original_write(self, folder, chunk, records, encode)

    def sidecar(path, obj):
        if kill_at == "before_sidecar" and path.name == "shard-000002.json":
            raise KeyboardInterrupt  # the shard is on disk, its sidecar is not
        return original_json(path, obj)

    def publish(*args):
        if kill_at == "before_index":
            raise KeyboardInterrupt
        return original_publish(*args)

    monkeypatch.setattr(ShardWriter, "write", write)
    monkeypatch.setattr(cache_mod, "atomic_write_json", sidecar)
    monkeypatch.setattr(cache_mod, "_publish", publish)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    partial = next(cfg.cache.root.glob("*.partial"))
    assert not (partial.with_suffix("")).exists()  # nothing published half-done
    (partial / "shards" / ".shard-000001.safetensors.999.tmp").write_bytes(b"half a shard")
    monkeypatch.setattr(cache_mod, "_publish", original_publish)
    monkeypatch.setattr(cache_mod, "atomic_write_json", original_json)
    first_run = list(shards_written)
    build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    redone = shards_written[len(first_run):]
    finished_before = {"capture": [0], "before_sidecar": [0, 1], "before_index": [0, 1, 2]}[kill_at]
    assert not set(redone) & set(finished_before)  # finished shards are not redone
    assert sorted(finished_before + redone) == [0, 1, 2]
    resumed = open_split(tmp_path / "cache", "train")
    assert not list((resumed.path / "shards").glob(".*.tmp"))
    clean = open_split(built[2], "train")  # the same data and settings, built in one go
    assert resumed.meta["key"] == clean.meta["key"]
    assert resumed.ids == clean.ids == [r["id"] for r in TRAIN]
    for i in range(len(clean)):
        a, b = resumed[i], clean[i]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_shard_is_named(damageable):
    path = damageable / "shards" / "shard-000001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheCorruptError, match="shard-000001.safetensors is truncated"):
        CacheReader(damageable)


def test_altered_shard_fails_its_checksum(damageable):
    path = damageable / "shards" / "shard-000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte of hidden state flipped
    path.write_bytes(bytes(data))
    reader = CacheReader(damageable)
    assert reader[0]["input_ids"].numel()  # other shards still read
    with pytest.raises(CacheCorruptError, match="shard-000002.safetensors fails its checksum"):
        reader[9]
    with pytest.raises(CacheCorruptError, match="shard-000002"):
        CacheReader(damageable).verify_all()
    assert CacheReader(damageable, verify=False)[9]["input_ids"].numel()


def test_a_damaged_cache_is_rebuilt_not_reused(tiny_config, tiny_target, regenerated, tmp_path):
    cfg = config(tiny_config, tmp_path)
    build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    path = open_split(tmp_path / "cache", "train").path / "shards" / "shard-000000.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    manifest = build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    assert not manifest.counts["train"]["reused"] and manifest.counts["holdout"]["reused"]
    open_split(tmp_path / "cache", "train").verify_all()  # whole again
    assert len(list(cfg.cache.root.glob("*.damaged-*"))) == 1  # the damaged copy is kept aside, not deleted


def test_missing_shard_is_named(damageable):
    (damageable / "shards" / "shard-000000.safetensors").unlink()
    with pytest.raises(CacheCorruptError, match="shard-000000.safetensors is missing"):
        CacheReader(damageable)


def test_cache_for_another_target_is_refused(built, tiny_target_any, tiny_target):
    _, _, out = built
    if tiny_target_any.fingerprint == tiny_target.fingerprint:
        open_split(out, "train", expect_fingerprint=tiny_target_any.fingerprint)
        return
    with pytest.raises(CacheMismatchError, match="rebuild the cache"):
        open_split(out, "train", expect_fingerprint=tiny_target_any.fingerprint)


def test_missing_pointer_and_non_cache_are_clear(tmp_path):
    with pytest.raises(CacheError, match="run `drafter build-cache`"):
        open_split(tmp_path, "train")
    with pytest.raises(CacheError, match="not a target cache"):
        CacheReader(tmp_path)


def test_truncation_and_unmaskable_samples_are_counted(tiny_config, tiny_target, tmp_path):
    long_prompt = {**conversation(1), "id": "long-prompt",
                   "messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    long_answer = {**conversation(2), "id": "long-answer",
                   "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 400}]}
    no_answer = {**conversation(3), "id": "no-answer", "messages": [{"role": "user", "content": "hi"}]}
    regenerated = write_regenerated(tmp_path / "r", {"train": [conversation(0), long_prompt, long_answer, no_answer]})
    cfg = config(tiny_config, tmp_path, max_seq_len=64)
    manifest = build_cache(cfg, regenerated, tmp_path / "cache", target=tiny_target)
    c = manifest.counts["train"]
    assert (c["input"], c["samples"], c["skipped"], c["truncated"]) == (4, 2, 2, 1)
    assert c["skipped_by_reason"] == {"no assistant token within max_seq_len": 2}
    reader = open_split(tmp_path / "cache", "train")
    assert reader.ids == ["conv-0000", "long-answer"] and max(reader.lengths) == 64


def test_cut_off_answers_leave_their_end_token_unmasked(tiny_target):
    end = chat.end_of_turn_strings(tiny_target.tokenizer, tiny_target.eos_token_ids)
    record = {**conversation(0), "regen": {"finish_reasons": ["length"]}}
    cut = cache_mod.encode_record(tiny_target.tokenizer, record, end, 256)
    whole = cache_mod.encode_record(tiny_target.tokenizer, conversation(0), end, 256)
    assert cut.input_ids == whole.input_ids
    assert sum(whole.loss_mask) == sum(cut.loss_mask) + 1
    last = max(i for i, m in enumerate(whole.loss_mask) if m)
    assert tiny_target.tokenizer.convert_ids_to_tokens(whole.input_ids[last]) == "<|im_end|>"
    assert not cut.loss_mask[last]


def test_nothing_to_learn_fails_loudly(tiny_config, tiny_target, tmp_path):
    rows = [{**conversation(i), "messages": [{"role": "user", "content": "word " * 100},
                                             {"role": "assistant", "content": "yes"}]} for i in range(3)]
    regenerated = write_regenerated(tmp_path / "r", {"train": rows})
    with pytest.raises(chat.LossMaskError, match="none of 3 conversations"):
        build_cache(config(tiny_config, tmp_path, max_seq_len=32), regenerated, tmp_path / "c", target=tiny_target)


def test_a_template_that_loses_the_answers_stops_the_build(tiny_config, tiny_target, regenerated, tmp_path,
                                                            monkeypatch):
    from tests.test_cache_chat import DROPS_ASSISTANT

    monkeypatch.setattr(tiny_target.tokenizer, "chat_template", DROPS_ASSISTANT)
    with pytest.raises(chat.LossMaskError):
        build_cache(config(tiny_config, tmp_path), regenerated, tmp_path / "cache", target=tiny_target)


def test_collate_pads_right(built):
    _, _, out = built
    reader = open_split(out, "train")
    samples = [reader[0], reader[1], reader[2]]
    batch = collate(samples)
    assert isinstance(batch, TrainBatch)
    width = max(reader.lengths[:3])
    n = len(reader.meta["layer_ids"])
    assert batch.features.shape == (3, width, n, 64) and batch.final_hidden.shape == (3, width, 64)
    for i, s in enumerate(samples):
        t = len(s["input_ids"])
        assert batch.attention_mask[i, :t].all() and not batch.attention_mask[i, t:].any()
        assert not batch.loss_mask[i, t:].any()
        assert torch.equal(batch.features[i, :t], s["features"])
        assert torch.equal(batch.input_ids[i, :t], s["input_ids"])


def test_online_reader_matches_the_cache(built, tiny_target):
    _, _, out = built
    reader = open_split(out, "train")
    online = OnlineReader(tiny_target, TRAIN, max_seq_len=256)
    assert len(online) == len(reader) and online.meta["layer_ids"] == reader.meta["layer_ids"]
    for i in (0, 4):
        a, b = online[i], reader[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        torch.testing.assert_close(a["features"], b["features"], atol=1e-5, rtol=1e-4)


def test_reader_in_a_dataloader_with_workers(built):
    _, _, out = built
    reader = open_split(out, "train")
    loader = torch.utils.data.DataLoader(reader, batch_size=4, shuffle=True, collate_fn=collate, num_workers=2)
    seen = sum(int(b.attention_mask.sum()) for b in loader)
    assert seen == reader.meta["num_tokens"]


def test_fp16_overflow_is_refused(tiny_target, tmp_path, monkeypatch):
    writer = ShardWriter(tiny_target, "float16", 2)
    with pytest.raises(CacheError, match="overflows float16"):
        writer._store("features", torch.full((2, 3, 4), 1e6), {}, "shard-000000")


def test_missing_input_is_clear(tiny_config, tiny_target, tmp_path):
    with pytest.raises(CacheError, match="run regenerate first"):
        build_cache(config(tiny_config, tmp_path), tmp_path / "none", tmp_path / "cache", target=tiny_target)
    assert not os.path.exists(tmp_path / "cache" / "manifest.json")
