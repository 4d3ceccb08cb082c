"""The target cache: what training needs from the frozen target, computed once and shared.

Per conversation the cache stores the input ids, the assistant-token loss mask (from
the chat template, `drafter.chat`), the raw outputs of the feature layers (as
`Target.capture` returns them) and the target's next-token distribution p_t that the
losses train against: by default its top-k probabilities (`cache.target_top_k`, 64), so
training never runs the target's LM head; optionally the final hidden state (after the
last norm) for the dense p_t through the frozen LM head (`cache.final_hidden`).

Layout of one cache (a folder under the state dir's `cache/`, named by its key):
```
<key>/index.json                  meta (fingerprints, layer ids, dtype, counts, sizes) + shard list
<key>/shards/shard-000000.safetensors   the samples of one chunk of conversations, concatenated:
       input_ids [N] int32, loss_mask [N] bool, offsets [S+1] int64,
       features [N, n, H]      (bf16 | fp16 | fp32; or the compact int8 mode: features int8
       + features_scale [N, n] float32, one absmax scale per token and layer)
       target_ids [N, k] int32 + target_probs [N, k] float16   (cache.target_top_k = k > 0;
       the tail mass is 1 - sum(target_probs))
       final_hidden [N, H]     (cache.final_hidden; bf16 in int8 mode, because 8 bits
       visibly distort p_t through the LM head)
<key>/shards/shard-000000.json    sidecar: sha256, bytes, ids, lengths, skipped samples
```
- Content-addressed: the key hashes the target fingerprint (weights, tokenizer,
  template), the dtype the target computed in, the template switches, layer ids, the
  dataset hash, the storage dtype, what is stored (top-k, final hidden) and max_seq_len;
  the same request reuses the cache, so EAGLE-3, DFlash and DSpark share one.
- Resumable and atomic: conversation chunk c always lands in shard c; each shard is
  written under a temporary name and renamed, then its sidecar; a killed build redoes
  only the chunks without both. The folder is built as `<key>.partial/` and renamed to
  `<key>/` when the index is written, so a cache folder is always complete.
- Incremental: every finished shard is also linked under `chunks/<chunk key>` (the cache
  key with the chunk's index and records in place of the dataset hash). A dataset that
  grows by appending (today's traffic after yesterday's) rebuilds only its new chunks; the
  others are linked back from there after their checksum is verified.
- Scale-out: under `accelerate launch`, rank r builds the chunks c with c % world == r;
  rank 0 merges the sidecars into the index.
- Reading: `CacheReader` memory-maps shards (safetensors) and reads one sample's slices
  at a time; each shard's size is checked when the cache is opened and its SHA-256
  when this process first touches it, so a truncated or altered shard is an error that
  names the file. A cache for another target or tokenizer is refused.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from drafter import chat
from drafter.config import Config
from drafter.errors import DrafterError
from drafter.manifest import (
    Timer,
    atomic_write_json,
    check_accounting,
    link_or_copy,
    sha256_file,
    sha256_json,
    write_manifest,
)
from drafter.models.base import TrainBatch
from drafter.progress import StageProgress
from drafter.reports import Manifest
from drafter.runtime import DTYPES, dtype_name

log = logging.getLogger(__name__)

FORMAT = 1
SPLITS = ("train", "holdout")
_NO_ANSWER = "no assistant token within max_seq_len"
TOP_K_CHUNK = 512  # tokens per LM-head product when storing the target's top-k
_REBUILD = "rebuild it with `drafter build-cache`"


class CacheError(DrafterError, RuntimeError):
    """The cache cannot be built or opened."""


class CacheCorruptError(CacheError):
    """A shard is missing, truncated or altered; the message names it."""


class CacheMismatchError(CacheError):
    """The cache was made for another target, tokenizer or chat template."""


# ----- storage precision -----------------------------------------------------------
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit with one float32 scale per vector along the last dim (token x layer)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def bytes_per_token_plain(hidden_size: int, num_layers: int) -> int:
    """DeepSpec's plain bf16 layout: id, attention and loss mask (6 bytes) + n+1 hidden states."""
    return 6 + 2 * hidden_size * (num_layers + 1)


# ----- encoding conversations ---------------------------------------------------------
@dataclass
class Encoded:
    id: str
    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool


