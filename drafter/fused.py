"""A bf16 decoder layer's elementwise work in one pass each, on a CPU: RMSNorm, silu(gate) * up
and the rotary embedding.

A decoding step, a verification and a drafter's proposal run every layer's norms, gated MLP and
rotary embedding over one or a few rows, where torch's chain of small ops (8 for an RMSNorm:
upcast, square, mean, add, rsqrt, multiply, downcast, scale; 2 for the gate; 12 for the rotary
embedding of q and k) costs more in dispatch than in arithmetic. `csrc/fused_ops.cpp` does each
in one pass with the same roundings (the norm's float32 sum of squares in another order, so equal
to the bit almost everywhere and within one bf16 step elsewhere; the gate with torch's own exp
and the rotary embedding to the bit).

`install(model)` gives each RMSNorm-like module (a 1-D `weight`, `variance_epsilon` or `eps`) and
each gated SiLU MLP (`gate_proj`, `up_proj`, `down_proj`) a forward that takes the kernel for bf16
inputs on the CPU outside autograd, and its own forward otherwise; and it replaces the
`apply_rotary_pos_emb` of the transformers module that defines the model's attention (process-wide,
for every model of that architecture: the replacement hands anything else to the original).
Each is installed only where the kernel, tried on random inputs at install time, gives the
original's result (an RMSNorm that scales by `1 + weight`, or another activation, keeps its
forward). Plain and speculative decoding share the modules, so decoding stays lossless relative
to the target as it runs.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn

from drafter import few_rows


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return eps


def _activation(module: nn.Module) -> nn.Module | None:
    act = getattr(module, "act_fn", getattr(module, "act", None))
    parts = all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
    return act if parts and isinstance(act, nn.Module) else None


def _fused_norm(module: nn.Module, eps: float):
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _takes(x, module.weight):
            return torch.ops.drafter_fused.rms_norm(x, module.weight, eps)
        return original(x)

    return forward


def _fused_mlp(module: nn.Module):
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _takes(x, module.down_proj.weight):
            return module.down_proj(torch.ops.drafter_fused.silu_mul(module.gate_proj(x), module.up_proj(x)))
        return original(x)

    return forward


def _fused_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if (unsqueeze == 1 and q.dim() == 4 and cos.dim() == 3 and q.shape[-1] % 32 == 0 and q.stride(-1) == 1
                and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
                and all(_takes(t, cos) for t in (q, k, sin))):
            return torch.ops.drafter_fused.rope(q, cos, sin), torch.ops.drafter_fused.rope(k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._drafter_fused = True
    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def _install_rope(module: nn.Module, g: torch.Generator) -> bool:
    """Replace the rotary embedding function of the transformers module that defines this
    attention module's class, if it has one and the kernel agrees with it."""
    if not all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")):
        return False
    source = sys.modules.get(type(module).__module__)
    original = getattr(source, "apply_rotary_pos_emb", None)
    if original is None or getattr(original, "_drafter_fused", False):
        return False
    q, k = (torch.randn(2, 5, 3, 64, generator=g).bfloat16().transpose(1, 2) for _ in range(2))  # [B, H, T, D] views, as in the model
    angles = torch.randn(2, 5, 64, generator=g) * 3
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    replacement = _fused_rope(original)
    if not all(torch.equal(a, b) for a, b in zip(replacement(q, k, cos, sin), original(q, k, cos, sin))):
        return False
    source.apply_rotary_pos_emb = replacement
    return True


def _agrees(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal to the bit almost everywhere, and nowhere more than one bf16 step apart."""
    a, b = ours.float(), theirs.float()
    return bool((a == b).float().mean() >= 0.99 and ((a - b).abs() <= b.abs() * 2**-7 + 1e-30).all())


@torch.no_grad()
def install(model: nn.Module) -> int:
    """Fuse the bf16 CPU model's norms, gated MLPs and rotary embedding where the kernel agrees
    with them; returns how many modules (and rotary functions) now take it (0 where the kernel is
    not built or the model is not bf16 on a CPU)."""
    params = next(model.parameters(), None)
    if params is None or params.dtype != torch.bfloat16 or params.device.type != "cpu" or not few_rows.available():
        return 0
    g = torch.Generator().manual_seed(0)
    fused = 0
    for module in model.modules():
        if getattr(module, "_drafter_fused", False):  # installed before
            continue
        eps = _norm_eps(module)
        if eps is not None and type(module).__name__.endswith("RMSNorm") and module.weight.dtype == torch.bfloat16:
            x = torch.randn(5, module.weight.shape[0], generator=g).bfloat16()
            if _agrees(torch.ops.drafter_fused.rms_norm(x, module.weight, eps), module(x)):
                module.forward, module._drafter_fused = _fused_norm(module, eps), True
                fused += 1
        fused += _install_rope(module, g)
        act = _activation(module)
        if act is not None and module.down_proj.weight.dtype == torch.bfloat16:
            gate, up = (torch.randn(5, 64, generator=g).bfloat16() * 4 for _ in range(2))
            if torch.equal(torch.ops.drafter_fused.silu_mul(gate, up), act(gate) * up):
                module.forward, module._drafter_fused = _fused_mlp(module), True
                fused += 1
    return fused


@contextmanager
def unfused(model: nn.Module):
    """Within: the model's fused modules and rotary functions run their own forwards again (for
    side-by-side measurements, bench/fused_ops.py)."""
    modules = [m for m in model.modules() if getattr(m, "_drafter_fused", False)]
    forwards = [m.__dict__.pop("forward") for m in modules]
    sources = {sys.modules[type(m).__module__] for m in model.modules()}
    ropes = {src: src.apply_rotary_pos_emb for src in sources
             if getattr(getattr(src, "apply_rotary_pos_emb", None), "_drafter_fused", False)}
    for src, fn in ropes.items():
        src.apply_rotary_pos_emb = fn.original
    try:
        yield
    finally:
        for m, forward in zip(modules, forwards):
            m.forward = forward
        for src, fn in ropes.items():
            src.apply_rotary_pos_emb = fn
