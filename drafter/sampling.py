"""Temperature, top-k and top-p for transformers' `generate` without sorting the vocabulary.

transformers applies top-k and top-p as two warpers, and its top-p sorts every row of the
vocabulary (49,152 logits for SmolLM2) although top-k has already masked all but k of them.
On a CPU that sort, its cumulative sum and the scatter back cost ~40 ms of a ~265 ms decoding
step at 16 rows (`bench/regenerate_throughput.py`), and the draw over the whole vocabulary
another 22 ms. `TopKTopP` does the same three steps on the k survivors only (its `mask` is
transformers' masked scores), and draws among the survivors.

Ties: transformers' top-k keeps every token tied with the k-th (more than k may pass), and
so do we. Where top-p's cut falls between tokens of equal logits, transformers' unstable sort
keeps some of them at random; we keep every token as likely as the least likely one kept.
Elsewhere the masked scores are transformers' to the bit (tested).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class TopKTopP(LogitsProcessor):
    """scores / temperature, then top-k, then top-p (transformers' order and rules), and the draw.

    As a logits processor it draws the token itself, among the survivors only, and returns
    scores that leave greedy decoding no other choice (0 for the drawn token, -inf elsewhere):
    `generate(do_sample=False, logits_processor=[TopKTopP(...)])`. transformers' own draw
    (`multinomial` over the whole vocabulary: an exponential variate per logit, 22 ms a step at
    16 rows of 49,152) is the same distribution at the cost of a few dozen."""

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        if temperature <= 0 or top_k < 1 or not 0 < top_p < 1:
            raise ValueError(f"TopKTopP needs temperature > 0, top_k >= 1 and 0 < top_p < 1 "
                             f"(got {temperature}, {top_k}, {top_p})")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def _survivors(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scaled scores, the top values [B, w] descending, their ids, the least kept value [B, 1])."""
        scores = scores / self.temperature
        k = min(self.top_k, scores.size(-1))
        top = torch.topk(scores, k, dim=-1)
        kth = top.values[..., -1:]
        widest = int((scores >= kth).sum(-1).max())  # ties with the k-th value pass top-k too
        values = top.values
        if widest > k:
            top = torch.topk(scores, widest, dim=-1)
            values = top.values.masked_fill(top.values < kth, float("-inf"))  # rows with fewer ties than the widest
        ascending = values.flip(-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
        remove[..., -1] = False  # the most likely token always stays
        least_kept = ascending.gather(-1, remove.sum(-1, keepdim=True))
        return scores, values, top.indices, least_kept

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """The scaled scores with every token top-k or top-p removes at -inf (transformers' warpers' output)."""
        scaled, _, _, least_kept = self._survivors(scores)
        return scaled.masked_fill(scaled < least_kept, float("-inf"))

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """One token id per row [B, 1], drawn from softmax(mask(scores)) with torch's random state."""
        _, values, ids, least_kept = self._survivors(scores)
        probs = values.masked_fill(values < least_kept, float("-inf")).softmax(-1)
        return ids.gather(-1, torch.multinomial(probs, 1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.full_like(scores, float("-inf")).scatter_(-1, self.draw(scores), 0.0)
