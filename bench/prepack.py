"""bf16 linear weights reordered once for oneDNN (`drafter/prepack.py`) against `F.linear`
reordering them on every call: the target's forward at each stage's shapes, side by side.

    python bench/prepack.py [--config configs/smollm2-135m-dspark.yaml] [--reps 5] [--threads 1]

One bf16 target, its layers switched between the two forms between measurements, interleaved
rounds (best of --reps each; two for the 4 x 512 prefill). The shapes are bench/dtype_choice.py's
(decoding with 256 tokens of KV cache, 16 rows of one token, prefills), plus the LM head alone
on 1 and 16 rows. Every shape's logits are compared between the two forms: they must be equal
to the bit. Writes bench/results/prepack.{json,md}.
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


def same_logits(model, rows: int, context: int, new: int) -> bool:
    """The logits of one forward of this shape with the weights reordered equal F.linear's."""
    import torch

    from drafter.prepack import prepack, unpack

    ids = torch.randint(0, model.config.vocab_size, (rows, context + new), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        unpack(model)
        plain = model(ids).logits
        prepack(model)
        return torch.equal(plain, model(ids).logits)


def main() -> None:
    args = forward_args(__doc__)

    from drafter.config import load_config
    from drafter.prepack import prepack, unpack
    from drafter.target import load_target

    target = load_target(load_config(args.config, ["target.dtype=bfloat16", "runtime.prepack=false"]))
    model = target.model
    cases = {f"LM head {r} row(s)": ("head", r, 0, 0) for r in (1, 16)} | SHAPES
    ms = {form: {} for form in ("F.linear", "prepacked")}
    for name, (work, rows, ctx, new) in cases.items():
        reps = 2 if rows * new > 1000 else args.reps
        for form, switch in (("F.linear", unpack), ("prepacked", prepack), ("F.linear", unpack), ("prepacked", prepack)):
            switch(model)
            seconds = lm_head_seconds(model, rows, reps) if work == "head" else best_seconds(model, rows, ctx, new, reps)
            ms[form][name] = min(ms[form].get(name, float("inf")), 1e3 * seconds)
        print(f"{name}: {ms['F.linear'][name]:.1f} -> {ms['prepacked'][name]:.1f} ms", flush=True)
    equal = {name: same_logits(model, rows, ctx, new) for name, (work, rows, ctx, new) in SHAPES.items()
             if work == "decode"}
    rows = [{"shape": s, "work": cases[s][0], "f_linear_ms": round(ms["F.linear"][s], 1),
             "prepacked_ms": round(ms["prepacked"][s], 1),
             "speedup": round(ms["F.linear"][s] / ms["prepacked"][s], 2), "logits_equal": equal.get(s)}
            for s in cases]
    doc = {"command": command(), "target": target.name, "dtype": "bfloat16", "rows": rows,
           "machine": machine(torch_threads=args.threads)}
    md = [f"# bf16 linear weights reordered once vs on every call: {target.name} "
          f"({args.threads} thread(s), best of {args.reps}, two interleaved rounds)", "",
          f"Command: `{doc['command']}`", "",
          "| shape | work | F.linear ms | prepacked ms | speedup | logits equal to the bit |",
          "|---|---|---:|---:|---:|---|",
          *[f"| {r['shape']} | {r['work']} | {r['f_linear_ms']} | {r['prepacked_ms']} | {r['speedup']}x | "
            f"{'' if r['logits_equal'] is None else ('yes' if r['logits_equal'] else 'NO')} |" for r in rows], ""]
    write_results(args.out, "prepack", doc, "\n".join(md))
    if not all(equal.values()):
        raise SystemExit(f"logits differ with prepacked weights: {[s for s, ok in equal.items() if not ok]}")


if __name__ == "__main__":
    main()
