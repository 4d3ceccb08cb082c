"""Building blocks the drafters share: a decoder layer shaped like the target's.

Module and weight names follow transformers and the `speculators` package
(`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...) so a drafter's state dict
is already in the serving format. Only the attention *pattern* differs between
algorithms; the two patterns live here as plain functions:

- `block_attention` (DFlash/DSpark): queries of a block see the context keys their
  `ctx_visible` mask allows plus every key of their own block (bidirectional).
- `ttt_attention` (EAGLE-3 training-time test): causal attention over the sequence plus
  the "diagonal" keys of the earlier unrolled steps at the same index.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from drafter.attention import kernel_attention, kernel_takes


def draft_layer_config(target_config: Any, num_layers: int) -> Any:
    """The target's config with `num_layers` full-attention layers: the drafter's layer shape.

    Width, heads, head_dim, MLP width, activation, norm eps and RoPE come from the target.
    Every drafter layer uses full attention (no sliding windows): drafts are short.
    """
    cfg = copy.deepcopy(target_config)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * num_layers
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        # Gemma-style per-layer-type RoPE: the drafter's layers are full-attention layers.
        cfg.rope_parameters = dict(rope["full_attention"])
    if getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg


def _act(config: Any):
    from transformers.activations import ACT2FN

    name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
    return ACT2FN[name]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, computed in float32 (the Llama/Qwen3 convention)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """RoPE with the target's parameters (default or any transformers rope type)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            dim = config.head_dim
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = float(scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] long -> cos, sin [..., head_dim]."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, *pos, d]; cos/sin [b, *pos, d] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act = _act(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Projections of one attention block; the pattern is applied by the caller."""

    def __init__(self, config: Any, in_dim: int | None = None, qk_norm: bool = True) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        in_dim = in_dim or config.hidden_size
        self.q_proj = nn.Linear(in_dim, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim**-0.5

    def _heads(self, x: torch.Tensor, proj: nn.Linear, n: int, norm: RMSNorm | None) -> torch.Tensor:
        # [b, *pos, in] -> [b, n, *pos, d]
        y = proj(x).unflatten(-1, (n, self.head_dim))
        if norm is not None:
            y = norm(y)
        return y.movedim(-2, 1)

    def q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(self._heads(x, self.q_proj, self.num_heads, self.q_norm), cos, sin)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = apply_rope(self._heads(x, self.k_proj, self.num_kv_heads, self.k_norm), cos, sin)
        return k, self._heads(x, self.v_proj, self.num_kv_heads, None)

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        # [b, heads, *pos, d] -> [b, *pos, heads*d] -> o_proj
        return self.o_proj(attn.movedim(1, -2).flatten(-2))


class DecoderLayer(nn.Module):
    """Pre-norm attention + gated MLP, the target's shape; EAGLE-3 adds `hidden_norm`."""

    def __init__(self, config: Any, attn_in_dim: int | None = None, qk_norm: bool = True, hidden_norm: bool = False):
        super().__init__()
        self.self_attn = Attention(config, attn_in_dim, qk_norm)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if hidden_norm:
            self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    # [b, h, ...] -> [b, kv, h/kv, ...]: grouped-query attention without copying k/v.
    return q.unflatten(1, (num_kv_heads, q.shape[1] // num_kv_heads))


def block_attention(
    q: torch.Tensor,  # [b, h, A, S, d]: A blocks of S queries
    k_ctx: torch.Tensor,  # [b, kv, T, d]
    v_ctx: torch.Tensor,
    k_blk: torch.Tensor,  # [b, kv, A, S, d]
    v_blk: torch.Tensor,
    ctx_visible: torch.Tensor | None,  # [b, A, T] bool: context keys each block may see; None: all
    scale: float,
    ctx_valid: torch.Tensor | None = None,  # [b, T] bool, with ctx_visible None: rows' real context slots
) -> torch.Tensor:
    """Attention of each block over [its visible context ; its own block], in one softmax.

    Equivalent to dense attention over [context | all blocks] with the mask
    `BlockLayout.dense()`, without materialising the other blocks' columns
    (memory O(A*S*(T+S)) instead of O(A*S*(T+A*S))).
    """
    if ctx_visible is None:  # inference: one block a row that sees all its context, one fused kernel
        return _single_block_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale, ctx_valid)
    kv = k_ctx.shape[1]
    qg = _grouped(q, kv).float()  # [b, kv, g, A, S, d]
    s_ctx = torch.einsum("bkgasd,bktd->bkgast", qg, k_ctx.float()) * scale
    s_ctx = s_ctx.masked_fill(~ctx_visible[:, None, None, :, None, :], float("-inf"))
    s_blk = torch.einsum("bkgasd,bkard->bkgasr", qg, k_blk.float()) * scale
    probs = torch.softmax(torch.cat([s_ctx, s_blk], dim=-1), dim=-1)
    p_ctx, p_blk = probs.split([k_ctx.shape[2], k_blk.shape[3]], dim=-1)
    out = torch.einsum("bkgast,bktd->bkgasd", p_ctx, v_ctx.float())
    out = out + torch.einsum("bkgasr,bkard->bkgasd", p_blk, v_blk.float())
    return out.flatten(1, 2).to(q.dtype)  # [b, h, A, S, d]


def _single_block_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale: float, ctx_valid=None) -> torch.Tensor:
    """`block_attention` with A = 1 and every context key visible (or, rows drafted together, each
    row's real slots `ctx_valid` [b, T] of a padded context), in the weights' dtype: no float32
    copies of the context keys/values (SDPA accumulates in float32; bf16 on a CPU with the
    short-query kernel, drafter/attention.py, takes that)."""
    b, h, A, S, d = q.shape
    if A != 1:
        raise ValueError(f"an unmasked block attention takes one block per row, got {A}")
    k = torch.cat([k_ctx, k_blk[:, :, 0]], dim=2)
    v = torch.cat([v_ctx, v_blk[:, :, 0]], dim=2)
    if ctx_valid is None:
        visible = torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(b, 1, S, k.shape[2])  # the block sees itself whole
    else:
        visible = F.pad(ctx_valid, (0, S), value=True)[:, None, None].expand(b, 1, S, k.shape[2])
    if q.device.type == "cpu" and kernel_takes(q[:, :, 0], k, v, visible):  # the target's short-query kernel
        return kernel_attention(q[:, :, 0], k, v, visible, scale)[:, :, None]
    out = F.scaled_dot_product_attention(q[:, :, 0], k, v, attn_mask=None if ctx_valid is None else visible,
                                         scale=scale, enable_gqa=h != k.shape[1])
    return out[:, :, None]  # [b, h, 1, S, d]


def pad_rows(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Requests drafted together: their [1, heads, L_r, d] keys (or values) as one batch
    [b, heads, max L, d], each padded on the right, and the rows' real slots [b, max L] (None
    when no row is padded)."""
    if len(parts) == 1:
        return parts[0], None
    lengths = [p.shape[2] for p in parts]
    longest = max(lengths)
    out = parts[0].new_zeros(len(parts), parts[0].shape[1], longest, parts[0].shape[3])
    for r, part in enumerate(parts):
        out[r, :, : part.shape[2]] = part[0]
    if min(lengths) == longest:
        return out, None
    return out, torch.arange(longest, device=out.device)[None] < torch.tensor(lengths, device=out.device)[:, None]


def ttt_attention(
    q: torch.Tensor,  # [b, h, N, d]
    k: torch.Tensor,  # [b, kv, M, d]: keys every query may see under `mask`
    v: torch.Tensor,
    mask: torch.Tensor | None,  # [b, N, M] bool, or None for all visible
    diag_k: list[torch.Tensor],  # each [b, kv, N, d]: one extra key per query (same index)
    diag_v: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """EAGLE-3's unrolled attention: base keys under `mask` plus per-query diagonal keys.

    At unrolled step i, query index t sees the step-0 keys at indices <= t and the keys
    the steps 1..i produced at the same index t: exactly what chain drafting sees at
    inference (the confirmed prefix, then the tokens it drafted itself).
    """
    kv = k.shape[1]
    qg = _grouped(q, kv).float()  # [b, kv, g, N, d]
    scores = torch.einsum("bkgnd,bkmd->bkgnm", qg, k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    extra = [torch.einsum("bkgnd,bknd->bkgn", qg, dk.float())[..., None] * scale for dk in diag_k]
    probs = torch.softmax(torch.cat([scores, *extra], dim=-1), dim=-1)
    out = torch.einsum("bkgnm,bkmd->bkgnd", probs[..., : k.shape[2]], v.float())
    for j, dv in enumerate(diag_v):
        out = out + probs[..., k.shape[2] + j, None] * dv.float()[:, :, None]
    return out.flatten(1, 2).to(q.dtype)  # [b, h, N, d]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """transformers' default init: normal(0, initializer_range) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


__all__ = [
    "Attention", "DecoderLayer", "MLP", "RMSNorm", "Rotary", "apply_rope", "block_attention",
    "draft_layer_config", "init_weights", "ttt_attention",
]
