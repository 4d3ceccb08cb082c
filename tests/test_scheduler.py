"""Confidence-scheduled verification: Algorithm 1 with its early stop, threshold truncation,
and losslessness with the scheduler on (greedy equality, distribution preserved)."""

import json

import pytest
import torch

from drafter.manifest import sha256_file
from drafter.decoding import SpecEngine
from drafter.scheduler import (
    CostTable,
    Scheduler,
    SchedulerError,
    apply_temperatures,
    load_temperatures,
    monotone_times,
    prefix_lengths,
    prefix_survival,
    profile_target,
    threshold_lengths,
)
from tests.drafters import LMDrafter, ScriptedDrafter, lively_target, perturbed_copy
from tests.test_decoding import ALPHA, QUESTIONS, chat, make_small_world, reference, sample_pvalue


def table(rows, line_per_row):
    widths = list(range(1, len(line_per_row[0]) + 1))
    return CostTable(rows=rows, widths=widths, sps=line_per_row)


@pytest.mark.parametrize("shared_width", [False, True])
def test_algorithm1_by_hand(shared_width):
    # SPS falls 25% per extra token of width; two requests.
    sps = table([2], [[1 / (1 + 0.25 * k) for k in range(5)]])
    survival = [torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0.5, 0.2])]
    # Paper: admitted 0.9 (theta 2.32), 0.8 (2.47), 0.5 (2.8), 0.2 (2.93); 0.1 would need
    # width 4: 4.5 / 1.75 = 2.57 < 2.93 -> stop. Shared width: widen to 2 with 0.9 + 0.5
    # (2.72), to 3 with 0.8 + 0.2 (2.93), not to 4 (2.57): the same prefixes here.
    assert prefix_lengths(survival, sps, shared_width) == [2, 2]


def test_shared_width_carries_the_other_requests():
    """Four requests at 0.6 each, widening costs a third of the throughput: judged alone the
    first draft loses (4.6 / 1.5 < 4) and the paper's rule verifies nothing; together the
    four pay for the wider block (6.4 / 1.5 > 4)."""
    sps = table([4], [[1 / (1 + 0.5 * k) for k in range(3)]])
    survival = [torch.tensor([0.6])] * 4
    assert prefix_lengths(survival, sps, shared_width=False) == [0, 0, 0, 0]
    assert prefix_lengths(survival, sps, shared_width=True) == [1, 1, 1, 1]
    # One request: both rules are the paper's.
    one = table([1], [[1.0, 0.5, 0.45]])
    for shared in (False, True):
        assert prefix_lengths([torch.tensor([0.95, 0.9])], one, shared) == [0]


def test_packed_rule_prices_tokens_not_widths():
    """Packed, a forward of N tokens over R rows costs what width N / R costs. Two requests:
    0.9 -> 3 tokens (2.9 x 0.9 = 2.61), 0.72 -> 4 tokens (3.62 x 0.8 = 2.90), 0.5 would take
    5 tokens (4.12 x 0.7 = 2.88 < 2.90): stop. Padded, the second draft of the first request
    needs width 3 for both rows (3.62 x 0.6 = 2.17 < 2.32) and the search stops there."""
    sps = table([2], [[1.0, 0.8, 0.6]])
    survival = [torch.tensor([0.9, 0.72]), torch.tensor([0.5, 0.05])]
    assert prefix_lengths(survival, sps, packed=True) == [2, 0]
    assert prefix_lengths(survival, sps, shared_width=False) == [1, 0]
    assert sps(2, 1.5) == pytest.approx(0.9) and sps(2, 2.5) == pytest.approx(0.7)


def test_round_overhead_favours_longer_blocks():
    """Width 2 halves the forward rate: alone it does not pay (1.95 x 0.5 < 1), but when a
    round also spends 1 s outside the forward the step rate only drops from 1/2 to 1/3 and
    every draft pays its way."""
    sps = table([1], [[1.0, 0.5, 0.45, 0.42, 0.40]])
    survival = [torch.tensor([0.95, 0.9, 0.85, 0.8])]
    assert prefix_lengths(survival, sps) == [0]
    assert prefix_lengths(survival, sps, overhead_s=1.0) == [4]


def test_engine_measures_round_overhead(tiny_target):
    from tests.drafters import RandomDrafter

    seen = []

    class Spy(Scheduler):
        def lengths(self, proposed, confidences, overhead_s=0.0, greedy=False):
            seen.append((overhead_s, greedy))
            return list(proposed)

    engine = SpecEngine(tiny_target, RandomDrafter(tiny_target.vocab_size), gamma=3, scheduler=Spy())
    engine.generate_batch([[5, 6, 7], [8, 9]], 6)
    assert seen[0][0] == 0.0 and all(s > 0 for s, _ in seen[1:]) and 2 in engine.overhead_s
    assert all(greedy == engine.greedy for _, greedy in seen)  # the engine says how it decodes


