"""Scheduled retraining: serve the `drafter-retrain` deployment on the config's cron.

Needs a Prefect server (schedules and deployments do not exist on the temporary local
API):

    prefect server start                                   # UI and API on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    drafter schedule -c configs/smollm2-135m-dspark.yaml   # serves until stopped

Or, with a work pool and a worker (the flow runs wherever the worker runs; this
process only registers the deployment and exits):

    drafter schedule --work-pool drafter                   # creates the process pool if missing
    prefect worker start --pool drafter                    # on the machine that trains

Scheduled runs never wait for a human: they end with the new version awaiting
`drafter approve` (the `wait_for_approval=False` parameter of the deployment). The
monitoring loop starts the same deployment when it detects drift.
"""

from __future__ import annotations

from pathlib import Path

from drafter.config import Config
from drafter.errors import DrafterError

FLOW_NAME = "drafter-retrain"


class NoPrefectServer(DrafterError):
    """Schedules and deployments need a Prefect server."""


def deployment_name(cfg: Config) -> str:
    """`flow/deployment`, as `run_deployment` and `prefect deployment run` take it."""
    return f"{FLOW_NAME}/{cfg.schedule.deployment}"


ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/retrain.py:retrain_flow"


def _deployment_settings(cfg: Config, config_path: str | Path, overrides: list[str] | None) -> dict:
    """What both kinds of deployment share: name, schedule, parameters, one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    return dict(
        name=cfg.schedule.deployment,
        # Scheduled and drift-triggered runs (the same deployment) never overlap on the same
        # data: one at a time, the next queued behind it.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        schedule=Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone),
        parameters={
            "config": str(Path(config_path).resolve()),
            "overrides": list(overrides or []),
            "wait_for_approval": False,
        },
        tags=["drafter", cfg.run.name],
        description=f"Retrain the {cfg.drafter.algorithm} drafter of {cfg.run.name} on `{cfg.schedule.cron}` "
        f"({cfg.schedule.timezone}); new versions await `drafter approve`.",
    )


def retraining_deployment(cfg: Config, config_path: str | Path, overrides: list[str] | None = None):
    """The deployment of the retraining flow with the cron schedule of `cfg.schedule`."""
    from flows.retrain import retrain_flow

    return retrain_flow.to_deployment(**_deployment_settings(cfg, config_path, overrides))


def deploy_to_work_pool(cfg: Config, config_path: str | Path, overrides: list[str] | None, work_pool: str) -> str:
    """Register the deployment on a process work pool (created if missing), code from this
    checkout; a `prefect worker start --pool POOL` on a machine with the checkout runs it.
    Returns the deployment's id."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
        except ObjectAlreadyExists:
            pass
    source = flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINT)
    return str(source.deploy(work_pool_name=work_pool, print_next_steps=False,
                             **_deployment_settings(cfg, config_path, overrides)))


def serve(cfg: Config, config_path: str | Path, overrides: list[str] | None = None) -> None:
    """Register the deployment and run its schedule in this process until interrupted."""
    from prefect import serve as prefect_serve

    require_server()
    prefect_serve(retraining_deployment(cfg, config_path, overrides))


def require_server() -> None:
    from flows.approval import prefect_server

    if not prefect_server():
        raise NoPrefectServer(
            "scheduling needs a Prefect server: run `prefect server start` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, then `drafter schedule` again"
        )
