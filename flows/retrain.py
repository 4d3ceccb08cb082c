"""The retraining flow: the pipeline diagram as Prefect tasks.

    ingest -> regenerate -> build cache -> train -> calibrate -> evaluate
      -> (re-evaluate production) -> gate -> register -> approval -> promote

Each task calls the same `drafter/` function as the CLI and the DVC stage (imported inside
the task so the flow module imports quickly). Caching across runs is keyed on content:
each stage task gets the hash of what it reads (raw log files, or the upstream stage's
manifest, which records its inputs' hashes and parameters), the resolved config, the code
version and the task source (`INPUTS + TASK_SOURCE`, no RUN_ID), with results persisted as
JSON (never pickled). A cache hit whose output folder has since been deleted runs again.
Regeneration is retried with exponential backoff (server hiccups; the stage resumes).

MLflow: one parent run per flow run, one nested run per stage (see `flows/tracking.py`).
Prefect artifacts: a markdown report, the tau table candidate vs production, the gate
verdict, the approval request and a link to the MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from uuid import uuid4

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.tasks import exponential_backoff

from drafter import __version__, plots, registry
from drafter.config import DEFAULT_CONFIG, Config, load_config
from drafter.manifest import (
    atomic_write_json, atomic_write_text, git_state, sha256_file, sha256_json, sha256_tree,
)
from drafter.reports import GateVerdict, parse, read_eval_report
from flows.approval import approval_flow
from flows.tracking import FlowTracking

STAGE_CACHE = INPUTS + TASK_SOURCE


def stage_task(name: str, **options: Any):
    """A pipeline stage as a Prefect task, cached on its content-hashed inputs."""
    return task(name=name, cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json", **options)


def _cfg(config: dict[str, Any]) -> Config:
    return Config.model_validate(config)


# ----- stage tasks (one per CONTRACTS.md function) ----------------------------
@stage_task("ingest")
def ingest_task(config: dict, inputs: list[str], out_dir: str, input_hash: str, code: str) -> dict:
    from drafter.traces.ingest import ingest

    return ingest(_cfg(config), [Path(p) for p in inputs], Path(out_dir)).to_json()


@stage_task("regenerate", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5)
def regenerate_task(config: dict, in_dir: str, out_dir: str, input_hash: str, code: str) -> dict:
    from drafter.regenerate import regenerate

    return regenerate(_cfg(config), Path(in_dir), Path(out_dir)).to_json()


@stage_task("build-cache")
def build_cache_task(config: dict, in_dir: str, out_dir: str, input_hash: str, code: str) -> dict:
    from drafter.cache import build_cache

    return build_cache(_cfg(config), Path(in_dir), Path(out_dir)).to_json()


@stage_task("train")
def train_task(config: dict, cache_dir: str, out_dir: str, input_hash: str, code: str) -> dict:
    from drafter.train import train

    return train(_cfg(config), Path(cache_dir), Path(out_dir)).to_json()


@stage_task("calibrate")
def calibrate_task(config: dict, drafter_dir: str, cache_dir: str, out_dir: str, input_hash: str, code: str) -> dict:
    from drafter.calibrate import calibrate

    # its metrics section: ECE/AUROC/Brier before and after STS
    return calibrate(_cfg(config), Path(drafter_dir), Path(cache_dir), Path(out_dir)).to_json()


@stage_task("evaluate")
def evaluate_task(config: dict, drafter_dir: str, out_dir: str, ingested_dir: str, input_hash: str, code: str) -> dict:
    from drafter.evaluate import evaluate

    # its metrics section: tau per set, speedup, accept_rate@k
    return evaluate(_cfg(config), Path(drafter_dir), Path(out_dir), ingested_dir=Path(ingested_dir)).to_json()


@task(name="gate")
def gate_task(config: dict, candidate_report: str, production_report: str | None) -> dict:
    from drafter.gates import gate

    return gate(_cfg(config), Path(candidate_report), Path(production_report) if production_report else None).to_json()


# ----- content hashes for the cache keys --------------------------------------
def code_version() -> str:
    """The drafter code a result came from; uncommitted changes disable caching."""
    git = git_state(Path(__file__).resolve().parents[1])
    if git["commit"] is None:
        return __version__  # an installed release
    if git["dirty"]:
        return f"{__version__}+{git['commit'][:12]}-uncommitted-{uuid4()}"
    return f"{__version__}+{git['commit'][:12]}"


def content_hash(*paths: Path) -> str:
    """Hash of files and folders (a missing path hashes as missing, so a key still forms)."""
    parts = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            parts.append(sha256_tree(path))
        elif path.is_file():
            parts.append(sha256_file(path))
        else:
            parts.append(f"missing:{path}")
    return sha256_json(parts)


def outputs_present(out_dir: Path) -> bool:
    """A stage's output is still there: its manifest, and whatever its pointer files point at."""
    if not (out_dir / "manifest.json").is_file():
        return False
    for pointer in out_dir.glob("*.json"):
        try:
            target = json.loads(pointer.read_text()).get("path")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(target, str) and not Path(target).exists():
            return False
    return True