def test_both_rules_agree_for_one_request():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        survival = prefix_survival(torch.rand(int(torch.randint(1, 8, (1,), generator=gen)), generator=gen))
        steps = torch.rand(8, generator=gen).sort(descending=True).values.tolist()
        sps = table([1], [steps])
        assert prefix_lengths([survival], sps, False) == prefix_lengths([survival], sps, True)


@pytest.mark.parametrize("shared_width", [False, True])
def test_algorithm1_stops_early_where_a_global_search_would_not(shared_width):
    # Width 2 costs half the throughput; width 5 would pay off overall (4.5 x 0.42 = 1.89 > 1),
    # but the first admission already loses (1.95 x 0.5 < 1): Algorithm 1 stops there.
    sps = table([1], [[1.0, 0.5, 0.45, 0.42, 0.40]])
    assert prefix_lengths([torch.tensor([0.95, 0.9, 0.85, 0.8])], sps, shared_width) == [0]
    cheap = table([1], [[1.0, 0.9, 0.85, 0.8, 0.75]])
    assert prefix_lengths([torch.tensor([0.95, 0.9, 0.85, 0.8])], cheap, shared_width) == [4]
    assert prefix_lengths([torch.tensor([0.0, 0.0])], cheap, shared_width) == [0]  # a = 0 is never a candidate
    # Greedy decoding (any drafts may be verified): every width is weighed, width 5 is the fastest
    # (4.5 x 0.40 = 1.80 against 1.55, 1.28, 0.98 and 1 for widths 4, 3, 2 and 1).
    assert prefix_lengths([torch.tensor([0.95, 0.9, 0.85, 0.8])], sps, shared_width, any_width=True) == [4]
    assert prefix_lengths([torch.tensor([0.0, 0.0])], cheap, shared_width, any_width=True) == [0]


def test_greedy_width_scan_passes_a_step_in_the_cost():
    """Four requests; widening past 4 costs a step (rows padded to the next tile block: 19.1 ->
    16.2 forwards/s, measured on AMX), past it more width is nearly free. The stopping rule halts
    at the step: (4 + 4 x 3.05) x 16.2 = 262 < (4 + 4 x 2.55) x 19.1 = 271. With greedy decoding
    every width is weighed, and the whole block pays: (4 + 4 x 4.55) x 15.2 = 337."""
    sps = table([4], [[22.9, 21.3, 20.3, 19.1, 16.2, 15.7, 15.3, 15.2]])
    survival = [torch.tensor([0.9, 0.85, 0.8, 0.5, 0.5, 0.5, 0.5])] * 4
    assert prefix_lengths(survival, sps, shared_width=True) == [3] * 4
    assert prefix_lengths(survival, sps, shared_width=True, any_width=True) == [7] * 4

    def merit(width, rows):  # expected tokens x forwards/s
        return (4 + sum(float(s[: width - 1].sum()) for s in rows)) * sps(4, width)

    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # the scan's width is the best of all widths, the fixed block's included
        rows = [prefix_survival(torch.rand(7, generator=gen) ** 0.3) for _ in range(4)]
        chosen = prefix_lengths(rows, sps, shared_width=True, any_width=True)[0] + 1
        assert merit(chosen, rows) == max(merit(w, rows) for w in range(1, 9)) >= merit(8, rows)


def test_threshold_and_temperatures():
    conf = torch.tensor([0.9, 0.6, 0.7, 0.2])
    assert threshold_lengths([conf, torch.tensor([0.3, 0.9])], 0.5) == [3, 0]
    torch.testing.assert_close(apply_temperatures(conf, [1.0]), conf)
    hot = apply_temperatures(conf, [2.0, 2.0, 2.0, 2.0])
    assert torch.all((hot - 0.5).abs() < (conf - 0.5).abs())  # T > 1 pulls towards 1/2
    assert torch.equal(hot.argsort(), conf.argsort())  # order-preserving
    torch.testing.assert_close(prefix_survival(torch.tensor([0.5, 0.5, 0.5])), torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64))


@pytest.mark.parametrize("mode,packed,want", [("prefix", None, False), ("threshold", None, True),
                                              ("prefix", "true", True), ("threshold", "false", False)])
