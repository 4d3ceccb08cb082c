"""A bf16 linear kernel for the few rows of decoding steps, on AVX-512 CPUs.

A decoding step, a verification of a few drafted tokens and a drafter's proposal multiply a
handful of rows by every weight of the model: the work is reading the weights from memory.
oneDNN's bf16 kernel (AVX-512 BF16, no AMX) reads them at ~9 GB/s on one thread here, and each
extra row adds its `vdpbf16ps` compute on top of that read. `csrc/few_rows_linear.cpp` streams
each 64-column tile of a weight, laid out k after k, with software prefetch 8 KiB ahead, and has
two arithmetics, chosen once per CPU by the layout `pack` writes (`paired()`):
- float32 FMAs over bf16 turned float (one shift or mask per 16 values). On the Intel Xeon
  measured, whose FMAs issue at twice `vdpbf16ps`'s rate: 1.2-1.7x oneDNN's prepacked kernel
  from 1 to 32 rows; verifying 4 tokens costs what decoding 1 did (`bench/prepack.py`), and
  SmolLM2's plain and speculative decoding run 1.37x faster end to end (bench/RESULTS.md).
- `vdpbf16ps` on bf16 pairs (k and k+1 side by side), on AMD EPYC, where it multiplies twice the
  values an FMA does for the same issue slot: the FMAs there beat oneDNN only up to 8 rows, the
  pairs up to 16-32 (1.15-1.36x at 8 rows, 1.03-1.19x at 16; the same as the FMAs at 1-4 rows;
  `bench/few_rows_limit.py`). Its tiles are 48 columns wide, so that 8 rows' sums stay in the
  registers and a verification of 8 tokens reads each weight once (with 64 columns 6 rows did and
  2 read the tile again from L2: SmolLM2's forward of 8 tokens 1.10x faster, 1 token the same).
  On a CPU with AMX the same layout feeds the tile unit (`tdpbf16ps`), whose work does not grow
  with the rows: SmolLM2's forward of 8 tokens costs 1.12x one token's (1.48x with `vdpbf16ps`,
  1.06x with oneDNN's AMX kernel, which reads the weights 1.3x slower).
On two torch threads (this VM's two vCPUs) oneDNN's kernel scaled and this one did not, so
prepacked layers take it on one thread only (drafter/prepack.py).

Every output is one float32 sum over k in order (an FMA chain, or a chain of pairs, or of 16 pairs
at a time on the tiles), plus the bias, rounded to bf16 once: a row's result is the same whatever
the other rows, the tile or the thread (tested), so a token's logits in a verification are those of the same token decoded
alone. Not F.linear's to the bit (oneDNN sums in another order); plain and speculative decoding
share the kernel, so decoding stays lossless relative to the target as it runs.

The kernel is compiled on first use with torch's C++ extension builder (g++ and ninja; ~20 s,
cached under `TORCH_EXTENSIONS_DIR`, `make setup` builds it). Without a compiler, AVX-512 or a
successful build, `available()` is False and prepacked layers keep oneDNN.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# the same build holds drafter.attention's short-query kernel (torch.ops.drafter_attention) and
# drafter.fused's elementwise ops (torch.ops.drafter_fused)
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("few_rows_linear.cpp", "short_attention.cpp", "fused_ops.cpp")]
MAX_ROWS = 32  # Intel: measured faster than oneDNN up to here on every SmolLM2 shape (bench/RESULTS.md)
# AMD EPYC (AVX-512 BF16, no AMX), with the pairs in 48-column tiles: the target's forward 1.67x
# oneDNN's at 1 row, 1.17-1.19x at 16, 1.11-1.14x at 32 (bench/few_rows_limit.py; bench/RESULTS.md,
# "A few-rows bf16 kernel"). Its float32 FMAs lose to oneDNN from 16 rows on (0.89x).
MAX_ROWS_BY_VENDOR = {"AuthenticAMD": 16}  # without the pairs
PAIRED_VENDORS = {"AuthenticAMD"}


# Intel with AMX, the pairs layout through the tile unit (`tdpbf16ps`): the target's forward
# 1.35x oneDNN's (its own AMX kernel) at 1 row, 1.28x at 8, 1.14-1.24x at 32, 1.06-1.13x at 64 and
# 0.98x at 128 (bench/results/amx/few_rows_limit.md, bench/RESULTS.md).
MAX_ROWS_WITH_AMX = 64


def max_rows() -> int:
    """The most rows a product may have to take the kernel on this CPU (0: none do)."""
    from drafter.runtime import cpu_flags, cpu_vendor

    if "amx_bf16" in cpu_flags():  # the tiles take the pairs layout; without it oneDNN's AMX kernel stays
        return MAX_ROWS_WITH_AMX if paired() else 0
    return MAX_ROWS if paired() else MAX_ROWS_BY_VENDOR.get(cpu_vendor(), MAX_ROWS)


def cpu_supports() -> bool:
    """AVX-512: where the kernels build and run. Which products the linear kernel takes is
    `max_rows()`'s, per CPU, as measured against oneDNN."""
    from drafter.runtime import cpu_flags

    return "avx512f" in cpu_flags()


