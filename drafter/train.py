"""Train a drafter (EAGLE-3, DFlash or DSpark) on the target cache: `drafter train`.

Built on `accelerate`: one CPU process by default; the same command under
`accelerate launch` runs DDP across GPUs or nodes. bf16 autocast wherever `runtime.dtype`
resolves to bf16 (GPUs, AMX/AVX-512 BF16 CPUs), with fp32 master weights and optimizer state.

`Trainer` reads top to bottom: `prepare` (load, check, build), `resume` (the latest
checkpoint), `fit` (the loop; `stop_at` ends it early at a checkpoint), `finish` (exports,
manifest). Checkpoints live in `drafter/checkpoint.py`, MLflow logging in `train_tracking.py`.

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
loss) is exported to `best/`, the final one to `last/`, and `train.export_steps` to
`steps/step-N/` (speculators format, each with its held-out estimate and training CPU time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from drafter import plots
from drafter import train_tracking as tracking
from drafter.config import Config, ConfigError
from drafter.errors import DrafterError
from drafter.progress import StageProgress
from drafter.checkpoint import STATE_FILE, checkpoint, latest_checkpoint, load_checkpoint
from drafter.manifest import (
    Timer, atomic_dir, atomic_write_json, check_accounting, read_manifest, sha256_file, sha256_json, write_manifest,
)
from drafter.models import TargetHeads, TrainBatch, build
from drafter.models.metrics import simulated_tau
from drafter.reports import Manifest
from drafter.runtime import resolve_dtype

log = logging.getLogger(__name__)

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
    if mp == "auto":  # bf16 autocast wherever the runtime computes batches in bf16 (AMX CPUs too)
        bf16 = resolve_dtype(cfg.runtime.dtype, "cuda" if cuda else "cpu", "batch") == torch.bfloat16
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


@dataclass
class LoopState:
    """What a run has done so far; saved in every checkpoint (`state.json`) and resumed from it."""

    run_key: str
    step: int = 0
    best_tau: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)  # held-out evaluations
    tokens: int = 0
    positions: float = 0.0
    with_targets: int = 0
    without_targets: int = 0
    cpu_s: float = 0.0  # process CPU seconds spent in optimizer steps (this process), over all resumes
    mlflow_run_id: str | None = None


class Trainer:
    """One training run, top to bottom: `prepare` (load, build, check), `resume` (the latest
    checkpoint, if any), `fit` (the loop, up to `stop_at`), `finish` (exports, manifest)."""

    def __init__(self, cfg: Config, cache_dir: Path, out_dir: Path, target: Any = None, data=None,
                 collate: Callable | None = None, callback: Callable[[int, dict[str, Any]], None] | None = None):
        self.cfg, self.cache_dir, self.out_dir = cfg, cache_dir, out_dir
        self.target, self.data, self.collate, self.callback = target, data, collate, callback
        self.timer = Timer()
        self.ckpt_root = out_dir / "checkpoints"
        self.resumed_from: str | None = None

    # ----- prepare -----------------------------------------------------------------------------
    def prepare(self) -> Manifest | None:
        """Load target and data, check them, build the model; the manifest when already done."""
        cfg, tc, timer = self.cfg, self.cfg.train, self.timer
        self.accelerator = accelerator = _accelerator(cfg)
        self.main = accelerator.is_main_process
        W = accelerator.num_processes
        if tc.batch_size < W * tc.grad_accum:
            raise ConfigError(
                f"train.batch_size={tc.batch_size} is smaller than processes x grad_accum = {W} x {tc.grad_accum}"
            )
        with timer("load"):
            if self.target is None:
                from drafter.target import load_target

                tcfg = cfg.model_copy(deep=True)
                tcfg.target.device = str(accelerator.device)
                self.target = load_target(tcfg, work="batch")
            if self.data is None:
                train_ds, holdout_ds, default_collate = _open_data(cfg, self.cache_dir, self.target)
            else:
                (train_ds, holdout_ds), default_collate = self.data, None
            if self.collate is None:
                from drafter.cache import collate

                self.collate = default_collate or collate
        if len(train_ds) == 0 or len(holdout_ds) == 0:
            raise TrainError(f"empty training data: {len(train_ds)} train / {len(holdout_ds)} holdout sequences")
        self.train_ds, self.holdout_ds = train_ds, holdout_ds
        target = self.target
        self.meta = meta = _meta(train_ds)
        self.layer_ids = layer_ids = list(meta.get("layer_ids") or target.layer_ids)
        if layer_ids != list(target.layer_ids):
            raise TrainError(
                f"the cache holds feature layers {layer_ids} but the target captures {target.layer_ids}: "
                "rebuild the cache or set target.layer_ids to match"
            )
        if meta.get("hidden_size") not in (None, target.hidden_size):
            raise TrainError(
                f"the cache holds width-{meta['hidden_size']} features; the target is {target.hidden_size} wide"
            )
        self.steps = tc.max_steps or math.ceil(tc.epochs * len(train_ds) / tc.batch_size)
        self.init = init_source(tc.init_from)
        # What determines the weights (not logging, checkpoint or export cadence): a changed key
        # means another run, which must not resume these checkpoints.
        cosmetic = {"log_every", "system_metrics", "checkpoint_every", "keep_checkpoints", "export_steps",
                    "init_from"}  # init_from: its weights' hash below, not its path
        self.run_key = sha256_json({
            "drafter": cfg.drafter.model_dump(mode="json"), "train": tc.model_dump(mode="json", exclude=cosmetic),
            "seed": cfg.run.seed,
            "target": target.fingerprint, "layer_ids": layer_ids, "train_sequences": len(train_ds),
            "holdout_sequences": len(holdout_ds), "cache": meta.get("key"),
            **({"init": self.init["weights_sha256"]} if self.init else {}),
        })[:16]
        if (self.out_dir / "manifest.json").is_file():
            done = read_manifest(self.out_dir)
            if done.params.get("run_key") == self.run_key:
                log.info("drafter in %s is already trained with this config and data: nothing to do", self.out_dir)
                return done

        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)
        self.model, self.vocabulary = build_model(cfg, target, layer_ids, train_ds, timer)
        if self.init is not None:
            warm_start(self.model, Path(tc.init_from), target)
            self.vocabulary["from"] = "init_from"
        model = self.model
        model.to(accelerator.device)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                           weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.steps, tc.warmup_ratio))
        self.loop = LoopState(run_key=self.run_key)
        return None

    # ----- resume -------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the latest complete checkpoint of the same run; then wrap for DDP."""
        if (latest := latest_checkpoint(self.ckpt_root)) is not None:
            saved = json.loads((latest / STATE_FILE).read_text())
            if saved.get("run_key") != self.run_key:
                raise TrainError(
                    f"{self.out_dir} holds checkpoints of a different run (config, target or data changed); "
                    "use another --out folder or delete it"
                )
            self.loop = LoopState(**load_checkpoint(latest, self.model, self.optimizer, self.scheduler))
            self.resumed_from = latest.name
            log.warning("resuming from %s (step %d of %d)", latest, self.loop.step, self.steps)
        acc, tc = self.accelerator, self.cfg.train
        model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.run = Session(self.cfg, acc, model, self.optimizer, self.scheduler, self.train_ds, self.holdout_ds,
                           self.collate, holdout_n=min(len(self.holdout_ds), tc.holdout_limit or len(self.holdout_ds)))
        self.mlflow = None
        if self.main:
            self.mlflow = tracking.start_run(self.cfg, self.loop.mlflow_run_id)
            if self.resumed_from is None:
                tracking.log_params(self.cfg, self.run.inner, self.target, self.steps, len(self.train_ds),
                                    len(self.holdout_ds), acc.num_processes)
            self.loop.mlflow_run_id = self.mlflow.info.run_id

    # ----- fit ----------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> bool:
        """The loop, up to `self.steps` (or `stop_at`, where a checkpoint is saved). True when
        the run is complete."""
        tc, loop, timer = self.cfg.train, self.loop, self.timer
        end = self.steps if stop_at is None else min(stop_at, self.steps)
        self.run.model.train()
        if loop.step == 0 and not loop.evals:
            with timer("evaluate"):
                self.record_eval(0)  # the untrained baseline
        bar = StageProgress(total=self.steps, initial=loop.step, disable=not self.main,
                            desc=f"train {self.cfg.drafter.algorithm}",
                   unit="step", mininterval=2.0)
        try:
            while loop.step < end:
                with timer("train"):
                    record, summary = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tau=f"{summary['sim_tau']:.2f}")
                step = loop.step
                if self.mlflow is not None and (step % tc.log_every == 0 or step == self.steps):
                    tracking.log_metrics(step, "train", summary, extra={k: record[k] for k in ("lr", "grad_norm",
                                                                                           "tokens_per_s")})
                exported = step in tc.export_steps
                if step % tc.eval_every == 0 or step == self.steps or exported:
                    with timer("evaluate"):
                        self.record_eval(step, export=exported)
                if (step % tc.checkpoint_every == 0 or step == end) and step < self.steps:
                    self.save_checkpoint()
                if self.callback is not None:
                    self.callback(step, record)
        except BaseException:
            if self.mlflow is not None:
                import mlflow

                mlflow.end_run(status="KILLED")  # resumed (same run id) by the next call
            raise
        finally:
            bar.close()
        if loop.step < self.steps:  # stopped at `stop_at`: the run goes on from the checkpoint
            if self.mlflow is not None:
                import mlflow

                mlflow.end_run(status="KILLED")
            return False
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
        return True

    def step(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """One optimizer step, accounted in the loop state. -> (history record, summary)."""
        loop = self.loop
        started, cpu = time.perf_counter(), time.process_time()
        totals, tokens, lr, grad_norm = self.run.train_step(loop.step)
        elapsed = time.perf_counter() - started
        loop.cpu_s += time.process_time() - cpu
        summary = totals.summary()
        n = totals.positions
        record = {"step": loop.step + 1, "loss": summary["loss"], **summary["losses"], "sim_tau": summary["sim_tau"],
                  "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / max(elapsed, 1e-9), "positions": n,
                  "cpu_s": loop.cpu_s}
        loop.history.append(record)
        loop.tokens += tokens
        loop.with_targets += int(totals.sequences[0])
        loop.without_targets += int(totals.sequences[1])
        loop.positions += n
        loop.step += 1
        return record, summary

    def record_eval(self, step: int, export: bool = False) -> None:
        """Held-out metrics; the best drafter so far goes to `best/`, an export step to `steps/step-N/`."""
        loop, main = self.loop, self.main
        result = self.run.evaluate()
        tau = result[self.select]
        loop.evals.append({"step": step, **result})
        if loop.best_tau is None or tau > loop.best_tau:
            loop.best_tau, loop.best_step = tau, step
            if main:
                export_drafter(self.run.inner, self.out_dir / "best", step, result, loop.cpu_s)
        if main and export:
            export_drafter(self.run.inner, self.out_dir / "steps" / f"step-{step:08d}", step, result, loop.cpu_s)
        if self.mlflow is not None:
            import mlflow

            tracking.log_metrics(step, "holdout", result)
            mlflow.log_metric("holdout/best_tau", loop.best_tau, step=step)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        with self.timer("checkpoint"):
            if self.main:
                checkpoint(self.ckpt_root, self.run.inner, self.optimizer, self.scheduler, asdict(self.loop),
                           self.cfg.train.keep_checkpoints)
            self.accelerator.wait_for_everyone()

    @property
    def select(self) -> str:
        return "sim_tau_greedy" if self.cfg.evaluate.temperature == 0 else "sim_tau"

    # ----- finish -------------------------------------------------------------------------------
    def finish(self) -> Manifest:
        """`last/`, the final checkpoint, metrics.json, the manifest; MLflow artifacts."""
        cfg, tc, loop, out_dir = self.cfg, self.cfg.train, self.loop, self.out_dir
        inner, W = self.run.inner, self.accelerator.num_processes
        if self.main:
            export_drafter(inner, out_dir / "last", loop.step, loop.evals[-1], loop.cpu_s)
            checkpoint(self.ckpt_root, inner, self.optimizer, self.scheduler, asdict(loop), tc.keep_checkpoints)
            atomic_write_json(out_dir / "metrics.json", {
                "algorithm": cfg.drafter.algorithm, "selected_by": self.select, "best_step": loop.best_step,
                "best_tau": loop.best_tau, "evals": loop.evals, "history": loop.history,
            })
            cfg.save(out_dir / "config.yaml")
            plots.training_curves(loop.history, loop.evals, out_dir / "training_curves.png")
        seen = loop.step * tc.batch_size
        counts = {
            "train_sequences": len(self.train_ds), "holdout_sequences": len(self.holdout_ds),
            "holdout_evaluated": self.run.holdout_n, "steps": loop.step, "sequences_seen": seen,
            "sequences_with_targets": loop.with_targets, "sequences_without_targets": loop.without_targets,
            "tokens_seen": loop.tokens, "positions_trained": int(loop.positions), "evaluations": len(loop.evals),
            "processes": W,
        }
        check_accounting(seen, {"with_targets": counts["sequences_with_targets"],
                                "without_targets": counts["sequences_without_targets"]}, "training sequences")
        params = {"run_key": self.run_key, "algorithm": cfg.drafter.algorithm,
                  "drafter": cfg.drafter.model_dump(mode="json"), "train": tc.model_dump(mode="json"),
                  "seed": cfg.run.seed, "layer_ids": self.layer_ids,
                  "trainable_parameters": sum(p.numel() for p in self.run.trainable), "selected_by": self.select,
                  "vocabulary": self.vocabulary, "mixed_precision": self.accelerator.mixed_precision,
                  "init_from": self.init}
        outputs = {"best": str(out_dir / "best"), "last": str(out_dir / "last"), "best_step": loop.best_step,
                   "best_tau": loop.best_tau, "final_holdout": loop.evals[-1], "resumed_from": self.resumed_from,
                   "mlflow_run_id": loop.mlflow_run_id, "train_cpu_s": round(loop.cpu_s, 2),
                   "exports": {str(s): str(out_dir / "steps" / f"step-{s:08d}") for s in tc.export_steps
                               if s <= loop.step}}
        inputs = {"cache": str(self.cache_dir) if self.data is None else "<in-memory>",
                  "target_fingerprint": self.target.fingerprint,
                  "cache_meta": {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, list, bool))}}
        final = loop.evals[-1]
        metrics = {"best_holdout_sim_tau": loop.best_tau, "final_holdout_sim_tau": final.get("sim_tau"),
                   "final_holdout_sim_tau_greedy": final.get("sim_tau_greedy"), "train_cpu_s": loop.cpu_s,
                   # per CPU second of the optimizer steps: both count every resume (wall time would not)
                   "tokens_per_cpu_s": loop.tokens / loop.cpu_s if loop.cpu_s else None}
        manifest = Manifest(stage="train", inputs=inputs, params=params, counts=counts, outputs=outputs)
        if self.main:
            manifest = write_manifest(out_dir, "train", inputs=inputs, params=params, counts=counts,
                                      durations=self.timer.durations, outputs=outputs, metrics=metrics)
            if loop.mlflow_run_id is not None:
                tracking.log_artifacts(loop.mlflow_run_id, out_dir)
        self.accelerator.wait_for_everyone()
        return manifest


