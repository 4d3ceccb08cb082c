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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


def reserved_mask_token(tokenizer, eos_ids: list[int]) -> int | None:
    """The MASK id DFlash/DSpark fill their blocks with: the tokenizer's own mask token, else
    the last special token the chat never uses (not EOS, pad or BOS, absent from the chat
    template); SmolLM2 gets `<empty_output>` (16). Never an EOS or pad token: a block of
    end-of-turn tokens would teach the drafter to stop."""
    if tokenizer is None:
        return None
    taken = {*eos_ids, tokenizer.pad_token_id, tokenizer.bos_token_id}
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id not in taken:
        return tokenizer.mask_token_id
    template = getattr(tokenizer, "chat_template", None) or ""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    unused = [i for i, tok in added.items() if tok.special and i not in taken and str(tok) not in template]
    return max(unused) if unused else None


@dataclass
class TargetHeads:
    """The frozen pieces of the target a drafter shares (never stored in its checkpoint)."""

    embed_tokens: nn.Module  # token ids -> [.., H] (Gemma's scale included)
    lm_head: nn.Module  # [.., H] -> [.., V]
    config: Any  # the target's transformers config (width, heads, MLP, rope, eps)
    final_logit_softcapping: float | None = None
    mask_token_id: int | None = None  # DFlash/DSpark block filler; a reserved or special token
    eos_token_ids: list[int] = field(default_factory=list)  # never a MASK

    @classmethod
    def from_target(cls, target) -> TargetHeads:
        eos = list(target.eos_token_ids)
        return cls(
            embed_tokens=target.embed_tokens,
            lm_head=target.lm_head,
            config=target.config,
            final_logit_softcapping=getattr(target.config, "final_logit_softcapping", None),
            mask_token_id=reserved_mask_token(target.tokenizer, eos),
            eos_token_ids=eos,
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The frozen head keeps the target's dtype (bf16 under runtime.dtype=auto); the drafter's
        # hidden state may be fp32 (outside autocast): compute in the head's dtype.
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
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
    # p_t, what the losses train against: the target's top-k (ids [B, T, k], probabilities
    # [B, T, k]) when the cache stores them, else the final hidden state [B, T, H] (p_t
    # through the frozen LM head). At least one of the two.
    final_hidden: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TrainBatch:
        float_kw = {"dtype": dtype} if dtype else {}

        def move(x: torch.Tensor | None, **kw) -> torch.Tensor | None:
            return None if x is None else x.to(device, **kw)

        return TrainBatch(
            input_ids=self.input_ids.to(device),
            loss_mask=self.loss_mask.to(device),
            attention_mask=self.attention_mask.to(device),
            features=self.features.to(device, **float_kw),
            final_hidden=move(self.final_hidden, **float_kw),
            target_ids=move(self.target_ids),
            target_probs=move(self.target_probs, dtype=torch.float32),
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
    # vocabulary (DSpark: after the Markov bias). None at temperature 0: the tokens are the
    # argmaxes and verification degenerates to exact greedy matching.
    probs: torch.Tensor | None
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

    def extend_batch(self, states: Sequence[Any], features: Sequence[torch.Tensor],
                     input_ids: Sequence[torch.Tensor]) -> None:
        """`extend` for several sequences (each its own t). Here one at a time; a drafter that can
        extends them in one pass (the engine's batches call this)."""
        for state, f, ids in zip(states, features, input_ids):
            self.extend(state, f, ids)

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

    def propose_batch(
        self,
        states: Sequence[Any],
        anchors: torch.Tensor,
        gammas: Sequence[int],
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> list[Proposal]:
        """`propose` for several sequences (anchors [b]), one Proposal each. Here one at a time;
        a drafter that can drafts them in one pass (the engine's batches call this)."""
        return [self.propose(s, a.reshape(1), g, temperature, generator) for s, a, g in zip(states, anchors, gammas)]

    # --- persistence -----------------------------------------------------------
    def export(self, out_dir: Path) -> Path:
        """Write the speculators-format checkpoint (config.json + model.safetensors)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path, heads: TargetHeads) -> DraftModel:
        raise NotImplementedError


class BatchedDraftModel(DraftModel):
    """A drafter whose batched calls are its implementation: one request is a batch of one, so
    there is one drafting path (DSpark, DFlash, EAGLE-3)."""

    @torch.no_grad()
    def extend(self, state: Any, features: torch.Tensor, input_ids: torch.Tensor) -> None:
        self.extend_batch([state], [features], [input_ids])

    @torch.no_grad()
    def propose(
        self,
        state: Any,
        anchor: torch.Tensor,
        gamma: int,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        return self.propose_batch([state], anchor.reshape(1), [gamma], temperature, generator)[0]