def encode_record(
    tokenizer: Any, record: dict, end_strings: list[str], max_seq_len: int, enable_thinking: bool = False
) -> Encoded | str:
    """Ids and loss mask of a regenerated conversation, or the reason it cannot be used.

    A `LossMaskError` (template mismatch) is not caught: it fails the whole build.
    """
    messages = [{"role": m["role"], "content": m.get("content") or ""} for m in record["messages"]]
    finish = (record.get("regen") or {}).get("finish_reasons") or []
    unfinished = {k for k, reason in enumerate(finish) if reason == "length"}  # cut off: no end token
    try:
        enc = chat.encode(tokenizer, messages, end_strings, enable_thinking, unfinished)
    except chat.ChatTemplateError as exc:
        return f"chat template: {exc}"
    ids, mask = enc.input_ids[:max_seq_len], enc.loss_mask[:max_seq_len]
    if not any(mask):
        return _NO_ANSWER
    return Encoded(str(record["id"]), ids, mask, len(enc.input_ids) > max_seq_len)


# ----- the key and the folders ----------------------------------------------------------
def cache_key(target, dataset_hash: str, dtype: str, max_seq_len: int, enable_thinking: bool = False,
              target_top_k: int = 0, final_hidden: bool = True) -> str:
    return sha256_json({
        "format": FORMAT,
        "target": target.fingerprint,
        "template": target.template_hash,
        "template_kwargs": chat.template_kwargs(target.tokenizer, enable_thinking),
        "layer_ids": list(target.layer_ids),
        "target_dtype": dtype_name(target.dtype),  # the dtype the target computed the states in
        "dataset": dataset_hash,
        "dtype": dtype,
        "max_seq_len": max_seq_len,
        "stored": {"target_top_k": target_top_k, "final_hidden": final_hidden},
    })[:20]


def cache_root(cfg: Config) -> Path:
    from drafter.state import state_paths

    return Path(cfg.cache.root).resolve() if cfg.cache.root else state_paths().caches


def _shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}"


