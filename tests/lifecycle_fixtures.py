"""Real inputs for the registry/flow/monitor tests: speculators-format folders with safetensors
weights, evaluation reports and gate verdicts shaped as the stages write them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]


def make_drafter(path: Path, algorithm: str = "dspark", tokens: int = 4, hidden: int = 16, seed: int = 0) -> Path:
    """A small speculators-format drafter folder: config.json + model.safetensors (+ calibration)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "fc.weight": rng.standard_normal((hidden, 3 * hidden)).astype(np.float32),
            "layers.0.mlp.weight": rng.standard_normal((hidden, hidden)).astype(np.float32),
        },
        str(path / "model.safetensors"),
    )
    config = {
        "speculators_model_type": algorithm,
        "architectures": [f"{algorithm.capitalize()}Speculator"],
        "block_size": tokens,
        "speculators_config": {
            "algorithm": algorithm,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "architectures": ["LlamaForCausalLM"]},
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "calibration.json").write_text(json.dumps({"temperatures": [1.0 + 0.1 * i for i in range(tokens)]}))
    return path


def make_eval(path: Path, taus: dict[str, float], accept: list[float] | None = None) -> Path:
    """An evaluation output folder: report.json (+ .md, acceptance.csv)."""
    path.mkdir(parents=True, exist_ok=True)
    accept = accept or [0.8, 0.6, 0.4, 0.2]
    macro = sum(taus.values()) / len(taus)
    report = {  # the fields of drafter.evaluate's report that the registry, gate and plots read
        "datasets": {name: {"tau": tau, "tau_pooled": tau, "accept_rate": accept, "accept_rate_at_k": accept}
                     for name, tau in taus.items()},
        "macro": {"tau": macro, "accept_rate": accept},
        "macro_tau": macro, "tau": dict(taus), "overall": {"tau_pooled": macro, "accept_rate_at_k": accept},
    }
    (path / "report.json").write_text(json.dumps(report))
    (path / "report.md").write_text("# Evaluation\n" + "\n".join(f"- {k}: {v}" for k, v in taus.items()))
    (path / "acceptance.csv").write_text("position,accept_rate\n" + "".join(f"{i + 1},{a}\n" for i, a in enumerate(accept)))
    (path / "manifest.json").write_text(json.dumps({"stage": "evaluate", "counts": {"datasets": len(taus)}}))
    return path


def verdict(passed: bool, reasons: list[str], **figures):
    """A gate verdict as `drafter.gates.gate` returns it (typed, with its markdown)."""
    from drafter.reports import GateVerdict

    head = "PASSED" if passed else "FAILED (macro_tau)"
    return GateVerdict(passed=passed, failed=[] if passed else ["macro_tau"], reasons=reasons,
                       markdown=f"# Promotion gate: {head}\n\n" + "".join(f"- {r}\n" for r in reasons), **figures)


def passing_gate():
    return verdict(True, ["macro tau above floor"], candidate_tau=2.5, production_tau=None)


def passing_verdict() -> dict:
    """A passing verdict as it crosses a Prefect task or flow boundary (JSON)."""
    return passing_gate().to_json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, health_url: str, log: Path, what: str) -> None:
    """Until `health_url` answers 200 (two minutes at most); the server's log if it dies first."""
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not become healthy")


def stop(proc: subprocess.Popen | None, timeout: float) -> None:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


_MIGRATE = {  # each library migrates a new SQLite database itself, in a process of its own
    "mlflow": ["-c", "from mlflow.tracking import MlflowClient; "
                     "MlflowClient('sqlite:///mlflow.db').search_experiments()"],  # in its working folder
    "prefect": ["-m", "prefect", "server", "database", "upgrade", "-y"],  # into $PREFECT_HOME/prefect.db
}


