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


__all__ = ["DraftModel", "Proposal", "TargetHeads", "TrainBatch", "TrainOutput", "REGISTRY", "register", "model_class"]