@functools.cache
def available() -> bool:
    """Whether the kernel is built (building it now if needed) and loaded on a CPU it suits."""
    if not cpu_supports():
        return False
    try:
        build()
    except Exception as exc:  # no compiler, no ninja, a failed build: oneDNN stays, with the reason
        log.warning("few-rows bf16 kernel not built (%s); bf16 linears keep oneDNN", str(exc).splitlines()[0][:200])
        return False
    return True


@functools.cache
def attention_available() -> bool:
    """Whether drafter.attention's short-query kernel runs here: it is built with this one, and
    multiplies bf16 pairs (`vdpbf16ps`: AVX-512 BF16)."""
    from drafter.runtime import cpu_flags

    return "avx512_bf16" in cpu_flags() and available()


def build(verbose: bool = False) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load("drafter_few_rows", [str(source) for source in SOURCES], extra_cflags=["-O3", "-mavx512f"],
                       is_python_module=False, verbose=verbose)


def paired() -> bool:
    """Whether the kernel multiplies bf16 pairs here: with `vdpbf16ps` on AMD EPYC with AVX-512 BF16,
    where it is up to 1.7x the float32 FMAs from 8 rows on, and with the AMX tiles' `tdpbf16ps` on
    CPUs with AMX, 1.06-2.4x the FMAs from 1 to 64 rows (bench/few_rows_limit.py); Intel without AMX
    keeps the FMAs, which were measured there (its `vdpbf16ps` issues at half their rate)."""
    from drafter.runtime import cpu_flags, cpu_vendor

    flags = cpu_flags()
    return "avx512_bf16" in flags and (cpu_vendor() in PAIRED_VENDORS or "amx_bf16" in flags)


def pack(weight: torch.Tensor, pairs: bool | None = None) -> torch.Tensor:
    """`weight` [N, K] bf16 in the kernel's tile layout (a copy, the weight's size); `pairs`: the
    `vdpbf16ps` layout (None: `paired()`). `linear` takes its arithmetic from the layout."""
    pairs = paired() if pairs is None else pairs
    return getattr(torch.ops.drafter_few_rows, "pack_pairs" if pairs else "pack")(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for bf16 `x` [..., K] from `pack(weight)`, float32 sums rounded once."""
    out = torch.ops.drafter_few_rows.linear(x.reshape(-1, x.shape[-1]), packed, out_features, bias)
    return out.view(*x.shape[:-1], out_features)


if __name__ == "__main__":  # `python -m drafter.few_rows`: build the kernel now (make setup does); never fails
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if available():
        print("few-rows kernel: built and loaded")
    else:
        print("few-rows kernel: not used here" + ("" if cpu_supports() else " (needs an AVX-512 CPU)"))