def migrated_database(kind: str, dest: Path) -> Path:
    """Put a copy of an empty MLflow or Prefect database at `dest`, already at its newest schema.

    A new store runs every migration on its first open (about 3 s for MLflow, 15 s for Prefect);
    the tests open a dozen. The library migrates one database per version, kept under
    .drafter/test-databases/ and shared by the test workers; each store starts from a copy."""
    import shutil
    import sqlite3
    import tempfile
    from importlib import metadata

    from filelock import FileLock

    folder = ROOT / ".drafter" / "test-databases"
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / f"{kind}-{metadata.version(kind)}.db"
    with FileLock(str(template) + ".lock"):
        if not template.is_file():
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                db = Path(tmp) / f"{kind}.db"
                env = {**os.environ, "PREFECT_HOME": tmp, "MLFLOW_DISABLE_TELEMETRY": "true"}
                env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
                env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
                subprocess.run([sys.executable, *_MIGRATE[kind]], cwd=tmp, env=env, check=True,
                               capture_output=True, timeout=300)
                if kind == "mlflow":  # the default experiment records its artifact folder: each copy makes its own
                    with sqlite3.connect(db) as con:
                        con.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
                        con.execute("DELETE FROM experiments WHERE experiment_id = 0")
                    con.close()
                os.replace(db, template)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, dest)
    return dest


def drain_prefect_events() -> None:
    """Stop Prefect's events workers. One worker per client type serves the whole process, bound
    to the API URL it started under: left running after its server stops, it sends every later
    test's events to the dead port (Prefect's own harness drains them on exit)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()


@contextmanager
def prefect_harness():
    """Prefect's test harness (a server subprocess on a temporary database), on a migrated copy."""
    import tempfile

    import pytest
    from prefect.testing import utilities

    drain_prefect_events()
    folder = tempfile.mkdtemp(prefix="prefect-harness-")
    migrated_database("prefect", Path(folder) / "prefect-test.db")  # the harness's file name in mkdtemp's folder
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utilities, "mkdtemp", lambda: folder)
        with utilities.prefect_test_harness(server_startup_timeout=120):
            yield


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, for the duration of a test module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        return self.start().wait()

    def start(self) -> MlflowServer:
        migrated_database("mlflow", self.root / "mlflow.db")
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.log = (self.root / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        return self

    def wait(self) -> MlflowServer:
        wait_healthy(self.proc, f"{self.url}/health", self.root / "server.log", "mlflow server")
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc, timeout=20)
        self.log.close()


