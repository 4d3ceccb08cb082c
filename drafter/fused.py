"""A bf16 decoder layer's elementwise work in one pass each, on a CPU: RMSNorm and silu(gate) * up.

A decoding step, a verification and a drafter's proposal run every layer's norms and gated MLP
over one or a few rows, where torch's chain of small ops (8 for an RMSNorm: upcast, square, mean,
add, rsqrt, multiply, downcast, scale; 2 for the gate) costs more in dispatch than in arithmetic.
`csrc/fused_ops.cpp` does each in one pass with the same roundings (the norm's float32 sum of
squares in another order, so equal to the bit almost everywhere and within one bf16 step
elsewhere; the gate to the bit, with torch's own exp).

`install(model)` gives each RMSNorm-like module (a 1-D `weight`, `variance_epsilon` or `eps`) and
each gated SiLU MLP (`gate_proj`, `up_proj`, `down_proj`) a forward that takes the kernel for bf16
inputs on the CPU outside autograd, and its own forward otherwise. It installs only where the
kernel, tried on random rows at install time, gives the module's own result (an RMSNorm that
scales by `1 + weight`, or another activation, keeps its forward). Plain and speculative decoding
share the modules, so decoding stays lossless relative to the target as it runs.
"""

from __future__ import annotations

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


def _agrees(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal to the bit almost everywhere, and nowhere more than one bf16 step apart."""
    a, b = ours.float(), theirs.float()
    return bool((a == b).float().mean() >= 0.99 and ((a - b).abs() <= b.abs() * 2**-7 + 1e-30).all())


@torch.no_grad()
def install(model: nn.Module) -> int:
    """Fuse the bf16 CPU model's norms and gated MLPs where the kernel agrees with them; returns
    how many modules now take it (0 where the kernel is not built or the model is not bf16 on a CPU)."""
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
        act = _activation(module)
        if act is not None and module.down_proj.weight.dtype == torch.bfloat16:
            gate, up = (torch.randn(5, 64, generator=g).bfloat16() * 4 for _ in range(2))
            if torch.equal(torch.ops.drafter_fused.silu_mul(gate, up), act(gate) * up):
                module.forward, module._drafter_fused = _fused_mlp(module), True
                fused += 1
    return fused
