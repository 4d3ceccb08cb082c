"""The project-local state directory and the embedded defaults of every component.

Everything the pipeline keeps between runs lives under one folder (default `.drafter/`
in the working directory, or `$DRAFTER_HOME`): the Prefect home and its SQLite API
database, the MLflow SQLite store and artifacts, converted target models and the
content-addressed target caches. Nothing touches the user's global configuration,
telemetry is off and hubs are offline unless the user says otherwise.

Variables the user already set win (`os.environ.setdefault`), so the same code points
at a Prefect server, an MLflow server or an online hub when asked to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def models(self) -> Path:
        """Targets converted once to safetensors (GGUF -> HF folder); shareable via $DRAFTER_MODELS."""
        return Path(os.environ.get("DRAFTER_MODELS", self.root / "models")).resolve()

    @property
    def caches(self) -> Path:
        """Content-addressed target caches, shared by all algorithms and retrains."""
        return self.root / "cache"

    @property
    def hf_home(self) -> Path:
        return self.root / "hf"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"


def state_paths() -> StatePaths:
    return StatePaths(Path(os.environ.get("DRAFTER_HOME", ".drafter")).resolve())


def configure_environment() -> StatePaths:
    """Set the embedded defaults; called once when `drafter` is imported."""
    paths = state_paths()
    online = os.environ.get("DRAFTER_ONLINE", "0") == "1"
    defaults = {
        # Prefect: a temporary local API server on SQLite under our state dir.
        "PREFECT_HOME": str(paths.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # The product's own loggers reach the flow run's logs in the Prefect UI.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "drafter,flows,monitoring",
        # MLflow: SQLite store, absolute URI, no network lookups.
        "MLFLOW_TRACKING_URI": paths.mlflow_uri,
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # Hugging Face and DVC: offline, no telemetry.
        "HF_HOME": str(paths.hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not online:
        defaults |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Prefect creates its home without parents at import time and fails on a fresh clone.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return paths