class ChunkStore:
    """Finished shards by chunk key (`<root>/chunks/`), so that another cache holding the same
    chunk of conversations at the same index links it instead of running the target again."""

    def __init__(self, root: Path, key_of) -> None:
        self.folder = root / "chunks"
        self.key_of = key_of  # (chunk index, its records) -> chunk key

    def keep(self, shards: Path, chunk: int, records: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name, key = _shard_name(chunk), self.key_of(chunk, records)
        link_or_copy(shards / f"{name}.safetensors", self.folder / f"{key}.safetensors")
        link_or_copy(shards / f"{name}.json", self.folder / f"{key}.json")  # last: it marks the entry whole

    def restore(self, shards: Path, chunk: int, records: list[dict]) -> bool:
        """Link a stored shard for this chunk into `shards`; False when none is stored intact."""
        key = self.key_of(chunk, records)
        info = _done_sidecar(self.folder, key)
        if info is None or sha256_file(self.folder / f"{key}.safetensors") != info["sha256"]:
            return False
        name = _shard_name(chunk)
        link_or_copy(self.folder / f"{key}.safetensors", shards / f"{name}.safetensors")
        link_or_copy(self.folder / f"{key}.json", shards / f"{name}.json")
        return True


# ----- writing one shard -------------------------------------------------------------------
class ShardWriter:
    """Turns one chunk of conversations into one shard (+ sidecar), atomically."""

    def __init__(self, target, dtype: str, batch_size: int, rank: int = 0, target_top_k: int = 0,
                 final_hidden: bool = True) -> None:
        self.target = target
        self.dtype = dtype
        self.batch_size = batch_size
        self.rank = rank
        self.top_k = target_top_k
        self.keep_final = final_hidden

    @torch.no_grad()
    def _top_k(self, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's top-k next-token probabilities (temperature 1) from final hidden states
        [n, H], through its LM head in chunks (an n x V logit matrix at once would be GBs)."""
        ids, probs = [], []
        for part in final.split(TOP_K_CHUNK):
            p = torch.softmax(self.target.logits_from_hidden(part.to(self.target.device, self.target.dtype)).float(), -1)
            top = torch.topk(p, self.top_k, dim=-1)
            ids.append(top.indices.to(torch.int32).cpu())
            probs.append(top.values.to(torch.float16).cpu())
        return torch.cat(ids), torch.cat(probs)

    def _capture(self, samples: list[Encoded]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Features of each sample, batched by similar length with right padding."""
        out: list[Any] = [None] * len(samples)
        order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(samples[batch[0]].input_ids)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(samples[i].input_ids)
                ids[row, :n] = torch.tensor(samples[i].input_ids)
                attn[row, :n] = 1
            feats = self.target.capture(ids, attention_mask=attn)
            for row, i in enumerate(batch):
                n = len(samples[i].input_ids)
                out[i] = (feats.layers[row, :n].float().cpu(), feats.final[row, :n].float().cpu())
        return out

    def _store(self, name: str, x: torch.Tensor, tensors: dict[str, torch.Tensor], where: str) -> None:
        if self.dtype == "int8" and name == "features":
            tensors["features"], tensors["features_scale"] = quantize_int8(x)
            return
        stored = x.to(DTYPES["bfloat16" if self.dtype == "int8" else self.dtype])
        if not torch.isfinite(stored).all():
            raise CacheError(f"{where}: {name} overflows {self.dtype}; use cache.dtype=bfloat16 or float32")
        tensors[name] = stored.contiguous()

    def write(self, folder: Path, chunk: int, records: list[dict], encode) -> dict:
        start = time.perf_counter()
        name = _shard_name(chunk)
        samples, skipped = [], []
        for record in records:
            enc = encode(record)
            if isinstance(enc, str):
                skipped.append({"id": str(record["id"]), "reason": enc})
            else:
                samples.append(enc)
        captured = self._capture(samples)
        lengths = [len(s.input_ids) for s in samples]
        tensors: dict[str, torch.Tensor] = {
            "input_ids": torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.int32),
            "loss_mask": torch.tensor([m for s in samples for m in s.loss_mask], dtype=torch.bool),
            "offsets": torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.long),
        }
        n, hidden = len(self.target.layer_ids), self.target.hidden_size
        layers = torch.cat([c[0] for c in captured]) if captured else torch.zeros(0, n, hidden)
        final = torch.cat([c[1] for c in captured]) if captured else torch.zeros(0, hidden)
        self._store("features", layers, tensors, name)
        if self.keep_final:
            self._store("final_hidden", final, tensors, name)
        tail = 0.0
        if self.top_k:
            tensors["target_ids"], tensors["target_probs"] = self._top_k(final)
            tail = float((1.0 - tensors["target_probs"].float().sum(-1)).clamp_min(0).sum())
        path = folder / f"{name}.safetensors"
        _atomic_save(tensors, path, {"format": str(FORMAT), "chunk": str(chunk)})
        sidecar = {
            "chunk": chunk,
            "rank": self.rank,
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "samples": len(samples),
            "tokens": sum(lengths),
            "loss_tokens": sum(sum(s.loss_mask) for s in samples),
            "truncated": sum(s.truncated for s in samples),
            "top_k_tail_mass": tail,  # summed over tokens: p_t's mass outside the stored top-k
            "ids": [s.id for s in samples],
            "lengths": lengths,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - start, 4),
        }
        atomic_write_json(folder / f"{name}.json", sidecar)  # after the shard: it marks the chunk done
        return sidecar


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _done_sidecar(folder: Path, chunk: int | str) -> dict | None:
    """The sidecar of a finished chunk (by index, or by key in the chunk store), or None when
    the chunk must be (re)built."""
    name = _shard_name(chunk) if isinstance(chunk, int) else chunk
    side, shard = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not (side.is_file() and shard.is_file()):
        return None
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("bytes") == shard.stat().st_size else None


