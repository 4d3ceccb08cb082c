"""Temperature, top-k and top-p for transformers' `generate` without sorting the vocabulary.

transformers applies top-k and top-p as two warpers, and its top-p sorts every row of the
vocabulary (49,152 logits for SmolLM2) although top-k has already masked all but k of them.
On a CPU that sort, its cumulative sum and the scatter back cost ~40 ms of a ~265 ms decoding
step at 16 rows (`bench/regenerate_throughput.py`). `TopKTopP` does the same three steps on
the k survivors only, and hands transformers the same masked scores, so its softmax and
multinomial draw the same token from the same random state.

Ties: transformers' top-k keeps every token tied with the k-th (more than k may pass), and
so do we. Where top-p's cut falls between tokens of equal logits, transformers' unstable sort
keeps some of them at random; we keep every token as likely as the least likely one kept.
Elsewhere the masked scores are transformers' to the bit (tested).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class TopKTopP(LogitsProcessor):
    """scores / temperature, then top-k, then top-p (transformers' order and rules)."""

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        if temperature <= 0 or top_k < 1 or not 0 < top_p < 1:
            raise ValueError(f"TopKTopP needs temperature > 0, top_k >= 1 and 0 < top_p < 1 "
                             f"(got {temperature}, {top_k}, {top_p})")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature
        k = min(self.top_k, scores.size(-1))
        top = torch.topk(scores, k, dim=-1).values
        kth = top[..., -1:]
        widest = int((scores >= kth).sum(-1).max())  # ties with the k-th value pass top-k too
        if widest > k:
            top = torch.topk(scores, widest, dim=-1).values
            top = top.masked_fill(top < kth, float("-inf"))  # rows with fewer ties than the widest
        ascending = top.flip(-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
        remove[..., -1] = False  # the most likely token always stays
        least_kept = ascending.gather(-1, remove.sum(-1, keepdim=True))
        return scores.masked_fill(scores < least_kept, float("-inf"))
