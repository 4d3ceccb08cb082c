"""The engine is lossless: greedy output equals the target's own greedy generate(), and
sampling preserves the target distribution (and a broken acceptance rule is caught)."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

import drafter.decoding as dec
from drafter.decoding import DecodingError, SpecEngine, round_totals
from drafter.sampling import Sampler
from tests.drafters import (
    BigramDrafter,
    LMDrafter,
    RandomDrafter,
    RecordingDrafter,
    ScriptedDrafter,
    perturbed_copy,
    lively_target,
    tiny_vocab_target,
)

QUESTIONS = ["Write a function that adds two numbers.", "What is 12 times 7? Explain step by step.", "hi"]


def chat(target, text):
    return target.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)[
        "input_ids"
    ]


def assert_speculative_is_plain(target, questions=QUESTIONS, max_new_tokens=24):
    """Greedy speculative decoding (a scripted drafter that errs now and then) emits plain greedy
    decoding's tokens, with some drafts accepted."""
    for question in questions:
        prompt = chat(target, question)
        plain = SpecEngine(target, None).generate(prompt, max_new_tokens).tokens
        drafter = ScriptedDrafter({tuple(prompt): plain}, target.vocab_size, error=(1.0, 2.0))
        spec = SpecEngine(target, drafter, gamma=4).generate(prompt, max_new_tokens)
        assert spec.tokens == plain and any(r.accepted for r in spec.rounds)


def reference(target, prompt, max_new_tokens, eos=None):
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = target.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def lively():
    """A tiny Llama whose greedy answers vary (see tests/drafters.py `lively_target`)."""
    return lively_target("llama")


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def lively_any(request):
    return lively_target(request.param)


@pytest.fixture(scope="module")
def noisy_drafter(lively):
    return LMDrafter(perturbed_copy(lively.model, 0.03, seed=1))


def test_greedy_equals_generate_every_shape(lively_any):
    """Llama, Qwen3 and Gemma3 shapes; a scripted drafter (the greedy answer with random
    corruptions) gives rounds that accept some drafts and reject others; one request and a batch."""
    target = lively_any
    prompts = [chat(target, q) for q in QUESTIONS]
    refs = [reference(target, p, 32) for p in prompts]
    torch.manual_seed(0)
    drafter = ScriptedDrafter({tuple(p): r for p, r in zip(prompts, refs)}, target.vocab_size, error=(1.0, 2.0))
    engine = SpecEngine(target, drafter, gamma=4)
    singles = [engine.generate(p, 32) for p in prompts]
    batch = engine.generate_batch(prompts, 32)
    assert [g.tokens for g in singles] == refs
    assert [g.tokens for g in batch] == refs
    totals = round_totals(singles + batch)
    assert 1.5 < totals["tau"] < 5.0 and totals["accepted"] < totals["verified"]
    assert all(len(set(r)) > 3 for r in refs)  # varied answers, not one repeated token


def test_greedy_equals_generate_with_a_draft_lm(lively, noisy_drafter):
    """A second LM drafts sequentially with its own KV cache (a perturbed copy of the target)."""
    prompts = [chat(lively, q) for q in QUESTIONS[:2]]
    refs = [reference(lively, p, 32) for p in prompts]
    engine = SpecEngine(lively, noisy_drafter, gamma=4)
    singles = [engine.generate(p, 32) for p in prompts]
    batch = engine.generate_batch(prompts, 32)
    assert [g.tokens for g in singles] == refs
    assert [g.tokens for g in batch] == refs
    assert [g.rounds for g in batch] == [g.rounds for g in singles]  # batching changes nothing per request
    totals = round_totals(singles)
    assert 1.0 < totals["tau"] < 5.0  # non-trivial: some drafts accepted, some rejected
    assert totals["accepted"] < totals["verified"]


