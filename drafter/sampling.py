"""The target's sampling distribution: temperature, then top-k, then top-p, without sorting the vocabulary.

transformers applies top-k and top-p as two warpers, and its top-p sorts every row of the
vocabulary (49,152 logits for SmolLM2) although top-k has already masked all but k of them.
On a CPU that sort, its cumulative sum and the scatter back cost ~40 ms of a ~265 ms decoding
step at 16 rows, and its draw (`multinomial` over the whole vocabulary: an exponential variate
per logit) another 22 ms. `Sampler` does the same three steps on the k survivors only (its
`mask` is transformers' masked scores) and draws among the survivors.

Ties: transformers' top-k keeps every token tied with the k-th (more than k may pass), and
so do we. Where top-p's cut falls between tokens of equal logits, transformers' unstable sort
keeps some of them at random; we keep every token as likely as the least likely one kept.
Elsewhere the masked scores are transformers' to the bit (tested).
"""

from __future__ import annotations

import torch


class Sampler:
    """scores / temperature, then top-k (0: off), then top-p (1: off): transformers' order and rules.

    `probs` is the whole distribution (what speculative decoding's acceptance rule compares
    with), `draw` one token per row from it, among the survivors only when a mask is on."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
        if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"Sampler needs temperature > 0, top_k >= 0 (0: off) and 0 < top_p <= 1 (1: off) "
                             f"(got {temperature}, {top_k}, {top_p})")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @property
    def masked(self) -> bool:
        return self.top_k > 0 or self.top_p < 1

    def _survivors(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scaled scores, the top values [B, w] descending, their ids, the least kept value [B, 1])."""
        scores = scores.float() / self.temperature
        k = min(self.top_k or scores.size(-1), scores.size(-1))
        top = torch.topk(scores, k, dim=-1)
        kth = top.values[..., -1:]
        widest = int((scores >= kth).sum(-1).max()) if k < scores.size(-1) else k  # ties with the k-th pass too
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
        if not self.masked:
            return scores.float() / self.temperature
        scaled, _, _, least_kept = self._survivors(scores)
        return scaled.masked_fill(scaled < least_kept, float("-inf"))

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """softmax(mask(scores)) in float32, over the whole vocabulary."""
        return torch.softmax(self.mask(scores), dim=-1)

    def draw(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token id per row [B, 1], drawn from `probs(scores)`."""
        if not self.masked:
            return torch.multinomial(self.probs(scores), 1, generator=generator)
        _, values, ids, least_kept = self._survivors(scores)
        probs = values.masked_fill(values < least_kept, float("-inf")).softmax(-1)
        return ids.gather(-1, torch.multinomial(probs, 1, generator=generator))
