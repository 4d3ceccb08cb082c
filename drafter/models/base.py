"""The one surface every drafter algorithm exposes.

The trainer, the decoding engine, the evaluator and the exporter depend on this file
only; `eagle3.py`, `dflash.py` and `dspark.py` implement it and register by name.

Conventions (positions are 0-based token positions in the sequence):
- The target's features of position t are the hidden states the target computed *at*
  t (they predict token t+1).
- A drafter's confirmed context is the target features of positions 0..L-1 plus their
  token ids; the *anchor* is the token at position L, whose target features are not
  known yet (it was just sampled). `propose` drafts tokens for positions L+1..L+gamma.
- `propose` never changes the confirmed state; the engine calls `extend` with the
  target features of the positions that verification confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class TargetHeads:
    """The frozen pieces of the target a drafter shares (never stored in its checkpoint)."""

    embed_tokens: nn.Module  # token ids -> [.., H] (Gemma's scale included)
    lm_head: nn.Module  # [.., H] -> [.., V]
    config: Any  # the target's transformers config (width, heads, MLP, rope, eps)
    final_logit_softcapping: float | None = None
    mask_token_id: int | None = None  # DFlash/DSpark block filler; a reserved or special token

    @classmethod
    def from_target(cls, target) -> TargetHeads:
        tok = target.tokenizer
        mask = getattr(tok, "mask_token_id", None) if tok is not None else None
        if mask is None and tok is not None:
            mask = tok.pad_token_id
        return cls(
            embed_tokens=target.embed_tokens,
            lm_head=target.lm_head,
            config=target.config,
            final_logit_softcapping=getattr(target.config, "final_logit_softcapping", None),
            mask_token_id=mask,
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


@dataclass
class TrainBatch:
    """A padded batch of cached sequences (what the cache reader's samples collate into)."""

    input_ids: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] bool: assistant tokens
    attention_mask: torch.Tensor  # [B, T] bool: False on padding
    features: torch.Tensor  # [B, T, n, H]: target feature layers
    final_hidden: torch.Tensor  # [B, T, H]: target final hidden state (p_t via the frozen LM head)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TrainBatch:
        float_kw = {"device": device, "dtype": dtype} if dtype else {"device": device}
        return TrainBatch(
            input_ids=self.input_ids.to(device),
            loss_mask=self.loss_mask.to(device),
            attention_mask=self.attention_mask.to(device),
            features=self.features.to(**float_kw),
            final_hidden=self.final_hidden.to(**float_kw),
        )


@dataclass
class TrainOutput:
    loss: torch.Tensor  # scalar, differentiable
    losses: dict[str, torch.Tensor]  # each weighted term, detached (e.g. ce, tv, bce)
    # Per-position metrics, each a [gamma] tensor: "accept_rate" (expected conditional
    # acceptance 1 - TV(p_d, p_t) at temperature 1), "accuracy" (draft argmax == target
    # argmax), "count" (positions that contributed).
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Proposal:
    tokens: torch.Tensor  # [1, g] drafted token ids
    # [1, g, V]: exactly the distributions the tokens were drawn from, over the target
    # vocabulary (DSpark: after the Markov bias). At temperature 0 a one-hot of the argmax,
    # so the acceptance rule degenerates to exact greedy matching.
    probs: torch.Tensor
    confidences: torch.Tensor | None = None  # [1, g] raw conditional survival c_k (DSpark)


class DraftModel(nn.Module):
    """Base class: subclasses set `algorithm` and implement the methods below."""

    algorithm: ClassVar[str]

    def __init__(self, config: Any, heads: TargetHeads) -> None:
        super().__init__()
        self.config = config
        # Kept out of the module tree: frozen, shared with the target, not in checkpoints.
        object.__setattr__(self, "heads", heads)

    # --- training ------------------------------------------------------------
    def forward_train(self, batch: TrainBatch) -> TrainOutput:
        raise NotImplementedError

    # --- inference -----------------------------------------------------------
    def init_state(self) -> Any:
        """A fresh per-sequence drafting state (batch of one)."""
        raise NotImplementedError

    def extend(self, state: Any, features: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Append confirmed positions: features [1, t, n, H] and their token ids [1, t]."""
        raise NotImplementedError

    def propose(
        self,
        state: Any,
        anchor: torch.Tensor,
        gamma: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        """Draft `gamma` tokens after `anchor` ([1] long) without changing `state`."""
        raise NotImplementedError

    # --- persistence -----------------------------------------------------------
    def export(self, out_dir: Path) -> Path:
        """Write the speculators-format checkpoint (config.json + model.safetensors)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path, heads: TargetHeads) -> DraftModel:
        raise NotImplementedError