def run_stage(tracking: FlowTracking, report: list[dict], name: str, stage, output: Path, **kwargs: Any) -> dict:
    """Run one stage task inside its nested MLflow run; re-run a cache hit whose output is gone."""
    with tracking.stage(name) as run_id:
        state = stage(**kwargs, return_state=True)
        manifest = state.result()
        cached = state.name == "Cached"
        if cached and not outputs_present(output):
            get_run_logger().warning("%s: cached result but %s is gone; running it again", name, output)
            manifest = stage.with_options(refresh_cache=True)(**kwargs)
            cached = False
        tracking.log_stage(run_id, manifest, output, cached)
    report.append({"stage": name, "cached": cached, "counts": (manifest or {}).get("counts", {}), "out": str(output)})
    return manifest


# ----- gate and release ---------------------------------------------------------
def tau_table(candidate_eval: Path, production_eval: Path | None) -> list[dict[str, Any]]:
    def taus(folder: Path | None) -> dict[str, float]:
        report = read_eval_report(folder)
        return {**report.tau_by_dataset, "macro": report.macro.tau} if report else {}

    cand, prod = taus(candidate_eval), taus(production_eval)
    rows = []
    names = [n for n in cand if n != "macro"] + [n for n in prod if n not in cand and n != "macro"]
    for dataset in names + ["macro"]:
        c, p = cand.get(dataset), prod.get(dataset)
        rows.append({
            "dataset": dataset,
            "candidate": None if c is None else round(c, 3),
            "production": None if p is None else round(p, 3),
            "change": None if c is None or p in (None, 0) else f"{(c / p - 1) * 100:+.1f}%",
        })
    return rows


@flow(name="drafter-release")
def release_flow(
    config: str,
    overrides: list[str] | None,
    drafter_dir: str,
    eval_dir: str,
    verdict: dict,
    production_eval_dir: str | None = None,
    wait_for_approval: bool | None = None,
    mlflow_parent_run_id: str | None = None,
    plots_url: str | None = None,
) -> dict[str, Any]:
    """Gate artifacts -> register the candidate -> approval -> promote (or leave it awaiting)."""
    from drafter.lineage import collect_lineage

    cfg = load_config(config, overrides or [])
    gate = parse(GateVerdict, verdict, "the gate verdict")
    markdown = gate.markdown
    if plots_url:
        markdown += (f"\n\nPlots (candidate vs production, acceptance per position, tau per dataset, accepted "
                     f"lengths, reliability, training curves): [MLflow]({plots_url})\n")
    rows = tau_table(Path(eval_dir), Path(production_eval_dir) if production_eval_dir else None)
    create_table_artifact(rows, key="drafter-tau", description="tau per dataset: candidate vs production")
    create_markdown_artifact(markdown, key="drafter-gate", description="gate verdict")
    if not gate.passed:
        return {"registered": False, "gate": "failed", "reasons": gate.reasons, "tau": rows}
    sps_table = Path(eval_dir) / "sps_cost_table.json"  # the SPS table the evaluation ran with, if any
    run_id = None
    c = registry.client()
    if mlflow_parent_run_id:
        exp = c.get_run(mlflow_parent_run_id).info.experiment_id
        run_id = c.create_run(exp, run_name="register", tags={
            "mlflow.parentRunId": mlflow_parent_run_id, "drafter.stage": "register"}).info.run_id
    try:
        cand = registry.register_candidate(
            cfg, drafter_dir, eval_dir=eval_dir, gate_verdict=gate, gate_markdown=markdown,
            sps_table=sps_table if sps_table.is_file() else None, lineage=collect_lineage(cfg), run_id=run_id, plots_url=plots_url,
        )
    except Exception:
        if run_id:
            c.set_terminated(run_id, "FAILED")
        raise
    if run_id:
        c.set_terminated(run_id, "FINISHED")
    create_link_artifact(registry.run_url(cand.run_id), link_text=f"MLflow: {cand.name} v{cand.version}",
                         key="drafter-mlflow-register")
    state = registry.client().get_model_version(cand.name, cand.version).tags.get("approval.state")
    if cand.reused and state != registry.PENDING:  # these weights were decided on before
        decision = {"decision": f"already {state}", "name": cand.name, "version": cand.version}
    else:
        decision = approval_flow(
            cand.name, cand.version, markdown, timeout_s=cfg.registry.approval_timeout_s,
            poll_s=cfg.registry.approval_poll_s, wait=wait_for_approval,
        )
    if mlflow_parent_run_id:
        c.set_tag(mlflow_parent_run_id, "drafter.approval", decision["decision"])
    return {"registered": True, "name": cand.name, "version": cand.version, "run_id": cand.run_id,
            "reused": cand.reused, "approval": decision, "tau": rows}


