"""One target forward after a cached context, with transformers' DynamicCache (every step
concatenates each layer's keys and values, copying the whole cache) and with the engine's
PackedCache (drafter/attention.py, `RoomyLayer`: written in place into a buffer with room),
side by side: the same target, context and blocks, the two in turn.

    python bench/kv_cache.py [--shapes 1x1 1x8 4x4 16x1 16x4 16x8] [--context 372] [--threads 1]

Each shape (rows x block width) is timed `--reps` times per cache after a warm-up, the block
cropped after every forward as the engine does; the fastest of each is kept (process CPU time).
The logits of the last forward are compared (the same keys and values: equal to the bit).
Then the realignment after a round at 16 rows (each row shifted right past the 1-7 drafts it
rejected, from its first real slot), by slice copies through a temporary and by `shift_rows`,
in turn, fastest of `--reps`; both leave the same cache. Writes bench/results/kv_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import RESULTS, apply_threads, command, machine, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smollm2-135m-dspark.yaml"))
    parser.add_argument("--shapes", nargs="+", default=["1x1", "1x8", "4x4", "16x1", "16x4", "16x8"])
    parser.add_argument("--context", type=int, default=372, help="cached tokens (the scheduler bench's profile context)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    apply_threads(args)
    import torch
    from transformers import DynamicCache

    from drafter.attention import PackedCache
    from drafter.config import load_config
    from drafter.target import load_target

    target = load_target(load_config(args.config))
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for shape in args.shapes:
        rows, width = map(int, shape.split("x"))
        context = torch.randint(target.vocab_size, (rows, args.context), generator=gen)
        block = torch.randint(target.vocab_size, (rows, width), generator=gen)
        caches = {"concatenated (DynamicCache)": DynamicCache(), "in place (PackedCache)": PackedCache()}
        best, logits = {}, {}
        with torch.inference_mode():
            for cache in caches.values():
                target.capture(context, past_key_values=cache, use_cache=True)
            for rep in range(args.reps + 1):  # the caches in turn; the first round warms up
                for name, cache in caches.items():
                    start = time.process_time()
                    feats = target.capture(block, past_key_values=cache, use_cache=True)
                    logits[name] = target.logits_from_hidden(feats.final)
                    seconds = time.process_time() - start
                    cache.crop(-width)
                    if rep:
                        best[name] = min(best.get(name, seconds), seconds)
        a, b = logits.values()
        ms = {name: s * 1e3 for name, s in best.items()}
        rows_out.append({"rows": rows, "width": width, "forward_ms": ms, "speedup": ms["concatenated (DynamicCache)"] /
                         ms["in place (PackedCache)"], "same_logits": bool(torch.equal(a, b))})
        print(f"{shape:>5}: {ms['concatenated (DynamicCache)']:6.1f} -> {ms['in place (PackedCache)']:6.1f} ms "
              f"({rows_out[-1]['speedup']:.2f}x), same logits: {rows_out[-1]['same_logits']}", flush=True)
    shifts = row_shifts(target, args.context, args.reps, gen)
    print(f"row shifts at 16 rows: {shifts['slices_ms']:.1f} -> {shifts['shift_rows_ms']:.1f} ms, "
          f"same cache: {shifts['same_cache']}", flush=True)
    doc = {"command": command(), "target": target.info(), "context": args.context, "reps": args.reps,
           "clock": "process", "results": rows_out, "row_shifts": shifts, "machine": machine()}
    md = "\n".join([
        f"# Target forward, KV cache concatenated vs written in place (`{doc['command']}`)", "",
        f"{target.info().get('name', '')} after {args.context} cached tokens; fastest of {args.reps}, process CPU time, "
        f"{doc['machine'].get('torch_threads')} thread(s); load average {doc['machine']['load_average']}.", "",
        "| rows x width | concatenated (ms) | in place (ms) | speedup | same logits |", "|---|---:|---:|---:|---|",
        *[f"| {r['rows']} x {r['width']} | {r['forward_ms']['concatenated (DynamicCache)']:.1f} | "
          f"{r['forward_ms']['in place (PackedCache)']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same_logits'] else 'NO'} |"
          for r in rows_out], "",
        f"Realigning 16 rows after a round (each shifted past its 1-7 rejected drafts, every layer's keys and "
        f"values): slice copies {shifts['slices_ms']:.1f} ms, `shift_rows` {shifts['shift_rows_ms']:.1f} ms "
        f"({shifts['slices_ms'] / shifts['shift_rows_ms']:.2f}x); the same cache: {'yes' if shifts['same_cache'] else 'NO'}.",
        ""])
    write_results(args.out, "kv_cache", doc, md)


def row_shifts(target, context: int, reps: int, gen) -> dict:
    """The engine's realignment of a 16-row cache: slice copies through a temporary against
    `shift_rows`, in turn on copies of the same cache."""
    import torch

    from drafter.attention import PackedCache, shift_rows, shift_rows_by_slices

    cache = PackedCache()
    with torch.inference_mode():
        target.capture(torch.randint(target.vocab_size, (16, context), generator=gen), past_key_values=cache, use_cache=True)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    shifts = [(r, 1 + r % 7, (r * 23) % (context // 2)) for r in range(16)]  # (row, rejected, first real slot)

    ways = {"slices": lambda ts: shift_rows_by_slices(ts, shifts), "shift_rows": lambda ts: shift_rows(ts, shifts)}
    copies = {name: [t.clone() for t in tensors] for name in ways}
    best = {}
    for rep in range(reps + 1):
        for name, way in ways.items():
            start = time.process_time()
            way(copies[name])
            if rep:
                best[name] = min(best.get(name, 1e9), time.process_time() - start)
    same = all(torch.equal(a, b) for a, b in zip(*copies.values()))  # each applied as often as the other
    return {"rows": 16, "slices_ms": best["slices"] * 1e3, "shift_rows_ms": best["shift_rows"] * 1e3, "same_cache": same}


if __name__ == "__main__":
    main()