def build_model(cfg: Config, target: Any, layer_ids: list[int], train_ds: Any, timer: Timer) -> tuple[Any, dict]:
    """The configured drafter on the target's frozen heads, its draft vocabulary from the
    training data's assistant tokens. -> (model, vocabulary: sizes and coverage of the answers)."""
    heads = TargetHeads.from_target(target)
    token_counts = None
    if cfg.drafter.draft_vocab_size and cfg.drafter.draft_vocab_size < heads.vocab_size:
        with timer("token_counts"):
            token_counts = _token_counts(train_ds, heads.vocab_size)
    model = build(cfg, heads, layer_ids, token_counts)
    model.verifier["name_or_path"] = verifier_name(target) or model.verifier["name_or_path"]
    model.meta = {"target_fingerprint": target.fingerprint, "target_name": getattr(target, "name", None)}
    vocabulary = {"draft_vocab_size": model.draft_vocab_size, "target_vocab_size": heads.vocab_size}
    if token_counts is not None:
        vocabulary["coverage"] = round(float(token_counts[model.t2d.cpu()].sum() / token_counts.sum().clamp_min(1)), 6)
    return model, vocabulary


def init_source(path: str | None) -> dict[str, Any] | None:
    """The drafter a run starts from: its folder, weights hash and training CPU seconds."""
    if path is None:
        return None
    from drafter.models import speculators_format as fmt

    folder = Path(path)
    if not (folder / fmt.WEIGHTS_FILE).is_file():
        raise ConfigError(f"train.init_from={path}: no {fmt.WEIGHTS_FILE} there (expected an exported drafter folder)")
    config, _ = fmt.read(folder)
    return {"path": str(folder), "weights_sha256": sha256_file(folder / fmt.WEIGHTS_FILE),
            "algorithm": config["speculators_model_type"], "step": config.get("drafter", {}).get("step"),
            "train_cpu_s": config.get("drafter", {}).get("train_cpu_s")}


