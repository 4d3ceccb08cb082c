"""Resumable training checkpoints: `checkpoints/step-N/`, nothing pickled.

A checkpoint holds the trainable weights (safetensors), the optimizer tensors
(safetensors) and scalars (JSON), the scheduler state (JSON), the RNG state and the
loop state (`state.json`, written last: it marks the checkpoint complete).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from drafter.errors import DrafterError
from drafter.manifest import atomic_dir, atomic_write_bytes, atomic_write_json

STATE_FILE = "state.json"


class CheckpointError(DrafterError):
    """A checkpoint that cannot be read back (damaged or from another model)."""


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
    from safetensors import SafetensorError

    try:
        return _load_checkpoint(folder, model, optimizer, scheduler)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:  # damaged file, JSON, shapes
        raise CheckpointError(
            f"{folder}: the checkpoint cannot be read ({type(exc).__name__}: {str(exc)[:300]}); delete that folder "
            "to resume from the one before it, or train into a fresh --out") from exc


def _load_checkpoint(folder: Path, model, optimizer, scheduler) -> dict[str, Any]:
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


def checkpoint(root: Path, model, optimizer, scheduler, loop: dict[str, Any], keep: int) -> Path:
    """Save `step-N/` under root and keep only the `keep` most recent."""
    folder = save_checkpoint(root / f"step-{loop['step']:08d}", model, optimizer, scheduler, loop)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None