# ----- distributed helpers ---------------------------------------------------------------
class _Dist:
    """accelerate's process state when launched with `accelerate launch`, else one process."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # On CPU-only machines accelerate must be told, or every rank thinks it is alone.
            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


# ----- the stage ---------------------------------------------------------------------------
def _read_records(path: Path) -> list[dict]:
    from drafter.regenerate import read_jsonl

    return read_jsonl(path)


def build_cache(cfg: Config, in_dir: Path, out_dir: Path, target=None) -> Manifest | None:
    """Cache the target's features over `in_dir/{train,holdout}.jsonl`; pointers in `out_dir`.
    Returns the manifest (None on the other ranks of a distributed run)."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    splits = [s for s in SPLITS if (in_dir / f"{s}.jsonl").is_file()]
    if "train" not in splits:
        raise CacheError(f"no regenerated train split in {in_dir} (expected {in_dir / 'train.jsonl'}): run regenerate first")
    dist = _Dist()
    timer = Timer()
    with timer("load_target"):
        if target is None:
            from drafter.target import load_target

            target = load_target(cfg, work="batch")
            if dist.state is not None and target.device != dist.state.device:
                target.model.to(dist.state.device)
    if target.tokenizer is None:
        raise CacheError("the target has no tokenizer: the cache needs its chat template")
    thinking = cfg.regenerate.enable_thinking
    end_strings = chat.end_of_turn_strings(target.tokenizer, target.eos_token_ids)
    chat.check_template(target.tokenizer, end_strings, thinking)  # fail before any compute

    root = cache_root(cfg)
    ccfg = cfg.cache
    counts, pointers, metas = {}, {}, {}
    for split in splits:
        path = in_dir / f"{split}.jsonl"
        dataset_hash = sha256_file(path)
        key = cache_key(target, dataset_hash, ccfg.dtype, ccfg.max_seq_len, thinking, ccfg.target_top_k,
                        ccfg.final_hidden)
        final = root / key
        if dist.main and (final / "index.json").is_file():
            with timer(f"verify_{split}"):
                _check_before_reuse(final, target.fingerprint)
        dist.barrier()
        reused = (final / "index.json").is_file()
        if reused:
            log.info("reusing the %s cache %s", split, final)
        else:
            with timer(f"build_{split}"):
                _build(cfg, target, _read_records(path), final, key, split, dataset_hash, end_strings, dist)
        reader = CacheReader(final, expect_fingerprint=target.fingerprint, verify=False)
        meta = reader.meta
        metas[split] = meta
        counts[split] = {**meta["counts"], "reused": reused}
        pointers[split] = {
            "key": key,
            "path": str(final),
            "split": split,
            "target_fingerprint": meta["target_fingerprint"],
            "layer_ids": meta["layer_ids"],
            "dtype": meta["dtype"],
            "num_samples": meta["num_samples"],
            "num_tokens": meta["num_tokens"],
        }
        if dist.main:
            atomic_write_json(out_dir / f"{split}.json", pointers[split])

    if not dist.main:
        dist.barrier()
        return None
    cfg.save(out_dir / "config.yaml")
    regen_manifest = in_dir / "manifest.json"
    manifest = write_manifest(
        out_dir,
        "build_cache",
        inputs={"dir": str(in_dir), "splits": {s: metas[s]["dataset_hash"] for s in splits},
                "regenerate_manifest": sha256_file(regen_manifest) if regen_manifest.is_file() else None},
        params={"dtype": ccfg.dtype, "target_dtype": dtype_name(target.dtype), "target_top_k": ccfg.target_top_k,
                "final_hidden": ccfg.final_hidden, "max_seq_len": ccfg.max_seq_len, "batch_size": ccfg.batch_size,
                "shard_samples": ccfg.shard_samples, "root": str(root), "world_size": dist.world},
        counts=counts,
        durations=timer.durations,
        outputs={f"{s}.json": pointers[s] for s in splits},
        extra={"target": target.info(),
               "size": {s: {k: metas[s].get(k) for k in ("bytes", "bytes_per_token", "plain_bytes_per_token",
                                                     "size_vs_plain", "tokens_per_s", "top_k_tail_mass_mean")} for s in splits}},
    )
    dist.barrier()
    return manifest


