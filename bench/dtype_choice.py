"""float32 against bfloat16 for the target's forward at the shapes each stage runs, side by side
in one process, and what `runtime.dtype: auto` picks on this machine for each kind of work.

    python bench/dtype_choice.py [--config configs/smollm2-135m-dspark.yaml] [--reps 5] [--threads 1]

Shapes (SmolLM2-135M by default, random token ids, 256 tokens of KV cache for the decoding
shapes): one new token (plain decoding), 4 and 8 new tokens (verifying a block), 16 rows of one
token (batched regeneration), a 256-token and 4 x 512-token prefill with every hidden state
(build-cache). Best of --reps (two for the 4 x 512 prefill), wall clock. The training step is
`bench/train_throughput.py` (its `after` and `after-fp32` rows). Writes
bench/results/dtype_choice.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import RESULTS, ROOT, apply_threads, command, machine, write_results

# name -> (kind of work, rows, tokens of context, new tokens); context 0 = a prefill
SHAPES = {
    "decode 1 token": ("decode", 1, 256, 1),
    "verify 4 tokens": ("decode", 1, 256, 4),
    "verify 8 tokens": ("decode", 1, 256, 8),
    "16 rows x 1 token": ("decode", 16, 128, 1),
    "prefill 256": ("batch", 1, 0, 256),
    "prefill 4 x 512": ("batch", 4, 0, 512),
}


def best_seconds(model, rows: int, context: int, new: int, reps: int) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (rows, context + new), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.inference_mode():
        cache = model(ids[:, :context], use_cache=True).past_key_values if context else None
        for _ in range(reps + 1):  # (the first call warms the kernels up)
            if cache is not None and cache.get_seq_length() > context:
                cache.crop(context - cache.get_seq_length())
            start = time.perf_counter()
            if context:
                model(ids[:, context:], past_key_values=cache, use_cache=True)
            else:
                model(ids, use_cache=False, output_hidden_states=True)
            best = min(best, time.perf_counter() - start)
    return best


def forward_args(doc: str) -> argparse.Namespace:
    """--config, --reps, --threads (applied), --out: the arguments of a script that times the target's forwards."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m-dspark.yaml")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    apply_threads(args)
    return args


def main() -> None:
    args = forward_args(__doc__)

    from drafter.config import load_config
    from drafter.runtime import dtype_name, resolve_dtype
    from drafter.target import load_target

    ms = {}
    for dtype in ("float32", "bfloat16"):
        target = load_target(load_config(args.config, [f"target.dtype={dtype}"]))
        ms[dtype] = {name: 1e3 * best_seconds(target.model, rows, ctx, new, 2 if rows * new > 1000 else args.reps)
                     for name, (_, rows, ctx, new) in SHAPES.items()}
        name = target.name
    rows = [{"shape": s, "work": SHAPES[s][0], "float32_ms": round(ms["float32"][s], 1),
             "bfloat16_ms": round(ms["bfloat16"][s], 1), "bf16_over_fp32": round(ms["bfloat16"][s] / ms["float32"][s], 2)}
            for s in SHAPES]
    auto = {work: dtype_name(resolve_dtype("auto", "cpu", work)) for work in ("decode", "batch")}
    doc = {"command": command(), "target": name, "rows": rows, "auto_picks": auto,
           "machine": machine(torch_threads=args.threads)}
    md = [f"# float32 vs bfloat16 forward of {name} ({args.threads} thread(s), best of {args.reps})", "",
          f"Command: `{doc['command']}`", "",
          "| shape | work | float32 ms | bfloat16 ms | bf16 / fp32 |", "|---|---|---:|---:|---:|",
          *[f"| {r['shape']} | {r['work']} | {r['float32_ms']} | {r['bfloat16_ms']} | {r['bf16_over_fp32']} |" for r in rows],
          "", f"`runtime.dtype: auto` picks here: decode {auto['decode']}, batch {auto['batch']}.", ""]
    write_results(args.out, "dtype_choice", doc, "\n".join(md))


if __name__ == "__main__":
    main()
