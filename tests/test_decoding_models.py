"""The engine with the real drafter classes (EAGLE-3, DFlash, DSpark from drafter/models),
randomly initialised: greedy output equals the target's, with and without the scheduler,
and sampling preserves the target distribution. Skipped where the models are not installed."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

pytest.importorskip("drafter.models.dspark")

from drafter.config import load_config  # noqa: E402
from drafter.decoding import SpecEngine, block_size_of, round_totals  # noqa: E402
from drafter.models import TargetHeads, build  # noqa: E402
from drafter.scheduler import CostTable, Scheduler  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.drafters import lively_target, tiny_vocab_target  # noqa: E402
from tests.test_decoding import ALPHA, QUESTIONS, chat, reference  # noqa: E402


def drafter_for(target, algorithm, *sets, heads=None, seed=0):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"drafter.algorithm={algorithm}", *sets])
    torch.manual_seed(seed)
    return build(cfg, heads or TargetHeads.from_target(target), target.layer_ids).eval()


@pytest.fixture(scope="module")
def lively():
    return lively_target("llama")


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash", "dspark"])
def test_greedy_equality_with_real_drafters(lively, algorithm):
    prompts = [chat(lively, q) for q in QUESTIONS]
    refs = [reference(lively, p, 24) for p in prompts]
    drafter = drafter_for(lively, algorithm)
    gamma = block_size_of(drafter, 4)
    engine = SpecEngine(lively, drafter, gamma=gamma)
    assert [engine.generate(p, 24).tokens for p in prompts] == refs
    assert [g.tokens for g in engine.generate_batch(prompts, 24)] == refs
    if algorithm == "dspark":  # its confidence head drives the scheduler
        sps = CostTable(rows=[1, 4], widths=list(range(1, gamma + 2)),
                        sps=[[1 / (1 + 0.3 * k) for k in range(gamma + 1)]] * 2)
        for mode in ("threshold", "prefix"):
            gens = SpecEngine(lively, drafter, gamma=gamma, scheduler=Scheduler(mode, 0.5, None, sps)).generate_batch(prompts, 24)
            assert [g.tokens for g in gens] == refs


@pytest.mark.integration  # ~10 s each: real drafters propose more slowly than the test ones
@pytest.mark.parametrize("algorithm", ["eagle3", "dspark"])
def test_sampling_with_real_drafters_preserves_the_target(algorithm):
    """Chi-square of the first three tokens against the exact joint (false-alarm rate 1e-3)."""
    vocab, temperature, samples, prompt = 16, 0.8, 3000, [1, 5, 3]
    target = tiny_vocab_target(vocab, seed=0)
    heads = TargetHeads.from_target(target)
    heads.mask_token_id = vocab - 1
    drafter = drafter_for(target, algorithm, "drafter.block_size=2", "drafter.ttt_steps=2", heads=heads, seed=1)
    with torch.no_grad():  # an opinionated random drafter: both accept and reject paths carry weight
        for p in drafter.parameters():
            p.mul_(3.0)
    cont = torch.tensor(list(itertools.product(range(vocab), repeat=3)))
    ids = torch.cat([torch.tensor(prompt).expand(len(cont), -1), cont], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(target.model(ids).logits.double() / temperature, dim=-1)
    joint = sum(logp[:, 2 + k].gather(1, cont[:, k : k + 1]).squeeze(1) for k in range(3)).exp().numpy()
    engine = SpecEngine(target, drafter, gamma=2, temperature=temperature, seed=1, eos_token_ids=[])
    gens = [g for _ in range(samples // 500) for g in engine.generate_batch([prompt] * 500, 4)]
    counts = np.zeros(vocab**3)
    for g in gens:
        counts[(g.tokens[0] * vocab + g.tokens[1]) * vocab + g.tokens[2]] += 1
    expected = joint * samples
    small = expected < 5
    pvalue = stats.chisquare(np.append(counts[~small], counts[small].sum()),
                             np.append(expected[~small], expected[small].sum())).pvalue
    assert pvalue > ALPHA
    assert round_totals(gens)["accepted"] > 0


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash", "dspark"])
def test_a_loaded_drafter_drafts_in_the_targets_dtype(tmp_path, algorithm):
    """`load_drafter` puts an exported (fp32) drafter in a bf16 target's dtype, and every part of
    a proposal runs in it (a module left in fp32 meets bf16 inputs and raises)."""
    from drafter.decoding import load_drafter

    target = lively_target("llama")
    target.model.to(torch.bfloat16)
    drafter_for(target, algorithm).export(tmp_path / "drafter")
    drafter, _ = load_drafter(tmp_path / "drafter", target)
    assert {p.dtype for p in drafter.parameters() if p.is_floating_point()} == {torch.bfloat16}
    gen = SpecEngine(target, drafter, gamma=block_size_of(drafter, 4)).generate(chat(target, QUESTIONS[0]), 16)
    assert len(gen.tokens) == 16 and sum(r.proposed for r in gen.rounds) > 0


def test_a_drafter_of_other_feature_layers_is_refused(tmp_path):
    # A drafter trained on a cache of 3 feature layers, decoding a target that captures others,
    # would fail deep in its first projection: the load says which layers to set instead.
    from drafter.decoding import DecodingError, load_drafter

    target = lively_target("llama")
    drafter_for(target, "dspark").export(tmp_path / "drafter")
    load_drafter(tmp_path / "drafter", target)
    target.layer_ids = list(target.layer_ids)[:-1]
    with pytest.raises(DecodingError, match="feature layers"):
        load_drafter(tmp_path / "drafter", target)
