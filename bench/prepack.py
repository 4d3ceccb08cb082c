"""bf16 linear weights reordered once for oneDNN (`drafter/prepack.py`) against `F.linear`
reordering them on every call, the same with wide products in float32, and with the few-rows
kernel for products of at most 32 rows (`drafter/few_rows.py`; the default where it suits the
CPU): the target's forward at each stage's shapes, side by side.

    python bench/prepack.py [--config configs/smollm2-135m-dspark.yaml] [--reps 5] [--threads 1]

One bf16 target, its layers switched between the four forms between measurements, interleaved
rounds (best of --reps each; two for prefills of more than 1,000 tokens). The shapes are
bench/dtype_choice.py's (decoding with 256 tokens of KV cache, 16 rows of one token, prefills),
a regeneration batch's prefill (16 x 71 tokens), and the LM head alone on 1 and 16 rows. Every
decoding shape's logits (one forward over its context and new tokens at once) are compared with
F.linear's: the prepacked form's must be equal to the bit; for the wide form, whose forward over
that many tokens multiplies in float32, and the few-rows form (another summation order), the
largest logit difference is reported. The few-rows form's speedup is against the wide form. Writes
bench/results/prepack.{json,md}.
"""

from __future__ import annotations

import time

from _common import command, machine, write_results
from dtype_choice import SHAPES, best_seconds, forward_args


def lm_head_seconds(model, rows: int, reps: int) -> float:
    import torch

    head = model.get_output_embeddings()
    x = torch.randn(rows, head.in_features, generator=torch.Generator().manual_seed(0)).to(head.weight.dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps + 1):
            start = time.perf_counter()
            head(x)
            best = min(best, time.perf_counter() - start)
    return best


def logit_gap(model, forms, form: str, rows: int, context: int, new: int) -> float:
    """The largest |logit difference| of one forward of this shape between `form` and F.linear."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (rows, context + new), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        forms["F.linear"](model)
        plain = model(ids).logits
        forms[form](model)
        return float((model(ids).logits.float() - plain.float()).abs().max())


def main() -> None:
    args = forward_args(__doc__)

    from drafter.config import load_config
    from drafter import few_rows
    from drafter.prepack import WIDE_ROWS, prepack, unpack
    from drafter.target import load_target

    target = load_target(load_config(args.config, ["target.dtype=bfloat16", "runtime.prepack=false"]))
    model = target.model
    forms = {"F.linear": unpack, "prepacked": lambda m: (unpack(m), prepack(m)),
             "wide in float32": lambda m: (unpack(m), prepack(m, wide_rows=WIDE_ROWS))}
    if few_rows.available():
        forms["few-rows kernel"] = lambda m: (unpack(m), prepack(m, wide_rows=WIDE_ROWS, few_rows=few_rows.MAX_ROWS))
    cases = ({f"LM head {r} row(s)": ("head", r, 0, 0) for r in (1, 16)} | SHAPES
             | {"prefill 16 x 71": ("batch", 16, 0, 71)})
    ms = {form: {} for form in forms}
    for name, (work, rows, ctx, new) in cases.items():
        reps = 2 if rows * new > 1000 else args.reps
        for form in [*forms, *forms]:
            forms[form](model)
            seconds = lm_head_seconds(model, rows, reps) if work == "head" else best_seconds(model, rows, ctx, new, reps)
            ms[form][name] = min(ms[form].get(name, float("inf")), 1e3 * seconds)
        print(f"{name}: " + " / ".join(f"{ms[f][name]:.1f}" for f in forms) + " ms", flush=True)
    gaps = {form: {name: logit_gap(model, forms, form, rows, ctx, new) for name, (work, rows, ctx, new) in SHAPES.items()
                   if work == "decode"} for form in forms if form != "F.linear"}
    few = "few-rows kernel" in forms
    rows = [{"shape": s, "work": cases[s][0], "f_linear_ms": round(ms["F.linear"][s], 1),
             "prepacked_ms": round(ms["prepacked"][s], 1), "wide_fp32_ms": round(ms["wide in float32"][s], 1),
             "speedup": round(ms["F.linear"][s] / ms["prepacked"][s], 2),
             "wide_speedup": round(ms["F.linear"][s] / ms["wide in float32"][s], 2),
             "logits_equal": None if s not in gaps["prepacked"] else gaps["prepacked"][s] == 0,
             "wide_max_logit_gap": gaps["wide in float32"].get(s)}
            | ({"few_rows_ms": round(ms["few-rows kernel"][s], 1),
                "few_rows_speedup": round(ms["wide in float32"][s] / ms["few-rows kernel"][s], 2),
                "few_rows_max_logit_gap": gaps["few-rows kernel"].get(s)} if few else {})
            for s in cases]
    doc = {"command": command(), "target": target.name, "dtype": "bfloat16", "wide_rows": WIDE_ROWS,
           "few_rows": few_rows.MAX_ROWS if few else None, "rows": rows,
           "machine": machine(torch_threads=args.threads)}
    md = [f"# bf16 linear weights reordered once vs on every call: {target.name} "
          f"({args.threads} thread(s), best of {args.reps}, two interleaved rounds)", "",
          f"Command: `{doc['command']}`", "",
          f"Wide in float32: products of at least {WIDE_ROWS} rows per ~2M weight elements multiply in float32.", "",
          *([f"Few-rows kernel: products of at most {few_rows.MAX_ROWS} rows (with the wide form's float32 for "
             "prefills); its speedup is against the wide form.", ""] if few else []),
          "| shape | work | F.linear ms | prepacked ms | speedup | logits equal to the bit | wide in float32 ms | "
          "speedup | max logit gap |" + (" few-rows kernel ms | speedup | max logit gap |" if few else ""),
          "|---|---|---:|---:|---:|---|---:|---:|---:|" + ("---:|---:|---:|" if few else ""),
          *[f"| {r['shape']} | {r['work']} | {r['f_linear_ms']} | {r['prepacked_ms']} | {r['speedup']}x | "
            f"{'' if r['logits_equal'] is None else ('yes' if r['logits_equal'] else 'NO')} | {r['wide_fp32_ms']} | "
            f"{r['wide_speedup']}x | {'' if r['wide_max_logit_gap'] is None else r['wide_max_logit_gap']} |"
            + (f" {r['few_rows_ms']} | {r['few_rows_speedup']}x | "
               f"{'' if r['few_rows_max_logit_gap'] is None else r['few_rows_max_logit_gap']} |" if few else "")
            for r in rows], ""]
    write_results(args.out, "prepack", doc, "\n".join(md))
    if any(gaps["prepacked"].values()):
        raise SystemExit(f"logits differ with prepacked weights: {[s for s, g in gaps['prepacked'].items() if g]}")


if __name__ == "__main__":
    main()
