"""Up to how many rows the few-rows kernel beats oneDNN on this CPU: the target's forward with
the kernel and without it, at the row counts of verification and batched decoding.

    python bench/few_rows_limit.py [--config configs/smollm2-135m-dspark.yaml] [--reps 5] [--threads 1]

The configured target in bf16 with its weights prepacked (drafter/prepack.py), R rows of w new
tokens after 256 cached tokens, LM head included: the shapes of a verification (1 x 8), of
concurrent requests (4 x 4, 16 x 2) and of batched decoding (16 x 1). Each forward is timed with
every product of at most 32 rows through the kernel (`few_rows.MAX_ROWS`) and with none, in
interleaved rounds (the first dropped), best of --reps, CPU time of the process. The kernel
takes products of at most `few_rows.max_rows()` rows on this CPU; the table says where that
limit should sit. Writes bench/results/few_rows_limit.{json,md}.
"""

from __future__ import annotations

import time

from _common import command, machine, write_results
from dtype_choice import forward_args

SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (8, 1), (4, 4), (16, 1), (4, 8), (16, 2)]  # (rows, new tokens)


def main() -> None:
    args = forward_args(__doc__)

    import torch
    from transformers import DynamicCache

    from drafter import few_rows
    from drafter.config import load_config
    from drafter.runtime import cpu_vendor
    from drafter.target import load_target

    if not few_rows.available():
        raise SystemExit("the few-rows kernel does not suit this CPU or did not build: nothing to compare")
    target = load_target(load_config(args.config, ["target.dtype=bfloat16"]))
    linears = [m for m in target.model.modules() if "_few_packed" in m.__dict__]
    gen = torch.Generator().manual_seed(0)
    caches = {}
    for rows in sorted({r for r, _ in SHAPES}):
        caches[rows] = DynamicCache()
        target.capture(torch.randint(target.vocab_size, (rows, 256), generator=gen), past_key_values=caches[rows],
                       use_cache=True)

    def forward_s(rows: int, new: int) -> float:
        block = torch.randint(target.vocab_size, (rows, new), generator=gen)
        start = time.process_time()
        target.logits_from_hidden(target.capture(block, past_key_values=caches[rows], use_cache=True).final)
        seconds = time.process_time() - start
        caches[rows].crop(-new)
        return seconds

    best = {}
    with torch.inference_mode():
        for rep in range(args.reps + 1):
            for form, limit in (("kernel", few_rows.MAX_ROWS), ("oneDNN", None)):
                for m in linears:
                    m._few_rows = limit
                for shape in SHAPES:
                    seconds = forward_s(*shape)
                    if rep:  # the first round warms up
                        best[form, shape] = min(best.get((form, shape), float("inf")), seconds)
    rows = [{"rows": r, "new_tokens": w, "products_rows": r * w, "kernel_ms": round(1e3 * best["kernel", (r, w)], 1),
             "onednn_ms": round(1e3 * best["oneDNN", (r, w)], 1),
             "kernel_speedup": round(best["oneDNN", (r, w)] / best["kernel", (r, w)], 2)} for r, w in SHAPES]
    doc = {"command": command(), "target": target.name, "cpu_vendor": cpu_vendor(),
           "max_rows_here": few_rows.max_rows(), "rows": rows, "machine": machine(torch_threads=args.threads)}
    md = [f"# Few-rows kernel against oneDNN by rows: {target.name}, bf16, prepacked, 256 cached tokens", "",
          f"Command: `{doc['command']}`; best of {args.reps}, CPU time, {args.threads} thread(s); "
          f"{doc['cpu_vendor'] or 'unknown vendor'}: the kernel takes products of at most {doc['max_rows_here']} rows here.", "",
          "| rows x new tokens | rows per product | kernel ms | oneDNN ms | kernel speedup |", "|---|---:|---:|---:|---:|",
          *[f"| {r['rows']} x {r['new_tokens']} | {r['products_rows']} | {r['kernel_ms']} | {r['onednn_ms']} | "
            f"{r['kernel_speedup']}x |" for r in rows], ""]
    for line in md[4:]:
        print(line)
    write_results(args.out, "few_rows_limit", doc, "\n".join(md))


if __name__ == "__main__":
    main()
