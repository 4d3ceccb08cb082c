"""Cache layout against decoded tau at the same training budget.

    python bench/cache_layout.py --data DIR --ingested DIR [--arms dense-bf16-5,bf16-5,int8-5,int8-3]
                                 [--steps 300] [--config bench/learning_curve.yaml] [--work /tmp/drafter-bench-layout]

`--data`: a regenerated folder (train.jsonl, holdout.jsonl, as `drafter regenerate` writes it);
`--ingested`: the ingested folder whose evaluation sets and holdout prompts are decoded.
Each arm stores the target's side of the data differently:

- `dense-bf16-5`: DeepSpec's plain layout, 5 bf16 feature layers and the final hidden state
  (p_t through the target's LM head, the whole vocabulary);
- `bf16-5`: 5 bf16 feature layers, p_t as the target's top-k (the default);
- `int8-5`, `int8-3`: the same top-k with int8 features, 5 or 3 feature layers.

For each arm, one after the other and each stage skipped once its manifest exists (so a
killed run resumes): `drafter build-cache`, `drafter train` (DSpark from a random init,
`--steps` steps, seed 42), `drafter evaluate` (greedy, block 3, plain decoding interleaved).
Reports bytes per token against the plain layout, held-out simulated tau, decoded macro tau
and speedup, and per arm the paired bootstrap interval of per-prompt tau minus the dense
arm's on the same prompts. Writes bench/results/cache_layout.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import PAIRED_RESAMPLES, RESULTS, ROOT, command, machine, paired_tau_diff, rounds_per_prompt, write_results

ARMS = {  # name -> overrides of the config's cache and target sections
    "dense-bf16-5": ["cache.dtype=bfloat16", "target.num_feature_layers=5", "cache.target_top_k=0",
                     "cache.final_hidden=true"],
    "bf16-5": ["cache.dtype=bfloat16", "target.num_feature_layers=5"],
    "int8-5": ["cache.dtype=int8", "target.num_feature_layers=5"],
    "int8-3": ["cache.dtype=int8", "target.num_feature_layers=3"],
}
BASELINE = "dense-bf16-5"


def drafter_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "drafter", *args], cwd=ROOT, check=True,
                   env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def run_arm(name: str, args: argparse.Namespace) -> dict:
    work = args.work / name
    sets = [x for o in ARMS[name] for x in ("-s", o)]
    config = ["-c", str(args.config)]
    if not (work / "cache" / "manifest.json").is_file():
        drafter_cli("build-cache", *config, "--in", str(args.data), "--out", str(work / "cache"), *sets)
    if not (work / "drafter" / "manifest.json").is_file():
        drafter_cli("train", *config, "--cache", str(work / "cache"), "--out", str(work / "drafter"), *sets,
                    "-s", "drafter.algorithm=dspark", "-s", "run.seed=42", "-s", f"train.max_steps={args.steps}",
                    "-s", "train.eval_every=100", "-s", "train.checkpoint_every=100")
    if not (work / "eval" / "manifest.json").is_file():
        drafter_cli("evaluate", "-d", str(work / "drafter"), "-o", str(work / "eval"), "--ingested", str(args.ingested),
                    *config, *sets, "-s", "drafter.algorithm=dspark", "-s", "evaluate.temperature=0",
                    "-s", "evaluate.block_size=3", "--json")
    size = json.loads((work / "cache" / "manifest.json").read_text())["size"]["train"]
    trained = json.loads((work / "drafter" / "manifest.json").read_text())["metrics"]
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    return {
        "arm": name, "overrides": ARMS[name],
        "bytes_per_token": size["bytes_per_token"], "plain_bytes_per_token": size["plain_bytes_per_token"],
        "holdout_sim_tau_greedy": trained.get("final_holdout_sim_tau_greedy"),
        "holdout_sim_tau_t1": trained.get("final_holdout_sim_tau"),
        "train_cpu_s": trained.get("train_cpu_s"),
        "macro_tau": metrics["macro_tau"], "speedup": metrics["speedup"],
        "decode_speedup": metrics.get("decode_speedup"), "lossless": bool(metrics["lossless_passed"]),
        "per_prompt": rounds_per_prompt(work / "eval"),  # [emitted, rounds]: what the paired bootstrap resamples
    }


def markdown(result: dict) -> str:
    lines = ["# Cache layout against decoded tau at the same budget", "",
             f"DSpark, {result['steps']} steps from a random init on the same conversations, decoded greedy at "
             "block 3 with plain decoding interleaved. Paired: per-prompt tau minus the dense arm's, "
             f"95% bootstrap over prompts ({PAIRED_RESAMPLES:,} resamples). Sizes against DeepSpec's plain layout "
             f"(the dense arm: bf16 feature layers + the final hidden state), {result['plain_bytes_per_token']:,} bytes "
             "a token.", "",
             "| arm | bytes/token | vs plain bf16 | train CPU s/step | held-out sim tau (greedy) | macro tau | speedup | "
             "paired tau diff vs dense [95%] | lossless |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["arms"]:
        p = r.get("paired_vs_dense")
        cell = f"{p['mean_tau_diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p else "-"
        sim = "-" if r["holdout_sim_tau_greedy"] is None else f"{r['holdout_sim_tau_greedy']:.3f}"
        step = "-" if r["train_cpu_s"] is None else f"{r['train_cpu_s'] / result['steps']:.2f}"
        lines.append(f"| {r['arm']} | {r['bytes_per_token']:,.0f} | {r['size_vs_plain']:.3f} | {step} | {sim} | "
                     f"{r['macro_tau']:.3f} | {r['speedup']:.3f}x | {cell} | {r['lossless']} |")
    lines += ["", f"Command: `{result['command']}`", f"Machine: {result['machine']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="regenerated folder (train.jsonl, holdout.jsonl)")
    parser.add_argument("--ingested", type=Path, required=True, help="ingested folder whose sets are decoded")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "learning_curve.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/drafter-bench-layout"))
    args = parser.parse_args()
    names = args.arms.split(",")
    unknown = [n for n in names if n not in ARMS]
    if unknown or BASELINE not in names:
        parser.error(f"arms must be among {list(ARMS)} and include {BASELINE}; unknown: {unknown}")
    arms = [run_arm(name, args) for name in names]
    base = next(a for a in arms if a["arm"] == BASELINE)
    for arm in arms:  # against DeepSpec's plain layout of the dense arm (5 layers + final hidden, bf16)
        arm["size_vs_plain"] = arm["bytes_per_token"] / base["plain_bytes_per_token"]
        if arm is not base:
            arm["paired_vs_dense"] = paired_tau_diff(arm["per_prompt"], base["per_prompt"])
    result = {"target": "SmolLM2-135M-Instruct", "steps": args.steps, "data": str(args.data),
              "plain_bytes_per_token": base["plain_bytes_per_token"],
              "arms": arms, "command": command(), "machine": machine()}
    write_results(RESULTS, "cache_layout", result, markdown(result))


if __name__ == "__main__":
    main()
