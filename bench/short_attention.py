"""The short-query attention kernel (csrc/short_attention.cpp) against the matrix-product path it
stands in for (`attention._grouped_attention`), side by side, on one layer's shapes of SmolLM2
(9 query heads over 3 KV heads, head size 64) after 260 cached tokens.

    python bench/short_attention.py [--threads 1] [--reps 300]

Shapes: one row of 1, 4 or 8 query tokens (a decoding step, verifications) with the causal
default and with an explicit mask, and 8 or 16 rows of one token / 4 rows of 4 (batches) with a
padding mask; and 16 rows of 1-8 tokens packed in slots 8 wide, with and without each row's token
count. Best of five runs of --reps calls each, wall clock. Writes
bench/results/short_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import RESULTS, apply_threads, command, machine, write_results

SHAPES = [(1, 1, False), (1, 4, False), (1, 8, False), (1, 4, True), (1, 8, True), (8, 1, True), (16, 1, True),
          (4, 4, True)]  # rows, query tokens, explicit mask
CACHED = 260
PACKED_TOKENS = [8, 1, 5, 3, 8, 2, 4, 6, 1, 7, 3, 5, 2, 8, 4, 6]  # a packed verification's rows (73 tokens)


def best_us(fn, reps: int) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    apply_threads(args)
    import torch

    from drafter import few_rows
    from drafter.attention import _grouped_attention

    if not few_rows.attention_available():
        raise SystemExit("the short-query kernel does not run here (it needs the few-rows build and AVX-512 BF16)")
    g = torch.Generator().manual_seed(0)
    table = []
    for rows, tokens, masked in SHAPES:
        q = (torch.randn(rows, 9, tokens, 64, generator=g) * 0.125).bfloat16()
        k, v = (torch.randn(rows, 3, CACHED, 64, generator=g).bfloat16() for _ in range(2))
        mask = None
        if masked:
            mask = torch.ones(rows, tokens, CACHED, dtype=torch.bool).tril(CACHED - tokens)
            mask[:, :, :5] = False  # left padding
        kernel = best_us(lambda: torch.ops.drafter_attention.attend(q, k, v, mask), args.reps)
        matrix = best_us(lambda: _grouped_attention(q, k, v, None if mask is None else mask[:, None], 1.0), args.reps)
        table.append({"rows": rows, "query_tokens": tokens, "mask": masked, "cached": CACHED,
                      "matrix_us": round(matrix, 1), "kernel_us": round(kernel, 1), "speedup": round(matrix / kernel, 2)})
    # Packed verification: 16 rows of their own lengths (1-8 tokens) in slots 8 wide; the kernel
    # given each row's token count against computing every slot (what it did before it took them).
    tokens = torch.tensor(PACKED_TOKENS)
    q = (torch.randn(16, 9, 8, 64, generator=g) * 0.125).bfloat16()
    k, v = (torch.randn(16, 3, CACHED, 64, generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(16, 8, CACHED, dtype=torch.bool).tril(CACHED - 8)
    every = best_us(lambda: torch.ops.drafter_attention.attend(q, k, v, mask), args.reps)
    own = best_us(lambda: torch.ops.drafter_attention.attend(q, k, v, mask, tokens), args.reps)
    packed = {"rows": 16, "slots": 8, "tokens": int(tokens.sum()), "every_slot_us": round(every, 1),
              "own_tokens_us": round(own, 1), "speedup": round(every / own, 2)}
    doc = {"command": command(), "rows": table, "packed": packed, "machine": machine(torch_threads=args.threads)}
    md = ["# Short-query attention kernel against the matrix products (one SmolLM2 layer)", "",
          f"Command: `{doc['command']}`; best of 5 x {args.reps} calls, wall clock.", "",
          "| rows x query tokens | mask | matrix products us | kernel us | speedup |", "|---|---|---:|---:|---:|",
          *[f"| {r['rows']} x {r['query_tokens']} | {'padding' if r['mask'] else 'causal'} | {r['matrix_us']} | "
            f"{r['kernel_us']} | {r['speedup']}x |" for r in table], "",
          f"Packed verification, 16 rows of 1-8 tokens ({packed['tokens']} in all) in slots 8 wide: every slot "
          f"{packed['every_slot_us']} us, each row's own tokens {packed['own_tokens_us']} us ({packed['speedup']}x).", ""]
    for line in md[4:]:
        print(line)
    write_results(args.out, "short_attention", doc, "\n".join(md))


if __name__ == "__main__":
    main()
