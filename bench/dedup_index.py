"""The dedup index alone: rows written every batch against rows written in sorted runs.

    python bench/dedup_index.py [--prompts 700000] [--batch 700] [--duplicates 0.35]

Random 64-bit keys (an exact key and 8 LSH band keys a prompt, the index's default shape)
go through `Deduper.check` in batches, as an ingest commits them; a share of the prompts
repeats an earlier prompt's keys, so lookups hit the index too. Run twice in one process:
with `FLUSH_KEYS = 1` (every batch's rows written at once, sorted by key: the layout before
the rows waited in memory) and with the default. Both runs must give the same verdicts.
Writes bench/results/dedup_index.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, command, machine, write_results


def run(prompts: int, batch: int, duplicates: float, flush_keys: int, work: Path) -> dict:
    import drafter.traces.dedup as dedup

    dedup.FLUSH_KEYS = flush_keys
    rng = np.random.default_rng(0)
    path = work / f"index-{flush_keys}.sqlite"
    index = dedup.Deduper(path)
    verdicts, seen, seconds = [], np.empty((0, 9), dtype=np.int64), 0.0
    for start in range(0, prompts, batch):
        keys = rng.integers(-(2**63), 2**63 - 1, size=(batch, 9), dtype=np.int64)
        if len(seen):
            again = rng.random(batch) < duplicates
            keys[again] = seen[rng.integers(0, len(seen), size=int(again.sum()))]
        seen = np.concatenate([seen, keys[: batch // 10]])  # a sample of earlier prompts to repeat
        ids = [f"{start + i:016x}" for i in range(batch)]
        began = time.perf_counter()
        verdicts += index.check(ids, keys)
        index.settle()
        seconds += time.perf_counter() - began
    began = time.perf_counter()
    kept = index.count()
    index.close()
    seconds += time.perf_counter() - began
    return {"flush_keys": flush_keys, "prompts": prompts, "kept": kept, "seconds": round(seconds, 2),
            "prompts_per_s": round(prompts / seconds), "index_mib": round(path.stat().st_size / 2**20, 1),
            "verdicts": verdicts}


def main() -> None:
    import drafter.traces.dedup as dedup

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=700_000)
    parser.add_argument("--batch", type=int, default=700)
    parser.add_argument("--duplicates", type=float, default=0.35)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(args.prompts, args.batch, args.duplicates, n, Path(tmp)) for n in (1, dedup.FLUSH_KEYS)]
    same = runs[0].pop("verdicts") == runs[1].pop("verdicts")
    doc = {"runs": runs, "same_verdicts": same, "command": command(), "machine": machine()}
    md = ["# Dedup index: rows written every batch vs in sorted runs", "", f"Command: `{command()}`", "",
          "| rows held in memory | prompts | kept | seconds | prompts/s | index file |", "|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['flush_keys']:,} keys | {r['prompts']:,} | {r['kept']:,} | {r['seconds']} | {r['prompts_per_s']:,} | "
           f"{r['index_mib']} MiB |" for r in runs]
    md += ["", f"Sorted runs vs every batch: {runs[0]['seconds'] / runs[1]['seconds']:.2f}x faster; "
           f"same verdicts: {same}.", ""]
    write_results(args.out, "dedup_index", doc, "\n".join(md))
    if not same:
        raise SystemExit("the two runs gave different verdicts")


if __name__ == "__main__":
    main()