def _check_before_reuse(final: Path, fingerprint: str) -> None:
    """Verify every checksum of a cache about to be reused; move a damaged one aside."""
    try:
        CacheReader(final, expect_fingerprint=fingerprint).verify_all()
    except CacheCorruptError as exc:
        damaged = final.with_name(f"{final.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("%s; moving the cache to %s and building it again", exc, damaged)
        os.replace(final, damaged)


def _build(cfg, target, records, final: Path, key, split, dataset_hash, end_strings, dist: _Dist) -> None:
    """Build (or resume) one cache: this rank's chunks, then rank 0 merges and publishes."""
    from filelock import FileLock

    ccfg = cfg.cache
    partial = final.with_name(f"{final.name}.partial")
    shards = partial / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final) + ".lock") if dist.world == 1 else None
    if lock is not None:
        lock.acquire()
    try:
        if (final / "index.json").is_file():  # another process finished it while we waited
            return
        n_chunks = math.ceil(len(records) / ccfg.shard_samples)
        mine = [c for c in range(n_chunks) if c % dist.world == dist.rank]
        for c in mine:  # leftovers of a killed run
            for stray in shards.glob(f".{_shard_name(c)}.*.tmp"):
                stray.unlink(missing_ok=True)
        todo = {c for c in mine if _done_sidecar(shards, c) is None}
        writer = ShardWriter(target, ccfg.dtype, ccfg.batch_size, dist.rank, ccfg.target_top_k, ccfg.final_hidden)

        def encode(record: dict):
            return encode_record(target.tokenizer, record, end_strings, ccfg.max_seq_len,
                                 cfg.regenerate.enable_thinking)

        def chunk_key(c: int, chunk: list[dict]) -> str:
            return cache_key(target, sha256_json({"chunk": c, "records": chunk}), ccfg.dtype, ccfg.max_seq_len,
                             cfg.regenerate.enable_thinking, ccfg.target_top_k, ccfg.final_hidden)

        store = ChunkStore(final.parent, chunk_key)
        done_before, linked = len(mine) - len(todo), 0
        bar = StageProgress(total=len(mine), initial=done_before, desc=f"cache {split}", unit="shard",
                   disable=not todo or not dist.main)
        for c in mine:
            chunk = records[c * ccfg.shard_samples : (c + 1) * ccfg.shard_samples]
            if c in todo:
                if store.restore(shards, c, chunk):
                    linked += 1
                else:
                    writer.write(shards, c, chunk, encode)
                bar.update(1)
            store.keep(shards, c, chunk)  # also the chunks of a run killed between the two
        bar.close()
        if linked:
            log.info("cache %s: %d of %d chunks linked from earlier caches, %d built", split, linked, len(mine),
                     len(todo) - linked)
        dist.barrier()
        if dist.main:
            _publish(target, partial, final, key, split, dataset_hash, n_chunks, len(records), ccfg)
        dist.barrier()
    finally:
        if lock is not None:
            lock.release()


