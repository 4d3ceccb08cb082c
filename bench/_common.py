"""What every benchmark script shares: the machine block of its JSON, the command that made
it, the clock and torch threads it measured with, and writing `<name>.json` + `<name>.md`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drafter.scheduler import CLOCKS  # noqa: E402  (the clocks evaluate.clock names)

RESULTS = ROOT / "bench" / "results"
PAIRED_RESAMPLES = 10_000  # bootstrap resamples of the paired per-prompt tau differences


def add_clock_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="process = CPU time of this process (a shared machine; use with --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def command() -> str:
    """How this run was started, as a person would type it again."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def machine(**extra: Any) -> dict[str, Any]:
    """The machine and its load at the time of the call (put it at the end of a run)."""
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
                            "python": platform.python_version(), "torch": version("torch"),
                            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info | extra


class Resync:
    """The target's greedy continuation from wherever the emitted text left a drafter's script
    (bf16 rounds a near-tie differently in a block and in a single token). The synthetic
    drafters are free by design, so the clock the engine reads leaves this time out."""

    def __init__(self, target, prompts: list[list[int]], max_new: int, clock) -> None:
        from drafter.decoding import SpecEngine

        self.plain, self.prompts, self.max_new, self.base = SpecEngine(target, None), prompts, max_new, clock
        self.seconds = 0.0

    def __call__(self, ids: list[int]) -> list[int]:
        start = self.base()
        prompt = next(p for p in self.prompts if ids[: len(p)] == p)
        left = self.max_new - (len(ids) - len(prompt)) + 1
        tokens = self.plain.generate(ids, max(left, 1)).tokens
        self.seconds += self.base() - start
        return tokens

    def clock(self) -> float:
        return self.base() - self.seconds


def rounds_per_prompt(eval_dir: Path) -> dict[str, list[int]]:
    """[emitted tokens, rounds] per prompt id of a `drafter evaluate` output (its samples.jsonl):
    what the paired bootstraps of per-prompt tau resample."""
    samples = (json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines() if line)
    return {s["id"]: [sum(r[3] for r in s["spec"]["rounds"]), len(s["spec"]["rounds"])] for s in samples}


def paired_tau_diff(a: dict[str, list[int]], b: dict[str, list[int]], seed: int = 0) -> dict:
    """Mean over shared prompts of tau_a - tau_b (per-prompt tau = emitted / rounds), with a
    percentile bootstrap 95% interval over prompts."""
    ids = sorted(i for i in a.keys() & b.keys() if a[i][1] > 0 and b[i][1] > 0)
    diff = np.array([a[i][0] / a[i][1] - b[i][0] / b[i][1] for i in ids])
    boot = diff[np.random.default_rng(seed).integers(0, len(ids), size=(PAIRED_RESAMPLES, len(ids)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"prompts": len(ids), "mean_tau_diff": float(diff.mean()), "ci95": [float(lo), float(hi)],
            "better": int((diff > 0).sum()), "worse": int((diff < 0).sum())}


def write_results(out_dir: Path, name: str, doc: dict[str, Any], markdown: str) -> None:
    """`<out_dir>/<name>.json` (machine-readable) and `<name>.md`; the markdown is printed too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    print(markdown)
