"""Registry latency: register a drafter of realistic size, approve it, export it for vLLM.

    python bench/registry.py [--mb 130] [--repeats 3]

Runs on a fresh local MLflow SQLite store (the embedded default) in a temporary folder.
A DSpark drafter for SmolLM2-135M (2 layers, Markov rank 256 over 49k tokens) is about
130 MB in float32. Writes bench/results/registry.json and bench/results/registry.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DRAFTER_HOME", tempfile.mkdtemp(prefix="drafter-bench-"))
sys.path.insert(0, str(ROOT))


def make_drafter(folder: Path, mb: int, seed: int = 0) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    n = mb * (1 << 20) // 4
    save_file({"weight": np.random.default_rng(seed).standard_normal(n, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "speculators_model_type": "dspark",
        "speculators_config": {"algorithm": "dspark", "proposal_methods": [{"speculative_tokens": 7}]}}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=130)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mlflow

    from drafter import registry
    from drafter.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="drafter-bench-registry-"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["registry.model_name=bench", f"run.data_dir={tmp / 'data'}"])
    timings: dict[str, list[float]] = {"register": [], "approve": [], "export": []}
    registry.register_candidate(cfg, make_drafter(tmp / "warm", 1))  # imports, store creation
    for i in range(args.repeats):
        folder = make_drafter(tmp / f"d{i}", args.mb, seed=i + 1)  # new weights: a new version
        start = time.perf_counter()
        candidate = registry.register_candidate(cfg, folder)
        assert not candidate.reused
        version = candidate.version
        timings["register"].append(time.perf_counter() - start)
        start = time.perf_counter()
        registry.approve("bench", version, by="bench", reason="benchmark")
        timings["approve"].append(time.perf_counter() - start)
        start = time.perf_counter()
        registry.export_alias("bench", "production", tmp / f"out{i}")
        timings["export"].append(time.perf_counter() - start)
        (folder / "model.safetensors").unlink()

    command = f"python bench/registry.py --mb {args.mb} --repeats {args.repeats}"
    result = {"command": command, "drafter_mb": args.mb, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "median_s": {k: round(statistics.median(v), 3) for k, v in timings.items()},
              "all_s": {k: [round(x, 3) for x in v] for k, v in timings.items()}}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "registry.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Registry latency ({args.mb} MB drafter, local SQLite store, median of {args.repeats})", "",
          f"Command: `{command}`", "", "| operation | median s |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in result["median_s"].items()]
    (out / "registry.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
