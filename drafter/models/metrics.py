"""Small pieces every drafter shares: sampling a draft token, per-position metrics, tau."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures at or below this draft the argmax


def sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [1, V] -> (token [1], the distribution it was drawn from [1, V], float32).

    At temperature ~0 the token is the argmax and the distribution (its one-hot) is None: lossless
    verification then degenerates to exact greedy matching, which compares tokens only.
    """
    if temperature <= GREEDY_BELOW:  # max's index is argmax's (the first maximum), ~3x faster on a CPU
        return logits.max(-1).indices, None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, probs


Generators = torch.Generator | list[torch.Generator] | None


def choose_positions(candidates: torch.Tensor, k: int, generator: Generators = None) -> list[torch.Tensor]:
    """Per row of `candidates` [b, N] (bool), up to `k` of its True indices, drawn uniformly
    without replacement and sorted (all of them when there are at most k).

    `generator` may be one generator per row: then a sequence's draw does not depend on which
    batch or process it lands in (what makes DDP match one process exactly).
    """
    chosen = []
    for i, row in enumerate(candidates.cpu()):
        idx = row.nonzero().flatten()
        if idx.numel() > k:
            gen = generator[i] if isinstance(generator, list) else generator
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:k]].sort().values
        chosen.append(idx)
    return chosen


@torch.no_grad()
def target_prob_table(
    heads, final_hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """p_t (temperature 1) at final_hidden[rows, cols] through the frozen LM head, as
    (table of distinct positions [U, V], index of each request into it).

    Overlapping blocks and unrolled steps ask for the same positions many times: the
    LM head (an H x V matmul per row, the dominant cost) runs once per distinct position.
    """
    flat = rows * final_hidden.shape[1] + cols
    unique, inverse = torch.unique(flat, return_inverse=True)
    logits = heads.logits(final_hidden.flatten(0, 1)[unique]).float()
    return torch.softmax(logits, -1), inverse


@dataclass
class TargetDist:
    """The target distribution p_t (temperature 1) at N positions, dense or sparse.

    Dense: `probs` [N, V], `ids` None. Sparse (from a cache with `target_top_k`): `ids`
    [N, k] the target's top-k token ids, `probs` [N, k] their probabilities, and `tail`
    [N] the mass outside them (1 - sum(probs)).
    """

    probs: torch.Tensor
    ids: torch.Tensor | None = None

    @property
    def tail(self) -> torch.Tensor:
        if self.ids is None:
            return self.probs.new_zeros(self.probs.shape[0])
        return (1.0 - self.probs.sum(-1)).clamp_min(0.0)

    def argmax(self) -> torch.Tensor:
        top = self.probs.argmax(-1)
        return top if self.ids is None else self.ids.gather(-1, top[:, None])[:, 0]

    def __getitem__(self, sel) -> TargetDist:
        return TargetDist(self.probs[sel], None if self.ids is None else self.ids[sel])


@torch.no_grad()
def target_dist(heads, batch, rows: torch.Tensor, cols: torch.Tensor) -> TargetDist:
    """p_t at batch positions (rows, cols): the cached top-k when the batch has it (no LM
    head at all), else the dense distribution from the cached final hidden state."""
    if batch.target_ids is not None:
        return TargetDist(batch.target_probs[rows, cols].float(), batch.target_ids[rows, cols])
    if batch.final_hidden is None:
        raise ValueError("the batch has neither the target's top-k distributions nor its final hidden states")
    table, inverse = target_prob_table(heads, batch.final_hidden, rows, cols)
    return TargetDist(table[inverse])


def l1_to_target(vocab, p_draft: torch.Tensor, target: TargetDist) -> torch.Tensor:
    """||p_d - p_t||_1 per row; p_d [N, Vd] over the drafter's vocabulary (`vocab`: a DraftVocab).

    Dense targets: exact. Sparse targets (top-k ids K, tail mass m): the sum over K is exact;
    the tail is one bucket, |p_d(not K) - m|, a lower bound of the tail's true L1 (triangle
    inequality) that is exact when either tail is empty. With k = 64 the target's tail
    mass is small (measured in the cache manifest), so the bound is tight where it matters.
    """
    if target.ids is None:
        return (vocab.to_target(p_draft) - target.probs).abs().sum(-1)
    p_at = vocab.at_target_ids(p_draft, target.ids)
    head = (p_at - target.probs).abs().sum(-1)
    return head + ((1.0 - p_at.sum(-1)) - target.tail).abs()


def soft_cross_entropy(vocab, logp: torch.Tensor, target: TargetDist) -> torch.Tensor:
    """-sum_v p_t(v) log p_d(v) per row, p_t renormalised over the draft vocabulary (EAGLE-3's
    recipe); sparse targets: over the top-k tokens the draft vocabulary holds (tail dropped)."""
    if target.ids is None:
        soft = target.probs if vocab.draft_ids is None else target.probs[:, vocab.draft_ids]
        return -(soft / soft.sum(-1, keepdim=True).clamp_min(1e-12) * logp).sum(-1)
    soft = target.probs if vocab.t2d is None else target.probs * vocab.t2d[target.ids]
    soft = soft / soft.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(soft * vocab.at_target_ids(logp, target.ids)).sum(-1)


def acceptance(p_draft: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """Rejection sampling's analytic acceptance rate 1 - 0.5 * ||p_d - p_t||_1, per row."""
    return acceptance_from_l1((p_draft - p_target).abs().sum(-1))


def acceptance_from_l1(l1: torch.Tensor) -> torch.Tensor:
    return (1.0 - 0.5 * l1).clamp(0.0, 1.0)


def per_position(
    slot: torch.Tensor, gamma: int, accept: torch.Tensor, correct: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Means per draft position (0-based `slot` of each row) as [gamma] tensors, plus counts."""
    count = torch.zeros(gamma, device=slot.device).index_add_(0, slot, torch.ones_like(accept))
    denom = count.clamp_min(1.0)
    rate = torch.zeros(gamma, device=slot.device).index_add_(0, slot, accept.float()) / denom
    acc = torch.zeros(gamma, device=slot.device).index_add_(0, slot, correct.float()) / denom
    return {"accept_rate": rate.detach(), "accuracy": acc.detach(), "count": count.detach()}


def simulated_tau(rates: Sequence[float] | torch.Tensor) -> float:
    """Expected tokens per round from per-position conditional acceptance rates:
    1 + sum_k prod_{i<=k} rate_i (the bonus token plus the expected accepted prefix)."""
    rates = torch.as_tensor(rates, dtype=torch.float64)
    return float(1.0 + torch.cumprod(rates, 0).sum())
