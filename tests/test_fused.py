"""The fused bf16 norm and gated-MLP kernels (drafter/fused.py, csrc/fused_ops.cpp)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from drafter import few_rows, fused
from tests.drafters import wide_bf16_target
from tests.test_decoding import assert_speculative_is_plain

pytestmark = pytest.mark.skipif(not few_rows.available(), reason="needs the few-rows build (an AVX-512 CPU)")


@pytest.mark.parametrize("shape", [(1, 576), (3, 7, 40), (2, 1, 1536), (5, 9, 64)])
def test_the_fused_norm_gives_llamas_rms_norm(shape):
    g = torch.Generator().manual_seed(shape[-1])
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 0.5 + 1)
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    ours, theirs = torch.ops.drafter_fused.rms_norm(x, norm.weight, 1e-5), norm(x)
    assert ours.shape == x.shape and ours.dtype == torch.bfloat16
    # the sum of squares in another order: the same bits almost everywhere, never a bf16 step off
    assert (ours == theirs).float().mean() >= 0.99
    assert ((ours.float() - theirs.float()).abs() <= theirs.float().abs() * 2**-7).all()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert (ours.double() - exact).abs().max() <= 1.01 * (theirs.double() - exact).abs().max()


@pytest.mark.parametrize("numel", [1, 15, 16, 1536, 3 * 1536 + 5, 70_000])
def test_the_fused_gate_gives_silu_times_up_to_the_bit(numel):
    g = torch.Generator().manual_seed(numel)
    gate, up = ((torch.randn(numel, generator=g) * 6).bfloat16() for _ in range(2))
    gate[: min(numel, 4)] = torch.tensor([0.0, -0.0, 90.0, -90.0])[: min(numel, 4)].bfloat16()
    assert torch.equal(torch.ops.drafter_fused.silu_mul(gate, up), F.silu(gate) * up)


class ShiftedNorm(LlamaRMSNorm):  # Gemma's convention: scales by 1 + weight
    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight.float())).to(x.dtype)


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.GELU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_install_fuses_only_what_the_kernel_agrees_with():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, hidden_act="silu")
    model = nn.ModuleDict({"norm": LlamaRMSNorm(64), "shifted": ShiftedNorm(64), "mlp": LlamaMLP(config),
                           "gelu": GeluMLP()}).bfloat16()
    with torch.no_grad():
        model["norm"].weight.uniform_(0.5, 1.5)
    assert fused.install(model) == 2
    assert [getattr(model[name], "_drafter_fused", False) for name in ("norm", "shifted", "mlp", "gelu")] == [
        True, False, True, False]
    assert fused.install(model) == 0  # once only
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        want = model["mlp"].down_proj(F.silu(model["mlp"].gate_proj(x)) * model["mlp"].up_proj(x))
        assert torch.equal(model["mlp"](x), want)
    # outside what the kernel takes (autograd, float32), the module's own forward runs
    x.requires_grad_(True)
    model["norm"].weight.requires_grad_(True)
    assert model["norm"](x).grad_fn is not None
    assert fused.install(nn.ModuleDict({"norm": LlamaRMSNorm(64)})) == 0  # float32: nothing to fuse


def test_a_fused_bf16_target_decodes_speculatively_as_it_decodes_plainly():
    """Every step and verification of a bf16 target goes through the fused ops, and a row's norm
    does not depend on the other rows: speculative decoding stays token for token plain decoding."""
    target = wide_bf16_target()
    layers = target.config.num_hidden_layers
    assert sum(getattr(m, "_drafter_fused", False) for m in target.model.modules()) == 2 * layers + 1 + layers
    assert_speculative_is_plain(target)
    x = torch.randn(6, 128).bfloat16()
    norm = target.model.model.norm
    alone = torch.cat([norm(x[i : i + 1]) for i in range(6)])
    assert torch.equal(norm(x), alone)


@pytest.mark.parametrize("batch,heads,tokens,dim", [(1, 9, 1, 64), (3, 4, 7, 32), (2, 2, 5, 128)])
def test_the_fused_rotary_embedding_gives_transformers_to_the_bit(batch, heads, tokens, dim):
    from transformers.models.llama import modeling_llama

    g = torch.Generator().manual_seed(dim)
    q, k = ((torch.randn(batch, tokens, h, dim, generator=g) * 4).bfloat16().transpose(1, 2) for h in (heads, 1))
    angles = torch.randn(1, tokens, dim, generator=g) * 50  # one row of positions for the batch
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    original = getattr(modeling_llama.apply_rotary_pos_emb, "__wrapped__", None) or modeling_llama.apply_rotary_pos_emb
    ours = fused._fused_rope(original)
    for a, b in zip(ours(q, k, cos, sin), original(q, k, cos, sin)):
        assert torch.equal(a, b)
    q32, k32 = q.float(), k.float()  # not bf16: the original runs
    for a, b in zip(ours(q32, k32, cos.float(), sin.float()), original(q32, k32, cos.float(), sin.float())):
        assert torch.equal(a, b)


def test_loading_a_bf16_llama_replaces_its_rotary_function():
    from transformers.models.llama import modeling_llama

    wide_bf16_target()
    assert getattr(modeling_llama.apply_rotary_pos_emb, "_drafter_fused", False)


def test_unfused_puts_the_original_forwards_back_for_a_while():
    from transformers.models.llama import modeling_llama

    model = wide_bf16_target().model
    norm, rope = model.model.norm, modeling_llama.apply_rotary_pos_emb
    assert "forward" in norm.__dict__ and rope._drafter_fused
    with fused.unfused(model):
        assert "forward" not in norm.__dict__ and modeling_llama.apply_rotary_pos_emb is rope.original
        x = torch.randn(2, 128).bfloat16()
        assert norm(x).dtype == torch.bfloat16
    assert "forward" in norm.__dict__ and modeling_llama.apply_rotary_pos_emb is rope
