"""Where the numbers are computed: the dtype every stage runs the target (and training) in.

`runtime.dtype: auto` picks bfloat16 where the hardware has bf16 units (a CUDA GPU that
supports it, or a CPU with AMX or AVX-512 BF16, which oneDNN uses for bf16 matmuls) and
float32 elsewhere. Measured on this project's 2-core CPU (STACK.md): an LM-head product
3.7x faster, a 256-token prefill 2.4x, verifying 8 tokens 1.6x. `target.dtype` overrides
it for the target's forward in any one stage.

Losslessness is relative to the target *as it runs*: plain and speculative decoding use
the same dtype, so greedy speculative output equals greedy plain output in either.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU lists AMX-BF16 or AVX512-BF16 (Linux /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(flag in flags for flag in BF16_CPU_FLAGS)
    return False


def resolve_dtype(name: str | None, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto`/None -> bfloat16 where `device` has bf16 units, else float32; names map as is."""
    if name not in (None, "auto"):
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
