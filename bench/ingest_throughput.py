"""Ingest throughput and memory on generated production logs (default: 1,000,000 lines).

    python bench/ingest_throughput.py [--lines 1000000] [--workers 1,2,2r] [--work /tmp/drafter-bench-ingest]
                                      [--config configs/smollm2-135m-dspark.yaml]

1. Generates an OpenAI chat-completions gateway log: prompts and answers are 1-3
   sentences drawn at random from the ShareGPT dump (so almost every prompt is new, the
   costly path), with 3% retried requests logged twice, 2% pasted secrets and 0.5%
   broken lines.
2. For each worker count, runs `python -m drafter ingest LOG --out DIR --workers N` in a
   child process (real target tokenizer, bundled evaluation sets, Great Expectations; N > 1
   prepares batches on the LocalCluster of a prefect-dask DaskTaskRunner, whose workers read their own byte ranges of the
   log; `Nr`: records read here and sent to the workers, `ingest.workers_read_files=false`), polling the resident memory of the whole
   process tree (the ingest and its Dask workers) once a second, and the CPU time of that tree.
3. Writes bench/results/ingest.json and bench/results/ingest.md: per run lines/s, peak RSS
   of the tree, RSS along the run (bounded memory: it must not grow with the number of
   lines), the stage's own timings and counts from its manifest; and checks that every run
   kept the same conversations (the output does not depend on the number of workers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import RESULTS, ROOT, command, machine, write_results


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


def run_ingest(log: Path, out: Path, config: Path, workers: int, overrides: list[str] = ()) -> dict:
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "drafter", "ingest", str(log), "--out", str(out), "-c", str(config),
           "--workers", str(workers), "--json", *[a for o in overrides for a in ("-s", o)]]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    samples: list[tuple[float, int]] = []

    def poll() -> None:
        """RSS of the ingest and every process under it (Dask's nanny and worker processes)."""
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                break
            samples.append((round(time.time() - start, 1), total))
            time.sleep(1.0)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - start
    # CPU of the ingest and every process it waited for (Dask's nannies and workers)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}):\n{stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    samples = [s for s in samples if s[1] > 0]
    n = len(samples)
    along = [samples[min(n - 1, int(n * q))] for q in (0.1, 0.25, 0.5, 0.75, 1.0)] if n else []
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(max((s[1] for s in samples), default=0) / 2**20, 1),
            "rss_along_run_mib": [(t, round(rss / 2**20, 1)) for t, rss in along],
            "manifest": manifest, "command": " ".join(cmd).replace(sys.executable, "python")}


def output_digests(out: Path) -> dict[str, str]:
    """SHA-256 of every file the ingest published (datasets, quarantine, dropped, validation)."""
    import hashlib

    names = ["train", "holdout", "quarantine.jsonl", "dropped.jsonl", "validation.json"]
    files = sorted(f for n in names for f in ([out / n] if (out / n).is_file() else (out / n).glob("*.arrow")))
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated; "
                        "N r (e.g. 2r): records sent to the workers rather than byte ranges")
    parser.add_argument("--work", type=Path, default=Path("/tmp/drafter-bench-ingest"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m-dspark.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the generated log and output")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / f"gateway-{args.lines}.jsonl"
    gen = generate(log, args.lines)
    print(f"generated {gen['lines']:,} lines ({gen['bytes'] / 1e6:.0f} MB) in {gen['seconds']} s", flush=True)
    runs, kept = [], {}
    for spec in args.workers.split(","):
        workers, reads = int(spec.rstrip("r")), "records" if spec.endswith("r") or spec == "1" else "ranges"
        out = args.work / f"ingested-w{spec}"
        run = run_ingest(log, out, args.config, workers, ["ingest.workers_read_files=false"] * spec.endswith("r"))
        m = run["manifest"]
        kept[spec] = (m["counts"]["totals"], output_digests(out))
        runs.append({
            "workers": workers, "reads": reads, "lines": args.lines, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
            "lines_per_s": round(args.lines / run["wall_s"], 1), "mb_per_s": round(gen["bytes"] / 1e6 / run["wall_s"], 2),
            "peak_rss_mib": run["peak_rss_mib"], "rss_along_run_mib": run["rss_along_run_mib"],
            "stage_durations_s": m["durations_s"],
            "counts": {k: m["counts"][k] for k in ("records", "conversations", "quarantined_by_reason",
                                                     "duplicates_by_kind", "redactions", "domains", "totals")},
            "ingest_command": run["command"],
        })
        print(f"workers={workers} ({reads}): {runs[-1]['lines_per_s']:,.0f} lines/s, peak RSS {run['peak_rss_mib']:,.0f} MiB",
              flush=True)
        shutil.rmtree(out, ignore_errors=True) if not args.keep else None
    same = len({json.dumps(v, sort_keys=True) for v in kept.values()}) == 1
    doc = {"runs": runs, "log_bytes": gen["bytes"], "generated": gen["kinds"], "same_output": same,
           "command": command(), "machine": machine(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    base = runs[0]
    md = [
        "# Ingest throughput", "",
        f"Command: `{doc['command']}` ({gen['lines']:,} generated gateway lines, {gen['bytes'] / 1e6:,.0f} MB)", "",
        "| workers | workers read | wall time | CPU time (process tree) | lines/s | vs first | MB/s | peak RSS (process tree) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['workers']} | {r['reads'] if r['workers'] > 1 else '-'} | {r['wall_s']:,.0f} s | {r['cpu_s']:,.0f} s | {r['lines_per_s']:,.0f} | "
          f"{r['lines_per_s'] / base['lines_per_s']:.2f}x | {r['mb_per_s']} | {r['peak_rss_mib']:,.0f} MiB |" for r in runs],
        "",
        f"Same output (kept conversations, checksums of every output file) for every worker count: {same}.",
        f"Kept {base['counts']['totals']['train']:,} train + {base['counts']['totals']['holdout']:,} holdout; "
        f"duplicates {base['counts']['conversations']['duplicate']:,}; "
        f"quarantined {base['counts']['records']['quarantined']:,}; "
        f"redactions {sum(base['counts']['redactions'].values()):,}.", "",
        *[f"Stage timings, {r['workers']} worker(s), {r['reads']} (s; prepare steps summed over workers): "
          + ", ".join(f"{k} {v}" for k, v in r["stage_durations_s"].items()) for r in runs], "",
        f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs "
        f"(load average at the end: {doc['machine']['load_average']}).",
    ]
    write_results(RESULTS, "ingest", doc, "\n".join(md) + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    if not same:
        raise SystemExit("the runs kept different conversations: the output depends on the number of workers")


if __name__ == "__main__":
    main()
