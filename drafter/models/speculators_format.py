"""The `speculators` checkpoint format (what vLLM loads): config.json + model.safetensors.

Field names follow the `speculators` package (0.9.0): `speculators_model_type`,
`speculators_config` (algorithm, greedy proposal, verifier), `transformer_layer_config`
(the draft layers' transformers config), `draft_vocab_size`, and per algorithm
`aux_hidden_state_layer_ids` / `eagle_aux_hidden_state_layer_ids`, `block_size`,
`mask_token_id`, `sample_from_anchor`, `markov_rank`, `markov_head_type`,
`enable_confidence_head`, ... Weight names are the drafters' own state-dict names,
which match speculators' modules. DFlash/DSpark folders do not hold the frozen target
embedding and LM head (speculators and vLLM reload them from the verifier); EAGLE-3
folders carry copies of both (the reduced-vocabulary head restricted to the draft ids),
because speculators' EAGLE-3 loader does not refill them. Loading ignores those copies.

Layer ids: speculators (and vLLM) number auxiliary hidden states like transformers'
`output_hidden_states` (0 = embeddings, i = output of decoder layer i-1), while this
project numbers decoder layers from 0 with -1 = embeddings (DeepSpec's convention).
Export adds one; load subtracts one.

An extra top-level `drafter` key keeps this project's own config for an exact round
trip; speculators keeps unknown keys as plain attributes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from drafter.errors import DrafterError
from drafter.manifest import atomic_write_bytes, atomic_write_json

SPECULATORS_VERSION = "0.9.0"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# transformers config keys that describe the saved model, not the layer shape.
_SHAPE_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_hidden_layers", "vocab_size", "rms_norm_eps",
)
_DROP_KEYS = ("architectures", "_name_or_path", "auto_map", "quantization_config", "transformers_version")


class DrafterFormatError(DrafterError, ValueError):
    """A drafter folder that is not a readable speculators checkpoint for this target."""


def to_speculators_layer_ids(layer_ids: list[int]) -> list[int]:
    return [i + 1 for i in layer_ids]


def from_speculators_layer_ids(layer_ids: list[int]) -> list[int]:
    return [i - 1 for i in layer_ids]


def layer_config_dict(layer_config: Any) -> dict[str, Any]:
    """The draft layers' transformers config as speculators serialises it (a diff dict)."""
    data = layer_config.to_diff_dict()
    for key in _DROP_KEYS:
        data.pop(key, None)
    data["model_type"] = layer_config.model_type
    for key in _SHAPE_KEYS:  # always explicit, even where they equal a class default
        if getattr(layer_config, key, None) is not None:
            data[key] = getattr(layer_config, key)
    return data


def verifier_of(target_config: Any, name_or_path: str | None = None) -> dict[str, Any]:
    name = name_or_path or getattr(target_config, "_name_or_path", None) or None
    archs = list(getattr(target_config, "architectures", None) or [])
    if not archs:  # a model built in-process: its family's causal-LM class
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(target_config.model_type)
        archs = [arch] if isinstance(arch, str) else []
    return {"name_or_path": name, "architectures": archs}


def config_json(
    *,
    model_type: str,
    architecture: str,
    layer_config: Any,
    verifier: dict[str, Any],
    speculative_tokens: int,
    fields: dict[str, Any],
    drafter: dict[str, Any],
) -> dict[str, Any]:
    return {
        "architectures": [architecture],
        "speculators_model_type": model_type,
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": model_type,
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": verifier,
        },
        "transformer_layer_config": layer_config_dict(layer_config),
        **fields,
        "dtype": "float32",
        "drafter": drafter,
    }


def write(out_dir: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write config.json and model.safetensors (each atomically)."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write_bytes(out_dir / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out_dir / CONFIG_FILE, config)
    return out_dir


# Verifier-owned tensors a speculators-saved folder may carry; drafters take them from the target.
FROZEN_KEYS = ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight")


def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise DrafterFormatError(f"{path}: expected {CONFIG_FILE} and {WEIGHTS_FILE} (a speculators checkpoint)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise DrafterFormatError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if "speculators_model_type" not in config:
        raise DrafterFormatError(f"{cfg_path}: no speculators_model_type; not a speculators checkpoint")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise DrafterFormatError(
            f"{weights}: cannot read the drafter's weights ({type(exc).__name__}: {exc}); the file is damaged "
            "or was cut short: restore it, or train or export the drafter again"
        ) from None
    return config, state


def check_target(config: dict[str, Any], heads: Any, path: Path) -> None:
    """Refuse a drafter built for another target shape (width or vocabulary)."""
    layer = config.get("transformer_layer_config", {})
    for key, have in (("hidden_size", heads.hidden_size), ("vocab_size", heads.vocab_size)):
        want = layer.get(key)
        if want is not None and want != have:
            raise DrafterFormatError(
                f"{path}: drafter was built for a target with {key}={want}, this target has {have}"
            )


def export_drafter(
    drafter_dir: str | Path,
    out_dir: str | Path,
    verifier: str | None = None,
    which: str = "best",
    calibration_dir: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Copy a trained drafter into a standalone speculators folder (what `vllm serve` loads).

    `drafter_dir` is a training output (its `best/` or `last/` is taken) or a drafter
    folder itself. `verifier` sets `speculators_config.verifier.name_or_path` (a hub id or
    a path the serving machine can read). The drafter's calibration.json (beside it, or
    in `calibration_dir` when fitted on these weights) is copied along. An existing `out_dir`
    is replaced only when drafter wrote it (or with `force`).
    """
    import shutil

    from drafter.manifest import atomic_dir, check_replaceable
    from drafter.scheduler import find_calibration

    check_replaceable(out_dir, force)  # before any work: never wipe a folder that is not ours
    src = Path(drafter_dir)
    if not (src / CONFIG_FILE).is_file():
        src = src / which
    config, state = read(src)
    if verifier:
        config["speculators_config"]["verifier"]["name_or_path"] = verifier
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        shutil.copy2(src / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        atomic_write_json(tmp / CONFIG_FILE, config)
        calibration = find_calibration(src, calibration_dir)
        if calibration is not None:
            shutil.copy2(calibration, tmp / "calibration.json")
    return {
        "algorithm": config["speculators_model_type"],
        "source": str(src),
        "out": str(out_dir),
        "verifier": config["speculators_config"]["verifier"]["name_or_path"],
        "tensors": len(state),
        "parameters": sum(t.numel() for k, t in state.items() if k not in ("d2t", "t2d", "lm_head.weight")),
        "block_size": config.get("block_size", config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]),
    }
