"""Engine speedup: wall-clock tokens/s with a drafter vs plain autoregressive decoding of the
same target, in the same engine and run (interleaved per prompt, warm-up excluded), next to
tau (the ceiling with free drafting and free verification).

With `--drafter NAME=DIR` (repeatable) each trained drafter is evaluated by
`drafter.evaluate` on the configured eval sets. Without, synthetic drafters that follow the
target's own greedy answers with random corruptions (tests/drafters.py `ScriptedDrafter`)
span acceptance from perfect to poor; their drafting is free, so speedup / tau measures
what verification and the engine cost on this machine.

    python bench/engine_speedup.py [--drafter dspark=data/drafter ...] [--samples 2] [--max-new-tokens 64]

Writes bench/results/engine_speedup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from drafter.config import load_config  # noqa: E402
from drafter.decoding import SpecEngine, load_drafter  # noqa: E402
from drafter.evaluate import evaluate_drafter, load_prompts  # noqa: E402
from drafter.target import load_target  # noqa: E402

SYNTHETIC = {  # name: Beta(a, b) of the per-position corruption rate (mean a / (a + b))
    "oracle (no corruption)": (1e-4, 1e4),
    "synthetic, 10% corrupted": (1.0, 9.0),
    "synthetic, 25% corrupted": (1.0, 3.0),
    "synthetic, 50% corrupted": (1.0, 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m-dspark.yaml"))
    ap.add_argument("--drafter", action="append", default=[], help="NAME=DIR of a trained drafter (repeatable)")
    ap.add_argument("--datasets", nargs="+", default=["gsm8k", "humaneval", "mt-bench"])
    ap.add_argument("--samples", type=int, default=2, help="prompts per dataset")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process = CPU time of this process (shared machines; use --threads 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, [
        f"evaluate.datasets=[{','.join(args.datasets)}]", f"evaluate.samples_per_dataset={args.samples}",
        f"evaluate.max_new_tokens={args.max_new_tokens}", f"evaluate.block_size={args.gamma}", "evaluate.bootstrap=200",
        f"evaluate.clock={args.clock}",
    ])
    target = load_target(cfg)
    if args.drafter:
        drafters = {}
        for item in args.drafter:
            name, _, folder = item.partition("=")
            drafters[name] = load_drafter(folder, target)[0]
    else:
        from tests.drafters import ScriptedDrafter

        prompts = load_prompts(cfg, target.tokenizer, None)[0]
        answers = SpecEngine(target, None).generate_batch([p.ids for p in prompts], args.max_new_tokens)
        scripts = {tuple(p.ids): g.tokens for p, g in zip(prompts, answers)}
        torch.manual_seed(0)
        drafters = {name: ScriptedDrafter(scripts, target.vocab_size, error=err) for name, err in SYNTHETIC.items()}

    rows = []
    with tempfile.TemporaryDirectory(prefix="engine-speedup-") as tmp:
        for name, drafter in drafters.items():
            print(f"evaluating {name}", file=sys.stderr, flush=True)
            r = evaluate_drafter(cfg, drafter, target, Path(tmp) / name.replace(" ", "_").replace("/", "_"))
            o = r["overall"]
            rows.append({
                "drafter": name, "tau": o["tau_pooled"], "tau_ci": o["tau_ci"], "acceptance_rate": o["acceptance_rate"],
                "tokens_per_s": o["tokens_per_s"], "plain_tokens_per_s": o["plain_tokens_per_s"],
                "speedup": o["speedup"], "decode_speedup": o["decode_speedup"], "lossless": r["lossless"]["passed"],
                "per_dataset": {d: {"tau": m["tau_pooled"], "speedup": m["speedup"]} for d, m in r["datasets"].items()},
            })

    out = {
        "command": ("python bench/engine_speedup.py " + " ".join(sys.argv[1:])).strip(),
        "target": target.info(),
        "settings": {"datasets": args.datasets, "samples_per_dataset": args.samples, "gamma": args.gamma,
                     "max_new_tokens": args.max_new_tokens, "temperature": 0.0},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
        "clock": args.clock,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_speedup.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "engine_speedup.md").write_text(render(out))
    print(render(out))


def render(out: dict) -> str:
    s = out["settings"]
    lines = [
        "# Engine speedup over plain decoding (same target, same engine, same run)",
        "",
        f"Target {out['target']['name']} on {out['target']['device']} ({out['machine']['cpus']} CPUs, load average "
        f"{out['machine']['load_average'][0]:.1f} at the end); {', '.join(s['datasets'])}, {s['samples_per_dataset']} "
        f"prompts each, block {s['gamma']}, greedy, {s['max_new_tokens']} new tokens; "
        f"{'CPU time of the process' if out['clock'] == 'process' else 'wall clock'}, "
        f"{out['machine']['torch_threads']} torch thread(s).",
        f"Command: `{out['command']}`",
        "",
        "| drafter | tau (pooled) | acceptance | tok/s | plain tok/s | speedup | decode-only speedup | speedup / tau | lossless |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        lines.append(
            f"| {r['drafter']} | {r['tau']:.2f} | {r['acceptance_rate']:.2f} | {r['tokens_per_s']:.2f} | "
            f"{r['plain_tokens_per_s']:.2f} | {r['speedup']:.2f}x | {r['decode_speedup']:.2f}x | "
            f"{r['speedup'] / r['tau']:.2f} | {'yes' if r['lossless'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
