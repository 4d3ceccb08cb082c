"""bf16 linear weights reordered once for oneDNN (drafter/prepack.py): the outputs must stay
F.linear's to the bit, gradients must still flow, and a changed weight must not be served stale."""

import pytest
import torch
import torch.nn.functional as F

from drafter import prepack as pp
from drafter.config import load_config
from drafter.decoding import SpecEngine
from tests.conftest import ROOT
from tests.drafters import lively_target
from tests.test_decoding import QUESTIONS, chat

pytestmark = pytest.mark.skipif(not pp.supported(), reason="this torch build has no oneDNN packed linear")


def bf16_target(prepack=True, *sets):
    from drafter.target import load_target

    return load_target(load_config(ROOT / "configs" / "tiny.yaml", ["target.dtype=bfloat16", "target.tiny.seed=5",
                                                                     f"runtime.prepack={str(prepack).lower()}", *sets]))


def linear_count(model):
    return sum(type(m) is torch.nn.Linear for m in model.modules())


def test_a_bf16_target_is_prepacked_unless_the_config_says_no():
    packed, plain = bf16_target(), bf16_target(prepack=False)
    assert pp.is_prepacked(packed.model) and not pp.is_prepacked(plain.model)
    assert sum("_prepacked" in m.__dict__ for m in packed.model.modules()) == linear_count(packed.model)


def test_float32_layers_are_left_alone(tiny_target):
    assert pp.prepack(tiny_target.model) == 0 and not pp.is_prepacked(tiny_target.model)


@pytest.mark.parametrize("rows,context,new", [(1, 0, 37), (1, 20, 1), (1, 20, 5), (4, 12, 1), (3, 9, 16)])
def test_prepacked_logits_equal_f_linear_to_the_bit(rows, context, new):
    target = bf16_target(prepack=False)
    ids = torch.randint(0, target.model.config.vocab_size, (rows, context + new), generator=torch.Generator().manual_seed(rows))

    def logits():
        with torch.inference_mode():
            cache = target.model(ids[:, :context], use_cache=True).past_key_values if context else None
            return target.model(ids[:, context:], past_key_values=cache, use_cache=True).logits

    plain = logits()
    assert pp.prepack(target.model) == linear_count(target.model)
    assert torch.equal(logits(), plain)
    pp.unpack(target.model)
    assert not pp.is_prepacked(target.model) and torch.equal(logits(), plain)


def test_gradients_flow_through_a_prepacked_layer_as_through_f_linear():
    """A drafter trained through the target's LM head needs the gradient of its input."""
    linear = torch.nn.Linear(24, 40, bias=True).bfloat16().requires_grad_(False)
    pp.prepack(linear)
    x = torch.randn(5, 24).bfloat16().requires_grad_(True)
    linear(x).float().square().sum().backward()
    want = x.detach().clone().requires_grad_(True)
    F.linear(want, linear.weight, linear.bias).float().square().sum().backward()
    assert torch.equal(x.grad, want.grad)


def test_a_weight_changed_after_prepacking_is_reordered_again():
    linear = torch.nn.Linear(32, 48, bias=False).bfloat16().requires_grad_(False)
    pp.prepack(linear)
    x = torch.randn(3, 32).bfloat16()
    with torch.no_grad():
        linear(x)
        linear.weight.mul_(-2)  # in place
        assert torch.equal(linear(x), F.linear(x, linear.weight))
        linear.weight = torch.nn.Parameter(torch.randn(48, 32).bfloat16(), requires_grad=False)  # replaced
        assert torch.equal(linear(x), F.linear(x, linear.weight))
        linear.float()  # another dtype: F.linear's own path
        assert torch.equal(linear(x.float()), F.linear(x.float(), linear.weight))


