"""Drafter algorithms, registered by name; each module implements `base.DraftModel`."""

from __future__ import annotations

from drafter.models.base import DraftModel, Proposal, TargetHeads, TrainBatch, TrainOutput

REGISTRY: dict[str, type[DraftModel]] = {}


def register(cls: type[DraftModel]) -> type[DraftModel]:
    REGISTRY[cls.algorithm] = cls
    return cls


def model_class(algorithm: str) -> type[DraftModel]:
    import drafter.models.dflash  # noqa: F401  (modules register themselves on import)
    import drafter.models.dspark  # noqa: F401
    import drafter.models.eagle3  # noqa: F401

    try:
        return REGISTRY[algorithm]
    except KeyError:
        raise ValueError(f"unknown drafter algorithm {algorithm!r}; known: {sorted(REGISTRY)}") from None


def build(cfg, heads: TargetHeads, layer_ids: list[int], token_counts=None) -> DraftModel:
    """A fresh drafter for run config `cfg` (its `drafter` and `train` sections).

    `token_counts` ([V] counts of assistant tokens in the training data) picks EAGLE-3's
    reduced draft vocabulary when `drafter.draft_vocab_size` is set.
    """
    cls = model_class(cfg.drafter.algorithm)
    model = cls(cls.config_from(cfg, layer_ids), heads)
    if getattr(model, "d2t", None) is not None:
        if token_counts is None:
            raise ValueError("a reduced draft vocabulary needs token counts of the training data")
        model.set_draft_vocab(token_counts)
    return model


def load_drafter(path, heads: TargetHeads) -> DraftModel:
    """Load any drafter folder (speculators format) written by `export`."""
    from drafter.models import speculators_format as fmt

    config, _ = fmt.read(path)
    return model_class(config["speculators_model_type"]).load(path, heads)


__all__ = [
    "DraftModel", "Proposal", "TargetHeads", "TrainBatch", "TrainOutput", "REGISTRY", "register", "model_class",
    "build", "load_drafter",
]
