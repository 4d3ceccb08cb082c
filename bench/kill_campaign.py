"""Kill campaign: SIGKILL every resumable stage at random points, resume it, compare with a
run that was never interrupted.

    python bench/kill_campaign.py [--kills 20] [--seed 0] [--conversations 80]
                                  [--stages ingest,regenerate,build-cache,train,registry]
                                  [--ingest-set ingest.workers=2 ...]
                                  [--work /tmp/drafter-kill-campaign] [--force]

Stages: ingest, regenerate, build-cache, train (each the real `python -m drafter` CLI on the
tiny in-process target) and registry decisions (a `python -c` driver running a fixed sequence
of approve / reject / rollback / promote calls on a real MLflow SQLite store).

Per stage: an uninterrupted reference run gives the expected output and the stage's working
time (from its manifest; the registry driver reports its own). A round starts from a fresh
output; 1-3 runs of the same command are SIGKILLed in a row, each when the process has used a
CPU time drawn uniformly over the CPU seconds of the reference run's working part (after
interpreter start-up and imports; CPU rather than wall time, so a loaded machine does not
push the kills out of the work), then the command runs again to completion and its output
is compared with the reference. A run that finishes before its kill lands ends the round early. Rounds go on
until `--kills` kills have landed.

What is compared (lost / duplicated / mismatches):
- ingest (rounds alternate a first ingest and an incremental one that appends to a published
  output): kept conversations by id; rows, split, quarantine.jsonl, dropped.jsonl,
  watermarks and the manifest's counts identical.
- regenerate: conversations by id, identical records (greedy decoding on the tiny target).
- build-cache: samples by id, every tensor identical; the manifest's counts identical.
- train: loss history step by step, held-out evaluations, best step, and the sha256 of the
  exported weights (last/ and best/); checkpoint_every is small so kills land between checkpoints.
- registry: after every kill and after every resume, the aliases agree with the decision log
  (production and previous = the last complete entry's; an interrupted last entry allows
  its before or after state), no step has two complete entries, every version's
  approval.state is the last decision the log holds for it; after the resume, each step's
  production_after and the final aliases and states equal the reference sequence's.

Writes bench/results/kill_campaign.json (after each stage: a re-run skips finished stages
unless --force) and bench/results/kill_campaign.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TINY = ROOT / "configs" / "tiny.yaml"
PY = sys.executable
STAGES = ("ingest", "regenerate", "build-cache", "train", "registry")


# ----- processes ---------------------------------------------------------------------------
def stage_env(work: Path) -> dict[str, str]:
    """Every subprocess: state, MLflow store and models under `work`, one torch thread (the
    reference and the resumed runs must compute in the same order to be compared bit for bit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_"))}
    env |= {"DRAFTER_HOME": str(work / "home"), "MLFLOW_TRACKING_URI": store_uri(work), "OMP_NUM_THREADS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "TQDM_DISABLE": "1"}
    return env


def store_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def launch(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        # Its own process group: the kill takes any child (git, a tokenizer pool) with it.
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) the process has used so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def run_killed(cmd: list[str], env: dict[str, str], log: Path, at_cpu_s: float,
               timeout: float) -> tuple[bool, int | None, float, float]:
    """Start `cmd`, SIGKILL it once it has used `at_cpu_s` CPU seconds (CPU, not wall time: the
    machine's load does not move the kill out of the work). -> (landed, exit code if it ended
    first, wall seconds, the last CPU seconds seen)."""
    start = time.monotonic()
    proc = launch(cmd, env, log)
    seen = 0.0
    while proc.poll() is None:
        used = cpu_seconds(proc.pid)
        seen = used if used is not None else seen
        if (used is not None and used >= at_cpu_s) or time.monotonic() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, None, time.monotonic() - start, seen
        time.sleep(0.01)
    return False, proc.returncode, time.monotonic() - start, seen


def run_to_end(cmd: list[str], env: dict[str, str], log: Path, timeout: float,
               timeline: list[tuple[float, float]] | None = None) -> tuple[int, float]:
    """Run `cmd` to its end. -> (exit code, wall seconds); `timeline` gets (wall, CPU) samples."""
    start = time.monotonic()
    proc = launch(cmd, env, log)
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -1, time.monotonic() - start
        if timeline is not None and (used := cpu_seconds(proc.pid)) is not None:
            timeline.append((time.monotonic() - start, used))
        time.sleep(0.02)
    return proc.returncode, time.monotonic() - start


def tail(log: Path, n: int = 1500) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else ""


# ----- small comparison helpers ---------------------------------------------------------------
def by_id(records: list[dict], key: str = "id") -> tuple[dict[str, dict], int]:
    """{id: record} and how many records repeat an id already seen."""
    seen: dict[str, dict] = {}
    dup = 0
    for r in records:
        rid = str(r[key])
        dup += rid in seen
        seen.setdefault(rid, r)
    return seen, dup


def keyed_diff(ref: dict[str, Any], got: dict[str, Any], out: list[dict] | None = None) -> tuple[int, int]:
    """(lost, differing) between two {id: value} maps; the first few differences go to `out`."""
    lost = sum(k not in got for k in ref)
    differ = [k for k in ref if k in got and got[k] != ref[k]]
    extra = [k for k in got if k not in ref]  # in the output but never in the reference: a mismatch too
    if out is not None:
        out.extend({"id": k, "why": "differs"} for k in differ[:3])
        out.extend({"id": k, "why": "not in the reference"} for k in extra[:3])
    return lost, len(differ) + len(extra)


def lines_diff(a: Path, b: Path) -> int:
    """Lines in one file and not the other (as multisets): 0 when the files hold the same lines."""
    ca = Counter(a.read_bytes().splitlines()) if a.is_file() else Counter()
    cb = Counter(b.read_bytes().splitlines()) if b.is_file() else Counter()
    return sum(((ca - cb) + (cb - ca)).values())


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out |= flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: obj}


def counts_diff(ref: Path, got: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Keys of the manifests' counts that differ (minus `skip` substrings)."""
    if not got.is_file():
        return ["<no manifest>"]
    a = flat(json.loads(ref.read_text())["counts"])
    b = flat(json.loads(got.read_text())["counts"])
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not any(s in k for s in skip))


def result(lost: int, duplicated: int, mismatches: int, **detail: Any) -> dict[str, Any]:
    return {"lost": lost, "duplicated": duplicated, "mismatches": mismatches, **detail}


def manifest_work(out: Path, keys: Callable[[str], bool]) -> float:
    durations = json.loads((out / "manifest.json").read_text())["durations_s"]
    return sum(v for k, v in durations.items() if keys(k))


# ----- the stages ------------------------------------------------------------------------------
@dataclass
class Stage:
    """How to run one stage, prepare a round's fresh output, see how far a killed run got,
    and compare an output with the reference."""

    name: str
    command: Callable[[Path], list[str]]  # round folder -> argv
    fresh: Callable[[Path, str], None]  # (round folder, variant): the state a round starts from
    progress: Callable[[Path], dict]
    compare: Callable[[Path, Path], dict]  # (reference round folder, resumed round folder)
    work_s: Callable[[Path], float]  # seconds of work at the end of a reference run
    variants: tuple[str, ...] = ("",)  # rounds take them in turn; each has its own reference run


def ingest_stage(work: Path, logs: Path, base: Path, sets: tuple[str, ...] = ()) -> Stage:
    def command(rd: Path) -> list[str]:
        return [PY, "-m", "drafter", "ingest", str(logs), "--out", str(rd / "out"), "-c", str(TINY),
                "-s", f"run.data_dir={work / 'data'}", *[a for kv in sets for a in ("-s", kv)]]

    def fresh(rd: Path, variant: str) -> None:
        _plain_fresh(rd, variant)
        if variant == "incremental":  # the first part is published; the lines logged since go in
            shutil.copytree(base, rd / "out")

    def progress(rd: Path) -> dict:
        staged = rd / ".out.work" / "train.new.arrow"
        return {"published": (rd / "out" / "manifest.json").is_file(),
                "run_in_progress": (rd / ".out.work").is_dir(),
                "staged_train_bytes": staged.stat().st_size if staged.is_file() else 0,
                "swap_cut": (rd / ".out.old").exists()}

    def compare(ref: Path, got: Path) -> dict:
        from datasets import load_from_disk

        a, b, diffs = ref / "out", got / "out", []
        rows_ref, rows_got, dup = {}, {}, 0
        for split in ("train", "holdout"):
            for rows, folder in ((rows_ref, a), (rows_got, b)):
                if (folder / split / "dataset_info.json").is_file():
                    for row in load_from_disk(str(folder / split)):
                        dup += rows is rows_got and row["id"] in rows_got
                        rows[row["id"]] = {**row, "split": split}
        lost, differ = keyed_diff(rows_ref, rows_got, diffs)
        files = {name: lines_diff(a / name, b / name) for name in ("quarantine.jsonl", "dropped.jsonl")}
        marks = 0 if _json(a / "watermarks.json") == _json(b / "watermarks.json") else 1
        counts = counts_diff(a / "manifest.json", b / "manifest.json")
        return result(lost, dup, differ + sum(files.values()) + marks + len(counts), conversations=len(rows_ref),
                      line_diffs=files, watermarks_differ=bool(marks), counts_differ=counts, examples=diffs)

    return Stage("ingest", command, fresh, progress, compare,
                 lambda rd: manifest_work(rd / "out", lambda k: k == "total"), ("scratch", "incremental"))


def regenerate_stage(work: Path, ingested: Path) -> Stage:
    def command(rd: Path) -> list[str]:
        # Greedy: sampled answers depend on the RNG stream, which a resumed run does not replay.
        return [PY, "-m", "drafter", "regenerate", "--in", str(ingested), "--out", str(rd / "out"), "-c", str(TINY),
                "-s", "regenerate.limit=null", "-s", "regenerate.temperature=0", "-s", f"run.data_dir={work / 'data'}"]

    def progress(rd: Path) -> dict:
        part = rd / "out" / ".partial"
        return {s: len((part / f"{s}.jsonl").read_bytes().splitlines()) if (part / f"{s}.jsonl").is_file() else 0
                for s in ("train", "holdout")} | {"published": (rd / "out" / "manifest.json").is_file()}

    def compare(ref: Path, got: Path) -> dict:
        from drafter.regenerate import read_jsonl

        diffs, lost, dup, differ, n = [], 0, 0, 0, 0
        for split in ("train", "holdout"):
            want, _ = by_id(read_jsonl(ref / "out" / f"{split}.jsonl"))
            have, d = by_id(read_jsonl(got / "out" / f"{split}.jsonl"))  # none (no file): all lost
            l_, m = keyed_diff(want, have, diffs)
            lost, dup, differ, n = lost + l_, dup + d, differ + m, n + len(want)
        errors = lines_diff(ref / "out" / "errors.jsonl", got / "out" / "errors.jsonl")
        counts = counts_diff(ref / "out" / "manifest.json", got / "out" / "manifest.json")
        return result(lost, dup, differ + errors + len(counts), conversations=n, counts_differ=counts,
                      examples=diffs)

    return Stage("regenerate", command, _plain_fresh, progress, compare,
                 lambda rd: manifest_work(rd / "out", lambda k: k.startswith(("generate_", "load_backend"))))


def cache_stage(work: Path, regenerated: Path) -> Stage:
    def command(rd: Path) -> list[str]:
        # A store per round: the content-addressed cache would otherwise be found and reused.
        return [PY, "-m", "drafter", "build-cache", "--in", str(regenerated), "--out", str(rd / "out"),
                "-c", str(TINY), "-s", f"cache.root={rd / 'store'}", "-s", f"run.data_dir={work / 'data'}"]

    def progress(rd: Path) -> dict:
        store = rd / "store"
        return {"shards_done": len(list(store.glob("*.partial/shards/shard-*.json"))),
                "caches_published": len(list(store.glob("*/index.json")))}

    def compare(ref: Path, got: Path) -> dict:
        import torch

        from drafter.cache import open_split

        diffs, lost, dup, differ, n = [], 0, 0, 0, 0
        for split in ("train", "holdout"):
            want = open_split(ref / "out", split)
            try:
                have = open_split(got / "out", split)
            except Exception as exc:  # noqa: BLE001 - no usable output: everything is lost
                diffs.append({"split": split, "why": f"{type(exc).__name__}: {exc}"})
                lost, n = lost + len(want), n + len(want)
                continue
            at = {}
            for i, sid in enumerate(have.ids):
                dup += sid in at
                at.setdefault(sid, i)
            for i, sid in enumerate(want.ids):
                n += 1
                if sid not in at:
                    lost += 1
                    continue
                x, y = want[i], have[at[sid]]
                if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                    differ += 1
                    diffs.append({"id": sid, "why": "tensors differ"})
            differ += sum(sid not in set(want.ids) for sid in at)
        counts = counts_diff(ref / "out" / "manifest.json", got / "out" / "manifest.json", skip=("reused",))
        return result(lost, dup, differ + len(counts), samples=n, counts_differ=counts, examples=diffs[:6])

    return Stage("build-cache", command, _plain_fresh, progress, compare,
                 lambda rd: manifest_work(rd / "out", lambda k: k.startswith("build_")))


TRAIN_TIMING = ("tokens_per_s", "cpu_s")  # wall/CPU clocks: differ between any two runs


def train_stage(work: Path, cache: Path, steps: int, checkpoint_every: int) -> Stage:
    def command(rd: Path) -> list[str]:
        return [PY, "-m", "drafter", "train", "--cache", str(cache), "--out", str(rd / "out"), "-c", str(TINY),
                "-s", f"train.max_steps={steps}", "-s", f"train.checkpoint_every={checkpoint_every}",
                "-s", "train.eval_every=10", "-s", "train.batch_size=8", "-s", f"run.data_dir={work / 'data'}"]

    def progress(rd: Path) -> dict:
        from drafter.checkpoint import latest_checkpoint

        latest = latest_checkpoint(rd / "out" / "checkpoints")
        return {"checkpoint": int(latest.name.split("-")[1]) if latest else None,
                "finished": (rd / "out" / "manifest.json").is_file()}

    def compare(ref: Path, got: Path) -> dict:
        from drafter.manifest import sha256_file

        want = json.loads((ref / "out" / "metrics.json").read_text())
        path = got / "out" / "metrics.json"
        have = json.loads(path.read_text()) if path.is_file() else {"history": [], "evals": []}

        def strip(h: dict) -> dict:
            return {k: v for k, v in h.items() if k not in TRAIN_TIMING}

        ref_steps = {str(h["step"]): strip(h) for h in want["history"]}
        got_steps, dup = by_id(have["history"], "step")
        lost, differ = keyed_diff(ref_steps, {k: strip(v) for k, v in got_steps.items()})
        evals = 0 if want["evals"] == have["evals"] else 1
        weights = {}
        for which in ("last", "best"):
            w = got / "out" / which / "model.safetensors"
            weights[which] = w.is_file() and sha256_file(w) == sha256_file(ref / "out" / which / "model.safetensors")
        best = 0 if want.get("best_step") == have.get("best_step") else 1
        counts = counts_diff(ref / "out" / "manifest.json", got / "out" / "manifest.json")
        return result(lost, dup, differ + evals + best + sum(not ok for ok in weights.values()) + len(counts),
                      steps=len(ref_steps), steps_differ=differ, evals_differ=bool(evals), same_weights=weights,
                      counts_differ=counts)

    return Stage("train", command, _plain_fresh, progress, compare,
                 lambda rd: manifest_work(rd / "out", lambda k: k in ("evaluate", "train", "checkpoint")))


def _plain_fresh(rd: Path, variant: str = "") -> None:
    shutil.rmtree(rd, ignore_errors=True)
    rd.mkdir(parents=True)


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# ----- registry decisions ------------------------------------------------------------------------
# (operation, version, force): force where the gate was run against another production or the
# version was rejected before (the decision is logged with what it overrode).
DECISIONS = [
    ("approve", "1", True), ("approve", "2", True), ("reject", "3", False), ("rollback", None, False),
    ("approve", "4", True), ("reject", "2", False), ("rollback", None, False), ("rollback", None, False),
    ("approve", "3", True), ("promote", "1", False), ("approve", "2", True), ("rollback", None, False),
]
# The driver a person would run: each decision of the sequence that the log does not hold as
# complete is made (again); the ones it holds are not. Prints the decisions' time at the end.
DRIVER = """
import json, sys, time
from drafter import registry
name, steps = sys.argv[1], json.loads(sys.argv[2])
done = {e["via"] for e in registry.decision_log(name) if e["complete"]}
start = time.monotonic()  # mlflow imported, store open: the decisions start
for i, (op, version, force) in enumerate(steps):
    step = "kill-campaign step %d" % i  # the log's `via`: promote records no reason of its own
    if step in done:
        continue
    if op == "approve":
        registry.approve(name, version, by="kill-campaign", reason=step, via=step, force=force)
    elif op == "reject":
        registry.reject(name, version, by="kill-campaign", reason=step, via=step)
    elif op == "promote":
        registry.promote(name, version, by="kill-campaign", via=step)
    else:
        registry.rollback(name, by="kill-campaign", reason=step, via=step)
print(json.dumps({"work_s": time.monotonic() - start}))
"""


def registry_setup(work: Path, name: str, versions: int = 4) -> None:
    """A fresh registered model with `versions` pending candidates (gate passed against no production)."""
    from drafter import registry
    from drafter.config import load_config
    from tests.lifecycle_fixtures import make_drafter, passing_gate

    cfg = load_config(TINY, [f"registry.model_name={name}", f"run.data_dir={work / 'data'}"])
    for v in range(1, versions + 1):
        folder = make_drafter(work / "registry" / "drafters" / name / str(v), seed=v)
        registry.register_candidate(cfg, folder, gate_verdict=passing_gate(), lineage={"target_name": "tiny"},
                                    data_profile={})


def registry_view(name: str) -> dict[str, Any]:
    """Aliases, approval state per version and the decision log entries of the sequence."""
    from drafter import registry

    c = registry.client()
    log = registry.decision_log(name)
    states = {str(mv.version): mv.tags.get("approval.state", "") for mv in c.search_model_versions(f"name='{name}'")}
    return {"aliases": registry.aliases(name, c), "states": states, "log": log}


def _step_of(entry: dict) -> int | None:
    """Which step of the sequence an entry is (the driver passes it as `via`)."""
    via = entry["via"]
    return int(via.rsplit(" ", 1)[1]) if via.startswith("kill-campaign step ") else None


def _intended(entry: dict) -> tuple[str, str]:
    """(production, previous) once the entry's decision has fully applied."""
    prod, prev = entry["production_before"], entry["previous_before"]
    op, v = entry["decision"], entry["version"]
    if op in ("approved", "promote"):
        return v, (prod if prod != v else prev)
    if op == "rollback":
        return prev, ""
    return prod, prev


def registry_consistency(view: dict, just_killed: bool = False) -> list[str]:
    """Problems between the aliases, the approval states and the decision log. Just after a
    kill the last entry may be interrupted: production may then be its before or its after
    state (previous may be half-moved); otherwise both aliases must be the last complete entry's."""
    problems = []
    log = view["log"]
    prod, prev = view["aliases"].get("production", ""), view["aliases"].get("previous", "")
    complete = [e for e in log if e["complete"]]
    if log and not log[-1]["complete"]:
        last = log[-1]
        if not just_killed:
            problems.append(f"the last entry ({last['decision']} {last['version']}) is still interrupted")
        allowed = {last["production_before"], _intended(last)[0]}
        if prod not in allowed:
            problems.append(f"production {prod or '-'} is neither before ({last['production_before'] or '-'}) nor "
                            f"after the interrupted {last['decision']} {last['version']}")
    elif complete and (prod, prev) != (complete[-1]["production_after"], complete[-1]["previous_after"]):
        problems.append(f"production/previous {prod or '-'}/{prev or '-'} differ from the last complete entry's "
                        f"{complete[-1]['production_after'] or '-'}/{complete[-1]['previous_after'] or '-'}")
    steps = Counter(e["via"] for e in complete if _step_of(e) is not None)
    problems += [f"{r} recorded {n} times" for r, n in steps.items() if n > 1]
    for version, state in view["states"].items():
        decided = [e for e in log if e["version"] == version and e["decision"] in ("approved", "rejected")]
        if not decided:
            if state != "pending":
                problems.append(f"version {version} is {state} without a decision in the log")
            continue
        allowed = {decided[-1]["decision"]}
        if not decided[-1]["complete"]:  # interrupted: the state tag is written last
            earlier = [e for e in decided[:-1] if e["complete"]]
            allowed.add(earlier[-1]["decision"] if earlier else "pending")
        if state not in allowed:
            problems.append(f"version {version} is {state}; the log says {sorted(allowed)}")
    return problems


def registry_compare(ref: dict, got: dict) -> dict:
    """Against the uninterrupted sequence: each step's complete entry and the final state."""
    def steps(view: dict) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for e in view["log"]:
            i = _step_of(e)
            if i is not None:
                out.setdefault(i, []).append(e)
        return out

    want, have = steps(ref), steps(got)
    lost = dup = differ = 0
    detail = []
    for i in sorted(want):
        done = [e for e in have.get(i, []) if e["complete"]]
        if not done:
            lost += 1
            continue
        dup += len(done) - 1
        w = [e for e in want[i] if e["complete"]][-1]
        if (done[-1]["production_after"], done[-1]["previous_after"]) != (w["production_after"], w["previous_after"]):
            differ += 1
            detail.append(f"step {i} {w['decision']}: production/previous after "
                          f"{done[-1]['production_after'] or '-'}/{done[-1]['previous_after'] or '-'}, "
                          f"uninterrupted {w['production_after'] or '-'}/{w['previous_after'] or '-'}")
    final = {"aliases": got["aliases"] == ref["aliases"], "states": got["states"] == ref["states"]}
    problems = registry_consistency(got)
    return result(lost, dup, differ + sum(not ok for ok in final.values()) + len(problems), steps=len(want),
                  interrupted_entries=sum(not e["complete"] for e in got["log"]), final_state_equal=final,
                  inconsistencies=problems, examples=detail,
                  final={"aliases": got["aliases"], "states": got["states"]},
                  reference={"aliases": ref["aliases"], "states": ref["states"]})


def registry_stage(work: Path) -> Stage:
    refs: dict[Path, dict] = {}

    def name_of(rd: Path) -> str:
        return (rd / "model_name").read_text()

    def command(rd: Path) -> list[str]:
        return [PY, "-c", DRIVER, name_of(rd), json.dumps(DECISIONS)]

    def fresh(rd: Path, variant: str) -> None:
        _plain_fresh(rd)
        # A new registered model per round (a unique name: the store keeps the old rounds').
        (rd / "model_name").write_text(f"kc-{rd.name}-{time.time_ns() % 10**12}")
        registry_setup(work, name_of(rd))

    def progress(rd: Path) -> dict:
        view = registry_view(name_of(rd))
        return {"entries": len(view["log"]), "complete": sum(e["complete"] for e in view["log"]),
                "aliases": view["aliases"], "inconsistencies": registry_consistency(view, just_killed=True)}

    def compare(ref: Path, got: Path) -> dict:
        if ref not in refs:
            refs[ref] = registry_view(name_of(ref))
        return registry_compare(refs[ref], registry_view(name_of(got)))

    def work_s(rd: Path) -> float:
        lines = [l for l in tail(rd / "run.log", 4000).splitlines() if l.startswith('{"work_s"')]
        return json.loads(lines[-1])["work_s"]

    return Stage("registry", command, fresh, progress, compare, work_s)


# ----- inputs -------------------------------------------------------------------------------------
def prepare_inputs(work: Path, conversations: int, seed: int, env: dict[str, str], log: Path) -> dict[str, Path]:
    """The demo log (and its first 60% published as the incremental base), idempotently."""
    logs = work / "ingest" / "logs"
    base = work / "ingest" / "base"
    done = logs / "done"
    if (base / "manifest.json").is_file() and done.is_file() and done.read_text().endswith(f"code {code_key()}\n"):
        return {"logs": logs, "base": base}
    shutil.rmtree(work / "ingest", ignore_errors=True)
    demo = work / "ingest" / "demo"
    rc, _ = run_to_end([PY, "-m", "drafter", "demo-logs", "--out", str(demo), "--n", str(conversations),
                        "--seed", str(seed)], env, log, 600)
    assert rc == 0, tail(log)
    lines = (demo / "chat-completions.jsonl").read_bytes().splitlines(keepends=True)
    cut = int(len(lines) * 0.6)
    logs.mkdir(parents=True)
    log_file = logs / "chat-completions.jsonl"
    log_file.write_bytes(b"".join(lines[:cut]))
    rc, _ = run_to_end([PY, "-m", "drafter", "ingest", str(logs), "--out", str(base), "-c", str(TINY),
                        "-s", f"run.data_dir={work / 'data'}"], env, log, 900)
    assert rc == 0, tail(log)
    with log_file.open("ab") as f:  # the traffic since: the incremental rounds ingest it
        f.write(b"".join(lines[cut:]))
    done.write_text(f"{len(lines)} lines, first {cut} in base, code {code_key()}\n")
    return {"logs": logs, "base": base}


def reference(stage: Stage, work: Path, variant: str, env: dict[str, str]) -> dict[str, Any]:
    """The uninterrupted run (kept and reused: later stages read it as their input)."""
    rd = work / stage.name / f"reference{('-' + variant) if variant else ''}"
    info = rd / "reference.json"
    kept = json.loads(info.read_text()) if info.is_file() else {}
    if kept.get("code") == code_key():
        return kept | {"dir": rd}
    shutil.rmtree(rd, ignore_errors=True)  # another code's reference (or none): run it again
    stage.fresh(rd, variant)
    timeline: list[tuple[float, float]] = []
    rc, wall = run_to_end(stage.command(rd), env, rd / "run.log", 1800, timeline)
    if rc != 0 or not timeline:
        raise RuntimeError(f"the reference {stage.name} run failed ({rc}):\n{tail(rd / 'run.log')}")
    work_s = stage.work_s(rd)
    # The kill window in CPU seconds: from the CPU time the run had used when its work began
    # (wall time minus the manifest's working time) to the CPU time it used in all.
    began = [cpu for t, cpu in timeline if t <= wall - work_s] or [timeline[0][1]]
    data = {"wall_s": round(wall, 2), "work_s": round(work_s, 2), "variant": variant, "code": code_key(),
            "cpu_window_s": [round(began[-1], 2), round(timeline[-1][1], 2)]}
    info.write_text(json.dumps(data))
    return data | {"dir": rd}


# ----- the campaign ---------------------------------------------------------------------------------
def campaign(stage: Stage, work: Path, env: dict[str, str], kills: int, seed: int, in_row: tuple[int, int] = (1, 3),
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rounds of `in_row` kills in a row then a resume, until `kills` kills have landed."""
    rng = random.Random(f"{seed}:{stage.name}")
    refs: dict[str, dict] = {}
    started = time.monotonic()
    totals = {"kills": 0, "lost": 0, "duplicated": 0, "mismatches": 0}
    rounds: list[dict] = []
    misses = failures = 0
    while totals["kills"] < kills:
        r = len(rounds)
        rd = work / stage.name / f"round-{r:03d}"
        variant = stage.variants[r % len(stage.variants)]
        stage.fresh(rd, variant)
        if variant not in refs:  # the rounds of a variant compare with one uninterrupted run of it
            refs[variant] = reference(stage, work, variant, env)
        ref = refs[variant]
        lo, hi = ref["cpu_window_s"]
        record: dict[str, Any] = {"round": r, "variant": variant or None, "kills": []}
        finished = None
        for _ in range(rng.randint(*in_row)):
            if totals["kills"] >= kills:
                break
            # The last tenth is left out: a run's total CPU varies by more than that on a loaded
            # machine (short stages: build-cache works ~1 s), and a kill drawn past the end of a
            # run that finished early is a miss, not a kill.
            at_cpu = rng.uniform(lo, lo + 0.9 * (hi - lo))
            landed, rc, wall, seen = run_killed(stage.command(rd), env, rd / "run.log", at_cpu, 20 * ref["wall_s"] + 300)
            if not landed:  # it ended first: that run was the resume
                finished = rc
                if not record["kills"] and rc == 0 and 0 < seen < hi:
                    # A whole run used less CPU than the reference did (OpenMP threads spin for
                    # longer on a loaded machine): shrink the window to this run's, in proportion.
                    lo, hi = lo * seen / hi, seen
                    ref["cpu_window_s"] = [round(lo, 2), round(hi, 2)]
                break
            totals["kills"] += 1
            record["kills"].append({"cpu_s": round(at_cpu, 2), "wall_s": round(wall, 2), "at": stage.progress(rd)})
        if finished is None:
            finished, seconds = run_to_end(stage.command(rd), env, rd / "run.log", 20 * ref["wall_s"] + 300)
            record["resume_s"] = round(seconds, 2)
        record["exit_code"] = finished
        outcome = stage.compare(ref["dir"], rd)
        # Findings beyond the output: a resume that fails, a state inconsistent right after a kill.
        at_kill = sum(len(k["at"].get("inconsistencies", [])) for k in record["kills"])
        outcome["mismatches"] += (finished != 0) + at_kill
        record |= outcome
        for k in ("lost", "duplicated", "mismatches"):
            totals[k] += outcome[k]
        rounds.append(record)
        log(f"[{stage.name}] round {r}: {len(record['kills'])} kill(s), exit {finished}, lost {outcome['lost']} "
            f"duplicated {outcome['duplicated']} mismatches {outcome['mismatches']}")
        if finished != 0:
            record["log_tail"] = tail(rd / "run.log")
            failures += 1
            if failures >= 3:
                raise RuntimeError(f"{stage.name}: {failures} rounds in a row end with a failed run; the last:\n"
                                   f"{record['log_tail']}")
            continue
        failures = 0
        misses += not record["kills"]
        if misses > 3 * kills:
            raise RuntimeError(f"{stage.name}: runs keep finishing before the kill (CPU window {lo}-{hi} s)")
    return {**totals, "rounds_total": len(rounds), "kill_window_cpu_s": [lo, hi],
            "reference": {v: {k: x for k, x in ref.items() if k != "dir"} for v, ref in refs.items()},
            "wall_s": round(time.monotonic() - started, 1), "rounds": rounds}


def build_stages(work: Path, env: dict[str, str], conversations: int, seed: int, steps: int,
                 checkpoint_every: int, names: list[str], log: Path, ingest_sets: tuple[str, ...] = ()) -> dict[str, Stage]:
    """The stages asked for, each fed by the previous stage's reference output."""
    # The MLflow store first: its creation (seconds of migrations) must not lengthen a reference run.
    rc, _ = run_to_end([PY, "-c", "from drafter import registry; registry.ensure_store()"], env, log, 600)
    assert rc == 0, tail(log)
    inputs = prepare_inputs(work, conversations, seed, env, log)
    ingest = ingest_stage(work, inputs["logs"], inputs["base"], ingest_sets)
    stages = {"ingest": ingest}
    wanted = set(names)
    needs = {"regenerate": 1, "build-cache": 2, "train": 3}
    depth = max((needs.get(n, 0) for n in wanted), default=0)
    if depth >= 1:
        ingested = reference(ingest, work, "scratch", env)["dir"] / "out"
        stages["regenerate"] = regenerate_stage(work, ingested)
    if depth >= 2:
        regenerated = reference(stages["regenerate"], work, "", env)["dir"] / "out"
        stages["build-cache"] = cache_stage(work, regenerated)
    if depth >= 3:
        cache = reference(stages["build-cache"], work, "", env)["dir"] / "out"
        stages["train"] = train_stage(work, cache, steps, checkpoint_every)
    if "registry" in wanted:
        stages["registry"] = registry_stage(work)
    return {n: stages[n] for n in names}


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()]}


