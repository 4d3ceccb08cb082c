"""drafter.sampling.Sampler against transformers' temperature, top-k and top-p warpers."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from drafter import chat
from drafter.regenerate import LocalBackend
from drafter.sampling import Sampler
from tests.test_regenerate import config

INF = float("-inf")


def transformers_warpers(scores, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    scores = TopKLogitsWarper(top_k)(None, scores)
    return TopPLogitsWarper(top_p)(None, scores)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.0, 5, 0.5), (1.3, 64, 0.95), (0.5, 1, 0.9)])
def test_same_masked_scores_as_transformers(temperature, top_k, top_p):
    """Distinct logits (no ties): every row's masked scores equal transformers' to the bit."""
    g = torch.Generator().manual_seed(0)
    for spread in (0.5, 2.0, 8.0):  # flat to peaked rows: top-p keeps from all k down to one token
        scores = torch.randn(64, 3000, generator=g, dtype=torch.float64).float() * spread
        ours = Sampler(temperature, top_k, top_p).mask(scores)
        assert torch.equal(ours, transformers_warpers(scores, temperature, top_k, top_p))
        kept = ours.isfinite().sum(-1)
        assert bool((kept >= 1).all() and (kept <= top_k).all())


def test_ties_at_the_kth_value_pass_top_k_as_in_transformers():
    """transformers' top-k keeps every token tied with the k-th, so more than k reach top-p;
    rows in one batch may have different numbers of ties."""
    scores = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0], [2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4],
                           [3.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    for top_p in (0.99, 0.5):  # cuts between distinct logits
        ours = Sampler(1.0, 3, top_p).mask(scores)
        assert torch.equal(ours, transformers_warpers(scores, 1.0, 3, top_p))
    assert Sampler(1.0, 3, 0.99).mask(scores).isfinite().sum(-1).tolist() == [5, 3, 5]


def test_tied_tokens_at_the_top_p_boundary_are_kept_together():
    """Where top-p's cut falls between equal logits, transformers' unstable sort keeps some of
    them; every token as likely as the least likely kept one stays."""
    scores = torch.tensor([[4.0, 2.0, 2.0, -3.0, -4.0, -5.0]])
    # p(4) = 0.79, p(2) = 0.106 each: 0.8 needs one of the tied twos, so both stay.
    ours = Sampler(1.0, 4, 0.8).mask(scores)
    assert ours[0].isfinite().tolist() == [True, True, True, False, False, False]
    theirs = transformers_warpers(scores, 1.0, 4, 0.8)[0].isfinite()
    assert theirs[0] and not theirs[3:].any() and int(theirs[1:3].sum()) == 1


def test_bf16_logits_differ_from_transformers_only_by_tied_tokens_at_the_cut():
    """Logits of a bf16 target tie often. On such rows we keep what transformers keeps, plus
    at most the tokens tied with the least likely token it keeps."""
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(2000, 3000, generator=g) * 3).to(torch.bfloat16).float()
    ours = Sampler(0.7, 20, 0.8).mask(scores)
    theirs = transformers_warpers(scores, 0.7, 20, 0.8)
    kept, kept_theirs = ours.isfinite(), theirs.isfinite()
    assert bool((kept_theirs & ~kept).sum() == 0)  # nothing transformers keeps is dropped
    extra = kept & ~kept_theirs
    least_theirs = scores.masked_fill(~kept_theirs, float("inf")).min(-1, keepdim=True).values
    assert torch.equal(scores[extra], least_theirs.expand_as(scores)[extra])
    assert extra.any()  # such cuts are common at this spread (~1 row in 10)
    assert torch.equal(ours[~extra.any(-1)], theirs[~extra.any(-1)])


@pytest.mark.parametrize("args", [(0.0, 20, 0.8), (0.7, -1, 0.8), (0.7, 20, 1.5), (0.7, 20, 0.0)])
def test_settings_it_does_not_cover_are_refused(args):
    with pytest.raises(ValueError, match="Sampler needs"):
        Sampler(*args)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (20, 1.0), (0, 1.0)])
def test_either_mask_alone_or_none_is_transformers_too(top_k, top_p):
    """top_k 0 and top_p 1 are off, as in transformers (which skips a warper so set)."""
    scores = torch.randn(32, 3000, generator=torch.Generator().manual_seed(2)) * 3
    ours = Sampler(0.7, top_k, top_p).mask(scores)
    theirs = TemperatureLogitsWarper(0.7)(None, scores)
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(ours, theirs)
    assert Sampler(0.7, top_k, top_p).masked == (top_k > 0 or top_p < 1)


def frequencies_match(draws, probs, n):
    """Each token's count within 5 standard deviations of n * p (binomial), and none elsewhere."""
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    expected = n * probs.double()
    return bool(((counts - expected).abs() <= 5 * (expected * (1 - probs.double())).sqrt() + 1e-9).all())


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.3, 6, 0.95), (0.7, 0, 0.9), (1.0, 0, 1.0)])
def test_draws_follow_the_masked_distribution(temperature, top_k, top_p):
    """The draw among the survivors has transformers' distribution: softmax of the masked scores.
    bf16-rounded logits, so ties at the k-th value and at the top-p cut occur."""
    row = (torch.randn(1, 500, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16).float()
    sampler, n = Sampler(temperature, top_k, top_p), 40_000
    probs = sampler.mask(row).softmax(-1)[0]
    assert torch.equal(probs, sampler.probs(row)[0])
    assert 1 < int((probs > 0).sum()) < (top_k or 500) + 3
    draws = sampler.draw(row.expand(n, -1), torch.Generator().manual_seed(0))[:, 0]
    assert frequencies_match(draws, probs, n)
    if sampler.masked:
        wrong = torch.softmax(row[0] / temperature, -1)  # a draw that skipped the masks would match this instead
        assert not frequencies_match(draws, wrong, n)
    assert torch.equal(sampler.draw(row.expand(n, -1), torch.Generator().manual_seed(0))[:, 0], draws)


def test_local_backend_samples_the_targets_top_k_top_p_distribution(tiny_config, tiny_target):
    """The first answer token of one prompt, 3,000 times in one static batch through `generate`:
    its frequencies follow softmax(Sampler.mask(the target's logits)); torch's seed makes it repeat."""
    cfg = config(tiny_config, temperature=0.7, top_k=8, top_p=0.8, max_new_tokens=1, batch_size=3000).regenerate
    backend = LocalBackend(cfg, tiny_target)
    prompt = chat.prompt_ids(tiny_target.tokenizer, [{"role": "user", "content": "Explain binary search."}])
    with torch.no_grad():
        logits = tiny_target.model(torch.tensor([prompt])).logits[:, -1].float()
    probs = Sampler(0.7, 8, 0.8).mask(logits).softmax(-1)[0]
    assert int((probs > 0).sum()) > 1
    rows, turn = [], backend._turn
    backend._turn = lambda row: rows.append(row) or turn(row)  # the generated ids of each answer
    n = 3000
    torch.manual_seed(7)
    backend.generate([prompt] * n)
    assert frequencies_match(torch.tensor([r[0] for r in rows]), probs, n)
    torch.manual_seed(7)
    backend.generate([prompt] * n)
    assert rows[n:] == rows[:n]
    torch.manual_seed(8)
    backend.generate([prompt] * n)
    assert rows[2 * n:] != rows[:n]