def production_eval(cfg: Config, tracking: FlowTracking, report: list[dict], code: str) -> Path | None:
    """Production's evaluation on today's data (or its stored one), for the gate and the tau table."""
    name = registry.model_name(cfg)
    try:
        version = registry.aliases(name).get(registry.PRODUCTION)
    except registry.RegistryError:
        return None  # first run: nothing registered yet
    if version is None:
        return None
    d = cfg.data_dir
    exported = registry.export_alias(name, registry.PRODUCTION, d / "production")
    if not cfg.registry.reevaluate_production:
        return Path(exported["out"]) / "reports" / "eval"
    out = d / "eval-production"
    run_stage(tracking, report, "evaluate-production", evaluate_task, out,
              config=cfg.to_dict(), drafter_dir=str(d / "production"), out_dir=str(out),
              ingested_dir=str(d / "ingested"),
              input_hash=content_hash(d / "production" / "model.safetensors", d / "ingested" / "manifest.json"),
              code=code)
    return out


def warm_start(cfg: Config, conf: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    """`train.init_from: production`: the retrain starts from the production drafter's weights
    (exported first). -> (the train stage's config, the weights it starts from). With nothing
    in production yet, a random init."""
    if cfg.train.init_from != "production":
        return conf, [Path(cfg.train.init_from)] if cfg.train.init_from else []
    name, d = registry.model_name(cfg), cfg.data_dir
    try:
        in_production = registry.aliases(name).get(registry.PRODUCTION) is not None
    except registry.RegistryError:
        in_production = False
    train_conf = json.loads(json.dumps(conf))
    if not in_production:
        logging.getLogger("drafter.flows").warning(
            "train.init_from=production but %s has no production version: random init", name)
        train_conf["train"]["init_from"] = None
        return train_conf, []
    registry.export_alias(name, registry.PRODUCTION, d / "production")
    train_conf["train"]["init_from"] = str(d / "production")
    return train_conf, [d / "production" / "model.safetensors"]


# ----- the flow -------------------------------------------------------------------
@flow(name="drafter-retrain")
def retrain_flow(
    config: str = str(DEFAULT_CONFIG),
    overrides: list[str] | None = None,
    wait_for_approval: bool | None = None,
) -> dict[str, Any]:
    """Production logs -> a registered candidate awaiting (or given) approval."""
    from prefect.runtime import flow_run

    cfg = load_config(config, overrides or [])
    d, conf, code = cfg.data_dir, cfg.to_dict(), code_version()
    ingested, regenerated, cache = d / "ingested", d / "regenerated", d / "cache"
    drafter_dir, calibration, eval_dir = d / "drafter", d / "calibration", d / "eval"
    tracking = FlowTracking(cfg, run_name=f"retrain {flow_run.get_name() or ''}".strip(),
                            tags={"prefect.flow_run_id": str(flow_run.get_id() or "")},
                            commit=git_state(Path(__file__).resolve().parents[1])["commit"])
    create_link_artifact(tracking.url, link_text="MLflow parent run", key="drafter-mlflow-run")
    stages: list[dict] = []
    try:
        run_stage(tracking, stages, "ingest", ingest_task, ingested, config=conf,
                  inputs=[str(p) for p in cfg.ingest.inputs], out_dir=str(ingested),
                  input_hash=content_hash(*cfg.ingest.inputs), code=code)
        run_stage(tracking, stages, "regenerate", regenerate_task, regenerated, config=conf,
                  in_dir=str(ingested), out_dir=str(regenerated),
                  input_hash=content_hash(ingested / "manifest.json"), code=code)
        tracking.log_datasets({name: (folder, content_hash(folder / "manifest.json"))
                               for name, folder in (("ingested", ingested), ("regenerated", regenerated))})
        run_stage(tracking, stages, "build-cache", build_cache_task, cache, config=conf,
                  in_dir=str(regenerated), out_dir=str(cache),
                  input_hash=content_hash(regenerated / "manifest.json"), code=code)
        train_conf, init = warm_start(cfg, conf)
        run_stage(tracking, stages, "train", train_task, drafter_dir, config=train_conf,
                  cache_dir=str(cache), out_dir=str(drafter_dir),
                  input_hash=content_hash(cache / "manifest.json", *init), code=code)
        run_stage(tracking, stages, "calibrate", calibrate_task, calibration, config=conf,
                  drafter_dir=str(drafter_dir), cache_dir=str(cache), out_dir=str(calibration),
                  input_hash=content_hash(drafter_dir / "manifest.json", cache / "manifest.json"), code=code)
        run_stage(tracking, stages, "evaluate", evaluate_task, eval_dir, config=conf,
                  drafter_dir=str(drafter_dir), out_dir=str(eval_dir), ingested_dir=str(ingested),
                  input_hash=content_hash(calibration / "manifest.json", drafter_dir / "manifest.json",
                                          ingested / "manifest.json"), code=code)
        production = production_eval(cfg, tracking, stages, code)
        with tracking.stage("gate") as gate_run:
            verdict = gate_task(conf, str(eval_dir / "report.json"),
                                str(production / "report.json") if production else None)
            passed = parse(GateVerdict, verdict, "the gate verdict").passed
            atomic_write_json(d / "gate" / "verdict.json", verdict)
            atomic_write_text(d / "gate" / "verdict.md", verdict["markdown"])
            plots.candidate_vs_production(
                json.loads((eval_dir / "report.json").read_text()),
                json.loads((production / "report.json").read_text()) if production else None,
                d / "gate" / "candidate_vs_production.png")
            tracking.log_stage(gate_run, None, d / "gate", cached=False)
            tracking.log_plots([d / "gate" / "candidate_vs_production.png",
                                *(eval_dir / n for n in ("acceptance_curve.png", "tau_per_dataset.png",
                                                         "accepted_length.png")),
                                calibration / "reliability.png", drafter_dir / "training_curves.png"])
            tracking.client.set_tag(gate_run, "drafter.gate", "passed" if passed else "failed")
            tracking.rollup("gate", {"passed": float(passed)})
        release = release_flow(config, overrides, str(drafter_dir), str(eval_dir), verdict,
                               str(production) if production else None, wait_for_approval, tracking.parent,
                               plots_url=registry.run_url(tracking.parent, tracking.client, "plots"))
    except BaseException:
        tracking.finish("FAILED")
        raise
    tracking.finish()
    create_markdown_artifact(run_report(cfg, stages, release, tracking.url), key="drafter-retrain-report",
                             description="retraining run")
    return {"stages": stages, "release": release, "mlflow_run": tracking.parent}


def run_report(cfg: Config, stages: list[dict], release: dict[str, Any], mlflow_url: str) -> str:
    lines = [f"# Retraining `{cfg.run.name}`", "", "| stage | cached | counts |", "|---|---|---|"]
    for s in stages:
        counts = ", ".join(f"{k} {v}" for k, v in (s["counts"] or {}).items() if not isinstance(v, dict))
        lines.append(f"| {s['stage']} | {'yes' if s['cached'] else 'no'} | {counts} |")
    lines += ["", "## tau per dataset", "", "| dataset | candidate | production | change |", "|---|---|---|---|"]
    for row in release.get("tau", []):
        lines.append(f"| {row['dataset']} | {row['candidate']} | {row['production']} | {row['change'] or ''} |")
    lines.append("")
    if not release.get("registered"):
        lines.append(f"**Gate failed**: {release.get('reasons')}. The registry is unchanged.")
    else:
        name, version, decision = release["name"], release["version"], release["approval"]["decision"]
        lines.append(f"Registered **{name} version {version}**; approval: **{decision}**.")
        if decision in ("awaiting", "timeout"):
            lines += ["", "```bash", f"drafter approve {name} {version} --by WHO --reason '...'", "```"]
    lines += ["", f"MLflow run: {mlflow_url}"]
    return "\n".join(lines)


def has_inputs(cfg: Config) -> bool:
    """Some input of `ingest.inputs` holds a file."""
    return any(p.is_file() or (p.is_dir() and any(p.iterdir())) for p in map(Path, cfg.ingest.inputs))


def ensure_demo_logs(cfg: Config, n: int = 200) -> Path | None:
    """Write the demo production logs into the first input folder when no input has any file."""
    inputs = [Path(p) for p in cfg.ingest.inputs]
    if has_inputs(cfg):
        return None
    from drafter.traces.demo import write_demo_logs

    write_demo_logs(inputs[0], n, cfg.run.seed)
    return inputs[0]
