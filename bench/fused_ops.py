"""The fused elementwise ops (drafter/fused.py) against torch's own chain of ops, side by side:
the target's forward over the shapes of a decoding step, a verification, batched decoding and a
prefill.

    python bench/fused_ops.py [--config configs/smollm2-135m-dspark.yaml] [--reps 5] [--threads 1]

The configured target in bf16 with its weights prepacked, R rows of w new tokens after 256 cached
tokens (the prefill: 256 tokens from nothing), LM head included; each forward timed with the fused
RMSNorm, gated MLP and rotary embedding installed and with them taken out (`fused.unfused`), in
three interleaved rounds of `dtype_choice.best_seconds` (best of --reps, wall clock).
Writes bench/results/fused_ops.{json,md}.
"""

from __future__ import annotations

from _common import command, machine, write_results
from dtype_choice import best_seconds, forward_args

SHAPES = [(1, 1, 256), (1, 4, 256), (1, 8, 256), (8, 1, 256), (16, 1, 256), (1, 256, 0)]  # rows, new, cached


def main() -> None:
    args = forward_args(__doc__)
    from contextlib import nullcontext

    from drafter import fused
    from drafter.config import load_config
    from drafter.target import load_target

    target = load_target(load_config(args.config, ["target.dtype=bfloat16"]))
    if not any(getattr(m, "_drafter_fused", False) for m in target.model.modules()):
        raise SystemExit("the fused ops are not installed here (they need the few-rows build on a CPU): nothing to compare")
    best = {}
    for rows, new, cached in SHAPES:
        for form in ["torch ops", "fused"] * 3:  # three interleaved rounds
            with fused.unfused(target.model) if form == "torch ops" else nullcontext():
                seconds = best_seconds(target.model, rows, cached, new, args.reps)
            best[form, rows, new] = min(best.get((form, rows, new), float("inf")), seconds)
    table = [{"rows": r, "new_tokens": w, "cached": c, "torch_ops_ms": round(1e3 * best["torch ops", r, w], 2),
              "fused_ms": round(1e3 * best["fused", r, w], 2),
              "speedup": round(best["torch ops", r, w] / best["fused", r, w], 3)} for r, w, c in SHAPES]
    doc = {"command": command(), "target": target.name, "rows": table, "machine": machine(torch_threads=args.threads)}
    md = [f"# Fused elementwise ops against torch's ops: {target.name}, bf16, prepacked", "",
          f"Command: `{doc['command']}`; best of {args.reps} in three interleaved rounds, wall clock, "
          f"{args.threads} thread(s).", "",
          "| rows x new tokens | cached | torch ops ms | fused ms | speedup |", "|---|---:|---:|---:|---:|",
          *[f"| {r['rows']} x {r['new_tokens']} | {r['cached']} | {r['torch_ops_ms']} | {r['fused_ms']} | {r['speedup']}x |"
            for r in table], ""]
    for line in md[4:]:
        print(line)
    write_results(args.out, "fused_ops", doc, "\n".join(md))


if __name__ == "__main__":
    main()
