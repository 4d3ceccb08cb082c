"""Test-wide setup: an isolated state dir per worker, shared converted models, tiny targets."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Before drafter is imported: keep Prefect/MLflow state out of the user's .drafter/, but
# share the converted target models (content-addressed, immutable) with it.
os.environ["DRAFTER_HOME"] = tempfile.mkdtemp(prefix="drafter-test-")
os.environ.setdefault("DRAFTER_MODELS", str(ROOT / ".drafter" / "models"))
# One torch thread per pytest worker: `make test` runs two workers on two cores, and tiny
# models lose a lot to threads spin-waiting on a shared CPU.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from lifecycle_fixtures import migrated_database  # noqa: E402

from drafter.config import Config, TargetConfig, TinyTargetConfig, load_config  # noqa: E402

# This worker's own MLflow store and temporary Prefect API start from migrated copies.
migrated_database("mlflow", Path(os.environ["DRAFTER_HOME"]) / "mlflow.db")
migrated_database("prefect", Path(os.environ["DRAFTER_HOME"]) / "prefect" / "prefect.db")


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session", params=["llama", "qwen3", "gemma3"])
def tiny_target_any(request):
    """One tiny target of each shape, through the same API as a real one."""
    from drafter.target import load_target

    return load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(shape=request.param)))


@pytest.fixture(scope="session")
def tiny_target():
    from drafter.target import load_target

    return load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(shape="llama")))


@pytest.fixture(scope="session")
def smollm2_target():
    """The real default target (SmolLM2-135M-Instruct from its PyPI GGUF)."""
    from drafter.target import load_target

    return load_target(load_config(ROOT / "configs" / "smollm2-135m-dspark.yaml"))


@contextmanager
def _mlflow_store(folder: Path):
    """A real MLflow SQLite tracking/registry store in `folder`, embedded (no Prefect server)."""
    import mlflow

    uri = f"sqlite:///{migrated_database('mlflow', folder / 'mlflow.db')}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("PREFECT_API_URL", raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()


@pytest.fixture
def store(tmp_path):
    """A fresh MLflow store for one test."""
    with _mlflow_store(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    """One MLflow store for a module (each test uses its own model name)."""
    with _mlflow_store(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A real `mlflow server` and Prefect's test server, started side by side (once per test module)."""
    import mlflow
    from lifecycle_fixtures import MlflowServer, prefect_harness

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    mp = pytest.MonkeyPatch()
    try:
        with prefect_harness():
            server.wait()
            mp.setenv("MLFLOW_TRACKING_URI", server.url)
            mlflow.set_tracking_uri(server.url)
            yield server
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()
        server.__exit__()