def test_sliding_window_target_beyond_its_window(lively_any):
    """Gemma3's sliding layers (window 64): realigned rows stay exact past the window."""
    target = lively_any
    prompts = [chat(target, QUESTIONS[0]), chat(target, "hi")]
    refs = [reference(target, p, 60) for p in prompts]
    engine = SpecEngine(target, RandomDrafter(target.vocab_size), gamma=3, seed=3)
    assert [g.tokens for g in engine.generate_batch(prompts, 60)] == refs


def test_oracle_drafter_accepts_every_token(lively):
    prompt = chat(lively, QUESTIONS[0])
    gen = SpecEngine(lively, LMDrafter(lively.model), gamma=5).generate(prompt, 25)
    assert gen.tokens == reference(lively, prompt, 25)
    # 1 token from the prefill, then full rounds of gamma + bonus until the budget bites.
    assert [r.emitted for r in gen.rounds] == [6, 6, 6, 6]
    assert all(r.accepted == r.verified for r in gen.rounds)
    assert gen.tau == 6.0 and gen.finish_reason == "length"


def test_scripted_drafter_with_fixed_draws_drafts_each_position_alike_whatever_came_before():
    """The scheduler benchmark's common random numbers: with `draws_seed`, the draft at a
    position of a request does not depend on which rounds came before (with it, on the call order)."""
    prompt, script = (5, 6, 7), list(range(100, 140))

    def draft(at: int, gamma: int, seed: int = 3, calls_before: int = 0) -> list[int]:
        drafter = ScriptedDrafter({prompt: script}, 1000, error=(1.0, 1.0), draws_seed=seed)
        for _ in range(calls_before):  # another request's rounds in between
            drafter.propose({"ids": [9, 9]}, torch.tensor([9]), 4, 0.0)
        state = {"ids": [*prompt, *script[: at - 1]]}
        return drafter.propose(state, torch.tensor([script[at - 1]]), gamma, 0.0).tokens[0].tolist()

    whole = draft(1, 8)
    assert whole != script[1:9]  # a quarter to three quarters of positions corrupted: some are
    assert draft(3, 4) == whole[2:6] and draft(3, 4, calls_before=5) == whole[2:6]
    assert draft(1, 8, seed=4) != whole


def test_scripted_drafter_resyncs_where_the_output_leaves_its_script(lively):
    """The engine benchmark's synthetic drafters: a script that is wrong from its third token
    on is rejected there once; resync gives the target's own continuation from that point,
    and every later round accepts its whole block."""
    prompt = chat(lively, QUESTIONS[0])
    truth = reference(lively, prompt, 25)
    wrong = truth[:2] + [(t + 1) % lively.vocab_size for t in truth[2:]]
    calls = []

    def resync(ids):
        calls.append(len(ids) - len(prompt))
        return reference(lively, ids, 25)

    drafter = ScriptedDrafter({tuple(prompt): wrong}, lively.vocab_size, error=(1e-4, 1e4), resync=resync)
    gen = SpecEngine(lively, drafter, gamma=5).generate(prompt, 25)
    assert gen.tokens == truth
    assert calls == [3]  # once: after the round that rejected the script's first wrong token
    assert gen.rounds[0].accepted == 1 and all(r.accepted == r.verified for r in gen.rounds[1:])


def test_plain_decoding_without_drafter(lively):
    prompt = chat(lively, QUESTIONS[1])
    gen = SpecEngine(lively, None).generate(prompt, 20)
    assert gen.tokens == reference(lively, prompt, 20)
    assert all(r.emitted == 1 and r.proposed == 0 for r in gen.rounds) and len(gen.rounds) == 19


