"""DFlash: literally DSpark with the heads off (ALGORITHMS.md section 4).

Same backbone code, same block layout and training mask; r = 0 (no Markov head), no
confidence head, loss = cross-entropy against the ground truth with position weights
exp(-k / loss_decay). Exported as speculators `dflash` with `sample_from_anchor: true`
(DeepSpec's layout: all S block slots are drafts).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from drafter.models import register
from drafter.models.base import TargetHeads
from drafter.models.dspark import DSpark, DSparkConfig


def heads_off(config: DSparkConfig) -> DSparkConfig:
    """The DFlash baseline of a DSpark config: r = 0, no confidence head, CE only."""
    return replace(config, markov_rank=0, confidence_head=False, ce_weight=1.0, tv_weight=0.0, bce_weight=0.0)


@register
class DFlash(DSpark):
    algorithm = "dflash"
    architecture = "DFlashSpeculator"

    def __init__(self, config: DSparkConfig, heads: TargetHeads) -> None:
        if config != heads_off(config):
            raise ValueError("DFlash is DSpark with the heads off: use dflash.heads_off(config)")
        super().__init__(config, heads)

    @classmethod
    def config_from(cls, cfg: Any, layer_ids: list[int]) -> DSparkConfig:
        return heads_off(DSpark.config_from(cfg, layer_ids))

    @classmethod
    def config_from_speculators(cls, config: dict[str, Any]) -> DSparkConfig:
        return heads_off(DSpark.config_from_speculators(config))
