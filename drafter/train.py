"""Train a drafter (EAGLE-3, DFlash or DSpark) on the target cache: `drafter train`.

Built on `accelerate`: one CPU process by default; the same command under
`accelerate launch` runs DDP across GPUs or nodes (bf16 autocast on GPU, fp32 on CPU).

How a step works, and why it is exactly the same on 1 or N processes:
- The data is a stream of per-epoch permutations (seeded); optimizer step s takes the
  next `train.batch_size` sequences of the stream. They are split into
  `processes x grad_accum` micro-batches.
- Anchors are sampled with one generator per sequence, seeded by (seed, stream position),
  so a sequence's blocks do not depend on where it lands.
- Each micro-batch returns its *summed* loss; after the last one the gradients are scaled
  by processes / (valid positions over all micro-batches and processes). The step then
  optimises the mean over the whole global batch, whatever the split.

Checkpoints (`checkpoints/step-N/`) hold the trainable weights (safetensors), the
optimizer tensors (safetensors) and scalars (JSON), the scheduler state, the RNG state
and the loop state: a killed run resumes exactly where its last checkpoint stopped.
Nothing is unpickled. The best drafter by held-out simulated acceptance length (not by
loss) is exported to `best/`, the final one to `last/` (speculators format).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drafter.config import Config, ConfigError
from drafter.errors import DrafterError
from drafter.manifest import (
    Timer,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    check_accounting,
    sha256_json,
    write_manifest,
)
from drafter.models import TargetHeads, TrainBatch, build
from drafter.models.metrics import simulated_tau
from drafter.runtime import resolve_dtype

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class TrainError(DrafterError, RuntimeError):
    """Training cannot start or continue (bad data, an incompatible checkpoint)."""


# ----- small pieces ---------------------------------------------------------------------
def lr_lambda(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over warmup_ratio of the steps, then cosine decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Stream:
    """Sequence i of the training stream -> dataset index (seeded permutation per epoch)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __getitem__(self, i: int) -> int:
        epoch = i // self.size
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][i % self.size])


def sample_generator(seed: int, salt: int, i: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 7_919 + i) % (2**63))


def verifier_name(target: Any) -> str | None:
    """What a serving engine should load as the verifier: the HF folder or hub id when
    known (a packaged GGUF's converted folder), else the target's name."""
    source = getattr(target, "source", "") or ""
    for prefix in ("hf-folder:", "hub:"):
        if source.startswith(prefix):
            return source[len(prefix):]
    folder = getattr(getattr(target, "config", None), "_name_or_path", "") or ""
    if folder and Path(folder).is_dir():
        return folder
    return getattr(target, "name", None)


@dataclass
class Totals:
    """Sums over micro-batches and processes of what forward_train reports."""

    gamma: int
    losses: dict[str, float] = field(default_factory=dict)
    accept: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    count: torch.Tensor | None = None
    sequences: torch.Tensor | None = None  # [with targets, without targets]

    def __post_init__(self) -> None:
        self.accept, self.correct, self.count = (torch.zeros(self.gamma, dtype=torch.float64) for _ in range(3))
        self.sequences = torch.zeros(2, dtype=torch.float64)

    def add_samples(self, samples: list[dict[str, torch.Tensor]]) -> None:
        for sample in samples:
            mask = sample["loss_mask"]
            self.sequences[0 if bool((mask[:-1] & mask[1:]).any()) else 1] += 1

    def add(self, out) -> None:
        for name, value in out.losses.items():
            self.losses[name] = self.losses.get(name, 0.0) + float(value)
        m = out.metrics
        self.count += m["count"].double().cpu()
        self.accept += (m["accept_rate"] * m["count"]).double().cpu()
        self.correct += (m["accuracy"] * m["count"]).double().cpu()

    def reduce(self, accelerator) -> None:
        """Sum across processes (a no-op on one)."""
        if accelerator.num_processes == 1:
            return
        names = sorted(self.losses)
        flat = torch.cat([torch.tensor([self.losses[n] for n in names], dtype=torch.float64),
                          self.accept, self.correct, self.count, self.sequences]).to(accelerator.device)
        flat = accelerator.reduce(flat, "sum").cpu()
        self.losses = {n: float(v) for n, v in zip(names, flat[: len(names)])}
        g = self.gamma
        rest = flat[len(names):]
        self.accept, self.correct, self.count = rest[:g], rest[g : 2 * g], rest[2 * g : 3 * g]
        self.sequences = rest[3 * g :]

    @property
    def positions(self) -> float:
        return float(self.count.sum())

    def summary(self) -> dict[str, Any]:
        n = max(self.positions, 1.0)
        denom = self.count.clamp_min(1.0)
        rates, accs = (self.accept / denom).tolist(), (self.correct / denom).tolist()
        losses = {name: value / n for name, value in self.losses.items()}
        return {
            "loss": sum(losses.values()),
            "losses": losses,
            "accept_rate": rates,
            "accuracy": accs,
            "count": self.count.tolist(),
            "sim_tau": simulated_tau(rates),  # temperature 1: rates = 1 - TV(p_d, p_t)
            "sim_tau_greedy": simulated_tau(accs),  # temperature 0: argmax agreement
        }


