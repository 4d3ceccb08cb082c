"""Parallel ingestion on prefect-dask's `DaskTaskRunner`.

With `ingest.workers` > 1 or `ingest.scheduler_address`, `drafter.traces.ingest.ingest()`
prepares its batches on the cluster of a `DaskTaskRunner` (`task_runner()`): a `LocalCluster`
of `ingest.workers` single-threaded processes, or the running cluster at
`ingest.scheduler_address`.

- In a Prefect run (the retrain flow's ingest stage), ingest runs as the `drafter-ingest`
  subflow with that task runner: a flow run of its own in the Prefect UI, under the stage's
  task, with the manifest as its result.
- Outside one (`drafter ingest --workers N`, library calls), the same task runner is entered
  here, without a flow run: a command-line ingest starts no temporary Prefect API server (as a
  flow run it took 5-11 s and ~350 MiB more, bench/RESULTS.md).

Either way the batches go through the runner's own Dask client as plain Dask tasks, a few
batches each (~4 ms of bookkeeping a task), not as Prefect task runs: the workers never talk
to the Prefect API, and the output is the same as one process's.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext, TaskRunContext
from prefect_dask import DaskTaskRunner

from drafter.config import Config, IngestConfig
from drafter.reports import Manifest, parse
from drafter.traces.ingest import DaskPool


def task_runner(icfg: IngestConfig) -> DaskTaskRunner:
    if icfg.scheduler_address:
        return DaskTaskRunner(address=icfg.scheduler_address)
    # (the scheduler's HTTP endpoints on a free port: with None they still take 8787, and a second
    # ingest at the same time warned that it was in use)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": icfg.workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": ":0", "silence_logs": logging.WARNING,
    })


def _flow_task_runner() -> DaskTaskRunner | None:
    ctx = FlowRunContext.get()
    return ctx.task_runner if ctx is not None and isinstance(ctx.task_runner, DaskTaskRunner) else None


def needs_subflow() -> bool:
    """In a Prefect flow or task run whose task runner is not a DaskTaskRunner."""
    return _flow_task_runner() is None and (FlowRunContext.get() or TaskRunContext.get()) is not None


def dask_pool(icfg: IngestConfig) -> DaskPool:
    """The workers batches are prepared on: those of the flow run's DaskTaskRunner, or of one
    entered here (and left when the pool closes)."""
    import dask

    runner = _flow_task_runner()
    stack = ExitStack()
    if runner is None:
        runner = stack.enter_context(task_runner(icfg))
    try:
        # (no statistical profiler in the workers: it samples every thread 100 times a second)
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            client = runner.client  # the cluster starts here
        return DaskPool(client, icfg, on_close=stack.close)
    except BaseException:
        stack.close()
        raise


@flow(name="drafter-ingest", validate_parameters=False)
def ingest_flow(config: dict[str, Any], inputs: list[str] | None = None, out_dir: str | None = None,
                force: bool = False) -> dict[str, Any]:
    from drafter.traces.ingest import ingest

    cfg = Config.model_validate(config)
    return ingest(cfg, [Path(p) for p in inputs] if inputs else None, Path(out_dir) if out_dir else None,
                  force=force).to_json()


def run_ingest_flow(cfg: Config, inputs: list[Path] | None, out_dir: Path | None, force: bool) -> Manifest:
    result = ingest_flow.with_options(task_runner=task_runner(cfg.ingest))(
        cfg.model_dump(mode="json"), [str(p) for p in inputs] if inputs else None,
        str(out_dir) if out_dir else None, force)
    return parse(Manifest, result, "the drafter-ingest flow's result")
