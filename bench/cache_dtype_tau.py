"""Does an int8 target cache cost acceptance? DSpark trained on an int8 cache vs on bf16.

Runs after bench/tau_comparison.py, on the same data and config: builds the int8 cache from
the same regenerated conversations, trains DSpark with the same budget and seed, evaluates it
on the same seeded prompts, and compares with the bf16 DSpark of the tau benchmark.

    DRAFTER_MODELS=/work/main/.drafter/models python bench/cache_dtype_tau.py [-c bench/tau_smollm2.yaml] [-s ...]

Writes bench/results/cache_dtype_tau.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tau_comparison import RESULTS, ROOT, Runner, _macro

from drafter.config import load_config
from drafter.manifest import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "bench" / "tau_smollm2.yaml")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args()
    config = args.config.resolve()
    d = Path(load_config(config, args.overrides).run.data_dir)
    run = Runner(config, args.overrides, d)
    bf16 = d / "eval-dspark" / "report.json"
    if not bf16.is_file():
        raise SystemExit(f"{bf16} is missing: run bench/tau_comparison.py first")

    int8 = ["cache.dtype=int8", "drafter.algorithm=dspark"]
    run("build-cache-int8", "build-cache", "--in", str(d / "regenerated"), "--out", str(d / "cache-int8"), extra=int8)
    run("train-dspark-int8", "train", "--cache", str(d / "cache-int8"), "--out", str(d / "drafter-dspark-int8"), extra=int8)
    run("eval-dspark-int8", "evaluate", "-d", str(d / "drafter-dspark-int8" / "last"), "--ingested", str(d / "ingested"),
        "-o", str(d / "eval-dspark-int8"), extra=int8)

    figures = {}
    for name, folder in (("bfloat16", "dspark"), ("int8", "dspark-int8")):
        report = json.loads((d / f"eval-{folder}" / "report.json").read_text())
        train = json.loads((d / f"drafter-{folder}" / "manifest.json").read_text())
        cache = json.loads((d / ("cache" if name == "bfloat16" else "cache-int8") / "manifest.json").read_text())
        taus = {n: m["tau_pooled"] for n, m in report["datasets"].items()}
        figures[name] = {
            "tau": taus, "macro_tau": _macro(taus, list(taus)),
            "holdout_sim_tau_greedy": train["outputs"]["final_holdout"]["sim_tau_greedy"],
            "cache_bytes_per_token": cache["size"]["train"]["bytes_per_token"],
        }
    ratio = figures["int8"]["macro_tau"] / figures["bfloat16"]["macro_tau"]
    result = {"figures": figures, "macro_tau_int8_over_bf16": ratio, "commands": run.commands}
    atomic_write_json(RESULTS / "cache_dtype_tau.json", result)
    for name, f in figures.items():
        print(f"{name:9s} macro tau {f['macro_tau']:.3f}  held-out sim. tau {f['holdout_sim_tau_greedy']:.3f}  "
              f"bytes/token {f['cache_bytes_per_token']}")
    print(f"int8 / bf16 macro tau: {ratio:.3f}")


if __name__ == "__main__":
    main()