@dataclass
class Session:
    """One process's view of a run: the prepared model and optimizer, the data, and how a
    step and an evaluation split their sequences across processes and micro-batches."""

    cfg: Config
    accelerator: Any
    model: Any  # DDP-wrapped when distributed
    optimizer: Any
    scheduler: Any
    train_ds: Any
    holdout_ds: Any
    collate: Callable
    holdout_n: int

    def __post_init__(self) -> None:
        self.stream = Stream(len(self.train_ds), self.cfg.run.seed)
        self.inner = self.accelerator.unwrap_model(self.model)
        self.trainable = [p for p in self.inner.parameters() if p.requires_grad]
        tc, W = self.cfg.train, self.accelerator.num_processes
        self.micro_size = max(1, tc.batch_size // (W * tc.grad_accum))

    def batch(self, ds: Any, indices: list[int]) -> tuple[TrainBatch, list[dict[str, torch.Tensor]]]:
        samples = [ds[i] for i in indices]
        return self.collate(samples).to(self.accelerator.device, torch.float32), samples

    def train_step(self, step: int) -> tuple[Totals, int, float, float]:
        """One optimizer step over global batch `step`. -> (totals, tokens, lr, grad norm)."""
        acc, tc, seed = self.accelerator, self.cfg.train, self.cfg.run.seed
        W = acc.num_processes
        positions = torch.arange(step * tc.batch_size, (step + 1) * tc.batch_size)
        chunks = [c.tolist() for c in torch.tensor_split(positions, W * tc.grad_accum)]
        totals, tokens = Totals(self.inner.gamma), 0
        for m in range(tc.grad_accum):
            mine = chunks[m * W + acc.process_index]
            batch, samples = self.batch(self.train_ds, [self.stream[i] for i in mine])
            tokens += int(batch.attention_mask.sum())
            totals.add_samples(samples)
            gens = [sample_generator(seed, 0, i) for i in mine]
            sync = m == tc.grad_accum - 1  # DDP all-reduces on the last micro-batch only
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                out = self.model(batch, generator=gens, reduction="sum")
                acc.backward(out.loss)
            totals.add(out)
        totals.reduce(acc)
        scale = W / max(totals.positions, 1.0)  # DDP averaged over W: make it the global per-position mean
        for p in self.trainable:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = float(acc.clip_grad_norm_(self.trainable, tc.grad_clip))
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum"))
        return totals, tokens, lr, grad_norm

    def evaluate(self) -> dict[str, Any]:
        """Held-out losses and per-position rates (fixed anchors: comparable across evals)."""
        acc = self.accelerator
        totals = Totals(self.inner.gamma)
        mine = list(range(acc.process_index, self.holdout_n, acc.num_processes))
        self.model.eval()
        with torch.no_grad(), acc.autocast():
            for start in range(0, len(mine), self.micro_size):
                idx = mine[start : start + self.micro_size]
                batch, _ = self.batch(self.holdout_ds, idx)
                gens = [sample_generator(self.cfg.run.seed, 1, i) for i in idx]
                totals.add(self.inner.forward_train(batch, generator=gens, reduction="sum"))
        self.model.train()
        totals.reduce(acc)
        return totals.summary()


# ----- checkpoints ------------------------------------------------------------------------
def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, model, optimizer, scheduler, loop: dict[str, Any]) -> Path:
    from safetensors.torch import save

    with atomic_dir(folder) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(tmp / "model.safetensors", save(weights))
        tensors, meta = _optimizer_split(optimizer.state_dict())
        atomic_write_bytes(tmp / "optimizer.safetensors", save(tensors))
        atomic_write_json(tmp / "optimizer.json", meta)
        atomic_write_json(tmp / "scheduler.json", scheduler.state_dict())
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        atomic_write_bytes(tmp / "rng.safetensors", save(rng))
        atomic_write_json(tmp / STATE_FILE, loop)  # last: marks the checkpoint complete
    return folder


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict[str, Any]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    meta = json.loads((folder / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_join(load_file(str(folder / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return json.loads((folder / STATE_FILE).read_text())


def _checkpoint(root: Path, model, optimizer, scheduler, loop: dict[str, Any], keep: int) -> None:
    save_checkpoint(root / f"step-{loop['step']:08d}", model, optimizer, scheduler, loop)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


# ----- the stage --------------------------------------------------------------------------
def _open_data(cfg: Config, cache_dir: Path, target) -> tuple[Any, Any, Callable]:
    try:
        from drafter import cache  # lazily: the cache module is another stage's
    except ImportError as exc:
        raise TrainError(f"cannot read the target cache: {exc}") from exc

    train_ds = cache.open_split(cache_dir, "train", expect_fingerprint=target.fingerprint)
    holdout_ds = cache.open_split(cache_dir, "holdout", expect_fingerprint=target.fingerprint)
    return train_ds, holdout_ds, cache.collate


def _meta(ds: Any) -> dict[str, Any]:
    meta = getattr(ds, "meta", None) or {}
    return dict(meta) if isinstance(meta, dict) else dict(vars(meta))


def _accelerator(cfg: Config):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and cfg.target.device != "cpu"
    mp = cfg.train.mixed_precision
    if mp == "auto":  # bf16 autocast wherever the runtime computes in bf16 (AMX/AVX-512 BF16 CPUs too)
        bf16 = resolve_dtype(cfg.runtime.dtype, "cuda" if cuda else "cpu") == torch.bfloat16
        mp = "bf16" if bf16 else "no"
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mp:
        AcceleratorState._reset_state()  # a second training in one process (tests, notebooks) with other numerics
    return Accelerator(mixed_precision=mp, cpu=not cuda)


def _token_counts(ds: Any, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(len(ds)):
        sample = ds[i]
        counts += torch.bincount(sample["input_ids"][sample["loss_mask"]], minlength=vocab_size)[:vocab_size]
    return counts


def train(
    cfg: Config,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    target: Any = None,
    *,
    data: tuple[Any, Any] | None = None,
    collate: Callable[[list[dict[str, torch.Tensor]]], TrainBatch] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the configured drafter; returns the manifest (also written to out_dir).

    `data=(train, holdout)` takes any datasets with `len`, `ds[i]` -> dict(input_ids,
    loss_mask, features, final_hidden) and optionally `.meta`, instead of the cache in
    `cache_dir`; `collate` turns samples into a TrainBatch (default: drafter.cache.collate).
    `callback(step, record)` is called after every optimizer step.
    """
    timer = Timer()
    cache_dir = Path(cache_dir) if cache_dir is not None else cfg.data_dir / "cache"
    out_dir = Path(out_dir) if out_dir is not None else cfg.data_dir / "drafter"
    tc = cfg.train
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    W = accelerator.num_processes
    if tc.batch_size < W * tc.grad_accum:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is smaller than processes x grad_accum = {W} x {tc.grad_accum}"
        )

    with timer("load"):
        if target is None:
            from drafter.target import load_target

            tcfg = cfg.model_copy(deep=True)
            tcfg.target.device = str(accelerator.device)
            target = load_target(tcfg)
        if data is None:
            train_ds, holdout_ds, default_collate = _open_data(cfg, cache_dir, target)
        else:
            train_ds, holdout_ds = data
            default_collate = None
        collate = collate or default_collate
        if collate is None:
            from drafter.cache import collate  # noqa: F811
    if len(train_ds) == 0 or len(holdout_ds) == 0:
        raise TrainError(f"empty training data: {len(train_ds)} train / {len(holdout_ds)} holdout sequences")
    meta = _meta(train_ds)
    layer_ids = list(meta.get("layer_ids") or target.layer_ids)
    if layer_ids != list(target.layer_ids):
        raise TrainError(
            f"the cache holds feature layers {layer_ids} but the target captures {target.layer_ids}: "
            "rebuild the cache or set target.layer_ids to match"
        )

    if meta.get("hidden_size") not in (None, target.hidden_size):
        raise TrainError(
            f"the cache holds width-{meta['hidden_size']} features; the target is {target.hidden_size} wide"
        )

    steps = tc.max_steps or math.ceil(tc.epochs * len(train_ds) / tc.batch_size)
    # What determines the weights (not logging or checkpoint cadence): a changed key means
    # another run, which must not resume these checkpoints.
    cosmetic = {"log_every", "system_metrics", "checkpoint_every", "keep_checkpoints"}
    run_key = sha256_json({
        "drafter": cfg.drafter.model_dump(mode="json"), "train": tc.model_dump(mode="json", exclude=cosmetic),
        "seed": cfg.run.seed,
        "target": target.fingerprint, "layer_ids": layer_ids, "train_sequences": len(train_ds),
        "holdout_sequences": len(holdout_ds), "cache": meta.get("key"),
    })[:16]
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        done = json.loads(manifest_path.read_text())
        if done.get("params", {}).get("run_key") == run_key:
            log.info("drafter in %s is already trained with this config and data: nothing to do", out_dir)
            return done

    # ----- model, optimizer, schedule -----
    from accelerate.utils import set_seed

    set_seed(cfg.run.seed)
    heads = TargetHeads.from_target(target)
    token_counts = None
    if cfg.drafter.draft_vocab_size and cfg.drafter.draft_vocab_size < heads.vocab_size:
        with timer("token_counts"):
            token_counts = _token_counts(train_ds, heads.vocab_size)
    model = build(cfg, heads, layer_ids, token_counts)
    vocab = {"draft_vocab_size": model.draft_vocab_size, "target_vocab_size": heads.vocab_size}
    if token_counts is not None:  # share of the training answers' tokens the draft vocabulary holds
        vocab["coverage"] = round(float(token_counts[model.t2d.cpu()].sum() / token_counts.sum().clamp_min(1)), 6)
    model.verifier["name_or_path"] = verifier_name(target) or model.verifier["name_or_path"]
    model.meta = {"target_fingerprint": target.fingerprint, "target_name": getattr(target, "name", None)}
    model.to(accelerator.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, tc.warmup_ratio))

    ckpt_root = out_dir / "checkpoints"
    loop: dict[str, Any] = {"run_key": run_key, "step": 0, "best_tau": None, "best_step": None,
                            "history": [], "evals": [], "tokens": 0, "positions": 0.0,
                            "with_targets": 0, "without_targets": 0, "mlflow_run_id": None}
    resumed_from = None
    if (latest := latest_checkpoint(ckpt_root)) is not None:
        saved = json.loads((latest / STATE_FILE).read_text())
        if saved.get("run_key") != run_key:
            raise TrainError(
                f"{out_dir} holds checkpoints of a different run (config, target or data changed); "
                "use another --out folder or delete it"
            )
        loop = load_checkpoint(latest, model, optimizer, scheduler)
        resumed_from = latest.name
        log.warning("resuming from %s (step %d of %d)", latest, loop["step"], steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = Session(cfg, accelerator, model, optimizer, scheduler, train_ds, holdout_ds, collate,
                  holdout_n=min(len(holdout_ds), tc.holdout_limit or len(holdout_ds)))
    inner = run.inner

    # ----- MLflow -----
    mlflow_run = _start_mlflow(cfg, loop, main)
    if mlflow_run is not None and resumed_from is None:
        _log_params(cfg, inner, target, steps, len(train_ds), len(holdout_ds), W)
    loop["mlflow_run_id"] = mlflow_run.info.run_id if mlflow_run is not None else loop.get("mlflow_run_id")
    select = "sim_tau_greedy" if cfg.evaluate.temperature == 0 else "sim_tau"

    def record_eval(step: int) -> None:
        result = run.evaluate()
        tau = result[select]
        loop["evals"].append({"step": step, **result})
        improved = loop["best_tau"] is None or tau > loop["best_tau"]
        if improved:
            loop["best_tau"], loop["best_step"] = tau, step
            if main:
                _export(inner, out_dir / "best", step, result)
        _log_metrics(mlflow_run, step, "holdout", result)
        if main and mlflow_run is not None:
            import mlflow

            mlflow.log_metric("holdout/best_tau", loop["best_tau"], step=step)
        accelerator.wait_for_everyone()

    from tqdm.auto import tqdm

    model.train()
    if loop["step"] == 0 and not loop["evals"]:
        with timer("evaluate"):
            record_eval(0)  # the untrained baseline
    bar = tqdm(total=steps, initial=loop["step"], disable=not main, desc=f"train {cfg.drafter.algorithm}", unit="step",
               mininterval=2.0)
    try:
        while loop["step"] < steps:
            step = loop["step"]
            started = time.perf_counter()
            with timer("train"):
                totals, tokens, lr, grad_norm = run.train_step(step)
            elapsed = time.perf_counter() - started
            summary = totals.summary()
            n = totals.positions
            record = {"step": step + 1, "loss": summary["loss"], **summary["losses"], "sim_tau": summary["sim_tau"],
                      "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / max(elapsed, 1e-9), "positions": n}
            loop["history"].append(record)
            loop["tokens"] += tokens
            loop["with_targets"] += int(totals.sequences[0])
            loop["without_targets"] += int(totals.sequences[1])
            loop["positions"] += n
            loop["step"] = step + 1
            if main and mlflow_run is not None and (loop["step"] % tc.log_every == 0 or loop["step"] == steps):
                _log_metrics(mlflow_run, loop["step"], "train", summary,
                             extra={"lr": lr, "grad_norm": grad_norm, "tokens_per_s": record["tokens_per_s"]})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tau=f"{summary['sim_tau']:.2f}")
            if loop["step"] % tc.eval_every == 0 or loop["step"] == steps:
                with timer("evaluate"):
                    record_eval(loop["step"])
            if loop["step"] % tc.checkpoint_every == 0 and loop["step"] < steps:
                with timer("checkpoint"):
                    if main:
                        _checkpoint(ckpt_root, inner, optimizer, scheduler, loop, tc.keep_checkpoints)
                    accelerator.wait_for_everyone()
            if callback is not None:
                callback(loop["step"], record)
    except BaseException:
        if mlflow_run is not None:
            import mlflow

            mlflow.end_run(status="KILLED")  # resumed (same run id) by the next call
        raise
    finally:
        bar.close()
    if mlflow_run is not None:
        import mlflow

        mlflow.end_run()

    # ----- outputs -----
    if main:
        _export(inner, out_dir / "last", loop["step"], loop["evals"][-1])
        _checkpoint(ckpt_root, inner, optimizer, scheduler, loop, tc.keep_checkpoints)
        atomic_write_json(out_dir / "metrics.json", {
            "algorithm": cfg.drafter.algorithm, "selected_by": select, "best_step": loop["best_step"],
            "best_tau": loop["best_tau"], "evals": loop["evals"], "history": loop["history"],
        })
        cfg.save(out_dir / "config.yaml")
    seen = loop["step"] * tc.batch_size
    counts = {
        "train_sequences": len(train_ds), "holdout_sequences": len(holdout_ds), "holdout_evaluated": run.holdout_n,
        "steps": loop["step"], "sequences_seen": seen,
        "sequences_with_targets": loop["with_targets"], "sequences_without_targets": loop["without_targets"],
        "tokens_seen": loop["tokens"], "positions_trained": int(loop["positions"]), "evaluations": len(loop["evals"]),
        "processes": W,
    }
    check_accounting(seen, {"with_targets": counts["sequences_with_targets"],
                            "without_targets": counts["sequences_without_targets"]}, "training sequences")
    params = {"run_key": run_key, "algorithm": cfg.drafter.algorithm, "drafter": cfg.drafter.model_dump(mode="json"),
              "train": tc.model_dump(mode="json"), "seed": cfg.run.seed, "layer_ids": layer_ids,
              "trainable_parameters": sum(p.numel() for p in run.trainable), "selected_by": select,
              "vocabulary": vocab, "mixed_precision": accelerator.mixed_precision}
    outputs = {"best": str(out_dir / "best"), "last": str(out_dir / "last"), "best_step": loop["best_step"],
               "best_tau": loop["best_tau"], "final_holdout": loop["evals"][-1], "resumed_from": resumed_from,
               "mlflow_run_id": loop.get("mlflow_run_id")}
    inputs = {"cache": str(cache_dir) if data is None else "<in-memory>", "target_fingerprint": target.fingerprint,
              "cache_meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, list, bool))}}
    if main:
        write_manifest(out_dir, "train", inputs=inputs, params=params, counts=counts,
                       durations=timer.durations, outputs=outputs)
        if mlflow_run is not None:
            _log_artifacts(loop["mlflow_run_id"], out_dir)
    accelerator.wait_for_everyone()
    return json.loads(manifest_path.read_text()) if manifest_path.is_file() else {
        "stage": "train", "params": params, "counts": counts, "outputs": outputs}


def _export(model, folder: Path, step: int, result: dict[str, Any]) -> None:
    model.meta |= {"step": step, "holdout_sim_tau": result["sim_tau"],
                   "holdout_sim_tau_greedy": result["sim_tau_greedy"], "holdout_accept_rate": result["accept_rate"]}
    with atomic_dir(folder) as tmp:
        model.export(tmp)


# ----- MLflow -----------------------------------------------------------------------------
def _start_mlflow(cfg: Config, loop: dict[str, Any], main: bool):
    """A run nested under the active lifecycle run when there is one; resumed by id."""
    if not main:
        return None
    import mlflow

    from drafter.registry import experiment_id

    parent = mlflow.active_run()
    if parent is None:  # the run's experiment, artifacts in the state dir on a local store
        mlflow.set_experiment(experiment_id=experiment_id(cfg))
    kwargs = {"log_system_metrics": cfg.train.system_metrics}
    if loop.get("mlflow_run_id"):
        return mlflow.start_run(run_id=loop["mlflow_run_id"], nested=parent is not None, **kwargs)
    return mlflow.start_run(run_name=f"train-{cfg.drafter.algorithm}", nested=parent is not None, **kwargs)


def _log_params(cfg: Config, model, target, steps: int, n_train: int, n_holdout: int, processes: int) -> None:
    import mlflow

    params = {f"drafter.{k}": v for k, v in cfg.drafter.model_dump(mode="json").items()}
    params |= {f"train.{k}": v for k, v in cfg.train.model_dump(mode="json").items()}
    params |= {
        "seed": cfg.run.seed, "steps": steps, "train_sequences": n_train, "holdout_sequences": n_holdout,
        "processes": processes, "target": getattr(target, "name", None), "target_fingerprint": target.fingerprint,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    mlflow.log_params(params)
    mlflow.set_tag("stage", "train")


def _log_metrics(run, step: int, prefix: str, summary: dict[str, Any], extra: dict[str, float] | None = None) -> None:
    if run is None:
        return
    import mlflow

    metrics = {f"{prefix}/loss": summary["loss"], f"{prefix}/sim_tau": summary["sim_tau"],
               f"{prefix}/sim_tau_greedy": summary["sim_tau_greedy"]}
    metrics |= {f"{prefix}/loss_{k}": v for k, v in summary["losses"].items()}
    for k, (rate, acc) in enumerate(zip(summary["accept_rate"], summary["accuracy"]), start=1):
        metrics[f"{prefix}/accept_rate_pos{k}"] = rate
        metrics[f"{prefix}/accuracy_pos{k}"] = acc
    metrics |= {k: v for k, v in (extra or {}).items()}
    mlflow.log_metrics(metrics, step=step)


def _log_artifacts(run_id: str | None, out_dir: Path) -> None:
    import mlflow

    if run_id is None:
        return
    client = mlflow.MlflowClient()
    for name in ("manifest.json", "metrics.json", "config.yaml"):
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name), artifact_path="train")