def test_round_breakdown_charges_each_phase_its_own_time(lively, monkeypatch):
    """A clock that only the drafter's propose (5 ticks), the target's verification forward (3)
    and the drafter's extend (2) move: each phase gets exactly its own ticks, nothing else."""
    ticks = [0.0]

    def advance(n, fn):
        def wrapped(*a, **k):
            ticks[0] += n
            return fn(*a, **k)
        return wrapped

    drafter = LMDrafter(lively.model)
    monkeypatch.setattr(drafter, "propose", advance(5, drafter.propose))
    monkeypatch.setattr(drafter, "extend", advance(2, drafter.extend))
    engine = SpecEngine(lively, drafter, gamma=5, clock=lambda: ticks[0])
    prompt = chat(lively, QUESTIONS[0])
    monkeypatch.setattr(lively, "capture", advance(3, lively.capture))
    gen = engine.generate(prompt, 25)
    n = len(gen.rounds)  # 4 full rounds; the last one ends the request, so no extend after it
    assert gen.breakdown == {"draft": 5 * n, "verify": 3 * n, "accept": 0, "extend": 2 * (n - 1), "kv": 0, "other": 0}
    assert set(gen.breakdown) == set(dec.PHASES) and gen.to_dict()["breakdown"] == gen.breakdown


def test_eos_stops_and_accepted_eos_has_no_bonus(lively):
    prompt = chat(lively, QUESTIONS[0])
    free = reference(lively, prompt, 30)
    # Make a token the target emits mid-answer count as end of sequence, one that the oracle
    # drafter proposes inside a round (rounds emit tokens 1-6, 7-12, ...; the 6th is the bonus).
    eos = next(t for t in free[7:] if free.index(t) % 6 != 0)
    first = free.index(eos)
    engine = SpecEngine(lively, LMDrafter(lively.model), gamma=5, eos_token_ids=[eos])
    gen = engine.generate(prompt, 30)
    assert gen.tokens == free[: first + 1] == reference(lively, prompt, 30, eos=eos)
    assert gen.finish_reason == "eos" and gen.tokens[-1] == eos
    last = gen.rounds[-1]  # the drafted EOS was accepted: the round ends there, no bonus token
    assert last.emitted == last.accepted == (first - 1) % 6 + 1


def test_batch_where_one_request_ends_at_its_first_token(lively, noisy_drafter):
    prompts = [chat(lively, q) for q in QUESTIONS]
    refs = [reference(lively, p, 16) for p in prompts]
    eos = refs[1][0]  # request 1 ends in the prefill; the others must carry on unharmed
    gens = SpecEngine(lively, noisy_drafter, gamma=3, eos_token_ids=[eos]).generate_batch(prompts, 16)
    assert gens[1].tokens == [eos] and gens[1].rounds == [] and gens[1].finish_reason == "eos"
    for g, p in zip(gens, prompts):
        assert g.tokens == reference(lively, p, 16, eos=eos)


def test_max_tokens_exact_and_short_budgets(lively, noisy_drafter):
    prompt = chat(lively, QUESTIONS[2])
    ref = reference(lively, prompt, 13)
    engine = SpecEngine(lively, noisy_drafter, gamma=7)
    for budget in (1, 2, 13):
        gen = engine.generate(prompt, budget)
        assert gen.tokens == ref[:budget] and gen.finish_reason == "length"
        assert all(r.proposed <= budget - 1 for r in gen.rounds)  # never drafts past the budget


def test_extend_receives_confirmed_features(lively, noisy_drafter):
    """The drafter sees exactly the features a full target forward gives each confirmed position."""
    prompts = [chat(lively, q) for q in QUESTIONS[:2]]
    recorders = []

    class PerRequest(RecordingDrafter):
        def init_state(self):
            recorders.append([])
            return (len(recorders) - 1, self.inner.init_state())

        def extend(self, state, features, input_ids):
            recorders[state[0]].append((features.clone(), input_ids.clone()))
            self.inner.extend(state[1], features, input_ids)

        def propose(self, state, anchor, gamma, temperature, generator=None):
            return self.inner.propose(state[1], anchor, gamma, temperature, generator)

    gens = SpecEngine(lively, PerRequest(noisy_drafter), gamma=4).generate_batch(prompts, 24)
    for prompt, gen, calls in zip(prompts, gens, recorders):
        ids = torch.cat([c[1] for c in calls], dim=1)
        seq = prompt + gen.tokens
        assert ids[0].tolist() == seq[: ids.shape[1]]
        # Everything up to the final round's anchor (a finished request is not extended).
        assert ids.shape[1] == len(seq) - gen.rounds[-1].emitted - 1
        full = lively.capture(torch.tensor([seq[: ids.shape[1]]]))
        torch.testing.assert_close(torch.cat([c[0] for c in calls], dim=1), full.layers, rtol=1e-4, atol=1e-4)


