"""A DSpark proposal on a CPU with and without the Markov bias rows it keeps (models/dspark.py,
`MarkovHead`), side by side: the same drafter, context and anchors, the two in turn.

    python bench/draft_memo.py --drafter <dspark export> [--gamma 3] [--anchors 64] [--threads 1]

A round drafts from `--anchors` distinct anchor tokens (the first `--anchors` token ids of the
target's greedy answer to the first benchmark prompt, so previous tokens recur as they do in decoding) after
256 tokens of context. A first pass starts with no rows kept (it pays every first product); a
second pass follows it over the same anchors, as a long decode keeps its rows.
Median of 7 passes, process CPU time. Writes bench/results/draft_memo.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import RESULTS, apply_threads, command, machine, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("bench/learning_curve.yaml"))
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    apply_threads(args)
    import torch

    import drafter.models.dspark as dspark
    from drafter.config import load_config
    from drafter.decoding import SpecEngine, load_drafter
    from drafter.evaluate import load_prompts
    from drafter.target import load_target

    cfg = load_config(args.config, ["drafter.algorithm=dspark"])
    target = load_target(cfg)
    model, folder = load_drafter(args.drafter, target)
    if getattr(model, "markov_head", None) is None:
        raise SystemExit(f"{folder}: not a DSpark drafter with a Markov head")
    prompt = load_prompts(cfg, target.tokenizer, None)[0][0].ids  # the first benchmark prompt
    answer = SpecEngine(target, None).generate(prompt, 256).tokens
    context = torch.tensor([prompt + answer])[:, :256]
    state = model.init_state()
    model.extend(state, target.capture(context).layers, context)
    anchors = [torch.tensor([t]) for t in answer[: args.anchors]]

    def one_pass(memo_bytes: int, clear: bool = True) -> tuple[float, list[list[int]]]:
        dspark.MEMO_BYTES = memo_bytes
        if clear:
            model.markov_head.forget()  # no rows kept
        start = time.process_time()
        drafts = [model.propose(state, a, args.gamma, 0.0).tokens.flatten().tolist() for a in anchors]
        return (time.process_time() - start) / len(anchors) * 1e3, drafts

    kept = dspark.MEMO_BYTES
    one_pass(0)  # warm-up
    runs: dict[str, list[float]] = {"product": [], "kept rows, first pass": [], "kept rows, second pass": []}
    drafts: dict[str, list] = {}
    for _ in range(args.passes):
        for label, memo, clear in (("product", 0, True), ("kept rows, first pass", kept, True),
                                   ("kept rows, second pass", kept, False)):
            ms, drafts[label] = one_pass(memo, clear)
            runs[label].append(ms)
    dspark.MEMO_BYTES = kept
    median = {label: statistics.median(v) for label, v in runs.items()}
    doc = {
        "command": command(), "drafter": str(folder), "gamma": args.gamma, "anchors": len(anchors),
        "passes": args.passes, "clock": "process", "propose_ms": median, "runs_ms": runs,
        "speedup": {label: median["product"] / ms for label, ms in median.items() if label != "product"},
        "same_drafts": all(d == drafts["product"] for d in drafts.values()), "machine": machine(),
    }
    md = "\n".join([
        f"# DSpark proposal of {args.gamma} tokens, {len(anchors)} anchors, {args.passes} passes (`{doc['command']}`)",
        "",
        "| Markov bias | ms a proposal (median) |",
        "|---|---:|",
        *(f"| {label} | {ms:.3f} |" for label, ms in median.items()),
        "",
        "Against the product: " + ", ".join(f"{label} {x:.2f}x" for label, x in doc["speedup"].items())
        + f"; the same drafts: {doc['same_drafts']}.",
    ])
    write_results(args.out, "draft_memo", doc, md)


if __name__ == "__main__":
    main()
