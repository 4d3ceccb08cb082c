"""A reduced draft vocabulary (EAGLE-3's d2t/t2d), shared by all three algorithms.

The drafter scores only the N most frequent target tokens of the training data (assistant
tokens): `d2t[i]` = target id of draft id i minus i, `t2d` = bool mask over the target
vocabulary (the speculators layout vLLM reads). The LM head is the frozen target head
restricted to those rows, so every drafted position pays an H x N product instead of
H x V. Proposals map back to target ids; a target token outside the draft vocabulary has
draft probability 0, and the verification rule is unchanged (lossless either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drafter.models.metrics import GREEDY_BELOW
from drafter.prepack import is_prepacked, prepack_like


class DraftVocab:
    """Mixin for a `DraftModel`: `d2t`/`t2d` buffers (None with the full vocabulary)."""

    d2t: torch.Tensor | None
    t2d: torch.Tensor | None

    def init_draft_vocab(self, size: int | None, target_vocab: int) -> None:
        if size is not None and size < target_vocab:
            self.register_buffer("d2t", torch.zeros(size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(target_vocab, dtype=torch.bool))
        else:
            self.d2t = self.t2d = None

    @property
    def draft_vocab_size(self) -> int:
        return self.heads.vocab_size if self.d2t is None else self.d2t.numel()

    def set_draft_vocab(self, token_counts: torch.Tensor) -> None:
        """Keep the most frequent target tokens (counts [V] over the training data)."""
        if self.d2t is None:
            return
        n = self.d2t.numel()
        ids = torch.topk(token_counts.float().to(self.t2d.device), n).indices.sort().values
        self.d2t.copy_(ids - torch.arange(n, device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """Target id of each draft id (None with the full vocabulary)."""
        if self.d2t is None:
            return None
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def draft_index(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft ids; a token outside the draft vocabulary -> `draft_vocab_size`."""
        if self.t2d is None:
            return target_ids
        table = torch.where(self.t2d, self.t2d.long().cumsum(0) - 1, self.d2t.numel())
        return table[target_ids]

    def to_target_ids(self, draft: torch.Tensor) -> torch.Tensor:
        return draft if self.d2t is None else draft + self.d2t[draft]

    def vocab_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden -> draft-vocabulary logits via the frozen target LM head."""
        if self.d2t is None:
            return self.heads.logits(normed)
        head = self.heads.lm_head
        if head.weight.requires_grad:  # a head being trained: slice it each time, gradients flow
            ids = self.draft_ids
            bias = None if head.bias is None else head.bias[ids]
            logits = F.linear(normed.to(head.weight.dtype), head.weight[ids], bias)
        else:
            linear = self.draft_head()
            logits = linear(normed.to(linear.weight.dtype))
        cap = self.heads.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def draft_head(self) -> nn.Linear:
        """The frozen LM head's rows of the draft vocabulary, as a linear layer kept between calls.
        Copying N x H rows out of the V x H head costs several times the product itself (6.4
        against 1.4 ms a block on SmolLM2), so the slice is kept until the head, its device or
        dtype, or d2t change; when the head's weight is reordered once (`drafter.prepack`), so is
        the slice's. Not a submodule: it holds no state of its own."""
        head = self.heads.lm_head
        packed = is_prepacked(head)
        key = (head.weight.data_ptr(), head.weight._version, head.weight.dtype, self.d2t.data_ptr(), self.d2t._version,
               packed)
        if self.__dict__.get("_draft_head_key") != key:
            # Plain tensors even when first asked under inference_mode: training reuses them.
            with torch.inference_mode(False), torch.no_grad():
                ids = self.draft_ids
                weight = head.weight[ids]
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=head.bias is not None, device="meta")
                linear.weight = nn.Parameter(weight, requires_grad=False)
                if head.bias is not None:
                    linear.bias = nn.Parameter(head.bias[ids], requires_grad=False)
                if packed:
                    prepack_like(linear, head)
            self.__dict__["_draft_head"], self.__dict__["_draft_head_key"] = linear, key
        return self.__dict__["_draft_head"]

    def to_target(self, probs: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary distributions [..., Vd] -> target vocabulary [..., V] (zeros elsewhere)."""
        if self.d2t is None:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.heads.vocab_size)
        return out.index_copy_(-1, self.draft_ids, probs)

    def proposal_probs(self, probs: list[torch.Tensor | None], temperature: float) -> torch.Tensor | None:
        """The drafted positions' distributions, in order ([k, Vd] each) -> the proposal's [1, g, V]
        over the target vocabulary, or None when greedy (`sample` draws none): verification then
        compares tokens, and a [g, V] one-hot would cost every round a fill."""
        return None if temperature <= GREEDY_BELOW else self.to_target(torch.cat(probs)[None])

    def at_target_ids(self, values: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """values [N, Vd] over the draft vocabulary, read at target ids [N, k] (0 outside it)."""
        if self.t2d is None:
            return values.gather(-1, target_ids)
        padded = F.pad(values, (0, 1))  # the extra column: tokens the draft vocabulary lacks
        return padded.gather(-1, self.draft_index(target_ids))