def _publish(target, partial: Path, final: Path, key, split, dataset_hash, n_chunks, n_records, ccfg) -> None:
    shards = []
    for c in range(n_chunks):
        info = _done_sidecar(partial / "shards", c)
        if info is None:
            raise CacheError(f"cache {key}: chunk {c} has no finished shard after every rank finished")
        shards.append(info)
    samples = sum(s["samples"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    skipped: dict[str, int] = {}
    for s in shards:
        for item in s["skipped"]:
            reason = _NO_ANSWER if item["reason"] == _NO_ANSWER else item["reason"].split(":")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
    counts = {"input": n_records, "samples": samples, "skipped": sum(skipped.values()), "skipped_by_reason": skipped,
              "truncated": sum(s["truncated"] for s in shards), "tokens": tokens,
              "loss_tokens": sum(s["loss_tokens"] for s in shards)}
    check_accounting(n_records, {"samples": samples, "skipped": counts["skipped"]}, f"cache {split}")
    if n_records and not samples:
        raise chat.LossMaskError(
            f"cache {split}: none of {n_records} conversations has an assistant token within "
            f"max_seq_len={ccfg.max_seq_len}: training would learn nothing"
        )
    total_bytes = sum(s["bytes"] for s in shards)
    per_rank: dict[int, float] = {}
    for s in shards:  # ranks work side by side: the slowest one sets the pace
        per_rank[s.get("rank", 0)] = per_rank.get(s.get("rank", 0), 0.0) + s["seconds"]
    seconds = max(per_rank.values(), default=0.0)
    n, hidden = len(target.layer_ids), target.hidden_size
    plain = bytes_per_token_plain(hidden, n)
    meta = {
        "format": FORMAT,
        "key": key,
        "split": split,
        "target_name": target.name,
        "target_fingerprint": target.fingerprint,
        "weights_hash": target.weights_hash,
        "tokenizer_hash": target.tokenizer_hash,
        "template_hash": target.template_hash,
        "layer_ids": list(target.layer_ids),
        "hidden_size": hidden,
        "dtype": ccfg.dtype,
        "target_dtype": dtype_name(target.dtype),
        "target_top_k": ccfg.target_top_k,
        "final_hidden": ccfg.final_hidden,
        "max_seq_len": ccfg.max_seq_len,
        "dataset_hash": dataset_hash,
        "num_samples": samples,
        "num_tokens": tokens,
        "counts": counts,
        "ranks": len(per_rank),
        "bytes": total_bytes,
        "bytes_per_token": round(total_bytes / tokens, 2) if tokens else None,
        "plain_bytes_per_token": plain,
        "size_vs_plain": round(total_bytes / tokens / plain, 4) if tokens else None,
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "top_k_tail_mass_mean": round(sum(s.get("top_k_tail_mass", 0.0) for s in shards) / tokens, 6) if tokens else None,
    }
    atomic_write_json(partial / "index.json", {"format": FORMAT, "meta": meta, "shards": shards})
    if final.exists():
        shutil.rmtree(final)  # an unindexed leftover; the index is what makes a cache
    os.replace(partial, final)


# ----- reading ---------------------------------------------------------------------------------
class CacheReader:
    """Random access to cached samples through memory-mapped shards.

    `reader[i]` -> {"input_ids": LongTensor[T], "loss_mask": BoolTensor[T],
    "features": FloatTensor[T, n, H], "final_hidden": FloatTensor[T, H]} (float32).
    Opening checks the target fingerprint (when given) and every shard's size; the
    first access to a shard in a process checks its SHA-256 (`verify=False` skips that).
    """

    def __init__(self, path: str | Path, expect_fingerprint: str | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise CacheError(f"{self.path} is not a target cache (no index.json): run `drafter build-cache`")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            raise CacheCorruptError(f"{index_path} is not valid JSON: {exc}") from None
        if not isinstance(index, dict):
            raise CacheCorruptError(f"{index_path} is damaged (not an index): {_REBUILD}")
        if index.get("format") != FORMAT:
            raise CacheError(f"{self.path}: cache format {index.get('format')}, this version reads {FORMAT}")
        if not isinstance(index.get("meta"), dict) or not isinstance(index.get("shards"), list):
            raise CacheCorruptError(f"{index_path} is damaged (no meta or shard list): {_REBUILD}")
        self.meta: dict[str, Any] = index["meta"]
        if expect_fingerprint is not None and self.meta["target_fingerprint"] != expect_fingerprint:
            raise CacheMismatchError(
                f"{self.path} was built for target {self.meta['target_name']} with fingerprint "
                f"{self.meta['target_fingerprint']} (weights, tokenizer and chat template), but the "
                f"target now is {expect_fingerprint}: rebuild the cache with `drafter build-cache`"
            )
        self.verify = verify
        self.shards: list[dict] = index["shards"]
        try:
            for shard in self.shards:
                file = self.path / "shards" / shard["file"]
                if not file.is_file():
                    raise CacheCorruptError(f"cache shard {file} is missing")
                size = file.stat().st_size
                if size != shard["bytes"]:
                    raise CacheCorruptError(
                        f"cache shard {file} is {'truncated' if size < shard['bytes'] else 'altered'}: "
                        f"{size} bytes, the index says {shard['bytes']}"
                    )
            self._starts = [0]
            for shard in self.shards:
                self._starts.append(self._starts[-1] + shard["samples"])
            self.lengths: list[int] = [n for shard in self.shards for n in shard["lengths"]]
            self.ids: list[str] = [i for shard in self.shards for i in shard["ids"]]
        except (KeyError, TypeError) as exc:
            raise CacheCorruptError(f"{index_path} is damaged (a shard entry lacks {exc}): {_REBUILD}") from None
        self._open: dict[int, tuple[Any, torch.Tensor]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    def _handle(self, s: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: open (and verify) its own maps
            self._open, self._pid = {}, os.getpid()
        if s not in self._open:
            from safetensors import safe_open

            file = self.path / "shards" / self.shards[s]["file"]
            if self.verify and sha256_file(file) != self.shards[s]["sha256"]:
                raise CacheCorruptError(
                    f"cache shard {file} fails its checksum (altered or damaged); `drafter build-cache` "
                    "verifies a cache before reusing it and rebuilds a damaged one"
                )
            try:
                handle = safe_open(str(file), framework="pt")
                offsets = handle.get_tensor("offsets")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
                raise CacheCorruptError(f"cache shard {file} cannot be read: {exc}") from None
            self._open[s] = (handle, offsets)
        return self._open[s]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)}")
        s = bisect.bisect_right(self._starts, i) - 1
        handle, offsets = self._handle(s)
        local = i - self._starts[s]
        a, b = int(offsets[local]), int(offsets[local + 1])

        def part(name: str) -> torch.Tensor:
            return handle.get_slice(name)[a:b]

        if self.meta["dtype"] == "int8":
            features = dequantize_int8(part("features"), part("features_scale"))
        else:
            features = part("features").float()
        sample = {"input_ids": part("input_ids").long(), "loss_mask": part("loss_mask").bool(), "features": features}
        if self.meta.get("final_hidden", True):  # caches before target_top_k always held it
            sample["final_hidden"] = part("final_hidden").float()
        if self.meta.get("target_top_k"):
            sample["target_ids"] = part("target_ids").long()
            sample["target_probs"] = part("target_probs").float()
        return sample

    def verify_all(self) -> None:
        """Check every shard's SHA-256 now (instead of on first touch)."""
        for s in range(len(self.shards)):
            self._open.pop(s, None)
            verify, self.verify = self.verify, True
            try:
                self._handle(s)
            finally:
                self.verify = verify


def open_split(cache_dir: str | Path, split: str, expect_fingerprint: str | None = None,
               verify: bool = True) -> CacheReader:
    """The cache a pointer `cache_dir/{split}.json` names (train for training, holdout for metrics)."""
    pointer = Path(cache_dir) / f"{split}.json"
    if not pointer.is_file():
        raise CacheError(f"no {split} cache pointer {pointer}: run `drafter build-cache` first")
    try:
        path = Path(json.loads(pointer.read_text())["path"])
    except (ValueError, KeyError, TypeError) as exc:  # cut off mid-write, or edited by hand
        raise CacheCorruptError(f"cache pointer {pointer} is damaged ({type(exc).__name__}: {exc}): "
                                "run `drafter build-cache` again") from None
    if not path.is_absolute():
        path = pointer.parent / path
    return CacheReader(path, expect_fingerprint=expect_fingerprint, verify=verify)


def collate(samples: list[dict[str, torch.Tensor]]) -> TrainBatch:
    """Right-pad cached samples into a `TrainBatch` (attention and loss masks False on padding)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    width = max(s["input_ids"].shape[0] for s in samples)
    n, hidden = samples[0]["features"].shape[1:]
    batch = len(samples)
    input_ids = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.bool)
    attention = torch.zeros((batch, width), dtype=torch.bool)
    features = torch.zeros((batch, width, n, hidden), dtype=samples[0]["features"].dtype)
    # Optional per-token tensors (padding rows stay zero; the masks keep them out of every loss).
    optional = {name: torch.zeros((batch, width, *x.shape[1:]), dtype=x.dtype)
                for name, x in samples[0].items() if name in ("final_hidden", "target_ids", "target_probs")}
    for i, s in enumerate(samples):
        t = s["input_ids"].shape[0]
        input_ids[i, :t] = s["input_ids"]
        loss_mask[i, :t] = s["loss_mask"]
        attention[i, :t] = True
        features[i, :t] = s["features"]
        for name, out in optional.items():
            out[i, :t] = s[name]
    return TrainBatch(input_ids=input_ids, loss_mask=loss_mask, attention_mask=attention, features=features,
                      **optional)


class OnlineReader:
    """The CacheReader interface computed on the fly by the target (no cache on disk).

    For quick experiments and small data: every access runs the target, so epochs cost
    a target forward pass per sample instead of a read.
    """

    def __init__(self, target, records: Iterable[dict], max_seq_len: int, enable_thinking: bool = False) -> None:
        self.target = target
        end_strings = chat.end_of_turn_strings(target.tokenizer, target.eos_token_ids)
        encoded = [encode_record(target.tokenizer, r, end_strings, max_seq_len, enable_thinking) for r in records]
        self.samples = [e for e in encoded if not isinstance(e, str)]
        self.lengths = [len(e.input_ids) for e in self.samples]
        self.ids = [e.id for e in self.samples]
        self.meta = {
            "target_fingerprint": target.fingerprint,
            "template_hash": target.template_hash,
            "layer_ids": list(target.layer_ids),
            "hidden_size": target.hidden_size,
            "dtype": "online",
            "num_samples": len(self.samples),
            "num_tokens": sum(self.lengths),
        }

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.samples[i]
        ids = torch.tensor([sample.input_ids])
        feats = self.target.capture(ids)
        return {
            "input_ids": ids[0],
            "loss_mask": torch.tensor(sample.loss_mask, dtype=torch.bool),
            "features": feats.layers[0].float().cpu(),
            "final_hidden": feats.final[0].float().cpu(),
        }
