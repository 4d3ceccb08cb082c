"""Reduced draft vocabularies (all three algorithms), sparse target distributions (the
cache's top-k p_t) and the reserved MASK token."""

from __future__ import annotations

import pytest
import torch

from drafter.decoding import SpecEngine
from drafter.models import TargetHeads, load_drafter
from drafter.models.base import reserved_mask_token
from drafter.models.metrics import TargetDist, l1_to_target, soft_cross_entropy
from tests.drafters import lively_target
from tests.test_decoding import QUESTIONS, chat, reference

# The drafter fixtures (a sharp tiny target, its heads, a batch) are test_models'.
from tests.test_models import ALGOS, batch, heads, make, target  # noqa: E402,F401


def sparse(batch, heads, k):
    """The batch with its p_t as the top-k of the dense distribution (what the cache stores)."""
    p = torch.softmax(heads.logits(batch.final_hidden).float(), -1).topk(k)
    return type(batch)(batch.input_ids, batch.loss_mask, batch.attention_mask, batch.features,
                       None, p.indices, p.values)


class FullVocab:  # the DraftVocab surface with no reduction
    d2t = t2d = draft_ids = None

    @staticmethod
    def to_target(p):
        return p

    @staticmethod
    def at_target_ids(values, ids):
        return values.gather(-1, ids)


# ----- sparse targets ----------------------------------------------------------------------
def test_sparse_l1_hand_case_and_lower_bound():
    """p_t = (.5, .3, .15, .05), top-2 stored (tail .2); p_d = (.4, .4, .1, .1).
    Sparse: |.4-.5| + |.4-.3| + |(1-.8) - .2| = 0.2; dense: 0.3 (the tail bucket is a lower bound)."""
    p_t = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    p_d = torch.tensor([[0.4, 0.4, 0.1, 0.1]])
    dense = l1_to_target(FullVocab, p_d, TargetDist(p_t))
    top = TargetDist(torch.tensor([[0.5, 0.3]]), torch.tensor([[0, 1]]))
    torch.testing.assert_close(top.tail, torch.tensor([0.2]))
    torch.testing.assert_close(dense, torch.tensor([0.3]))
    torch.testing.assert_close(l1_to_target(FullVocab, p_d, top), torch.tensor([0.2]))
    # tails in proportion: the bucket is exact
    p_d2 = torch.tensor([[0.4, 0.4, 0.15, 0.05]])
    torch.testing.assert_close(l1_to_target(FullVocab, p_d2, top), l1_to_target(FullVocab, p_d2, TargetDist(p_t)))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("vocab", [None, 48])
def test_top_k_of_the_whole_vocabulary_is_the_dense_loss(target, heads, batch, algo, vocab):
    """With k = V the sparse path must reproduce the dense losses and metrics exactly."""
    counts = torch.bincount(batch.input_ids[batch.loss_mask], minlength=heads.vocab_size) + 1
    sets = [] if vocab is None else [f"drafter.draft_vocab_size={vocab}"]
    model = make(target, heads, algo, *sets, counts=counts)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    dense = model.forward_train(batch, generator=gens)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    full = model.forward_train(sparse(batch, heads, heads.vocab_size), generator=gens)
    torch.testing.assert_close(full.loss, dense.loss, rtol=1e-5, atol=1e-6)
    for name in ("accept_rate", "accuracy", "count"):
        torch.testing.assert_close(full.metrics[name], dense.metrics[name], rtol=1e-5, atol=1e-6)


