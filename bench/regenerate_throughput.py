"""Generated tokens per second of the `local` regeneration backend: batched vs one at a time.

    python bench/regenerate_throughput.py [--prompts 16] [--max-new-tokens 48] [--batch-sizes 1,4,8,16]
                                          [--continuous-sizes 16] [--repeats 2] [--threads N]
                                          [--attention drafter,sdpa] [--generate-sizes 1,16]
                                          [--config configs/smollm2-135m-dspark.yaml]

The real target (default SmolLM2-135M-Instruct) answers the first turns of the bundled
MT-bench questions through `LocalBackend.run`, the path `drafter regenerate` takes
(chat template, prompts sorted by length, left padding, KV cache), once per batch size,
side by side in one process with the same prompts and the configured sampling
(temperature 0.7, top-p 0.8, top-k 20; seeded), in interleaved rounds (the best round of
each batch size is reported, every round is listed). Batch size 1 is one request at a time.
Static batches run on the decoding engine (`drafter.decoding.SpecEngine` without a drafter),
as `drafter regenerate` does. `--generate-sizes` adds rows through transformers' `generate`
instead (left-padded, with transformers' own top-k/top-p warpers and draw),
`--continuous-sizes` rows with `regenerate.batching=continuous` (transformers'
continuous batching over a pool of 8 x batch size prompts, finished rows refilled).
Generated tokens are counted up to and including each answer's end-of-turn token (the
padding a finished row keeps producing while its batch runs on is not counted).
`--prepack on,onednn,bf16,off` runs every case with the target's bf16 linear weights reordered once,
wide products in float32 where that is faster and products of at most 32 rows through the
few-rows kernel where it suits the CPU (drafter/prepack.py, drafter/few_rows.py; the default: `on`),
the same without the few-rows kernel (`onednn`), reordered once with every product in bf16
(`bf16`), and reordered on every call (`off`). `--attention` runs every case under each
listed attention implementation (default: the target's own; `drafter` is drafter/attention.py's, `sdpa` transformers' SDPA).
Writes bench/results/regenerate_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, command, machine, write_results  # noqa: E402


def prompts(n: int) -> list[str]:
    from drafter.config import BUNDLED_EVAL_DIR

    lines = (BUNDLED_EVAL_DIR / "mt-bench.jsonl").read_text().splitlines()
    return [json.loads(line)["turns"][0] for line in lines[:n]]


def transformers_generate(backend, prompts: list[list[int]]) -> list:
    """A static batch through transformers' `generate`: left padding, its own warpers and draw."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), backend.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = backend.target.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=backend.cfg.max_new_tokens,
                                            pad_token_id=backend.pad_id, eos_token_id=backend.eos or None, use_cache=True,
                                            **backend._generate_kwargs())
    return [backend._turn(row) for row in out[:, width:].tolist()]


