"""Ingest throughput and memory on generated production logs (default: 1,000,000 lines).

    python bench/ingest_throughput.py [--lines 1000000] [--work /tmp/drafter-bench-ingest]
                                      [--config configs/smollm2-135m-dspark.yaml]

1. Generates an OpenAI chat-completions gateway log: prompts and answers are 1-3
   sentences drawn at random from the ShareGPT dump (so almost every prompt is new, the
   costly path), with 3% retried requests logged twice, 2% pasted secrets and 0.5%
   broken lines.
2. Runs `python -m drafter ingest LOG --out DIR` in a child process (real target
   tokenizer, bundled evaluation sets, Great Expectations), polling its resident memory
   once a second.
3. Writes bench/results/ingest.json and bench/results/ingest.md: lines/s, peak RSS,
   RSS along the run (bounded memory: it must not grow with the number of lines), and
   the stage's own timings and counts from its manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def sentence_pools(limit: int = 6000) -> tuple[list[str], list[str]]:
    from drafter.traces.demo import sharegpt_path
    from drafter.traces.sources import SourceReader

    users, answers = [], []
    splitter = re.compile(r"(?<=[.?!])\s+")
    for rec in SourceReader(sharegpt_path(), max_line_bytes=50_000_000).records():
        if rec.error or len(users) >= limit:
            break
        for turn in rec.obj.get("conversations", []):
            pool = users if turn.get("from") == "human" else answers
            for s in splitter.split(str(turn.get("value", ""))):
                if 20 <= len(s) <= 300 and s.isascii():
                    pool.append(s.strip())
    return users, answers


def generate(path: Path, lines: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    users, answers = sentence_pools()
    secrets = ["my email is ana.lopez@gmail.com", "key AKIAQ7XK3MZ4PL2N8RTW", "call (415) 867-5309",
               "token ghp_a1B2c3D4e5a1B2c3D4e5a1B2c3D4e5f6G7h8"]
    kinds = {"conversation": 0, "retried": 0, "secret": 0, "broken": 0}
    t0 = time.time()
    with path.open("w") as f:
        previous = None
        for i in range(lines):
            r = rng.random()
            if r < 0.005:
                f.write('{"request": {"messages": [{"role": "user", "content": "cut sho\n')
                kinds["broken"] += 1
                continue
            if r < 0.035 and previous:
                f.write(previous)
                kinds["retried"] += 1
                continue
            prompt = " ".join(rng.choice(users) for _ in range(rng.randint(1, 3)))
            if r < 0.055:
                prompt += " " + rng.choice(secrets)
                kinds["secret"] += 1
            else:
                kinds["conversation"] += 1
            answer = " ".join(rng.choice(answers) for _ in range(rng.randint(1, 4)))
            line = json.dumps({
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1763632800 + i)),
                "tenant": rng.choice(["acme", "globex", "initech"]), "route": "/v1/chat/completions",
                "request": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": prompt}],
                            "temperature": 0.7},
                "response": {"id": f"chatcmpl-{i}", "created": 1763632800 + i, "model": "SmolLM2-135M-Instruct",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                          "finish_reason": "stop"}]},
            }) + "\n"
            f.write(line)
            previous = line
    return {"lines": lines, "bytes": path.stat().st_size, "kinds": kinds, "seconds": round(time.time() - t0, 1)}


def run_ingest(log: Path, out: Path, config: Path) -> dict:
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "drafter", "ingest", str(log), "--out", str(out), "-c", str(config), "--json"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    samples: list[tuple[float, int, int]] = []

    def anon(pid: int) -> int:
        """Anonymous resident memory (heap): RSS minus file-backed pages such as memory-mapped
        Arrow files, which the kernel can drop at any time."""
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def poll() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss, heap = p.memory_info().rss, anon(proc.pid)
            except (psutil.Error, OSError):
                break
            samples.append((round(time.time() - start, 1), rss, heap))
            time.sleep(1.0)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - start
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}):\n{stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": round(wall, 1), "samples": samples, "manifest": manifest, "command": " ".join(cmd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/drafter-bench-ingest"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m-dspark.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the generated log and output")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / f"gateway-{args.lines}.jsonl"
    gen = generate(log, args.lines)
    print(f"generated {gen['lines']:,} lines ({gen['bytes'] / 1e6:.0f} MB) in {gen['seconds']} s", flush=True)
    run = run_ingest(log, args.work / "ingested", args.config)
    m = run["manifest"]
    counts = m["counts"]
    run["samples"] = [s for s in run["samples"] if s[1] > 0]  # an exited process reads 0
    peak = max((s[1] for s in run["samples"]), default=0)
    peak_anon = max((s[2] for s in run["samples"]), default=0)
    n = len(run["samples"])
    along = [run["samples"][min(n - 1, int(n * q))] for q in (0.1, 0.25, 0.5, 0.75, 1.0)] if n else []
    result = {
        "lines": args.lines,
        "log_bytes": gen["bytes"],
        "generated": gen["kinds"],
        "wall_s": run["wall_s"],
        "lines_per_s": round(args.lines / run["wall_s"], 1),
        "mb_per_s": round(gen["bytes"] / 1e6 / run["wall_s"], 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_rss_anon_mb": round(peak_anon / 2**20, 1),
        "rss_along_run_mb": [(t, round(rss / 2**20, 1), round(heap / 2**20, 1)) for t, rss, heap in along],
        "stage_durations_s": m["durations_s"],
        "counts": {k: counts[k] for k in ("records", "conversations", "quarantined_by_reason", "duplicates_by_kind",
                                            "redactions", "domains", "totals")},
        "command": f"python bench/ingest_throughput.py --lines {args.lines}",
        "ingest_command": run["command"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Ingest throughput",
        "",
        f"Command: `{result['command']}` (runs `{run['command'].split(' -c ')[0].replace(sys.executable, 'python')} ...`)",
        "",
        "| lines | log size | wall time | lines/s | MB/s | peak RSS | peak anonymous RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.lines:,} | {gen['bytes'] / 1e6:,.0f} MB | {run['wall_s']:,.0f} s | {result['lines_per_s']:,.0f} | "
        f"{result['mb_per_s']} | {result['peak_rss_mb']:,.0f} MiB | {result['peak_rss_anon_mb']:,.0f} MiB |",
        "",
        "RSS along the run (time: total / anonymous MiB): "
        + ", ".join(f"{t:.0f} s: {mb:.0f} / {heap:.0f}" for t, mb, heap in result["rss_along_run_mb"]),
        "Anonymous RSS is the process's own memory; the rest is file-backed (memory-mapped Arrow",
        "files while the datasets are written), which the kernel reclaims under pressure.",
        "",
        f"Kept {counts['totals']['train']:,} train + {counts['totals']['holdout']:,} holdout; "
        f"duplicates {counts['conversations']['duplicate']:,}; quarantined {counts['records']['quarantined']:,}; "
        f"redactions {sum(counts['redactions'].values()):,}.",
        "",
        "Stage timings (s): " + ", ".join(f"{k} {v}" for k, v in m["durations_s"].items()),
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs shared with other work "
        f"(load average at the end: {result['machine']['load_avg_at_end']}).",
    ]
    (RESULTS / "ingest.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
