"""bf16 linear layers on a CPU with their weights reordered once, not on every call.

torch runs a bf16 `F.linear` on a CPU through oneDNN, which reorders the weight matrix into its
blocked layout on every call. For the few rows of a decoding step that reorder costs as much as
the product: SmolLM2's LM head ([1 x 576] @ [576 x 49,152], one thread, Intel AVX-512 BF16) took
9.3 ms as `F.linear` and 6.0 ms from a weight reordered once (`bench/prepack.py`). `prepack`
gives each bf16 `nn.Linear` of a frozen CPU model a copy of its weight in oneDNN's layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing does) and a forward that
uses it. Same kernel, same accumulation order: the outputs are `F.linear`'s to the bit (tested;
with AMX, products of some row counts past 32 were seen a bf16 step apart now and then: oneDNN
blocks them differently), and plain and speculative decoding share the layout, so they stay lossless.

The reordered copy costs the weights' memory once more. A forward that needs gradients (a
drafter trained through the target's LM head) takes `F.linear`, and a weight replaced or changed
in place since it was reordered is reordered again before use.

Wide products (a prefill: many rows through one weight) are another matter on a CPU whose bf16
matrix products are slower than float32's (AVX-512 BF16 without AMX: ~75 against ~120-150
GFLOP/s here). With `wide_rows` set, a product of at least that many rows per ~2M weight
elements upcasts the weight on the fly, multiplies in float32 and rounds the result to bf16
once: a 16 x 71-token prefill of SmolLM2 1.4x faster (`bench/prepack.py`). Those outputs are
not bf16 `F.linear`'s to the bit (another summation order, the same float32 accumulation);
plain and speculative decoding share the prefill, so decoding stays lossless relative to the
target as it runs. Decoding steps and a request's verification (a few rows) keep the bf16 path.

With `few_rows` set, products of at most that many rows (decoding steps, verification, small
batches) on one torch thread take `drafter.few_rows`' kernel instead (AVX-512; AMX tiles where
the CPU has them): a float32-accumulating kernel that streams the weights faster than oneDNN's,
1.06-1.7x on SmolLM2's shapes, from a third copy of the weights in its own layout. On two threads
oneDNN's kernel was faster (bench/RESULTS.md), so it keeps those. Its outputs are not F.linear's to
the bit either, and every decoding path shares it.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from drafter import few_rows as few_rows_kernel


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


WIDE_ROWS = 64  # rows from which float32 beats bf16 on a ~1M-element weight (no AMX; bench/prepack.py)


def wide_rows_for_this_cpu() -> int | None:
    """`WIDE_ROWS` where large bf16 products are not faster than float32 ones (runtime.py's probe), else None."""
    from drafter.runtime import cpu_bf16_pays

    return None if cpu_bf16_pays("batch") else WIDE_ROWS


def _is_wide(rows: int, wide_rows: int | None, weight: torch.Tensor) -> bool:
    # the upcast costs one pass over the weight, so a larger weight needs more rows to pay for it
    return wide_rows is not None and rows >= wide_rows * max(1, weight.numel() >> 21)


def few_rows_for_this_cpu() -> int | None:
    """`few_rows.max_rows()` where the few-rows kernel builds and takes some products on this CPU, else None."""
    return (few_rows_kernel.max_rows() or None) if few_rows_kernel.available() else None


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, self.bias)
    rows = x.numel() // x.shape[-1]
    if _is_wide(rows, self._wide_rows, weight):
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), weight.float(), bias).to(x.dtype)
    if self._prepacked_from != (weight.data_ptr(), weight._version):  # replaced or changed in place
        _reorder(self)
    if self._few_rows is not None and rows <= self._few_rows and torch.get_num_threads() == 1:
        return few_rows_kernel.linear(x, self._few_packed, self.out_features, self.bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self._prepacked, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def _reorder(linear: nn.Linear) -> None:
    weight = linear.weight.detach()
    linear._prepacked = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    if linear._few_rows is not None:
        linear._few_packed = few_rows_kernel.pack(weight)
    linear._prepacked_from = (weight.data_ptr(), weight._version)


def prepack(model: nn.Module, wide_rows: int | Literal["auto"] | None = None,
            few_rows: int | Literal["auto"] | None = None) -> int:
    """Reorder the weights of `model`'s bf16 CPU `nn.Linear` layers once; returns how many.
    `wide_rows`: products of that many rows (per ~2M weight elements) or more run in float32
    (see the module's doc; None: never; "auto": `wide_rows_for_this_cpu()`). `few_rows`: products
    of at most that many rows take the few-rows kernel (None: never; "auto":
    `few_rows_for_this_cpu()`). Does nothing where oneDNN's packed linear is missing or differs
    from `F.linear`."""
    linears = [m for m in model.modules() if type(m) is nn.Linear
               and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    if not linears or not supported():
        return 0
    if wide_rows == "auto":
        wide_rows = wide_rows_for_this_cpu()
    if few_rows == "auto":
        few_rows = few_rows_for_this_cpu()
    for linear in linears:
        if "_prepacked" not in linear.__dict__:  # (a layer shared with a model prepacked before keeps its copy)
            linear._wide_rows, linear._few_rows = wide_rows, few_rows
            _reorder(linear)
            linear.forward = _packed_forward.__get__(linear)
    return len(linears)


def prepack_like(model: nn.Module, reference: nn.Module) -> int:
    """Prepack `model` with the settings `reference` was prepacked with (a drafter loaded for a
    prepacked target); nothing when `reference` is not prepacked."""
    settings = next((m for m in reference.modules() if "_prepacked" in m.__dict__), None)
    if settings is None:
        return 0
    return prepack(model, wide_rows=settings._wide_rows, few_rows=settings._few_rows)


def is_prepacked(model: nn.Module) -> bool:
    return any("_prepacked" in m.__dict__ for m in model.modules())


def unpack(model: nn.Module) -> None:
    """Undo `prepack` (the layers take F.linear again; the reordered copies are freed)."""
    for m in model.modules():
        if "_prepacked" in m.__dict__:
            del m.forward, m._prepacked, m._prepacked_from, m._wide_rows, m._few_rows
            m.__dict__.pop("_few_packed", None)