@pytest.mark.parametrize("wide_rows", [None, 16])
def test_greedy_speculative_decoding_with_prepacked_weights_is_plain_decoding(tmp_path, wide_rows):
    """A prepacked target, and a drafter `load_drafter` prepacks with it: lossless as before,
    also with the prefill's products in float32 (16 rows or more) and the rounds' in bf16."""
    from drafter.decoding import load_drafter
    from tests.test_decoding_models import drafter_for

    target = lively_target("llama")
    target.model.to(torch.bfloat16)
    prompt = chat(target, QUESTIONS[1])
    assert len(prompt) > 16
    unpacked = SpecEngine(target, None).generate(prompt, 24).tokens
    drafter_for(target, "dspark").export(tmp_path / "drafter")
    assert pp.prepack(target.model, wide_rows=wide_rows) == linear_count(target.model)
    drafter, _ = load_drafter(tmp_path / "drafter", target)
    assert pp.is_prepacked(drafter)
    plain = SpecEngine(target, None).generate(prompt, 24).tokens
    spec = SpecEngine(target, drafter, gamma=3).generate(prompt, 24)
    if wide_rows is None:
        assert plain == unpacked
    assert spec.tokens == plain and sum(r.proposed for r in spec.rounds) > 0


def test_the_draft_vocabularys_head_slice_is_reordered_with_the_lm_head():
    """A reduced draft vocabulary scores through a kept slice of the LM head: reordered once
    when the head is, equal to F.linear on the slice to the bit, and sliced again after a change."""
    from drafter.models import TargetHeads, build

    target = bf16_target(prepack=False)
    heads = TargetHeads.from_target(target)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["drafter.algorithm=dspark", "drafter.draft_vocab_size=32"])
    counts = torch.arange(heads.vocab_size).flip(0)  # the 32 lowest ids are the most frequent
    drafter = build(cfg, heads, target.layer_ids, token_counts=counts).to(torch.bfloat16)
    h = torch.randn(3, heads.hidden_size).bfloat16()

    def plain():
        return F.linear(h, heads.lm_head.weight[drafter.draft_ids])

    with torch.inference_mode():
        assert not pp.is_prepacked(drafter.draft_head()) and torch.equal(drafter.vocab_logits(h), plain())
        pp.prepack(target.model)
        assert pp.is_prepacked(drafter.draft_head()) and torch.equal(drafter.vocab_logits(h), plain())
        drafter.set_draft_vocab(counts.flip(0))  # another vocabulary: the 32 highest ids
        assert pp.is_prepacked(drafter.draft_head()) and torch.equal(drafter.vocab_logits(h), plain())
    assert "_draft_head" not in dict(drafter.named_modules()) and not any("draft_head" in k for k in drafter.state_dict())


def test_wide_products_multiply_in_float32_and_few_rows_stay_bf16():
    """With wide_rows set, a product of that many rows per ~2M weight elements is the float32
    product of the bf16 operands rounded once; fewer rows keep the bf16 kernel, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    for out_features, in_features, needs in ((1536, 576, 4), (4096, 1024, 8)):  # 4M elements: twice the rows
        linear = torch.nn.Linear(in_features, out_features).bfloat16().requires_grad_(False)
        pp.prepack(linear, wide_rows=4)
        told_apart = False
        for rows in (1, needs - 1, needs, 8 * needs):
            x = torch.randn(rows, in_features, generator=gen).bfloat16()
            wide = F.linear(x.float(), linear.weight.float(), linear.bias.float()).bfloat16()
            bf16 = F.linear(x, linear.weight, linear.bias)
            with torch.inference_mode():
                out = linear(x)
            assert torch.equal(out, wide if rows >= needs else bf16), (out_features, rows)
            told_apart |= rows >= needs and not torch.equal(wide, bf16)
        assert told_apart  # the two paths give different roundings somewhere here
        pp.unpack(linear)
        assert not hasattr(linear, "_wide_rows")


@pytest.mark.parametrize("bf16_pays,setting", [(True, "true"), (False, "true"), (False, "false")])
def test_the_target_multiplies_wide_in_float32_only_where_bf16_is_slower(monkeypatch, bf16_pays, setting):
    import drafter.runtime

    monkeypatch.setattr(drafter.runtime, "cpu_bf16_pays", lambda work: bf16_pays)
    target = bf16_target(True, f"runtime.wide_float32={setting}")
    wide = {m._wide_rows for m in target.model.modules() if "_prepacked" in m.__dict__}
    assert wide == {pp.WIDE_ROWS if not bf16_pays and setting == "true" else None}
