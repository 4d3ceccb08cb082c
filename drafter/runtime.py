"""Where the numbers are computed: the dtype every stage runs the target (and training) in.

`runtime.dtype: auto` picks bfloat16 where bf16 is faster than float32 for the stage's
work, float32 elsewhere. Two kinds of work differ on CPUs:

- `decode` (evaluate, decode, the engine, calibrate, regenerate): a few rows a forward, so
  reading the weights dominates, and bf16 halves the bytes on any CPU with bf16 units;
- `batch` (build-cache, train): long sequences, so the matmuls' arithmetic dominates. AMX
  makes bf16 several times faster; AVX-512 BF16 alone may not (on an Intel CPU without AMX
  a large bf16 matmul ran at 0.6-0.7x the speed of fp32), so there a matmul of the stage's shape
  is timed in both dtypes once per process and the faster wins.

Measured on this project's 2-core CPUs (STACK.md, bench/RESULTS.md): with AMX an LM-head
product 3.7x faster in bf16 and a 256-token prefill 2.4x; on an Intel CPU with AVX-512 BF16
and no AMX, verifying 4 tokens 1.5x faster in bf16 but a 256-token prefill 1.5x and a DSpark
training step 1.5x slower. `target.dtype` overrides it for the target's forward in any one
stage.

Losslessness is relative to the target *as it runs*: plain and speculative decoding use
the same dtype, so greedy speculative output equals greedy plain output in either.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Literal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Work = Literal["batch", "decode"]


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first `field` line of Linux's /proc/cpuinfo ("" elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """`GenuineIntel`, `AuthenticAMD`, ... ("" where /proc/cpuinfo is missing)."""
    return _cpuinfo("vendor_id")


def cpu_bf16_pays(work: Work) -> bool:
    """Whether bf16 beats float32 on this CPU for this kind of work (see the module's doc)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True
    if "avx512_bf16" not in flags:
        return False
    return work == "decode" or bf16_matmul_faster()


@functools.cache
def bf16_matmul_faster(rows: int = 512, reps: int = 5) -> bool:
    """A [rows x 576] @ [576 x 1536] product (a SmolLM2 MLP over a long sequence) timed in
    both dtypes, interleaved, best of `reps`: bf16 wins only when at least 10% faster."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, 576, generator=gen), torch.randn(576, 1536, generator=gen)
    pairs = {dt: (a.to(dt), b.to(dt)) for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(reps + 1):  # (the first round warms both kernels up)
        for dt, (x, y) in pairs.items():
            start = time.perf_counter()
            torch.matmul(x, y)
            best[dt] = min(best[dt], time.perf_counter() - start)
    return best[torch.bfloat16] < 0.9 * best[torch.float32]


def resolve_dtype(name: str | None, device: torch.device | str = "cpu", work: Work = "decode") -> torch.dtype:
    """`auto`/None -> bfloat16 where it is faster on `device` for `work`, else float32; names map as is."""
    if name not in (None, "auto"):
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_pays(work) else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
