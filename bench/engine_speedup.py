"""Engine speedup: wall-clock tokens/s with a drafter vs plain autoregressive decoding of the
same target, in the same engine and run (interleaved per prompt, warm-up excluded), next to
tau (the ceiling with free drafting and free verification).

With `--drafter NAME=DIR` (repeatable) each trained drafter is evaluated by
`drafter.evaluate` on the configured eval sets. Without, synthetic drafters that follow the
target's own greedy answers with random corruptions (tests/drafters.py `ScriptedDrafter`)
span acceptance from perfect to poor; their drafting costs a table lookup (and where bf16
rounding takes the answer off their script, a resync whose time the clock leaves out), so
speedup / tau measures what verification and the engine cost on this machine. Every drafter also runs at
gamma=1 (one drafted token a round, an MTP-1-style baseline). Per row, `breakdown` says where
an average round's milliseconds go (draft, verify, accept, extend, kv, other) and what a round
costs in plain decoding steps.

    python bench/engine_speedup.py [--drafter dspark=data/drafter ...] [--samples 2] [--max-new-tokens 64]

Writes bench/results/engine_speedup.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._common import CLOCKS, RESULTS, Resync, add_clock_args, apply_threads, command, machine, write_results  # noqa: E402
from drafter.config import load_config  # noqa: E402
from drafter.decoding import PHASES, load_drafter  # noqa: E402
from drafter.evaluate import evaluate_drafter, load_prompts  # noqa: E402
from drafter.target import load_target  # noqa: E402

SYNTHETIC = {  # name: Beta(a, b) of the per-position corruption rate (mean a / (a + b))
    "oracle (no corruption)": (1e-4, 1e4),
    "synthetic, 10% corrupted": (1.0, 9.0),
    "synthetic, 25% corrupted": (1.0, 3.0),
    "synthetic, 50% corrupted": (1.0, 1.0),
}
GAMMA1 = ("oracle (no corruption)", "synthetic, 10% corrupted")  # the synthetic drafters also run at gamma=1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m-dspark.yaml"))
    ap.add_argument("--drafter", action="append", default=[], help="NAME=DIR of a trained drafter (repeatable)")
    ap.add_argument("--datasets", nargs="+", default=["gsm8k", "humaneval", "mt-bench"])
    ap.add_argument("--samples", type=int, default=2, help="prompts per dataset")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="section.key=value")
    add_clock_args(ap)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="engine_speedup", help="results file name (<out>/<name>.json and .md)")
    args = ap.parse_args()
    apply_threads(args)

    def config(gamma: int):
        return load_config(args.config, [
            f"evaluate.datasets=[{','.join(args.datasets)}]", f"evaluate.samples_per_dataset={args.samples}",
            f"evaluate.max_new_tokens={args.max_new_tokens}", f"evaluate.block_size={gamma}", "evaluate.bootstrap=200",
            f"evaluate.clock={args.clock}", *args.overrides,
        ])

    cfg = config(args.gamma)
    target = load_target(cfg)
    runs = []  # (row name, drafter, gamma)
    clock = None  # the configured one
    if args.drafter:
        for item in args.drafter:
            name, _, folder = item.partition("=")
            model = load_drafter(folder, target)[0]
            runs += [(name, model, args.gamma), (f"{name}, gamma=1", model, 1)]
    else:
        from tests.drafters import ScriptedDrafter

        prompts = [p.ids for p in load_prompts(cfg, target.tokenizer, None)[0]]
        resync = Resync(target, prompts, args.max_new_tokens, CLOCKS[args.clock])
        scripts = {tuple(p): resync.plain.generate(p, args.max_new_tokens).tokens for p in prompts}
        torch.manual_seed(0)
        models = {name: ScriptedDrafter(scripts, target.vocab_size, error=err, resync=resync)
                  for name, err in SYNTHETIC.items()}
        clock = resync.clock
        runs += [(name, model, args.gamma) for name, model in models.items()]
        runs += [(f"{name}, gamma=1", models[name], 1) for name in GAMMA1]

    rows = []
    with tempfile.TemporaryDirectory(prefix="engine-speedup-") as tmp:
        for name, drafter, gamma in runs:
            print(f"evaluating {name}", file=sys.stderr, flush=True)
            folder = Path(tmp) / name.replace(" ", "_").replace("/", "_").replace(",", "")
            r = evaluate_drafter(config(gamma), drafter, target, folder, clock=clock)
            o = r["overall"]
            rows.append({
                "drafter": name, "gamma": gamma, "tau": o["tau_pooled"], "tau_ci": o["tau_ci"],
                "acceptance_rate": o["acceptance_rate"], "tokens_per_s": o["tokens_per_s"],
                "plain_tokens_per_s": o["plain_tokens_per_s"], "speedup": o["speedup"],
                "decode_speedup": o["decode_speedup"], "lossless": r["lossless"]["passed"],
                "breakdown": {"round_ms": o["round_ms"], "plain_step_ms": o["plain_step_ms"],
                              "round_cost_in_plain_steps": o["round_cost_in_plain_steps"]},
                "per_dataset": {d: {"tau": m["tau_pooled"], "speedup": m["speedup"]} for d, m in r["datasets"].items()},
            })

    out = {
        "command": command(),
        "target": target.info(),
        "settings": {"datasets": args.datasets, "samples_per_dataset": args.samples, "gamma": args.gamma,
                     "max_new_tokens": args.max_new_tokens, "temperature": 0.0},
        "machine": machine(),
        "clock": args.clock,
        "results": rows,
    }
    write_results(args.out, args.name, out, render(out))


def render(out: dict) -> str:
    s = out["settings"]
    lines = [
        "# Engine speedup over plain decoding (same target, same engine, same run)",
        "",
        f"Target {out['target']['name']} ({out['target']['dtype']}) on {out['target']['device']} "
        f"({out['machine']['cpus']} CPUs, load average {out['machine']['load_average'][0]:.1f} at the end); "
        f"{', '.join(s['datasets'])}, {s['samples_per_dataset']} prompts each, greedy, {s['max_new_tokens']} new "
        f"tokens; {'CPU time of the process' if out['clock'] == 'process' else 'wall clock'}, "
        f"{out['machine'].get('torch_threads')} torch thread(s).",
        f"Command: `{out['command']}`",
        "",
        "| drafter | gamma | tau (pooled) | acceptance | tok/s | plain tok/s | speedup | decode-only speedup | "
        "speedup / tau | round cost (plain steps) | lossless |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        lines.append(
            f"| {r['drafter']} | {r['gamma']} | {r['tau']:.2f} | {r['acceptance_rate']:.2f} | {r['tokens_per_s']:.2f} | "
            f"{r['plain_tokens_per_s']:.2f} | {r['speedup']:.2f}x | {r['decode_speedup']:.2f}x | "
            f"{r['speedup'] / r['tau']:.2f} | {r['breakdown']['round_cost_in_plain_steps']:.2f} | "
            f"{'yes' if r['lossless'] else 'NO'} |"
        )
    lines += ["", "Where a round's time goes (ms per round; a plain decoding step for comparison):", "",
              "| drafter | gamma | " + " | ".join(PHASES) + " | round | plain step |",
              "|---" * (len(PHASES) + 4) + "|"]
    for r in out["results"]:
        b = r["breakdown"]
        lines.append(f"| {r['drafter']} | {r['gamma']} | " + " | ".join(f"{b['round_ms'][k]:.1f}" for k in PHASES)
                     + f" | {b['round_ms']['total']:.1f} | {b['plain_step_ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