def warm_start(model, folder: Path, target: Any) -> None:
    """Copy an exported drafter's weights and draft vocabulary into `model` (same algorithm and
    shapes, else a ConfigError): a retrain continues from the drafter in production."""
    from drafter.models import load_drafter
    from drafter.models.speculators_format import DrafterFormatError

    try:
        start = load_drafter(folder, TargetHeads.from_target(target))
    except DrafterFormatError as exc:
        raise ConfigError(f"train.init_from: {exc}") from exc
    if type(start) is not type(model):
        raise ConfigError(f"train.init_from={folder} is a {start.algorithm} drafter; this run trains "
                          f"{model.algorithm}")
    want, have = model.state_dict(), start.state_dict()
    wrong = sorted(k for k in want.keys() | have.keys()
                   if k not in want or k not in have or want[k].shape != have[k].shape)
    if wrong:
        raise ConfigError(f"train.init_from={folder} does not match drafter.* of this run "
                          f"(differs in {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''})")
    model.load_state_dict(have)


def export_drafter(model, folder: Path, step: int, result: dict[str, Any], cpu_s: float) -> None:
    """The speculators-format drafter at `step`, with its held-out estimate in the config's meta."""
    model.meta |= {"step": step, "holdout_sim_tau": result["sim_tau"], "train_cpu_s": round(cpu_s, 2),
                   "holdout_sim_tau_greedy": result["sim_tau_greedy"], "holdout_accept_rate": result["accept_rate"]}
    with atomic_dir(folder) as tmp:
        model.export(tmp)