def test_top_k_loss_is_close_to_dense_and_trains(target, heads, batch):
    model = make(target, heads, "dspark")
    dense = model.forward_train(batch, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    top = model.forward_train(sparse(batch, heads, 16), generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert top.loss.item() == pytest.approx(dense.loss.item(), rel=0.05)
    top.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_soft_cross_entropy_sparse_matches_dense_over_the_top_k():
    logp = torch.log_softmax(torch.randn(3, 10), -1)
    probs = torch.softmax(torch.randn(3, 10) * 3, -1)
    top = probs.topk(10)
    torch.testing.assert_close(soft_cross_entropy(FullVocab, logp, TargetDist(top.values, top.indices)),
                               soft_cross_entropy(FullVocab, logp, TargetDist(probs)))


# ----- reduced draft vocabularies -------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGOS)
def test_reduced_vocabulary_every_algorithm(target, heads, batch, algo, tmp_path):
    counts = torch.bincount(batch.input_ids[batch.loss_mask], minlength=heads.vocab_size)
    model = make(target, heads, algo, "drafter.draft_vocab_size=64", counts=counts)
    ids = model.draft_ids
    assert model.draft_vocab_size == 64 and model.t2d.sum() == 64 and model.t2d[ids].all()
    assert set(counts.topk(20).indices.tolist()) <= set(ids.tolist())  # the most frequent kept
    if algo == "dspark":  # W2 scores the draft vocabulary; W1 embeds any previous target token (an anchor)
        assert model.markov_head.markov_w2.weight.shape[0] == 64
        assert model.markov_head.markov_w1.weight.shape[0] == heads.vocab_size
    state = model.init_state()
    model.extend(state, batch.features[:1, :10], batch.input_ids[:1, :10])
    greedy = model.propose(state, batch.input_ids[0, 10:11], 3, 0.0)
    assert greedy.probs is None and model.t2d[greedy.tokens].all()  # greedy: tokens only
    prop = model.propose(state, batch.input_ids[0, 10:11], 3, 1.0, torch.Generator().manual_seed(0))
    assert prop.probs.shape == (1, 3, heads.vocab_size)
    assert prop.probs[0][:, ~model.t2d].sum() == 0 and model.t2d[prop.tokens].all()
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones(1, 3))
    assert torch.equal(prop.probs[0].gather(-1, prop.tokens[0][:, None]) > 0, torch.ones(3, 1, dtype=torch.bool))
    model.export(tmp_path)
    back = load_drafter(tmp_path, heads)
    assert torch.equal(back.d2t, model.d2t) and torch.equal(back.t2d, model.t2d)
    again = back.propose(state, batch.input_ids[0, 10:11], 3, 0.0)
    assert torch.equal(again.tokens, model.propose(state, batch.input_ids[0, 10:11], 3, 0.0).tokens)


def test_the_kept_head_slice_follows_the_head_and_the_vocabulary(target, heads, batch):
    """vocab_logits keeps the frozen head's draft rows between calls; a changed head or d2t
    is sliced again, and a slice first made under inference_mode still trains."""
    counts = torch.bincount(batch.input_ids[batch.loss_mask], minlength=heads.vocab_size)
    model = make(target, heads, "dspark", "drafter.draft_vocab_size=64", counts=counts)
    h = torch.randn(3, heads.lm_head.weight.shape[1])

    def fresh():  # the product without any kept slice
        return h @ heads.lm_head.weight[model.draft_ids].T

    with torch.inference_mode():
        torch.testing.assert_close(model.vocab_logits(h), fresh())
    assert model.draft_head() is model.draft_head()  # kept, not sliced again
    with torch.no_grad():
        heads.lm_head.weight.mul_(2.0)  # the head changes in place
    try:
        torch.testing.assert_close(model.vocab_logits(h), fresh())
        model.set_draft_vocab(counts.flip(0))  # another vocabulary
        torch.testing.assert_close(model.vocab_logits(h), fresh())
        h.requires_grad_(True)
        model.vocab_logits(h).sum().backward()  # not an inference tensor
        assert h.grad is not None and h.grad.abs().sum() > 0
    finally:
        with torch.no_grad():
            heads.lm_head.weight.mul_(0.5)


@pytest.mark.parametrize("algo", ALGOS)
def test_greedy_equality_with_a_reduced_vocabulary(algo):
    """Lossless whatever the drafter scores: tokens outside its vocabulary have q = 0."""
    lively = lively_target("llama")
    heads = TargetHeads.from_target(lively)
    prompts = [chat(lively, q) for q in QUESTIONS]
    refs = [reference(lively, p, 20) for p in prompts]
    counts = torch.arange(heads.vocab_size).flip(0)  # any frequency order
    drafter = make(lively, heads, algo, "drafter.draft_vocab_size=40", counts=counts)
    engine = SpecEngine(lively, drafter, gamma=3)
    assert [g.tokens for g in engine.generate_batch(prompts, 20)] == refs


# ----- the MASK token ----------------------------------------------------------------------------
def test_mask_token_is_never_an_end_token(target, heads):
    assert heads.mask_token_id == target.tokenizer.mask_token_id
    assert heads.mask_token_id not in heads.eos_token_ids and heads.mask_token_id != target.tokenizer.pad_token_id
    eos = heads.eos_token_ids[0]
    with pytest.raises(ValueError, match="end-of-sequence"):
        make(target, heads, "dspark", f"drafter.mask_token_id={eos}")


def test_mask_token_falls_back_to_an_unused_special_token(target):
    tok = target.tokenizer
    mask = tok.mask_token_id
    try:
        tok.mask_token = None
        chosen = reserved_mask_token(tok, [tok.eos_token_id])
    finally:
        tok.mask_token = tok.convert_ids_to_tokens(mask)
    assert chosen is not None and chosen != tok.eos_token_id and chosen != tok.pad_token_id
    assert tok.convert_ids_to_tokens(chosen) not in (tok.chat_template or "")


@pytest.mark.integration
def test_smollm2_mask_is_a_reserved_token_not_im_end(smollm2_target):
    heads = TargetHeads.from_target(smollm2_target)
    assert smollm2_target.tokenizer.convert_ids_to_tokens(heads.mask_token_id) == "<empty_output>"
    assert heads.mask_token_id not in heads.eos_token_ids
