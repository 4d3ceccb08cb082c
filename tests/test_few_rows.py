"""The few-rows bf16 kernel (drafter/few_rows.py): each output is one float32 FMA chain over k in
order (or, in the pairs layout, one float32 sum over k pairs: `vdpbf16ps`, or `tdpbf16ps` where
the CPU has AMX), rounded to bf16 once, whatever the other rows, the tile or the thread;
prepacked layers take it for few rows only, and decoding through it stays lossless."""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from drafter import few_rows
from drafter import prepack as pp
from drafter.runtime import cpu_flags

pytestmark = pytest.mark.skipif(not (pp.supported() and few_rows.available()),
                                reason="needs an AVX-512 CPU, a compiler and oneDNN's packed linear")


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


needs_bf16_units = pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="needs AVX-512 BF16")
LAYOUTS = [False, pytest.param(True, marks=needs_bf16_units)]


@pytest.fixture(autouse=True)
def one_thread():
    """Prepacked layers take the kernel on one torch thread only (drafter/prepack.py)."""
    with torch_threads(1):
        yield


def fma_chain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic written out: acc = fma(x_k, w_k, acc) in float32 for k in order
    (a bf16 product is exact in float64, and so is its sum with a float32 here), bias, one rounding."""
    acc = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32)
    for k in range(x.shape[1]):
        acc = (acc.double() + x[:, k, None].double() * weight[None, :, k].double()).float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.bfloat16()


@pytest.mark.parametrize("out_features,in_features,bias", [(100, 37, True), (64, 70, False), (200, 16, True)])
def test_each_output_is_a_float32_fma_chain_rounded_once(out_features, in_features, bias):
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    x = torch.randn(13, in_features, generator=gen).bfloat16()
    out = few_rows.linear(x, few_rows.pack(weight, pairs=False), out_features, b)
    assert torch.equal(out, fma_chain(x, weight, b))


@needs_bf16_units
@pytest.mark.parametrize("out_features,in_features,bias", [(100, 37, True), (64, 70, False), (200, 576, True)])
def test_the_pairs_layout_sums_the_same_products_in_pairs(out_features, in_features, bias):
    """`vdpbf16ps` adds k's products two at a time (an odd K gets a zero pair partner): at most one
    bf16 step from the FMA chain, and equal to it nearly everywhere."""
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    x = torch.randn(13, in_features, generator=gen).bfloat16()
    packed = few_rows.pack(weight, pairs=True)
    assert packed.shape == ((out_features + 47) // 48, (in_features + 1) // 2, 96)
    out, want = few_rows.linear(x, packed, out_features, b), fma_chain(x, weight, b)
    ulp = want.float().abs().clamp_min(2 ** -126) * 2 ** -7  # one bf16 step at the sum's magnitude
    assert ((out.float() - want.float()).abs() <= ulp).all()
    assert (out == want).float().mean() > 0.98


@pytest.mark.parametrize("pairs", LAYOUTS)
def test_a_rows_result_does_not_depend_on_the_batch_or_the_threads(pairs):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(1536, 576, generator=gen).bfloat16()
    packed = few_rows.pack(weight, pairs=pairs)
    x = torch.randn(40, 576, generator=gen).bfloat16()
    alone = torch.cat([few_rows.linear(x[i:i + 1], packed, 1536) for i in range(40)])  # one thread (the fixture)
    with torch_threads(2):
        for rows in (1, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 40):
            assert torch.equal(few_rows.linear(x[:rows], packed, 1536), alone[:rows]), rows
    # 3-D input: the leading dimensions are rows
    assert torch.equal(few_rows.linear(x[:12].view(3, 4, 576), packed, 1536), alone[:12].view(3, 4, 1536))


def test_a_prepacked_layer_takes_the_kernel_for_few_rows_and_onednn_beyond(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    monkeypatch.setattr(few_rows, "paired", lambda: False)  # the FMA chain, written out below
    calls = []
    kernel = few_rows.linear
    monkeypatch.setattr(few_rows, "linear", lambda x, *args: calls.append(x.shape[0]) or kernel(x, *args))
    linear = torch.nn.Linear(576, 130).bfloat16().requires_grad_(False)
    pp.prepack(linear, few_rows=8)
    for rows in (1, 8, 9, 33):
        x = torch.randn(rows, 576, generator=gen).bfloat16()
        with torch.inference_mode():
            out = linear(x)
        if rows <= 8:
            assert torch.equal(out, fma_chain(x, linear.weight, linear.bias)), rows
        else:  # oneDNN's prepacked kernel: with AMX its blocking at many rows may sum in another order than F.linear's
            want = F.linear(x, linear.weight, linear.bias).float()
            assert ((out.float() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all(), rows
    assert calls == [1, 8]
    with torch_threads(2), torch.inference_mode():  # on two threads oneDNN's kernel was faster: it keeps them
        assert torch.equal(linear(x[:1]), F.linear(x[:1], linear.weight, linear.bias))
    assert calls == [1, 8]
    with torch.no_grad():  # a weight changed in place is packed again for the kernel too
        linear.weight.mul_(-1)
        x = torch.randn(2, 576, generator=gen).bfloat16()
        assert torch.equal(linear(x), fma_chain(x, linear.weight, linear.bias))
    pp.unpack(linear)
    assert "_few_packed" not in linear.__dict__


@pytest.mark.parametrize("available,setting", [(True, "true"), (False, "true"), (True, "false")])
def test_the_target_takes_the_kernel_where_it_suits_the_cpu_and_the_config_allows(monkeypatch, available, setting):
    from tests.test_prepack import bf16_target

    monkeypatch.setattr(few_rows, "available", lambda: available)
    target = bf16_target(True, f"runtime.few_rows_kernel={setting}")
    settings = {m._few_rows for m in target.model.modules() if "_prepacked" in m.__dict__}
    assert settings == {(few_rows.max_rows() or None) if available and setting == "true" else None}


@pytest.mark.parametrize("vendor,flags,rows,paired", [
    ("GenuineIntel", "avx512f avx512_bf16", few_rows.MAX_ROWS, False),
    ("AuthenticAMD", "avx512f avx512_bf16", few_rows.MAX_ROWS, True),
    ("AuthenticAMD", "avx512f", 16, False), ("", "avx512f", few_rows.MAX_ROWS, False),
    ("GenuineIntel", "avx512f avx512_bf16 amx_bf16", few_rows.MAX_ROWS_WITH_AMX, True),
    ("GenuineIntel", "avx512f amx_bf16", None, False)])
def test_the_kernel_takes_the_rows_and_arithmetic_it_was_measured_faster_with_on_this_cpu(monkeypatch, vendor, flags,
                                                                                          rows, paired):
    import drafter.runtime as rt

    monkeypatch.setattr(rt, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset(flags.split()))
    monkeypatch.setattr(few_rows, "available", lambda: True)
    assert pp.few_rows_for_this_cpu() == rows
    assert few_rows.paired() is paired
    linear = torch.nn.Linear(70, 130).bfloat16().requires_grad_(False)
    assert few_rows.pack(linear.weight).shape == ((3, 35, 96) if paired else (3, 70, 64))


def test_greedy_speculative_decoding_through_the_kernel_is_plain_decoding(tmp_path):
    """Target and drafter (prepacked like the target) on the kernel: verification blocks, single
    steps and proposals all through it; the speculative answer is the plain one token for token."""
    from drafter.decoding import SpecEngine, load_drafter
    from tests.drafters import lively_target
    from tests.test_decoding import QUESTIONS, chat
    from tests.test_decoding_models import drafter_for

    target = lively_target("llama")
    target.model.to(torch.bfloat16)
    drafter_for(target, "dspark").export(tmp_path / "drafter")
    pp.prepack(target.model, few_rows=few_rows.MAX_ROWS)
    drafter, _ = load_drafter(tmp_path / "drafter", target)
    assert {m._few_rows for m in drafter.modules() if "_prepacked" in m.__dict__} == {few_rows.MAX_ROWS}
    for question in QUESTIONS[:3]:
        prompt = chat(target, question)
        plain = SpecEngine(target, None).generate(prompt, 24).tokens
        spec = SpecEngine(target, drafter, gamma=3).generate(prompt, 24)
        assert spec.tokens == plain and sum(r.proposed for r in spec.rounds) > 0