def test_bad_requests_are_clear_errors(lively, noisy_drafter):
    engine = SpecEngine(lively, noisy_drafter)
    with pytest.raises(DecodingError, match="empty prompt"):
        engine.generate([], 4)
    with pytest.raises(DecodingError, match="max_new_tokens"):
        engine.generate([1, 2], 0)
    with pytest.raises(DecodingError, match="temperature"):
        SpecEngine(lively, noisy_drafter, temperature=-1)


def test_sampling_is_seeded(lively, noisy_drafter):
    prompt = chat(lively, QUESTIONS[0])
    a = SpecEngine(lively, noisy_drafter, temperature=1.0, seed=5).generate(prompt, 20).tokens
    b = SpecEngine(lively, noisy_drafter, temperature=1.0, seed=5).generate(prompt, 20).tokens
    c = SpecEngine(lively, noisy_drafter, temperature=1.0, seed=6).generate(prompt, 20).tokens
    assert a == b != c


# ----- sampling preserves the target distribution -----------------------------------------
# A 16-token target with peaked next-token distributions; a bigram drafter that disagrees
# with it often (tau ~1.5), so both the accept path and the residual path carry weight.
# Statistic: chi-square goodness of fit of the first three generated tokens (4096 cells,
# cells with expected count < 5 pooled) against the exact joint computed by enumeration.
# False-alarm rate: ALPHA = 1e-3 for a correct engine (the test is seeded, so it is
# deterministic in CI; a different seed fails a correct engine with probability 1e-3).
VOCAB, TEMPERATURE, SAMPLES, ALPHA = 16, 0.8, 4000, 1e-3
PROMPT = [1, 5, 3]


@pytest.fixture(scope="module")
def small_world():
    return make_small_world()


def make_small_world(confidences=False, dtype=torch.float32):
    target = tiny_vocab_target(VOCAB, seed=0)
    target.model.to(dtype)  # the exact joint below is the target's as it runs
    drafter = BigramDrafter.random(VOCAB, seed=1, confidences=confidences)
    return target, drafter, exact_joint(target, lambda logits: torch.log_softmax(logits.double() / TEMPERATURE, -1))


def exact_joint(target, log_probs):
    """P(first three tokens) for every continuation, from the target's logits through `log_probs`."""
    cont = torch.tensor(list(itertools.product(range(VOCAB), repeat=3)))
    ids = torch.cat([torch.tensor(PROMPT).expand(len(cont), -1), cont], dim=1)
    with torch.no_grad():
        logp = log_probs(target.model(ids).logits)
    p = len(PROMPT)
    joint = sum(logp[:, p - 1 + k].gather(1, cont[:, k : k + 1]).squeeze(1) for k in range(3)).exp().numpy()
    assert abs(joint.sum() - 1) < 1e-9
    return joint