def test_configured_verification_form(tmp_path, mode, packed, want):
    """Unset, `scheduler.packed` is padded for Algorithm 1 (its shared-width rule measured faster
    on CPUs, bench/RESULTS.md) and packed for the threshold rule; set, it is what it says."""
    from drafter.config import load_config
    from drafter.scheduler import build_scheduler

    table([1], [[10.0, 8.0]]).save(tmp_path / "sps.json")
    cfg = load_config(None, [f"scheduler.mode={mode}", f"scheduler.cost_table={tmp_path / 'sps.json'}",
                      f"run.data_dir={tmp_path}"] + ([f"scheduler.packed={packed}"] if packed else []))
    assert build_scheduler(cfg).packed is want


def test_cost_table_lookup_and_errors(tmp_path):
    t = CostTable(rows=[1, 4], widths=[1, 2, 3], sps=[[10.0, 8.0, 6.0], [4.0, 3.0, 2.0]])
    assert t(1, 2) == 8.0 and t(4, 3) == 2.0
    assert t(2, 1) == pytest.approx(8.0)  # linear between rows 1 and 4
    assert t(16, 1) == 4.0  # clamped beyond the last row
    assert t(1, 6) == pytest.approx(3.0)  # per-token extrapolation past the widest shape
    t.save(tmp_path / "c.json")
    assert CostTable.load(tmp_path / "c.json") == t
    with pytest.raises(SchedulerError, match="drafter profile"):
        CostTable.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [1], "widths": [1, 2], "sps": [[1.0]]}))
    with pytest.raises(SchedulerError, match="rows x widths"):
        CostTable.load(tmp_path / "bad.json")
    with pytest.raises(SchedulerError, match="cost table"):
        Scheduler("prefix")


def test_profile_measures_every_shape(tiny_target):
    t = profile_target(tiny_target, rows=[1, 2], max_width=3, context=16, reps=1, progress=False)
    assert (t.rows, t.widths) == ([1, 2], [1, 2, 3])
    assert all(v > 0 for line in t.sps for v in line) and t.target == tiny_target.fingerprint
    for i in range(2):  # steps/s never rise with more tokens or rows
        assert all(a >= b for a, b in zip(t.sps[i], t.sps[i][1:]))
    assert all(a >= b for a, b in zip(t.sps[0], t.sps[1]))


def test_monotone_times_smooths_noise():
    noisy = [[0.47, 1.0, 1.25, 0.9, 0.7], [0.6, 0.5, 1.3, 1.4, 1.5]]
    t = monotone_times(noisy)
    for line in t:
        assert all(a <= b + 1e-12 for a, b in zip(line, line[1:]))
    for k in range(5):
        assert t[0][k] <= t[1][k] + 1e-12
    assert monotone_times([[1.0, 2.0], [3.0, 4.0]]) == [[1.0, 2.0], [3.0, 4.0]]  # already monotone: unchanged


def test_load_temperatures(tmp_path):
    (tmp_path / "best").mkdir()
    assert load_temperatures(tmp_path / "best") is None
    (tmp_path / "calibration.json").write_text(json.dumps({"temperatures": [1.5, 2.0]}))
    assert load_temperatures(tmp_path / "best") == [1.5, 2.0]  # found in the drafter folder above best/


def test_calibration_output_applies_only_to_the_weights_it_was_fitted_on(tmp_path):
    model = tmp_path / "drafter" / "best"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights A")
    cal = tmp_path / "calibration"
    cal.mkdir()
    (cal / "calibration.json").write_text(json.dumps({"temperatures": [1.5], "drafter_weights": sha256_file(model / "model.safetensors")}))
    assert load_temperatures(tmp_path / "drafter", cal) == [1.5]
    (model / "model.safetensors").write_bytes(b"weights B")  # retrained: the old fit no longer applies
    assert load_temperatures(tmp_path / "drafter", cal) is None


@pytest.mark.parametrize("mode", ["threshold", "prefix"])
def test_greedy_equality_with_scheduler(mode):
    target = lively_target("llama")
    prompts = [chat(target, q) for q in QUESTIONS]
    refs = [reference(target, p, 30) for p in prompts]
    torch.manual_seed(0)
    drafter = ScriptedDrafter({tuple(p): r for p, r in zip(prompts, refs)}, target.vocab_size)
    # A steep synthetic cost so that Algorithm 1 really cuts some drafts.
    sps = table([1, 2, 4], [[1 / (r * (1 + 0.3 * k)) for k in range(6)] for r in (1, 2, 4)])
    scheduler = Scheduler(mode, threshold=0.7, temperatures=[1.2, 1.0], cost_table=sps)
    gens = SpecEngine(target, drafter, gamma=5, scheduler=scheduler).generate_batch(prompts, 30)
    assert [g.tokens for g in gens] == refs
    rounds = [r for g in gens for r in g.rounds]
    assert any(r.verified < r.proposed for r in rounds)  # the scheduler did cut
    assert any(r.verified > 0 for r in rounds)
    assert all(r.accepted <= r.verified <= r.proposed for r in rounds)


