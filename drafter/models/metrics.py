"""Small pieces every drafter shares: sampling a draft token, per-position metrics, tau."""

from __future__ import annotations

from collections.abc import Sequence

import torch

GREEDY_BELOW = 1e-5  # temperatures at or below this draft the argmax


def sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [1, V] -> (token [1], the distribution it was drawn from [1, V], float32).

    At temperature ~0 the distribution is the one-hot of the argmax, so lossless
    verification degenerates to exact greedy matching.
    """
    logits = logits.float()
    if temperature <= GREEDY_BELOW:
        token = logits.argmax(-1)
        probs = torch.zeros_like(logits).scatter_(-1, token[:, None], 1.0)
        return token, probs
    probs = torch.softmax(logits / temperature, dim=-1)
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


def target_probs(heads, final_hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    table, inverse = target_prob_table(heads, final_hidden, rows, cols)
    return table[inverse]


def acceptance(p_draft: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """Rejection sampling's analytic acceptance rate 1 - 0.5 * ||p_d - p_t||_1, per row."""
    return (1.0 - 0.5 * (p_draft - p_target).abs().sum(-1)).clamp(0.0, 1.0)


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
