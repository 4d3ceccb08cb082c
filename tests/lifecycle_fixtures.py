"""Real inputs for the registry/flow/monitor tests: speculators-format folders with safetensors
weights, evaluation reports and gate verdicts shaped as the stages write them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


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
    report = {
        "datasets": {name: {"tau": tau, "accept_rate": accept} for name, tau in taus.items()},
        "macro": {"tau": sum(taus.values()) / len(taus), "accept_rate": accept},
    }
    (path / "report.json").write_text(json.dumps(report))
    (path / "report.md").write_text("# Evaluation\n" + "\n".join(f"- {k}: {v}" for k, v in taus.items()))
    (path / "acceptance.csv").write_text("position,accept_rate\n" + "".join(f"{i + 1},{a}\n" for i, a in enumerate(accept)))
    (path / "manifest.json").write_text(json.dumps({"stage": "evaluate", "counts": {"datasets": len(taus)}}))
    return path


def passing_verdict() -> dict:
    return {"passed": True, "reasons": ["macro tau above floor"], "candidate_tau": 2.5, "production_tau": None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, for the duration of a test module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        import httpx

        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.log = (self.root / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("mlflow server did not become healthy")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