def test_scheduler_needs_confidences(tiny_target):
    drafter = LMDrafter(perturbed_copy(tiny_target.model, 0.05, seed=1))  # no confidence head
    engine = SpecEngine(tiny_target, drafter, gamma=3, scheduler=Scheduler("threshold"))
    with pytest.raises(SchedulerError, match="confidence head"):
        engine.generate(chat(tiny_target, "hi"), 5)


@pytest.mark.parametrize("shared_width,packed", [(False, False), (True, False), (False, True)])
def test_sampling_lossless_with_prefix_scheduler(shared_width, packed):
    """Algorithm 1 across 2000 concurrent requests at temperature 0.8 (padded and packed
    rules): the chi-square test of test_decoding (false-alarm rate 1e-3) still passes."""
    target, drafter, joint = make_small_world(confidences=True)
    line = [1.0, 0.8, 0.5] if shared_width else [1.0, 0.9999, 0.5]  # all verify first drafts, not second
    sps = table([1, 2000], [line, line])

    class Untimed(Scheduler):  # decisions from the table alone, so the seeded test stays deterministic
        def lengths(self, proposed, confidences, overhead_s=0.0, greedy=False):
            return super().lengths(proposed, confidences, 0.0, greedy)

    scheduler = Untimed("prefix", cost_table=sps, shared_width=shared_width, packed=packed)
    pvalue, totals = sample_pvalue(target, drafter, joint, scheduler=scheduler)
    assert pvalue > ALPHA
    assert 0 < totals["verified"] < totals["proposed"]  # it did schedule


def test_peeking_confidence_breaks_losslessness():
    """Truncating on a confidence that peeks at the drafted token it scores fails the test."""
    target, drafter, joint = make_small_world(confidences=True)
    # The same drafter with a confidence that looks at the token it scores (c_k = p_d(x_k)):
    # truncating on it biases which drafts reach the target.
    original = drafter.propose

    def peeking(state, anchor, gamma, temperature, generator=None):
        prop = original(state, anchor, gamma, temperature, generator)
        prop.confidences = prop.probs[0].gather(1, prop.tokens[0][:, None]).T
        return prop

    drafter.propose = peeking
    pvalue, _ = sample_pvalue(target, drafter, joint, scheduler=Scheduler("threshold", threshold=0.3))
    assert pvalue < ALPHA


def test_greedy_packed_scan_takes_the_best_token_budget():
    """Packed and greedy: every budget of N tokens is weighed with the N - R drafts of highest a,
    so the choice is the best prefix-closed set of that kind, past any step in the cost."""
    sps = table([2], [[20.0, 17.0, 16.5, 16.2, 12.0, 11.9, 11.8, 11.7]])
    survival = [prefix_survival(torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.9])),
                prefix_survival(torch.tensor([0.5, 0.9, 0.9, 0.9, 0.9, 0.9]))]
    # the stopping rule halts at the first step (N = 3: (2 + 0.9) x 17 = 49.3 > 40; N = 4 pays too)
    greedy = prefix_lengths(survival, sps, packed=True, any_width=True)
    assert greedy[0] >= greedy[1] and sum(greedy) >= sum(prefix_lengths(survival, sps, packed=True))

    def merit(lengths, rows):  # expected tokens x forwards/s at the packed width
        tau = 2 + sum(float(s[:n].sum()) for s, n in zip(rows, lengths))
        return tau * sps(2, (2 + sum(lengths)) / 2)

    every = [(i, j) for i in range(7) for j in range(7)]
    assert merit(greedy, survival) == pytest.approx(max(merit(ij, survival) for ij in every if _top_set(survival, ij)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        rows = [prefix_survival(torch.rand(6, generator=gen) ** 0.3) for _ in range(2)]
        chosen = prefix_lengths(rows, sps, packed=True, any_width=True)
        assert merit(chosen, rows) == pytest.approx(max(merit(ij, rows) for ij in every if _top_set(rows, ij)))
        assert merit(chosen, rows) >= merit([6, 6], rows) - 1e-9 and merit(chosen, rows) >= merit([0, 0], rows) - 1e-9


def _top_set(rows, lengths) -> bool:
    """Whether the chosen drafts are the highest-a ones (no left-out draft beats a chosen one)."""
    chosen = [float(x) for s, n in zip(rows, lengths) for x in s[:n]]
    left = [float(x) for s, n in zip(rows, lengths) for x in s[n:]]
    return not chosen or not left or min(chosen) >= max(left)