def measure(target, cfg, questions: list[str], batch_size: int, batching: str = "static", attention: str = "",
            prepacked: str = "on") -> dict:
    import torch

    from drafter.prepack import prepack, unpack
    from drafter.regenerate import Conversation, LocalBackend

    unpack(target.model)
    if prepacked != "off":
        prepack(target.model, wide_rows=None if prepacked == "bf16" else "auto",
                few_rows="auto" if prepacked == "on" else None)

    attention = attention or target.config._attn_implementation
    target.model.set_attn_implementation(attention)
    backend = LocalBackend(cfg.regenerate.model_copy(
        update={"batch_size": batch_size, "batching": "continuous" if batching == "continuous" else "static"}), target)
    if batching == "generate":
        backend.generate = lambda prompts: transformers_generate(backend, prompts)
    convs = [Conversation(row={"id": str(i)}, source=[{"role": "user", "content": q},
                                                      {"role": "assistant", "content": ""}])
             for i, q in enumerate(questions)]
    finished = []
    torch.manual_seed(cfg.run.seed)
    start = time.perf_counter()
    backend.run(convs, finished.append)
    seconds = time.perf_counter() - start
    errors = [c.error for c in finished if c.error]
    if errors:
        raise RuntimeError(f"batch {batch_size}: {errors[0]}")
    tokens = sum(t.tokens for c in finished for t in c.turns)
    stops = sum(t.finish_reason == "stop" for c in finished for t in c.turns)
    return {"batch_size": batch_size, "batching": batching, "attention": attention, "prepacked": prepacked,
            "requests": len(finished),
            "generated_tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
            "stopped_on_eos": stops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--continuous-sizes", default="", help="batch sizes also run with continuous batching")
    parser.add_argument("--attention", default="", help="attention implementations to compare (default: the target's)")
    parser.add_argument("--generate-sizes", default="", help="batch sizes also run through transformers' generate")
    parser.add_argument("--prepack", default="on",
                        help="bf16 linear weights reordered once with wide products in float32 and few rows through "
                             "the few-rows kernel (on, as runtime.prepack does), the same without that kernel (onednn), "
                             "reordered once with every product in bf16 (bf16), on every call (off): a list")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for regenerate_throughput.{json,md}")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m-dspark.yaml")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all batch sizes, interleaved; the best round of each is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 keeps a shared, oversubscribed machine from thrashing)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from drafter.config import load_config
    from drafter.target import load_target

    cfg = load_config(args.config, [f"regenerate.max_new_tokens={args.max_new_tokens}"])
    target = load_target(cfg)
    questions = prompts(args.prompts)
    attentions = args.attention.split(",") if args.attention else [target.config._attn_implementation]
    packs = args.prepack.split(",")
    sizes = {"static": args.batch_sizes, "generate": args.generate_sizes, "continuous": args.continuous_sizes}
    cases = [(int(x), batching, a, p) for batching, listed in sizes.items() for p in packs for a in attentions
             for x in listed.split(",") if x]
    measure(target, cfg, questions[:2], 2)  # warm-up: first-call allocations and lazy inits
    if any(case[1] == "continuous" for case in cases):
        measure(target, cfg, questions[:2], 2, "continuous")
    runs: dict[tuple[int, str, str, str], list[dict]] = {case: [] for case in cases}
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits all sizes alike
        for case in cases:
            runs[case].append(measure(target, cfg, questions, *case))
            print(json.dumps(runs[case][-1]), flush=True)
    rows = []
    for case in cases:
        best = max(runs[case], key=lambda r: r["tokens_per_s"])
        rows.append({**best, "all_tokens_per_s": [r["tokens_per_s"] for r in runs[case]]})
    bases = {}
    for r in rows:  # against the engine's one-at-a-time row of the first attention, weights prepacked alike
        same = [b for b in rows if b["prepacked"] == r["prepacked"]]
        base = bases[r["prepacked"]] = next((b for b in same if (b["batch_size"], b["batching"]) == (1, "static")), same[0])
        r["speedup_vs_one_at_a_time"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
    base = bases[packs[0]]

    result = {
        "benchmark": "regenerate_throughput",
        "command": command(),
        "target": target.info() | {"dtype": str(target.dtype)},
        "sampling": {k: getattr(cfg.regenerate, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")},
        "prompts": f"first turns of the first {len(questions)} bundled MT-bench questions",
        "machine": machine(device=str(target.device)),
        "results": rows,
    }
    lines = [
        "# Regeneration throughput (`local` backend)",
        "",
        f"Target {target.name} ({target.info()['parameters']:,} parameters, {target.dtype}, {target.device}); "
        f"{result['prompts']}; sampling {result['sampling']}.",
        "",
        "| batching | attention | prepacked | batch size | requests | generated tokens | seconds | tokens/s (best) | "
        f"every round | vs {'one at a time' if base['batch_size'] == 1 else 'batch ' + str(base['batch_size'])} "
        f"(static, {base['attention']}, same prepacking) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        label = "1 (one at a time)" if (r["batch_size"], r["batching"]) == (1, "static") else str(r["batch_size"])
        lines.append(f"| {r['batching']} | {r['attention']} | {r['prepacked']} | {label} | {r['requests']} | {r['generated_tokens']} | {r['seconds']} | "
                     f"{r['tokens_per_s']} | {', '.join(map(str, r['all_tokens_per_s']))} | "
                     f"{r['speedup_vs_one_at_a_time']}x |")
    lines += ["", f"Command: `{result['command']}`", f"Machine: {result['machine']}", ""]
    write_results(args.out, "regenerate_throughput", result, "\n".join(lines))


if __name__ == "__main__":
    main()