def code_key() -> str:
    """The commit the inputs and references were made with: kept runs of other code are redone
    (an incremental round onto a base of other code compares two versions, not a kill)."""
    state = code_state()
    return f"{state['commit']}{'+dirty' if state['dirty'] else ''}"


def code_state() -> dict[str, Any]:
    """The commit the stages ran (run the campaign from a clean worktree: others' edits in
    progress would otherwise be what is killed)."""
    from drafter.manifest import git_state

    return {"root": str(ROOT), **git_state(ROOT)}


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Kill campaign: SIGKILL at random points, resume, compare with an uninterrupted run", "",
        f"Command: `{doc['command']}` (seed {doc['seed']}; commit {str(doc['code'].get('commit'))[:10]}; "
        f"{doc['machine']['cpu_count']} CPUs, load average {doc['machine']['load_average']} at the start)", "",
        "| stage | kills | rounds | lost | duplicated | mismatches | kill window, CPU s | stage wall s | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in doc["stages"].items():
        lines.append(f"| {name} | {s['kills']} | {s['rounds_total']} | {s['lost']} | {s['duplicated']} | "
                     f"{s['mismatches']} | {s['kill_window_cpu_s'][0]}-{s['kill_window_cpu_s'][1]} | {s['wall_s']} | "
                     f"{str((s.get('code') or doc['code']).get('commit'))[:10]} |")
    lines += ["", doc.get("notes", "")]
    return "\n".join(lines).rstrip() + "\n"


