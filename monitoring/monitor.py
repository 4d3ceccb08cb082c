"""One monitoring pass (`drafter monitor`): telemetry -> drift checks -> actions -> report.

1. Read production acceptance: scrape the serving engine's Prometheus counters (URL or
   file; history in `<out>/scrapes.jsonl`) and/or per-request `metrics.speculative_decoding`
   blocks in response logs; compute tau and per-position acceptance over the window.
2. Compare with the production drafter's evaluation (from the registry) and compare the
   domain mix of new traffic (an ingested folder) with its training data (`data_profile.json`).
3. On drift: append to `<out>/drift.jsonl`, emit the Prefect event `drafter.drift.detected`
   and start the retraining deployment when a Prefect server is configured; otherwise say
   what would be started.
4. Write `<out>/<time>/report.md` (+ PNGs, report.json) and log an MLflow run with the metrics.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from drafter import registry
from drafter.config import Config
from drafter.lineage import domain_counts
from monitoring import drift as checks
from monitoring import telemetry
from monitoring.report import write_report

DRIFT_EVENT = "drafter.drift.detected"
# Monitor runs go to "<experiment>-monitoring": a time series of their own, not rows among the retrain runs.
MONITOR_EXPERIMENT_KIND = "monitoring"
log = logging.getLogger("monitoring")


def production_reference(cfg: Config) -> dict[str, Any]:
    """What the production drafter was evaluated at and trained on (empty when none)."""
    name = registry.model_name(cfg)
    try:
        evidence = registry.version_evidence(name, registry.PRODUCTION)
    except registry.RegistryError:
        evidence = None
    if evidence is None:
        return {"name": name, "version": None, "tau": None, "accept_rate": [], "domains": None, "approved": None}
    approved = evidence["tags"].get("approval.state") == registry.APPROVED
    if not approved:  # an alias moved outside the product (e.g. the MLflow UI): say so, loudly
        log.error("%s@production is version %s, which is not approved (approval.state=%s): check the registry "
                  "(drafter registry log %s)", name, evidence["version"], evidence["tags"].get("approval.state"), name)
    report = evidence["eval_report"]
    tau = report.macro.tau if report else None
    if tau is None and evidence["tags"].get("eval.tau_macro"):
        tau = float(evidence["tags"]["eval.tau_macro"])
    return {"name": name, "version": evidence["version"], "tau": tau,
            "accept_rate": list(report.macro.accept_rate) if report else [],
            "domains": (evidence.get("data_profile") or {}).get("domains"), "approved": approved}


def on_drift(cfg: Config, name: str, kinds: list[str], details: dict[str, Any], trigger: bool) -> dict[str, Any]:
    """Emit the drift event and start retraining where a Prefect server is there; else say what would run."""
    from flows.approval import prefect_server
    from flows.schedule import deployment_name

    deployment = deployment_name(cfg)
    actions: dict[str, Any] = {}
    if not prefect_server():
        actions["event"] = f"not emitted ({DRIFT_EVENT}): no Prefect server (PREFECT_API_URL is unset)"
        actions["retraining"] = (f"would start deployment '{deployment}' (`prefect deployment run '{deployment}'`); "
                                 f"without a server: `drafter run -c CONFIG`")
        return actions
    from prefect.deployments import run_deployment
    from prefect.events import emit_event
    from prefect.exceptions import ObjectNotFound

    event = emit_event(
        DRIFT_EVENT,
        resource={"prefect.resource.id": f"drafter.registered-model.{name}", "prefect.resource.name": name},
        payload={"kinds": kinds, **details},
    )
    actions["event"] = f"{DRIFT_EVENT} {event.id}" if event is not None else "not emitted (events are off)"
    if not trigger:
        actions["retraining"] = f"not started (trigger off); deployment '{deployment}'"
        return actions
    try:
        run = run_deployment(deployment, timeout=0, tags=["drift"], as_subflow=False)
        actions["retraining"] = f"started flow run {run.name} ({run.id}) of '{deployment}'"
        actions["flow_run_id"] = str(run.id)
    except ObjectNotFound:
        actions["retraining"] = f"deployment '{deployment}' not found: serve it with `drafter schedule`"
    return actions


def monitor(
    cfg: Config,
    metrics: str | None = None,
    request_logs: list[Path] | None = None,
    traffic: Path | None = None,
    trigger: bool | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    mc = cfg.monitor
    out_root = Path(mc.out_dir) if mc.out_dir else cfg.data_dir / "monitor"
    now = time.time() if now is None else now
    ref = production_reference(cfg)

    # 1. telemetry over the window
    source = metrics or mc.metrics_url
    logs = list(request_logs or mc.request_logs)
    tau_history: list[tuple[float, float]] = []
    counts, span, tally = telemetry.SpecCounts(), 0.0, None
    if source:
        scraped = telemetry.scrape(source)
        scraped.at = now
        telemetry.append_scrape(out_root / "scrapes.jsonl", scraped)
        history = telemetry.read_history(out_root / "scrapes.jsonl")
        counts, span = telemetry.window(history, mc.window_s, now)
        tau_history = telemetry.interval_taus(history)
    elif logs:
        read = telemetry.read_request_logs(logs, mc.window_s, now)
        counts, tally, span = read["counts"], read["tally"], float(mc.window_s)
    acceptance = checks.acceptance_check(
        counts.tau, counts.drafts, ref["tau"], mc.tau_drop_tolerance, mc.min_drafts,
        counts.per_position, ref["accept_rate"],
    )

    # 2. traffic mix of new traces vs the production drafter's training data
    traffic = traffic or mc.traffic or cfg.data_dir / "ingested"
    current = domain_counts(traffic, ("train", "holdout")) if Path(traffic).exists() else {}
    mix = checks.mix_check(ref["domains"], current, mc.drift_pvalue, mc.mix_min_shift, mc.min_traces)

    kinds = [kind for kind, check in (("acceptance", acceptance), ("traffic-mix", mix)) if check.status == checks.DRIFT]
    at = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds")
    result: dict[str, Any] = {
        "at": at,
        "model": ref["name"],
        "production_version": ref["version"],
        "telemetry": {"source": source or ",".join(map(str, logs)) or None, "window_s": mc.window_s,
                      "span_s": span, "request_logs": tally},
        "acceptance": acceptance.to_dict(),
        "mix": mix.to_dict(),
        "traffic": str(traffic),
        "drift": kinds,
        "actions": {},
    }

    # 3. record and act
    if kinds:
        details = {"acceptance": acceptance.message, "traffic_mix": mix.message, "production_version": ref["version"]}
        result["actions"] = on_drift(cfg, ref["name"], kinds, details, mc.trigger_retrain if trigger is None else trigger)
        out_root.mkdir(parents=True, exist_ok=True)
        with (out_root / "drift.jsonl").open("a") as f:
            f.write(json.dumps({"at": at, "kinds": kinds, **details, "actions": result["actions"]}) + "\n")

    # 4. report and MLflow
    report_dir = out_root / datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result["report"] = str(write_report(report_dir, result, tau_history))
    result["mlflow_run"] = log_run(cfg, result, report_dir)
    return result


def log_run(cfg: Config, result: dict[str, Any], report_dir: Path) -> str:
    from mlflow.entities import Metric

    c = registry.client()
    run = c.create_run(registry.experiment_id(cfg, c, kind=MONITOR_EXPERIMENT_KIND), run_name=f"monitor {result['at']}",
                       tags={"drafter.stage": "monitor", "drafter.drift": ",".join(result["drift"]) or "none",
                             "drafter.production_version": str(result["production_version"])})
    acc, mix = result["acceptance"], result["mix"]
    values = {
        "production_tau": acc["production_tau"], "evaluated_tau": acc["evaluated_tau"],
        "tau_relative_change": acc["relative_change"], "window_drafts": acc["drafts"],
        "mix_pvalue": mix["pvalue"], "mix_tv_distance": mix["tv_distance"],
        "drift_acceptance": float("acceptance" in result["drift"]),
        "drift_traffic_mix": float("traffic-mix" in result["drift"]),
        **{f"accept_pos_{k + 1}": v for k, v in enumerate(acc["production_per_position"])},
    }
    stamp = int(time.time() * 1000)
    c.log_batch(run.info.run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in values.items() if v is not None])
    c.log_artifacts(run.info.run_id, str(report_dir), "report")
    c.set_terminated(run.info.run_id)
    return run.info.run_id