def train(
    cfg: Config,
    cache_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    target: Any = None,
    *,
    data: tuple[Any, Any] | None = None,
    collate: Callable[[list[dict[str, torch.Tensor]]], TrainBatch] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    stop_at: int | None = None,
) -> Manifest:
    """Train the configured drafter; returns the manifest (also written to out_dir).

    `data=(train, holdout)` takes any datasets with `len`, `ds[i]` -> dict(input_ids,
    loss_mask, features, and final_hidden or target_ids/target_probs) and optionally `.meta`,
    instead of the cache in `cache_dir`; `collate` turns samples into a TrainBatch (default:
    drafter.cache.collate). `callback(step, record)` is called after every optimizer step.
    `stop_at=N` trains to step N of the run, saves a checkpoint there and returns a manifest
    with `stopped_at` (N) and no outputs; the next call (with or without it) continues from there.
    """
    trainer = Trainer(cfg, Path(cache_dir) if cache_dir is not None else cfg.data_dir / "cache",
                      Path(out_dir) if out_dir is not None else cfg.data_dir / "drafter", target, data, collate, callback)
    done = trainer.prepare()
    if done is not None:
        return done
    trainer.resume()
    if not trainer.fit(stop_at):
        return Manifest(stage="train", params={"run_key": trainer.run_key}, stopped_at=trainer.loop.step)
    return trainer.finish()
