"""MLflow bookkeeping of a flow run: one parent run per flow run, one nested run per stage.

Only the flow talks to MLflow (through `MlflowClient`, no global active-run state), so
the tasks stay plain calls of the stage functions and a cached task still gets a
nested run (tagged `drafter.cached=true`) showing the manifest it reused. Each stage's
headline metrics (its manifest's `metrics`) also roll up onto the parent as
`<stage>.<metric>`, so the run list compares retrainings at a glance; training, which
logs its own curves, nests its run under the stage's (`PARENT_RUN_ENV`).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from drafter import registry
from drafter.config import Config
from drafter.manifest import git_state, read_manifest, redact_urls

REPORT_SUFFIXES = (".json", ".md", ".csv", ".png")
PARENT_RUN_ENV = "DRAFTER_MLFLOW_PARENT_RUN_ID"  # the stage run a stage's own MLflow run nests under
# One "View run at" line per nested run is noise; the flow links its parent run as an artifact.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = node
    return out


def numeric_leaves(manifest: dict[str, Any]) -> dict[str, float]:
    """Counts and durations of a manifest as MLflow metrics."""
    metrics = {}
    for section in ("counts", "durations_s", "metrics"):
        for key, value in _flatten(manifest.get(section) or {}, section).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key.replace("@", "_at_")] = float(value)
    return metrics


class FlowTracking:
    def __init__(self, cfg: Config, run_name: str, tags: dict[str, str] | None = None,
                 commit: str | None = None) -> None:
        from mlflow.entities import Param

        self.client = registry.client()
        self.cfg = cfg
        self.experiment_id = registry.experiment_id(cfg, self.client)
        source = {"mlflow.source.type": "JOB", "mlflow.source.name": "flows/retrain.py"}
        if commit:
            source["mlflow.source.git.commit"] = commit
        self.parent = self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags={"drafter.config_hash": cfg.hash(), **source, **(tags or {})},
        ).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(redact_urls(cfg.to_dict())).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent, params=params[i : i + 100])

    @property
    def url(self) -> str:
        return registry.run_url(self.parent, self.client)

    @contextmanager
    def stage(self, name: str) -> Iterator[str]:
        run_id = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.parent, "drafter.stage": name}
        ).info.run_id
        os.environ[PARENT_RUN_ENV] = run_id
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)
        self.client.set_terminated(run_id, "FINISHED")

    def rollup(self, stage: str, metrics: dict[str, float]) -> None:
        """Headline metrics onto the parent run, as `<stage>.<name>`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(f"{stage}.{k}", float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.parent, metrics=rows[i : i + 1000])

    def log_plots(self, paths: list[Path]) -> None:
        """The run's plots, gathered on the parent under `plots/` (one link for the approver)."""
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.parent, str(path), "plots")

    def log_datasets(self, datasets: dict[str, tuple[Path, str]]) -> None:
        """`{name: (path, content hash)}` as the parent's inputs (MLflow's Dataset column)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for name, (path, digest) in datasets.items():
            with warnings.catch_warnings():  # a local path matches two equivalent local source types
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(str(Path(path).resolve()))
            ds = MetaDataset(source=source, name=name, digest=digest[:36])
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")]))
        self.client.log_inputs(self.parent, datasets=inputs)

    def log_stage(self, run_id: str, manifest: dict[str, Any] | None, out_dir: Path | None, cached: bool) -> None:
        from mlflow.entities import Metric, Param

        self.client.set_tag(run_id, "drafter.cached", str(cached).lower())
        if manifest:
            manifest = redact_urls(manifest)  # a URL with credentials never reaches MLflow
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(manifest.get("params") or {}).items()][:100]
            metrics = [Metric(k, v, 0, 0) for k, v in numeric_leaves(manifest).items()]
            self.client.log_batch(run_id, metrics=metrics[:1000], params=params)
            stage = self.client.get_run(run_id).info.run_name
            if manifest.get("metrics"):
                self.rollup(stage, manifest["metrics"])
            self.client.log_text(run_id, json.dumps(manifest, indent=2, default=str), "manifest.json")
        if out_dir is not None and Path(out_dir).is_dir():
            for item in sorted(Path(out_dir).iterdir()):
                if item.is_file() and item.suffix in REPORT_SUFFIXES and item.name != "manifest.json":
                    self.client.log_artifact(run_id, str(item), "outputs")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status)


@contextmanager
def cli_stage(cfg: Config, stage: str, out_dir: Path) -> Iterator[None]:
    """A stage run from the command line alone gets a parent run of its own ("<stage> (cli)")
    with the stage's run nested under it, its outputs and manifest metrics logged and its
    headline metrics rolled up, as in a flow run. Under a flow (PARENT_RUN_ENV set) the flow
    does this, and nothing is added."""
    if os.environ.get(PARENT_RUN_ENV):
        yield
        return
    commit = git_state(Path(__file__).resolve().parents[1]).get("commit")
    tracking = FlowTracking(cfg, f"{stage} (cli)", commit=commit,
                            tags={"mlflow.source.type": "LOCAL", "mlflow.source.name": f"drafter {stage}",
                                  "drafter.source": "cli"})
    try:
        with tracking.stage(stage) as run_id:
            yield
    except BaseException:
        tracking.finish("FAILED")
        raise
    tracking.log_stage(run_id, read_manifest(out_dir).to_json(), Path(out_dir), cached=False)
    tracking.finish()
