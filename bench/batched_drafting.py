"""A round's drafting work for R requests decoded together: one `propose` and one `extend` per
request, against `propose_batch` and `extend_batch` (DSpark: every row's block in one pass),
side by side on the same drafter, states and anchors.

    python bench/batched_drafting.py [--rows 1 2 4 8 16] [--accepted 3] [--reps 7] [--threads 1]
                                     [-s drafter.algorithm=eagle3 --name batched_drafting_eagle3]

The drafter is the default config's DSpark (`configs/smollm2-135m-dspark.yaml`, its draft
vocabulary, bf16 weights packed as `drafter generate` loads them; `-s` for another) with fresh
weights: what a round costs does not depend on what was learnt. Each row's context is one of the scheduler
bench's prompts (the same seeded draw) plus half its answer, its features random. A round
drafts the block (greedy) and extends each row by `--accepted` + 1 positions, as after a round
that accepted that many drafts. Each way is timed `--reps` times in turn (process CPU time,
fastest kept); the rows' greedy drafts are compared (the same tokens, or rounding apart).
Writes bench/results/<name>.{json,md} (default batched_drafting).
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

from _common import RESULTS, apply_threads, command, machine, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smollm2-135m-dspark.yaml"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--accepted", type=int, default=3, help="drafts a row accepts a round (it extends by one more)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[],
                        help="section.key=value, e.g. drafter.algorithm=eagle3")
    parser.add_argument("--name", default="batched_drafting", help="results file name")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    apply_threads(args)
    import torch

    from drafter.config import load_config
    from drafter.decoding import block_size_of, load_drafter
    from drafter.evaluate import load_prompts
    from drafter.models import TargetHeads, build
    from drafter.target import load_target

    cfg = load_config(args.config, ["evaluate.datasets=[gsm8k,humaneval,mt-bench,mbpp]",
                                    f"evaluate.samples_per_dataset={max(args.rows)}", *args.overrides])
    target = load_target(cfg)
    prompts = [p.ids for p in load_prompts(cfg, target.tokenizer, None)[0]]
    random.Random(0).shuffle(prompts)  # the scheduler bench's draw
    lengths = [len(p) + args.max_new_tokens // 2 for p in prompts[: max(args.rows)]]
    torch.manual_seed(0)
    fresh = build(cfg, TargetHeads.from_target(target), list(target.layer_ids),
                  token_counts=torch.randint(1, 1000, (target.vocab_size,)))
    with tempfile.TemporaryDirectory() as folder:
        fresh.export(Path(folder))
        drafter, _ = load_drafter(folder, target)
    gamma = block_size_of(drafter, cfg.drafter.block_size)
    layers, hidden = len(target.layer_ids), target.model.config.hidden_size

    gen = torch.Generator().manual_seed(0)
    states = []
    for n in lengths:
        states.append(drafter.init_state())
        drafter.extend(states[-1], torch.randn(1, n, layers, hidden, generator=gen).to(target.dtype),
                       torch.randint(target.vocab_size, (1, n), generator=gen))
    anchors = torch.randint(target.vocab_size, (len(states),), generator=gen)
    step = args.accepted + 1
    new_features = [torch.randn(1, step, layers, hidden, generator=gen).to(target.dtype) for _ in states]
    new_ids = [torch.randint(target.vocab_size, (1, step), generator=gen) for _ in states]

    def one_by_one(rows: int, extended: list):
        props = [drafter.propose(s, anchors[i : i + 1], gamma, 0.0) for i, s in enumerate(states[:rows])]
        drafted = time.process_time()
        for s, f, ids in zip(extended, new_features, new_ids):
            drafter.extend(s, f, ids)
        return props, drafted

    def together(rows: int, extended: list):
        props = drafter.propose_batch(states[:rows], anchors[:rows], [gamma] * rows, 0.0)
        drafted = time.process_time()
        drafter.extend_batch(extended, new_features[:rows], new_ids[:rows])
        return props, drafted

    ways = {"one by one": one_by_one, "batched": together}
    results = []
    with torch.inference_mode():
        for rows in args.rows:
            best = {name: {"draft_ms": float("inf"), "extend_ms": float("inf")} for name in ways}
            drafts = {}
            for rep in range(args.reps + 1):  # in turn; the first round warms up
                for name, way in ways.items():
                    extended = copy.deepcopy(states[:rows])  # extend copies: every way starts from the same states
                    start = time.process_time()
                    drafts[name], drafted = way(rows, extended)
                    end = time.process_time()
                    if rep:
                        best[name]["draft_ms"] = min(best[name]["draft_ms"], 1e3 * (drafted - start))
                        best[name]["extend_ms"] = min(best[name]["extend_ms"], 1e3 * (end - drafted))
            same = sum(torch.equal(a.tokens, b.tokens) for a, b in zip(drafts["one by one"], drafts["batched"]))
            results.append({"rows": rows, **{name: b for name, b in best.items()}, "rows_same_drafts": same})
            line = results[-1]
            print(f"R={rows:>2} draft {line['one by one']['draft_ms']:.1f} -> {line['batched']['draft_ms']:.1f} ms, extend "
                  f"{line['one by one']['extend_ms']:.1f} -> {line['batched']['extend_ms']:.1f} ms, same drafts {same}/{rows}",
                  flush=True)
    out = {"command": command(), "target": target.info(), "drafter": f"{drafter.algorithm} (fresh weights, {len(drafter.layers)} "
           f"layer(s), draft vocabulary {drafter.draft_vocab_size}, {str(target.dtype).removeprefix('torch.')})",
           "gamma": gamma, "accepted": args.accepted, "context_lengths": lengths, "reps": args.reps,
           "results": results, "machine": machine()}
    write_results(args.out, args.name, out, render(out))


def render(out: dict) -> str:
    lines = ["# Drafting a round for R requests: one by one against batched", "",
             f"Drafter {out['drafter']}, target {out['target']['name']}; block {out['gamma']}, greedy; each row extended "
             f"by {out['accepted'] + 1} positions; contexts of {min(out['context_lengths'])}-{max(out['context_lengths'])} "
             f"tokens; process CPU time, fastest of {out['reps']}, {out['machine']['torch_threads']} torch thread(s), "
             f"{out['machine'].get('cpu') or 'CPU'}.", f"Command: `{out['command']}`", "",
             "| R | draft, one by one (ms) | draft, batched (ms) | ratio | extend, one by one (ms) | extend, batched (ms) "
             "| ratio | rows with the same drafts |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["results"]:
        a, b = r["one by one"], r["batched"]
        lines.append(f"| {r['rows']} | {a['draft_ms']:.2f} | {b['draft_ms']:.2f} | {a['draft_ms'] / b['draft_ms']:.2f}x | "
                     f"{a['extend_ms']:.2f} | {b['extend_ms']:.2f} | {a['extend_ms'] / b['extend_ms']:.2f}x | "
                     f"{r['rows_same_drafts']}/{r['rows']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
