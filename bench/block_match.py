"""Drafters trained with different blocks, side by side: held-out estimates and decoded tau.

    python bench/block_match.py --arm B=DIR [--arm B2=DIR ...] --decoded B@3=EVAL [--decoded B2@4=EVAL ...] \
        [--pair B2@3-B@3 ...] [--description TEXT] [--out bench/results] [--name block_match]

`--arm NAME=DIR`: a `drafter train` output folder (its metrics.json and config.yaml);
`--decoded NAME@BLOCK=EVAL`: a `drafter evaluate` output folder of that arm's drafter decoded
drafting BLOCK tokens a round (`NAME@BLOCK/TAG=EVAL` for another decode of the same, e.g. with
other engine code); `--pair X@3-Y@3`: the paired bootstrap of per-prompt tau, X minus
Y, over the prompts both decoded. The training and decoding commands are the caller's (they
take hours on a CPU and run in the background); this script only reads their outputs, so the
table in `<name>.md` can be rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from _common import RESULTS, command, machine, paired_tau_diff, rounds_per_prompt, write_results
from drafter.models.metrics import simulated_tau

DECODED_FIELDS = ("macro_tau", "tau_pooled", "speedup", "decode_speedup", "tokens_per_s", "plain_tokens_per_s",
                  "round_cost_in_plain_steps", "accept_rate_at_1", "accept_rate_at_2", "accept_rate_at_3",
                  "lossless_passed")


def named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def arm(name: str, train_dir: Path) -> dict:
    """Config and held-out estimates at every evaluation of one training run."""
    cfg = yaml.safe_load((train_dir / "config.yaml").read_text())
    metrics = json.loads((train_dir / "metrics.json").read_text())
    cpu = {h["step"]: h["cpu_s"] for h in metrics["history"]}
    train = cfg["train"]
    evals = [{"step": e["step"], "train_cpu_s": round(cpu.get(e["step"], 0.0), 2),
              "sim_tau_greedy": round(e["sim_tau_greedy"], 4), "sim_tau_t1": round(e["sim_tau"], 4),
              "sim_tau_t1_first3": round(simulated_tau(e["accept_rate"][:3]), 4),
              "accept_rate": [round(a, 4) for a in e["accept_rate"]]} for e in metrics["evals"] if e["step"] > 0]
    return {"arm": name, "block_size": cfg["drafter"]["block_size"], "max_anchors": train["max_anchors"],
            "lr": train["lr"], "init_from": train.get("init_from"), "seed": cfg["run"]["seed"],
            "held_out_simulated": evals}


def decoded(eval_dir: Path) -> dict:
    """One decoding run's figures (its flat metrics.json) and per-prompt [emitted, rounds]."""
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    out = {k: round(metrics[k], 4) for k in DECODED_FIELDS if metrics.get(k) is not None}
    out["tau_per_set"] = {d: round(t, 3) for d, t in report["tau"].items()}
    out["per_prompt"] = rounds_per_prompt(eval_dir)
    return out


def render(doc: dict) -> str:
    lines = [f"# {doc['title']}", "", doc["description"], "",
             "| arm | block | anchors | lr | step | train CPU-min | held-out sim tau greedy | T=1 | T=1, first 3 | "
             "accept rate (conditional) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in doc["arms"]:
        for e in a["held_out_simulated"]:
            lines.append(f"| {a['arm']} | {a['block_size']} | {a['max_anchors']} | {a['lr']:g} | {e['step']} | "
                         f"{e['train_cpu_s'] / 60:.1f} | {e['sim_tau_greedy']:.3f} | {e['sim_tau_t1']:.3f} | "
                         f"{e['sim_tau_t1_first3']:.3f} | {', '.join(f'{x:.3f}' for x in e['accept_rate'])} |")
    lines += ["", "| arm | decoded block | macro tau | pooled | speedup | decode phase | round (plain steps) | "
              "accept@1/2/3 | lossless |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for d in doc["decoded"]:
        accepts = " / ".join(f"{d[f'accept_rate_at_{k}']:.3f}" for k in (1, 2, 3) if f"accept_rate_at_{k}" in d)
        label = d["arm"] + (f" ({d['tag']})" if d.get("tag") else "")
        lines.append(f"| {label} | {d['block']} | {d['macro_tau']:.3f} | {d['tau_pooled']:.3f} | "
                     f"{d['speedup']:.3f}x | {d['decode_speedup']:.3f}x | {d['round_cost_in_plain_steps']:.3f} | "
                     f"{accepts} | {'yes' if d['lossless_passed'] == 1 else 'no'} |")
    for p in doc["paired"]:
        lines += ["", f"Paired per-prompt tau, {p['a']} minus {p['b']}: {p['mean_tau_diff']:+.3f} "
                      f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] (95% bootstrap, {p['prompts']} prompts; "
                      f"{p['better']} better, {p['worse']} worse)"]
    lines += ["", f"Command: `{doc['command']}`", f"Machine: {doc['machine']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", type=named, action="append", required=True, help="NAME=TRAIN_DIR")
    parser.add_argument("--decoded", type=named, action="append", default=[],
                        help="NAME@BLOCK[/TAG]=EVAL_DIR (TAG tells apart two decodes of one arm and block)")
    parser.add_argument("--pair", action="append", default=[], help="X@BLOCK-Y@BLOCK: tau of X minus Y, per prompt")
    parser.add_argument("--title", default="Training the block that decoding uses (DSpark)")
    parser.add_argument("--description", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="block_match")
    args = parser.parse_args()

    arms = [arm(name, path) for name, path in args.arm]
    runs = {}
    for key, path in args.decoded:
        name, sep, rest = key.partition("@")
        block, _, tag = rest.partition("/")
        if not sep or not block.isdigit():
            parser.error(f"--decoded expects NAME@BLOCK[/TAG]=EVAL_DIR, got {key!r}")
        runs[key] = {"arm": name, "block": int(block), **({"tag": tag} if tag else {}), **decoded(path)}
    paired = []
    for text in args.pair:
        a, sep, b = text.partition("-")
        if not sep or a not in runs or b not in runs:
            parser.error(f"--pair {text!r}: both sides must be --decoded runs ({', '.join(runs) or 'none given'})")
        paired.append({"a": a, "b": b, **paired_tau_diff(runs[a]["per_prompt"], runs[b]["per_prompt"])})
    doc = {"title": args.title, "description": args.description, "arms": arms, "decoded": list(runs.values()),
           "paired": paired, "command": command(), "machine": machine()}
    write_results(args.out, args.name, doc, render(doc))


if __name__ == "__main__":
    main()