NOTES = (
    "Each round starts from a fresh output (ingest alternates a first ingest and an incremental one onto a "
    "published output), takes 1-3 SIGKILLs in a row of the real command, each when the process has used a CPU "
    "time drawn uniformly over the CPU seconds of the reference run's working part (after interpreter start-up, "
    "imports and model loading; CPU time, so the machine's load does not shift the kills), then runs the command "
    "to completion. lost = in the reference output, not in the resumed one; "
    "duplicated = an id (a training step, a registry step) twice; mismatches = records, tensors, steps, weights, "
    "manifest counts, registry states that differ from the uninterrupted run, plus inconsistencies between the "
    "registry's aliases, approval states and decision log, plus resumes that did not exit 0. "
    "Details per round (each kill's CPU and wall seconds and how far the killed run had got) are in "
    "kill_campaign.json."
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs that land, per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conversations", type=int, default=80, help="demo conversations (the logs)")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--ingest-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the killed ingest runs and their reference, e.g. ingest.workers=2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/drafter-kill-campaign"))
    parser.add_argument("--out", type=Path, default=RESULTS / "kill_campaign.json")
    parser.add_argument("--force", action="store_true",
                        help="run the --stages already in --out again (the other stages' results are kept)")
    args = parser.parse_args(argv)

    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(names) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = stage_env(work)
    os.environ.update({k: env[k] for k in ("DRAFTER_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY")})
    sys.path.insert(0, str(ROOT))

    command = "python bench/kill_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}  # --force replaces named stages only
    if doc.get("seed", args.seed) != args.seed or doc.get("kills_per_stage", args.kills) != args.kills:
        doc = {}  # another campaign: start over
    doc |= {"command": command.strip(), "seed": args.seed, "kills_per_stage": args.kills,
            "inputs": {"conversations": args.conversations, "config": "configs/tiny.yaml",
                       "train_steps": args.train_steps, "checkpoint_every": args.checkpoint_every,
                       "ingest_set": args.ingest_set,
                       "registry_decisions": [list(d) for d in DECISIONS]},
            "machine": machine(), "code": code_state(), "notes": NOTES}  # (this run's: each stage keeps its own)
    doc.setdefault("stages", {})
    todo = [n for n in names if args.force or n not in doc["stages"]]
    stages = build_stages(work, env, args.conversations, args.seed, args.train_steps, args.checkpoint_every, todo,
                          work / "inputs.log", tuple(args.ingest_set)) if todo else {}
    for name in todo:
        doc["stages"][name] = campaign(stages[name], work, env, args.kills, args.seed,
                                       log=lambda line: print(line, flush=True)) | {
            "command": command.strip(), "code": doc["code"], "machine": doc["machine"]}  # stages may come from different runs
        doc["stages"] = {n: doc["stages"][n] for n in STAGES if n in doc["stages"]}
        doc["wall_s"] = round(sum(s["wall_s"] for s in doc["stages"].values()), 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
