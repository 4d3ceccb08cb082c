"""What writing the dedup index's keys costs as the index grows (SQLite's `seen` table).

    python bench/dedup_insert_growth.py [--prompts 5800000] [--work /tmp/drafter-bench-growth]

New prompts (random keys: an exact key and 8 band keys each, all new) go through
`Deduper.check` in batches of 1,024, as an ingest commits them; every `_flush` (262,144 keys
written in key order) is timed in CPU seconds. A million gateway lines leave ~5.65M keys, so
the table's size stands for days of daily ingests. Writes results/dedup_insert_growth.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, command, machine, write_results

from drafter.traces import dedup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5_800_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/drafter-bench-growth"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    index = dedup.Deduper(args.work / "index.sqlite")
    flushes: list[dict] = []
    flush, written = index._flush, 0

    def timed_flush() -> None:
        nonlocal written
        pending = sum(len(k) for k, _ in index._runs)
        began = time.process_time()
        flush()
        cpu = time.process_time() - began
        if pending:
            flushes.append({"keys_before": written, "keys_written": pending, "cpu_s": round(cpu, 3),
                            "us_per_key": round(cpu / pending * 1e6, 3)})
            if len(flushes) % 20 == 0:
                print(f"{written / 1e6:6.1f}M keys: {flushes[-1]['us_per_key']:.2f} us a key", flush=True)
        written += pending

    index._flush = timed_flush
    rng = np.random.default_rng(0)
    for start in range(0, args.prompts, 1024):
        n = min(1024, args.prompts - start)
        keys = rng.integers(-(2**63), 2**63 - 1, size=(n, 1 + index.bands), dtype=np.int64)
        index.check([f"{start + i:016x}" for i in range(n)], keys)
        index.settle()
    index.close()
    size_mib = round((args.work / "index.sqlite").stat().st_size / 2**20)
    doc = {"machine": machine(), "command": command(), "prompts": args.prompts, "index_mib": size_mib, "flushes": flushes}
    step = max(1, len(flushes) // 10)
    shown = flushes[::step] + ([flushes[-1]] if (len(flushes) - 1) % step else [])
    md = [f"# Dedup index: the cost of writing keys as it grows\n\nCommand: `{command()}`\n",
          "| keys in the index before | keys written | CPU s | us a key |", "|---:|---:|---:|---:|"]
    md += [f"| {f['keys_before']:,} | {f['keys_written']:,} | {f['cpu_s']} | {f['us_per_key']} |" for f in shown]
    md.append(f"\n{args.prompts:,} prompts, {written:,} keys, index file {size_mib} MiB.\n")
    write_results(args.out, "dedup_insert_growth", doc, "\n".join(md))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
