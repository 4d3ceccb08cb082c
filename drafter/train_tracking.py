"""MLflow logging of a training run: a run nested under the active lifecycle run when there
is one, resumed by id after a restart; params once, metric batches per step, artifacts at the end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from drafter.config import Config


def start_run(cfg: Config, run_id: str | None):
    """A run nested under the active lifecycle run when there is one; resumed by id."""
    import mlflow

    from drafter.registry import experiment_id

    parent = mlflow.active_run()
    if parent is None:  # the run's experiment, artifacts in the state dir on a local store
        mlflow.set_experiment(experiment_id=experiment_id(cfg))
    kwargs = {"log_system_metrics": cfg.train.system_metrics}
    if run_id:
        return mlflow.start_run(run_id=run_id, nested=parent is not None, **kwargs)
    # In the retrain flow: under the flow's "train" stage run (flows/tracking.py sets it).
    stage_run = os.environ.get("DRAFTER_MLFLOW_PARENT_RUN_ID") if parent is None else None
    return mlflow.start_run(run_name=f"train-{cfg.drafter.algorithm}", nested=parent is not None,
                            parent_run_id=stage_run, **kwargs)


def log_params(cfg: Config, model, target, steps: int, n_train: int, n_holdout: int, processes: int) -> None:
    import mlflow

    params = {f"drafter.{k}": v for k, v in cfg.drafter.model_dump(mode="json").items()}
    params |= {f"train.{k}": v for k, v in cfg.train.model_dump(mode="json").items()}
    params |= {
        "seed": cfg.run.seed, "steps": steps, "train_sequences": n_train, "holdout_sequences": n_holdout,
        "processes": processes, "target": getattr(target, "name", None), "target_fingerprint": target.fingerprint,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    mlflow.log_params(params)
    mlflow.set_tag("stage", "train")


def log_metrics(step: int, prefix: str, summary: dict[str, Any], extra: dict[str, float] | None = None) -> None:
    import mlflow

    metrics = {f"{prefix}/loss": summary["loss"], f"{prefix}/sim_tau": summary["sim_tau"],
               f"{prefix}/sim_tau_greedy": summary["sim_tau_greedy"]}
    metrics |= {f"{prefix}/loss_{k}": v for k, v in summary["losses"].items()}
    for k, (rate, acc) in enumerate(zip(summary["accept_rate"], summary["accuracy"]), start=1):
        metrics[f"{prefix}/accept_rate_pos{k}"] = rate
        metrics[f"{prefix}/accuracy_pos{k}"] = acc
    metrics |= {k: v for k, v in (extra or {}).items()}
    mlflow.log_metrics(metrics, step=step)


def log_artifacts(run_id: str, out_dir: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for name in ("manifest.json", "metrics.json", "config.yaml"):
        if (out_dir / name).is_file():
            client.log_artifact(run_id, str(out_dir / name), artifact_path="train")
