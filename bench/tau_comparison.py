"""The result that matters: EAGLE-3 vs DFlash vs DSpark on the same data with the same budget.

One run config (bench/tau_smollm2.yaml) drives every stage through the `drafter` CLI:
demo logs -> ingest -> regenerate (the target's own answers: the data every drafter must
imitate) -> target cache -> train each algorithm (same steps, batch, lr schedule, anchors,
seed and data; only `drafter.algorithm` differs) -> evaluate each one on the same seeded
prompts (the eight bundled eval sets + the ingested holdout) in the same engine, with plain
autoregressive decoding of the target interleaved for the speedup.

    DRAFTER_MODELS=/work/main/.drafter/models python bench/tau_comparison.py \
        [-c bench/tau_smollm2.yaml] [-s section.key=value ...] [--jobs 2] [--report-only]

Every stage resumes on its own (regeneration, cache shards, training checkpoints,
evaluation prompts), so re-running the same command continues a killed run and a
finished one only rewrites the report. `-s` overrides apply to every stage, e.g.
`-s train.max_steps=40 -s run.data_dir=/tmp/other` for a smaller run elsewhere.
`--jobs 2` trains/evaluates two algorithms at a time (one torch thread each).

Writes bench/results/tau.json ({"target", "algorithms": {alg: {dataset: pooled tau}}}),
bench/results/tau_details.json (per-sample-mean tau, CIs, acceptance, speedups, training
budget and wall times) and bench/results/tau.md. The config evaluates at temperature 1, the
paper's setting; `--stem tau_greedy -s evaluate.temperature=0` evaluates the same drafters
greedily into tau_greedy.* (and eval-ALG-greedy folders) without retraining.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drafter.config import load_config  # noqa: E402
from drafter.manifest import atomic_write_json, atomic_write_text, sha256_json, sha256_tree  # noqa: E402

ALGORITHMS = ["eagle3", "dflash", "dspark"]  # the longest first: it gets a worker of its own
NAMES = {"eagle3": "EAGLE-3", "dflash": "DFlash", "dspark": "DSpark"}
PAPER = {"dspark/eagle3": (26.7, 30.9), "dspark/dflash": (16.3, 18.4)}  # macro tau gain, %, Qwen3-4B/8B/14B
RESULTS = ROOT / "bench" / "results"


class Runner:
    """Runs `python -m drafter ...` with the bench config and overrides; logs each call."""

    def __init__(self, config: Path, overrides: list[str], data_dir: Path) -> None:
        self.config, self.overrides, self.data_dir = config, overrides, data_dir
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        # One torch thread per process: steadier timings on a shared CPU (and at most two at a time).
        self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.env.setdefault("DRAFTER_HOME", str(data_dir.parent / "state"))
        self.commands: list[str] = []

    def sets(self, extra: list[str] = ()) -> list[str]:
        out = []
        for item in [*self.overrides, *extra]:
            out += ["-s", item]
        return out

    def __call__(self, name: str, *args: str, extra: list[str] = ()) -> float:
        cmd = [sys.executable, "-m", "drafter", *args, "-c", str(self.config), *self.sets(extra)]
        shown = "python -m drafter " + " ".join(shlex.quote(a) for a in cmd[3:])
        self.commands.append(shown)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shown}", flush=True)
        started = time.time()
        with (self.logs / f"{name}.log").open("a") as log:
            log.write(f"\n$ {shown}\n")
            log.flush()
            done = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        elapsed = time.time() - started
        if done.returncode != 0:
            raise SystemExit(f"{name} failed (exit {done.returncode}); see {self.logs / (name + '.log')}")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {elapsed / 60:.1f} min", flush=True)
        return elapsed


def prepare_data(run: Runner, cfg, demo_n: int) -> None:
    d = run.data_dir
    raw = Path(cfg.ingest.inputs[0])
    if not (raw / "chat-completions.jsonl").is_file():
        cmd = ["demo-logs", "--n", str(demo_n), "--seed", "0", "-o", str(raw)]  # takes no run config
        subprocess.run([sys.executable, "-m", "drafter", *cmd], cwd=ROOT, env=run.env, check=True)
    run.commands.append(f"python -m drafter demo-logs --n {demo_n} --seed 0 -o {raw}")
    if not (d / "ingested" / "manifest.json").is_file():
        run("ingest", "ingest", "-o", str(d / "ingested"))
    run("regenerate", "regenerate", "--in", str(d / "ingested"), "--out", str(d / "regenerated"))
    run("build-cache", "build-cache", "--in", str(d / "regenerated"), "--out", str(d / "cache"))


def eval_name(alg: str, stem: str) -> str:
    """Evaluation folder of one algorithm: `eval-ALG` for the headline run, else `eval-ALG-VARIANT`."""
    return f"eval-{alg}" if stem == "tau" else f"eval-{alg}-{stem.removeprefix('tau_')}"


def algorithm_pipeline(run: Runner, alg: str, stem: str) -> dict:
    """Train (resumes; a no-op when done) then evaluate `last/` (skipped when already done)."""
    d = run.data_dir
    extra = [f"drafter.algorithm={alg}"]
    train_dir, eval_dir = d / f"drafter-{alg}", d / eval_name(alg, stem)
    times = {"train_s": run(f"train-{alg}", "train", "--cache", str(d / "cache"), "--out", str(train_dir), extra=extra)}
    model = train_dir / "last"
    key = sha256_json({"drafter": sha256_tree(model), "overrides": run.overrides, "config": run.config.read_text()})
    marker = eval_dir / "bench_key.json"
    if (eval_dir / "report.json").is_file() and marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        print(f"{eval_dir.name}: already evaluated", flush=True)
    else:
        times["evaluate_s"] = run(eval_dir.name, "evaluate", "-d", str(model), "--ingested", str(d / "ingested"),
                                  "-o", str(eval_dir), extra=extra)
        atomic_write_json(marker, {"key": key})
    return times


# ----- the report -----------------------------------------------------------------------------------
def _macro(taus: dict[str, float], names: list[str]) -> float:
    vals = [taus[n] for n in names if n in taus]
    return sum(vals) / len(vals) if vals else float("nan")


def collect(cfg, data_dir: Path, algorithms: list[str], commands: list[str], times: dict, stem: str) -> dict:
    details: dict = {"algorithms": {}}
    target = None
    for alg in algorithms:
        report = json.loads((data_dir / eval_name(alg, stem) / "report.json").read_text())
        train = json.loads((data_dir / f"drafter-{alg}" / "manifest.json").read_text())
        target = target or report["target"].get("name")
        ds = report["datasets"]
        details["algorithms"][alg] = {
            "tau_pooled": {n: m["tau_pooled"] for n, m in ds.items()},
            "tau_per_sample_mean": {n: m["tau_per_sample_mean"] for n, m in ds.items()},
            "tau_ci95": {n: m["tau_ci"] for n, m in ds.items()},
            "prompts": {n: m["samples"] for n, m in ds.items()},
            "rounds": {n: m["rounds"] for n, m in ds.items()},
            "accept_rate_at_k": report["overall"]["accept_rate_at_k"],
            "acceptance_rate": report["overall"]["acceptance_rate"],
            "speedup": {k: report["overall"].get(k) for k in (
                "tokens_per_s", "plain_tokens_per_s", "speedup", "decode_tokens_per_s", "plain_decode_tokens_per_s",
                "decode_speedup")},
            "lossless": report["lossless"],
            "settings": report["settings"],
            "train": {
                "steps": train["counts"]["steps"], "sequences_seen": train["counts"]["sequences_seen"],
                "tokens_seen": train["counts"]["tokens_seen"], "positions_trained": train["counts"]["positions_trained"],
                "train_sequences": train["counts"]["train_sequences"],
                "trainable_parameters": train["params"]["trainable_parameters"],
                "durations_s": train["durations_s"], "holdout_sim_tau_greedy": train["outputs"]["final_holdout"]["sim_tau_greedy"],
                "holdout_accuracy": train["outputs"]["final_holdout"]["accuracy"],
            },
            "wall_s": times.get(alg, {}),
        }
    details["target"] = target
    details["commands"] = commands
    details["config"] = cfg.to_dict()
    details["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    return details


def ratios(details: dict, datasets: list[str]) -> dict:
    algs = details["algorithms"]
    macro = {a: _macro(v["tau_pooled"], datasets) for a, v in algs.items()}
    out = {"macro_tau": macro}
    for num, den in (("dspark", "eagle3"), ("dspark", "dflash"), ("dflash", "eagle3")):
        if num in macro and den in macro:
            out[f"{num}/{den}"] = macro[num] / macro[den]
    return out


def render(details: dict, summary: dict, cfg, datasets: list[str]) -> str:
    algs = [a for a in ALGORITHMS if a in details["algorithms"]]
    A = details["algorithms"]
    ec, tc = cfg.evaluate, cfg.train
    first = A[algs[0]]
    prompts = first["prompts"]
    lines = [
        f"# tau: EAGLE-3 vs DFlash vs DSpark on {details['target']} (same data, same budget)",
        "",
        ("Greedy decoding (temperature 0)" if ec.temperature == 0 else f"Sampling at temperature {ec.temperature}") + f", block/TTT length {cfg.drafter.block_size}, "
        f"{ec.max_new_tokens} new tokens per prompt, chain drafting, lossless verification. "
        f"Prompts per set (seeded, seed {cfg.run.seed}): " + ", ".join(f"{n} {k}" for n, k in prompts.items()) + ".",
        "tau = DeepSpec's pooled acceptance length (tokens emitted in verification rounds / rounds, the bonus "
        "token included; the prefill token not counted). Per-sample-mean tau and 95% bootstrap intervals are in "
        "tau_details.json.",
        "",
        "| dataset | " + " | ".join(NAMES[a] for a in algs) + " | DSpark / EAGLE-3 | DSpark / DFlash |",
        "|---|" + "---|" * (len(algs) + 2),
    ]

    def pct(a: float, b: float) -> str:
        return f"{(a / b - 1) * 100:+.1f}%" if b and b == b and a == a else "n/a"

    for n in datasets:
        row = [A[a]["tau_pooled"].get(n, float("nan")) for a in algs]
        cells = " | ".join(f"{v:.2f} [{A[a]['tau_ci95'][n][0]:.2f}, {A[a]['tau_ci95'][n][1]:.2f}]"
                           if A[a]["tau_ci95"].get(n) else f"{v:.2f}" for v, a in zip(row, algs))
        t = {a: A[a]["tau_pooled"].get(n, float("nan")) for a in algs}
        lines.append(f"| {n} | {cells} | {pct(t.get('dspark', float('nan')), t.get('eagle3', float('nan')))} "
                     f"| {pct(t.get('dspark', float('nan')), t.get('dflash', float('nan')))} |")
    m = summary["macro_tau"]
    bundled = [n for n in datasets if n != "holdout"]
    mb = {a: _macro(A[a]["tau_pooled"], bundled) for a in algs}
    lines.append(f"| **macro (all {len(datasets)})** | " + " | ".join(f"**{m[a]:.3f}**" for a in algs)
                 + f" | **{pct(m.get('dspark', 0), m.get('eagle3', 0))}** | **{pct(m.get('dspark', 0), m.get('dflash', 0))}** |")
    lines.append("| macro (8 bundled sets) | " + " | ".join(f"{mb[a]:.3f}" for a in algs)
                 + f" | {pct(mb.get('dspark', 0), mb.get('eagle3', 0))} | {pct(mb.get('dspark', 0), mb.get('dflash', 0))} |")
    lines += [
        "",
        "Cells: pooled tau [95% bootstrap interval over prompts].",
        "",
        "| macro tau gain | this run | paper (Qwen3-4B/8B/14B, temperature 1) |",
        "|---|---|---|",
        f"| DSpark / EAGLE-3 | {pct(m.get('dspark', 0), m.get('eagle3', 0))} | +{PAPER['dspark/eagle3'][0]}% .. +{PAPER['dspark/eagle3'][1]}% |",
        f"| DSpark / DFlash | {pct(m.get('dspark', 0), m.get('dflash', 0))} | +{PAPER['dspark/dflash'][0]}% .. +{PAPER['dspark/dflash'][1]}% |",
        "",
        "## Speedup (same engine, same run: plain autoregressive decoding of the target interleaved per prompt)",
        "",
        f"Clock: {first['settings']['clock']} ({'CPU time of the process' if first['settings']['clock'] == 'process' else 'wall'}), "
        f"{first['settings']['torch_threads']} torch thread(s); warm-up excluded; all prompts above.",
        "",
        "| drafter | tau (all prompts) | acceptance | tok/s | plain tok/s | speedup | decode-only speedup | lossless |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in algs:
        s, ll = A[a]["speedup"], A[a]["lossless"]
        lines.append(f"| {NAMES[a]} | {_overall_tau(A[a]):.2f} | {A[a]['acceptance_rate']:.3f} | {s['tokens_per_s']:.2f} | "
                     f"{s['plain_tokens_per_s']:.2f} | {s['speedup']:.2f}x | {s['decode_speedup']:.2f}x | "
                     f"{'yes' if ll['passed'] else 'NO'} ({ll['identical']}/{ll['checked']} identical, {ll['ties']} float ties) |")
    lines += [
        "",
        "## Training budget (identical for the three)",
        "",
        f"Data: {first['train']['train_sequences']} regenerated training conversations (target answers at temperature "
        f"{cfg.regenerate.temperature}, top-p {cfg.regenerate.top_p}, top-k {cfg.regenerate.top_k}, at most "
        f"{cfg.regenerate.max_new_tokens} new tokens a turn), cache {cfg.cache.dtype}, sequences cut at {cfg.cache.max_seq_len} tokens. "
        f"Steps {tc.max_steps}, batch {tc.batch_size}, AdamW lr {tc.lr} (warm-up {tc.warmup_ratio}, cosine to 0), "
        f"grad clip {tc.grad_clip}, mixed precision {tc.mixed_precision}, seed {cfg.run.seed}; DFlash/DSpark: "
        f"{cfg.drafter.num_layers} layers, up to {tc.max_anchors} anchors a sequence; DSpark: Markov rank {cfg.drafter.markov_rank} "
        f"({cfg.drafter.markov_head_type}), confidence head; EAGLE-3: 1 layer, {cfg.drafter.ttt_steps} TTT steps, full vocabulary. "
        "The evaluated weights are `last/` (after the whole budget).",
        "",
        "| drafter | steps | sequences seen | tokens seen | draft positions trained | trainable params | train wall (min) | eval wall (min) | held-out greedy sim. tau |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in algs:
        t, w = A[a]["train"], A[a]["wall_s"]
        tw = t["durations_s"].get("train", 0) / 60
        ew = w.get("evaluate_s")
        lines.append(f"| {NAMES[a]} | {t['steps']} | {t['sequences_seen']} | {t['tokens_seen']:,} | {t['positions_trained']:,} | "
                     f"{t['trainable_parameters']:,} | {tw:.1f} | {'' if ew is None else f'{ew / 60:.1f}'} | "
                     f"{t['holdout_sim_tau_greedy']:.3f} |")
    lines += ["", "## Commands", "", "```", *details["commands"], "```", ""]
    return "\n".join(lines)


def _overall_tau(a: dict) -> float:
    emitted = sum(a["tau_pooled"][n] * a["rounds"][n] for n in a["rounds"])
    rounds = sum(a["rounds"].values())
    return emitted / rounds if rounds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "bench" / "tau_smollm2.yaml")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--jobs", type=int, default=2, help="algorithms trained/evaluated at a time")
    parser.add_argument("--demo-n", type=int, default=800, help="demo-logs conversations (when no log exists)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    parser.add_argument("--stem", default="tau", help="result file names (and eval folders when not tau)")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended to tau.md (findings)")
    args = parser.parse_args()

    config = args.config.resolve()
    cfg = load_config(config, args.overrides)
    data_dir = Path(cfg.run.data_dir)
    algorithms = [a for a in args.algorithms.split(",") if a]
    run = Runner(config, args.overrides, data_dir)
    times_path = data_dir / f"bench_times_{args.stem}.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    if not args.report_only:
        prepare_data(run, cfg, args.demo_n)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {a: pool.submit(algorithm_pipeline, run, a, args.stem) for a in algorithms}
            for a, f in futures.items():
                times[a] = times.get(a, {}) | f.result()
                atomic_write_json(times_path, times)
    else:
        run.commands = json.loads((data_dir / f"bench_commands_{args.stem}.json").read_text()) if (data_dir / f"bench_commands_{args.stem}.json").is_file() else []
    if run.commands and not args.report_only:
        atomic_write_json(data_dir / f"bench_commands_{args.stem}.json", run.commands)

    details = collect(cfg, data_dir, algorithms, run.commands, times, args.stem)
    bench_cmd = "DRAFTER_MODELS=/work/main/.drafter/models python bench/tau_comparison.py -c " + \
        str(config.relative_to(ROOT)) + "".join(f" -s {shlex.quote(o)}" for o in args.overrides)
    details["commands"] = [bench_cmd, "# which runs:", *run.commands]
    first = details["algorithms"][algorithms[0]]
    datasets = list(first["tau_pooled"])
    summary = ratios(details, datasets)
    details["summary"] = summary
    details["paper_gain_percent"] = PAPER
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{args.stem}.json", {
        "target": details["target"],
        "algorithms": {a: details["algorithms"][a]["tau_pooled"] for a in algorithms},
    })
    atomic_write_json(RESULTS / f"{args.stem}_details.json", details)
    text = render(details, summary, cfg, datasets)
    if args.notes and args.notes.is_file():
        text += "\n" + args.notes.read_text()
    atomic_write_text(RESULTS / f"{args.stem}.md", text)
    print(text)


if __name__ == "__main__":
    main()
