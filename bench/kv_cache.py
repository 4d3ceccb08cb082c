"""One target forward after a cached context, with transformers' DynamicCache (every step
concatenates each layer's keys and values, copying the whole cache) and with the engine's
PackedCache (drafter/attention.py, `RoomyLayer`: written in place into a buffer with room),
side by side: the same target, context and blocks, the two in turn.

    python bench/kv_cache.py [--shapes 1x1 1x8 4x4 16x1 16x4 16x8] [--context 372] [--threads 1]

Each shape (rows x block width) is timed `--reps` times per cache after a warm-up, the block
cropped after every forward as the engine does; the fastest of each is kept (process CPU time).
The logits of the last forward are compared (the same keys and values: equal to the bit).
Writes bench/results/kv_cache.{json,md}.
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
    doc = {"command": command(), "target": target.info(), "context": args.context, "reps": args.reps,
           "clock": "process", "results": rows_out, "machine": machine()}
    md = "\n".join([
        f"# Target forward, KV cache concatenated vs written in place (`{doc['command']}`)", "",
        f"{target.info().get('name', '')} after {args.context} cached tokens; fastest of {args.reps}, process CPU time, "
        f"{doc['machine'].get('torch_threads')} thread(s); load average {doc['machine']['load_average']}.", "",
        "| rows x width | concatenated (ms) | in place (ms) | speedup | same logits |", "|---|---:|---:|---:|---|",
        *[f"| {r['rows']} x {r['width']} | {r['forward_ms']['concatenated (DynamicCache)']:.1f} | "
          f"{r['forward_ms']['in place (PackedCache)']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same_logits'] else 'NO'} |"
          for r in rows_out], ""])
    write_results(args.out, "kv_cache", doc, md)


if __name__ == "__main__":
    main()