def sample_pvalue(target, drafter, joint, seed=1, scheduler=None, **sampling):
    engine = SpecEngine(target, drafter, gamma=2, temperature=TEMPERATURE, seed=seed, eos_token_ids=[], scheduler=scheduler,
                        **sampling)
    counts = np.zeros(VOCAB**3)
    gens = []
    for _ in range(SAMPLES // 2000):
        gens += engine.generate_batch([PROMPT] * 2000, 4)  # budget 4: rounds draft the full gamma
    for g in gens:
        counts[(g.tokens[0] * VOCAB + g.tokens[1]) * VOCAB + g.tokens[2]] += 1
    expected = joint * SAMPLES
    small = expected < 5
    if expected[small].sum() == 0:  # only impossible continuations there: one drawn fails the test outright
        return (0.0 if counts[small].any() else stats.chisquare(counts[~small], expected[~small]).pvalue), round_totals(gens)
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(observed, expected).pvalue, round_totals(gens)


def test_sampling_preserves_target_distribution(small_world):
    pvalue, totals = sample_pvalue(*small_world)
    assert 1.2 < totals["tau"] < 2.5  # drafts are neither always right nor always wrong
    assert pvalue > ALPHA


@pytest.mark.parametrize("with_drafter", [True, False])
def test_top_k_top_p_sampling_follows_the_masked_target(small_world, with_drafter):
    """With top-k and top-p the target's distribution is transformers' masked one
    (drafter.sampling.Sampler): speculative decoding (the bigram drafter knows nothing of the
    masks) and plain decoding (every row drawn at once) both follow it, and not the unmasked one."""
    target, drafter, unmasked = small_world
    sampler = Sampler(TEMPERATURE, 4, 0.9)
    masked = exact_joint(target, lambda logits: torch.log_softmax(sampler.mask(logits).double(), -1))
    assert (masked == 0).mean() > 0.5  # the masks remove most continuations
    pvalue, _ = sample_pvalue(target, drafter if with_drafter else None, masked, top_k=4, top_p=0.9)
    assert pvalue > ALPHA
    pvalue, _ = sample_pvalue(target, drafter if with_drafter else None, unmasked, top_k=4, top_p=0.9)
    assert pvalue < ALPHA


@pytest.mark.parametrize("bug", ["resample_from_target", "accept_everything", "ignore_draft_probs"])
def test_broken_acceptance_rule_is_caught(small_world, monkeypatch, bug):
    if bug == "resample_from_target":  # a classic: forget to subtract the draft on rejection
        monkeypatch.setattr(dec, "residual", lambda p_t, p_d: p_t)
    elif bug == "accept_everything":
        monkeypatch.setattr(dec, "accept_sampled", lambda p_t, p_d, d, g: (d.numel(), int(torch.multinomial(p_t[-1], 1, generator=g))))
    else:  # accept with probability p_t(d) instead of p_t(d) / p_d(d)
        original = dec.accept_sampled
        monkeypatch.setattr(dec, "accept_sampled", lambda p_t, p_d, d, g: original(p_t, torch.ones_like(p_d), d, g))
    pvalue, _ = sample_pvalue(*small_world)
    assert pvalue < ALPHA


# ----- the real target ---------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_greedy_equals_generate(smollm2_target):
    """The real SmolLM2: a scripted drafter (its greedy answer with random corruptions) gives
    rounds that accept some drafts and reject others; one request and a batch of two."""
    target = smollm2_target
    prompts = [
        target.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        for q in ("Write a python function to reverse a string.", "What is the capital of France?")
    ]
    refs = [reference(target, p, 32) for p in prompts]
    torch.manual_seed(0)
    drafter = ScriptedDrafter({tuple(p): r for p, r in zip(prompts, refs)}, target.vocab_size, error=(1.0, 2.0))
    engine = SpecEngine(target, drafter, gamma=5)
    single = engine.generate(prompts[0], 32)
    batch = engine.generate_batch(prompts, 32)
    assert single.tokens == refs[0]
    assert [g.tokens for g in batch] == refs
    totals = round_totals([single, *batch])
    assert 1.5 < totals["tau"] < 5.5 and totals["accepted"] < totals["verified"]
    # Algorithm 1 choosing per-request prefixes for the batch: still the target's own answers.
    from drafter.scheduler import CostTable, Scheduler

    sps = CostTable(rows=[1, 2], widths=list(range(1, 7)), sps=[[1 / (1 + 0.2 * k) for k in range(6)]] * 2)
    scheduled = SpecEngine(target, drafter, gamma=5, scheduler=Scheduler("prefix", cost_table=sps)).generate_batch(prompts, 32)
    assert [g.tokens for g in scheduled] == refs
    assert any(r.verified < r.proposed for g in scheduled for r in g.rounds)