# ----- stand-in stages ---------------------------------------------------------
# The retraining flow chains functions other engineers write (drafter/CONTRACTS.md). Until
# they merge, these stand-ins with the contract's signatures and outputs check the wiring:
# the order, the arguments, caching, MLflow runs, artifacts and the release. They do real
# file work (manifests, a HF dataset, safetensors) so every downstream reader is real.
def install_standin_stages(monkeypatch, calls: list, taus: dict, speedups: dict | None = None) -> None:
    """`taus[str(drafter_dir)]` (or `taus["default"]`) is what `evaluate` reports for a drafter;
    `speedups`, keyed the same way, its end-to-end speedup."""
    import types

    from drafter.manifest import read_manifest, write_manifest

    def module(name: str, **functions) -> None:
        mod = types.ModuleType(name)
        for key, fn in functions.items():
            setattr(mod, key, fn)
        monkeypatch.setitem(sys.modules, name, mod)

    def ingest(cfg, inputs, out_dir):
        from datasets import Dataset

        calls.append(("ingest", [str(p) for p in inputs], str(out_dir)))
        lines = [l for p in inputs for f in sorted(Path(p).glob("*.jsonl")) for l in f.read_text().splitlines() if l]
        domains = [json.loads(l).get("domain", "chat") for l in lines]
        out_dir = Path(out_dir)
        Dataset.from_dict({"id": [str(i) for i in range(len(domains))], "domain": domains}).save_to_disk(
            str(out_dir / "train"))
        write_manifest(out_dir, "ingest", counts={"read": len(lines), "kept": len(lines)})
        return read_manifest(out_dir)

    def passthrough(stage):
        def run(cfg, in_dir, out_dir, target=None):
            calls.append((stage, str(in_dir), str(out_dir)))
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            if stage == "build_cache":
                store = Path(out_dir).parent / "store" / "k1"
                store.mkdir(parents=True, exist_ok=True)
                (Path(out_dir) / "train.json").write_text(json.dumps({"key": "k1", "path": str(store)}))
            write_manifest(out_dir, stage, counts={"input": 1, "succeeded": 1})
            return read_manifest(out_dir)
        return run

    def train(cfg, cache_dir, out_dir, target=None):
        calls.append(("train", str(cache_dir), str(out_dir)))
        make_drafter(Path(out_dir) / "best", tokens=cfg.drafter.block_size, seed=len(calls))
        write_manifest(out_dir, "train", counts={"steps": 4})
        return read_manifest(out_dir)

    def calibrate(cfg, drafter_dir, cache_dir, out_dir):
        calls.append(("calibrate", str(drafter_dir), str(cache_dir), str(out_dir)))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "calibration.json").write_text(json.dumps({"temperatures": [1.0] * 4}))
        write_manifest(out_dir, "calibrate", counts={"positions": 4})
        return read_manifest(out_dir)

    def evaluate(cfg, drafter_dir, out_dir, ingested_dir=None, target=None):
        calls.append(("evaluate", str(drafter_dir), str(out_dir), str(ingested_dir)))
        t = taus.get(str(drafter_dir), taus["default"])
        make_eval(Path(out_dir), t)
        speedup = (speedups or {}).get(str(drafter_dir), (speedups or {}).get("default"))
        write_manifest(out_dir, "evaluate", counts={"datasets": 2},
                       metrics={"macro_tau": sum(t.values()) / len(t), **{f"tau.{d}": v for d, v in t.items()},
                                **({"speedup": speedup} if speedup is not None else {})})
        return read_manifest(out_dir)

    def gate(cfg, candidate_report, production_report=None):
        calls.append(("gate", str(candidate_report), str(production_report) if production_report else None))
        cand = json.loads(Path(candidate_report).read_text())["macro"]["tau"]
        prod = json.loads(Path(production_report).read_text())["macro"]["tau"] if production_report else None
        passed = cand >= (prod if prod is not None else cfg.gate.min_tau)
        return verdict(passed, [f"candidate {cand:.2f} vs production {prod}"], candidate_tau=cand, production_tau=prod)

    def write_demo_logs(out, n, seed):
        calls.append(("demo", str(out), n, seed))
        Path(out).mkdir(parents=True, exist_ok=True)
        rows = [{"domain": ["chat", "code", "math"][i % 3], "messages": []} for i in range(n)]
        (Path(out) / "demo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    module("drafter.traces.ingest", ingest=ingest)
    module("drafter.traces.demo", write_demo_logs=write_demo_logs)
    module("drafter.regenerate", regenerate=passthrough("regenerate"))
    module("drafter.cache", build_cache=passthrough("build_cache"))
    module("drafter.train", train=train)
    module("drafter.calibrate", calibrate=calibrate)
    module("drafter.evaluate", evaluate=evaluate)
    module("drafter.gates", gate=gate)


class PrefectServer:
    """A real `prefect server start` (API and UI) on 127.0.0.1 with its own home and SQLite
    database; the test harness serves no UI. No background services: nothing here needs them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PrefectServer:
        migrated_database("prefect", self.root / "prefect.db")
        env = {**os.environ, "PREFECT_HOME": str(self.root), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_URL": self.api_url, "PREFECT_UI_API_URL": self.api_url}
        self.log = (self.root / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-services"], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_healthy(self.proc, f"{self.api_url}/health", self.root / "server.log", "prefect server")
        return self

    def settings(self):
        """Point this thread's Prefect client at the server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def __exit__(self, *exc) -> None:
        drain_prefect_events()
        stop(self.proc, timeout=30)
        if self.proc is not None:
            self.log.close()

