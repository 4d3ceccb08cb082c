"""MLflow bookkeeping of a flow run: one parent run per flow run, one nested run per stage.

Only the flow talks to MLflow (through `MlflowClient`, no global active-run state), so
the tasks stay plain calls of the stage functions and a cached task still gets a
nested run (tagged `drafter.cached=true`) showing the manifest it reused.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from drafter import registry
from drafter.config import Config
from drafter.manifest import redact_urls

REPORT_SUFFIXES = (".json", ".md", ".csv", ".png")
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
    def __init__(self, cfg: Config, run_name: str, tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Param

        self.client = registry.client()
        self.cfg = cfg
        self.experiment_id = registry.experiment_id(cfg, self.client)
        self.parent = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={"drafter.config_hash": cfg.hash(), **(tags or {})}
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
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def log_stage(self, run_id: str, manifest: dict[str, Any] | None, out_dir: Path | None, cached: bool) -> None:
        from mlflow.entities import Metric, Param

        self.client.set_tag(run_id, "drafter.cached", str(cached).lower())
        if manifest:
            manifest = redact_urls(manifest)  # a URL with credentials never reaches MLflow
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(manifest.get("params") or {}).items()][:100]
            metrics = [Metric(k, v, 0, 0) for k, v in numeric_leaves(manifest).items()]
            self.client.log_batch(run_id, metrics=metrics[:1000], params=params)
            self.client.log_text(run_id, json.dumps(manifest, indent=2, default=str), "manifest.json")
        if out_dir is not None and Path(out_dir).is_dir():
            for item in sorted(Path(out_dir).iterdir()):
                if item.is_file() and item.suffix in REPORT_SUFFIXES and item.name != "manifest.json":
                    self.client.log_artifact(run_id, str(item), "outputs")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status)
