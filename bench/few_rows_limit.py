"""Up to how many rows the few-rows kernel beats oneDNN on this CPU: the target's forward with
the kernel and without it, at the row counts of verification and batched decoding.

    python bench/few_rows_limit.py [--config configs/smollm2-135m-dspark.yaml] [--reps 5] [--threads 1]

The configured target in bf16 with its weights prepacked (drafter/prepack.py), R rows of w new
tokens after 256 cached tokens, LM head included: the shapes of a verification (1 x 8), of
concurrent requests (4 x 4, 16 x 2, 8 x 8) and of batched decoding (16 x 1 to 64 x 1). Each forward
is timed with every product of at most 32 rows (`few_rows.MAX_ROWS`; 64 where the CPU has AMX)
through the kernel in each of its two arithmetics (float32 FMAs over bf16 turned float; bf16
pairs, where the CPU has AVX-512 BF16: `vdpbf16ps`, or the AMX tile unit's `tdpbf16ps` where it
has AMX) and with none (oneDNN), in two interleaved rounds of `dtype_choice.best_seconds`
(best of --reps, wall clock). The kernel takes products of at most `few_rows.max_rows()` rows on
this CPU, with `few_rows.paired()`'s arithmetic; the table says where that limit should sit and
which arithmetic to take. Writes bench/results/few_rows_limit.{json,md}.
"""

from __future__ import annotations

from _common import command, machine, write_results
from dtype_choice import best_seconds, forward_args

SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (8, 1), (4, 4), (16, 1), (4, 8), (16, 2), (8, 4), (32, 1),
          (8, 8), (64, 1)]  # (rows, new tokens)


def main() -> None:
    args = forward_args(__doc__)

    from drafter import few_rows
    from drafter.config import load_config
    from drafter.runtime import cpu_flags, cpu_vendor
    from drafter.target import load_target

    if not few_rows.available():
        raise SystemExit("the few-rows kernel does not suit this CPU or did not build: nothing to compare")
    target = load_target(load_config(args.config, ["target.dtype=bfloat16"]))
    linears = [m for m in target.model.modules() if "_prepacked" in m.__dict__]  # each form sets its own kernel rows
    # each form: the most rows a product may take the kernel, and the kernel's layout
    limit = max(few_rows.MAX_ROWS, few_rows.max_rows())
    forms = {"float32 FMAs": (limit, False), "oneDNN": (None, None)}
    if "avx512_bf16" in cpu_flags():  # the pairs layout: through the AMX tile unit where the CPU has one
        forms["tdpbf16ps" if "amx_bf16" in cpu_flags() else "vdpbf16ps"] = (limit, True)
    layouts = {pairs: [few_rows.pack(m.weight, pairs) for m in linears] for _, pairs in forms.values() if pairs is not None}
    best = {}
    for shape in SHAPES:
        for form in [*forms, *forms]:  # two interleaved rounds
            limit, pairs = forms[form]
            for i, m in enumerate(linears):
                m._few_rows = limit
                if pairs is not None:
                    m._few_packed = layouts[pairs][i]
            seconds = best_seconds(target.model, shape[0], 256, shape[1], args.reps)
            best[form, shape] = min(best.get((form, shape), float("inf")), seconds)
    kernels = [f for f in forms if f != "oneDNN"]
    rows = [{"rows": r, "new_tokens": w, "products_rows": r * w, "onednn_ms": round(1e3 * best["oneDNN", (r, w)], 1),
             **{f"{k}_ms": round(1e3 * best[k, (r, w)], 1) for k in kernels},
             **{f"{k}_speedup": round(best["oneDNN", (r, w)] / best[k, (r, w)], 2) for k in kernels}}
            for r, w in SHAPES]
    doc = {"command": command(), "target": target.name, "cpu_vendor": cpu_vendor(),
           "max_rows_here": few_rows.max_rows(), "paired_here": few_rows.paired(), "rows": rows,
           "machine": machine(torch_threads=args.threads)}
    md = [f"# Few-rows kernel against oneDNN by rows: {target.name}, bf16, prepacked, 256 cached tokens", "",
          f"Command: `{doc['command']}`; best of {args.reps} in two interleaved rounds, wall clock, {args.threads} thread(s); "
          f"{doc['cpu_vendor'] or 'unknown vendor'}: the kernel takes products of at most {doc['max_rows_here']} rows here, "
          f"with {kernels[-1] if doc['paired_here'] else 'float32 FMAs'}.", "",
          "| rows x new tokens | rows per product | oneDNN ms | " + " | ".join(f"{k} ms | {k} speedup" for k in kernels) + " |",
          "|---|---:|---:|" + "---:|---:|" * len(kernels),
          *[f"| {r['rows']} x {r['new_tokens']} | {r['products_rows']} | {r['onednn_ms']} | "
            + " | ".join(f"{r[k + '_ms']} | {r[k + '_speedup']}x" for k in kernels) + " |" for r in rows], ""]
    for line in md[4:]:
        print(line)
    write_results(args.out, "few_rows_limit", doc, "\n".join(md))


if __name__ == "__main__":
    main()
