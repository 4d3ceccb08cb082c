"""bf16 linear layers on a CPU with their weights reordered once, not on every call.

torch runs a bf16 `F.linear` on a CPU through oneDNN, which reorders the weight matrix into its
blocked layout on every call. For the few rows of a decoding step that reorder costs as much as
the product: SmolLM2's LM head ([1 x 576] @ [576 x 49,152], one thread, Intel AVX-512 BF16) took
9.3 ms as `F.linear` and 6.0 ms from a weight reordered once (`bench/prepack.py`). `prepack`
gives each bf16 `nn.Linear` of a frozen CPU model a copy of its weight in oneDNN's layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing does) and a forward that
uses it. Same kernel, same accumulation order: the outputs are `F.linear`'s to the bit (tested),
so plain and speculative decoding stay exactly what they were, only faster.

The reordered copy costs the weights' memory once more. A forward that needs gradients (a
drafter trained through the target's LM head) takes `F.linear`, and a weight replaced or changed
in place since it was reordered is reordered again before use.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def supported() -> bool:
    """oneDNN's packed linear is in this torch build and gives F.linear's bf16 result to the bit."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=gen).bfloat16()
    x = torch.randn(3, 64, generator=gen).bfloat16()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError:
        return False
    return torch.equal(out, F.linear(x, weight))


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, self.bias)
    if self._prepacked_from != (weight.data_ptr(), weight._version):  # replaced or changed in place
        _reorder(self)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self._prepacked, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def _reorder(linear: nn.Linear) -> None:
    weight = linear.weight.detach()
    linear._prepacked = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    linear._prepacked_from = (weight.data_ptr(), weight._version)


def prepack(model: nn.Module) -> int:
    """Reorder the weights of `model`'s bf16 CPU `nn.Linear` layers once; returns how many.
    Does nothing where oneDNN's packed linear is missing or differs from `F.linear`."""
    linears = [m for m in model.modules() if type(m) is nn.Linear
               and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    if not linears or not supported():
        return 0
    for linear in linears:
        if "_prepacked" not in linear.__dict__:  # (a layer shared with a model prepacked before keeps its copy)
            _reorder(linear)
            linear.forward = _packed_forward.__get__(linear)
    return len(linears)


def is_prepacked(model: nn.Module) -> bool:
    return any("_prepacked" in m.__dict__ for m in model.modules())


def unpack(model: nn.Module) -> None:
    """Undo `prepack` (the layers take F.linear again; the reordered copies are freed)."""
    for m in model.modules():
        if "_prepacked" in m.__dict__:
            del m.forward, m._prepacked, m._prepacked_from
