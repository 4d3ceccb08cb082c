"""Training step time per drafter algorithm, before and after the CPU work of the drafter-value
issue, side by side in one run on the real SmolLM2-135M target's shapes:

- before: the target (its frozen embedding and LM head) in fp32, no autocast, p_t recomputed
  from the cached final hidden state through the 576 x 49,152 LM head, the full vocabulary;
  EAGLE-3's training-time-test unroll over every position (then the sampled chains kept);
- after:  bf16 target, bf16 autocast, fp32 master weights (what `runtime.dtype: auto` picks
  for training with AMX), p_t from the cache's top-64 (no target LM head), an 8,192-token
  draft vocabulary, EAGLE-3's unroll on the sampled chains only;
- after-fp32: the same in float32 without autocast (what `auto` picks where bf16 matmuls are
  not faster, e.g. AVX-512 BF16 without AMX on Intel).

    DRAFTER_MODELS=/work/main/.drafter/models /work/main/.venv/bin/python bench/train_throughput.py \
        [--seq-len 320] [--batch 8] [--anchors 16] [--steps 3] [--threads 1]

Batch 8 x 16 anchors is the tau benchmark's. Features are random (throughput depends on
shapes only); the draft vocabulary is built from the batch's own target argmax tokens so
that no position is masked out of EAGLE-3's loss. Writes bench/results/train_throughput.json
and .md (forward, backward, clip, AdamW; mean of --steps after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import command  # noqa: E402

ALGORITHMS = ["dspark", "dflash", "eagle3"]
TOP_K, DRAFT_VOCAB = 64, 8192  # the default config's draft vocabulary
VARIANTS = {  # name -> (target dtype, autocast, sparse p_t, draft vocabulary)
    "before": ("float32", False, False, None),
    "after": ("bfloat16", True, True, DRAFT_VOCAB),
    "after-fp32": ("float32", False, True, DRAFT_VOCAB),
}


def synthetic_batch(target, b: int, T: int):
    from drafter.models import TrainBatch

    gen = torch.Generator().manual_seed(0)
    n, H = len(target.layer_ids), target.hidden_size
    ids = torch.randint(0, target.vocab_size, (b, T), generator=gen)
    loss_mask = torch.zeros(b, T, dtype=torch.bool)
    loss_mask[:, T // 4 :] = True  # a prompt, then the answer
    final = torch.randn(b, T, H, generator=gen)
    with torch.no_grad():
        top = torch.softmax(target.logits_from_hidden(final.to(target.dtype)).float(), -1).topk(TOP_K)
    return TrainBatch(ids, loss_mask, torch.ones(b, T, dtype=torch.bool), torch.randn(b, T, n, H, generator=gen),
                      final, top.indices, top.values)


def measure(target, algorithm: str, variant: str, batch, anchors: int, steps: int) -> dict:
    from drafter.config import load_config
    from drafter.models import TargetHeads, TrainBatch, build

    _, autocast, sparse, vocab = VARIANTS[variant]
    sets = [f"drafter.algorithm={algorithm}", f"train.max_anchors={anchors}",
            f"drafter.draft_vocab_size={vocab or 'null'}"]
    cfg = load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml", sets)
    heads = TargetHeads.from_target(target)
    if sparse:
        batch = TrainBatch(batch.input_ids, batch.loss_mask, batch.attention_mask, batch.features, None,
                           batch.target_ids, batch.target_probs)
    else:
        batch = TrainBatch(batch.input_ids, batch.loss_mask, batch.attention_mask, batch.features, batch.final_hidden)
    argmax = (batch.target_ids[..., 0] if sparse else torch.zeros(0, dtype=torch.long))
    counts = torch.bincount(torch.cat([batch.input_ids[batch.loss_mask], argmax.flatten()]), minlength=heads.vocab_size)
    torch.manual_seed(0)
    model = build(cfg, heads, target.layer_ids, counts).train()
    if algorithm == "eagle3" and variant == "before":  # the unroll ran over every position, then kept the chains
        full = model.ttt_hidden
        model.ttt_hidden = lambda b, chains=None: [  # noqa: E731
            o.gather(1, chains[..., None].expand(-1, -1, o.shape[-1])) for o in full(b)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch.input_ids.shape[0])]  # noqa: E731

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.forward_train(batch, generator=gens(), reduction="sum")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    elapsed = (time.perf_counter() - start) / steps
    return {
        "algorithm": algorithm, "variant": variant,
        "seconds_per_step": round(elapsed, 4),
        "tokens_per_s": round(int(batch.attention_mask.sum()) / elapsed, 1),
        "draft_positions_per_step": int(out.metrics["count"].sum()),
        "trainable_parameters": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--anchors", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for train_throughput.{json,md}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from drafter.config import load_config
    from drafter.target import load_target

    targets = {v: load_target(load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml", [f"target.dtype={d}"]))
               for v, (d, *_) in VARIANTS.items()}
    batch = synthetic_batch(targets["after"], args.batch, args.seq_len)
    results = []
    for algorithm in args.algorithms.split(","):
        for variant in VARIANTS:  # side by side, per algorithm
            row = measure(targets[variant], algorithm, variant, batch, args.anchors, args.steps)
            results.append(row)
            print(row, flush=True)
    for r in results:
        before = next(x for x in results if x["algorithm"] == r["algorithm"] and x["variant"] == "before")
        r["speedup_vs_before"] = round(before["seconds_per_step"] / r["seconds_per_step"], 2)
    report = {
        "command": command(), "device": f"CPU ({os.cpu_count()} cores, {args.threads} torch threads)",
        "platform": platform.platform(), "torch": torch.__version__, "target": targets["after"].name,
        "seq_len": args.seq_len, "batch": args.batch, "anchors": args.anchors, "steps": args.steps,
        "top_k": TOP_K, "draft_vocab_size": DRAFT_VOCAB, "variants": {k: dict(zip(
            ("target_dtype", "autocast_bf16", "sparse_target", "draft_vocab_size"), v)) for k, v in VARIANTS.items()},
        "load_average": os.getloadavg(), "results": results,
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    render(report, out / "train_throughput.md")


def render(report: dict, path: Path) -> None:
    lines = [
        f"# Drafter training step, before and after ({report['device']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Target shapes: {report['target']} (width 576, vocabulary 49152); batch {report['batch']} x "
        f"{report['seq_len']} tokens, up to {report['anchors']} anchors (chains) a sequence, mean of {report['steps']} "
        f"steps after one warm-up; load average {tuple(round(x, 1) for x in report['load_average'])} "
        "(shared machine: ratios are side by side in one run).",
        "",
        "- before: fp32 target heads, no autocast, dense p_t through the LM head, full vocabulary; "
        "EAGLE-3 unrolled over every position",
        f"- after: bf16 target heads + bf16 autocast, top-{report['top_k']} p_t from the cache, "
        f"{report['draft_vocab_size']:,}-token draft vocabulary; EAGLE-3 unrolled on its sampled chains",
        "- after-fp32: the same in float32, no autocast",
        "",
        "| algorithm | variant | s / step | speedup | sequence tokens / s | draft positions / step | trainable params |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['algorithm']} | {r['variant']} | {r['seconds_per_step']} | {r['speedup_vs_before']}x | "
                     f"{r['tokens_per_s']} | {r['draft_positions_per_step']} | {r['trainable_parameters']:,} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
