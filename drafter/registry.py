"""The serving registry: MLflow Model Registry with human approval before rollout.

One registered model per target (`cfg.registry.model_name`, default `drafter-<target>`).
Each candidate is a model version whose files are what vLLM needs plus the evidence
behind it:

    config.json, model.safetensors   the speculators-format drafter (calibration.json beside)
    sps_cost_table.json              the SPS(B) cost table of the prefix scheduler, if profiled
    reports/eval/...                 evaluation report (report.json/.md, acceptance.csv, PNGs)
    reports/gate/verdict.json|.md    the gate verdict
    lineage.json, data_profile.json  lineage and the training data's domain mix (for monitoring)

How it is logged: the folder is not a Python-callable model on its own (it needs the
target's embeddings and LM head, and vLLM reads the raw folder), so a pyfunc wrapper
would be a fake `predict` and would pickle code. We use MLflow 3's LoggedModel for
non-flavour models instead: `create_logged_model` (linked to the run), upload the folder
with `log_model_artifacts`, finalize, then `create_model_version(source="models:/<id>")`.
`models:/<name>@<alias>` then downloads exactly those files.

Aliases (stages are deprecated): `candidate` (latest registered, awaiting a decision),
`production` (served) and `previous` (what `rollback` returns to). Approval records are
version tags `approval.state|by|at|reason|via` plus a JSON `approval.history` (recent
entries; `approval.history_dropped` counts older ones).

Decisions (approve, promote, reject, rollback) run one at a time under a file lock
(`decision_lock`) and each is an MLflow run in the `drafter-registry-decisions` experiment:
the append-only decision log, with the OS user and host (`decision_log`). Within a decision
the log entry comes first, the version's state tag last, and the run is marked FINISHED
when the aliases have moved: a crash leaves an unfinished entry, never a state without
its record. The next decision first finishes it from what the entry holds (the decision
and the aliases before it; every step can be repeated), and a decision repeated after a
crash (the same one on the same version, or a rollback after a rollback) is that
finishing, not a second decision: a killed `drafter rollback` run again rolls back once.

The rules: `production` only ever points at a version whose approval state is `approved`
(`_set_production` is the one place that moves it and it checks the record); `approve`
also requires the version's gate to have passed against the production of today (or
`force=True`, which is logged); `export_alias`, which everything that serves or evaluates
production goes through, refuses a version that is not approved (unless
`allow_unapproved=True`, written into SERVE.md) and weights whose hash is not the one
registered.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import socket
import shutil
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from drafter.config import Config
from drafter.errors import DrafterError, ExitCode
from drafter.reports import EvalReport, GateVerdict, parse, read_eval_report, read_json
from drafter.manifest import atomic_dir, atomic_write_json, atomic_write_text, redact_url, sha256_file

CANDIDATE, PRODUCTION, PREVIOUS = "candidate", "production", "previous"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
MODEL_TYPE = "speculators-drafter"
_HISTORY_MAX_CHARS = 4000
DECISIONS_EXPERIMENT = "drafter-registry-decisions"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
LOCK_ENV = "DRAFTER_REGISTRY_LOCK"  # a lock file every decider sees (shared storage for a server backend)

log = logging.getLogger(__name__)


class RegistryError(DrafterError):
    """A registry action that cannot be done (missing version, bad folder, nothing to roll back)."""


class ApprovalRequired(RegistryError):
    """Refused: production would move to a version without an approval record."""


class GateFailed(RegistryError):
    """Refused: the candidate failed its gate, so the registry stays unchanged."""

    exit_code = ExitCode.GATE_FAILED


class NotServable(RegistryError):
    """Refused: the version is not approved, or its weights are not the registered ones."""


@dataclass(frozen=True)
class Candidate:
    name: str
    version: str
    run_id: str
    model_id: str
    reused: bool = False  # the same weights were already registered as this version


# ----- names and connections -------------------------------------------------
def model_name(cfg: Config) -> str:
    """The registered model of this run's target: one per target."""
    if cfg.registry.model_name:
        return cfg.registry.model_name
    from drafter.lineage import _target_name

    return "drafter-" + re.sub(r"[^A-Za-z0-9._-]+", "-", _target_name(cfg)).strip("-")


_READY_STORES: set[str] = set()


def ensure_store() -> None:
    """Create (or migrate) a local SQLite store under a file lock, once per process: processes
    that start together (DDP ranks, parallel jobs) otherwise race in MLflow's schema migration."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    if uri in _READY_STORES:
        return
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock"):
            MlflowClient().search_experiments(max_results=1)
    _READY_STORES.add(uri)


def client():
    from mlflow import MlflowClient

    ensure_store()
    return MlflowClient()


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def is_local_store(uri: str | None = None) -> bool:
    uri = uri or tracking_uri()
    return not uri.startswith(("http://", "https://", "databricks"))


def experiment_id(cfg: Config, mlflow_client=None, kind: str = "") -> str:
    """The run's experiment (`kind`: a sibling experiment, e.g. "monitoring", so that its runs do
    not sit among the retrain runs people compare); on a local store its artifacts live in the
    state dir."""
    from mlflow.exceptions import MlflowException

    from drafter.state import state_paths

    c = mlflow_client or client()
    name = (cfg.registry.experiment or cfg.run.name) + (f"-{kind}" if kind else "")
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = state_paths().mlflow_artifacts.as_uri() if is_local_store() else None
        try:
            exp = c.get_experiment(c.create_experiment(name, artifact_location=location))
        except MlflowException:  # created concurrently
            exp = c.get_experiment_by_name(name)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # open on the runs, not the GenAI traces page
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


# MLflow 3's UI opens in its GenAI view unless told otherwise (the experiment tag alone does
# not switch it): our links ask for the model-training view, where runs and metrics are.
UI_VIEW = "workflowType=machine_learning"


def ui_base() -> str:
    """Where the MLflow UI is: the tracking server, or where `mlflow ui` serves a local store."""
    return tracking_uri().rstrip("/") if not is_local_store() else "http://127.0.0.1:5000"


def experiment_url(experiment_id: str) -> str:
    return f"{ui_base()}/#/experiments/{experiment_id}?{UI_VIEW}"


def run_url(run_id: str, mlflow_client=None, artifact: str | None = None) -> str:
    """A link to the run (or to one of its artifact folders) in the MLflow UI."""
    c = mlflow_client or client()
    run = c.get_run(run_id)
    path = f"/artifactPath/{artifact}" if artifact else ""  # the UI's route to an artifact
    return f"{ui_base()}/#/experiments/{run.info.experiment_id}/runs/{run_id}{path}?{UI_VIEW}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def speculators_folder(path: str | Path) -> Path:
    """The folder vLLM loads: `path` itself or its `best/` (a train output folder)."""
    path = Path(path)
    folder = path / "best" if (path / "best" / "config.json").is_file() else path
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise RegistryError(f"{folder}: no {name}; expected a speculators-format drafter folder")
    _check_safetensors(folder / "model.safetensors")
    try:
        json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    return folder


def _check_safetensors(path: Path) -> None:
    """Read the header only: an 8-byte length, then that much JSON naming the tensors."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
            raise ValueError("no tensors")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: not a safetensors file ({exc})") from None


def drafter_facts(folder: Path, cfg: Config | None = None) -> dict[str, Any]:
    """Algorithm and tokens per round, from the speculators config (else the run config)."""
    config = json.loads((folder / "config.json").read_text())
    spec = config.get("speculators_config") or {}
    algorithm = config.get("speculators_model_type") or spec.get("algorithm")
    tokens = None
    for method in spec.get("proposal_methods") or []:
        tokens = method.get("speculative_tokens") or tokens
    tokens = tokens or config.get("block_size") or config.get("num_speculative_tokens")
    verifier = (spec.get("verifier") or {}).get("name_or_path")
    if cfg is not None:
        algorithm = algorithm or cfg.drafter.algorithm
        tokens = tokens or cfg.drafter.block_size
    return {"algorithm": algorithm, "num_speculative_tokens": tokens, "verifier": verifier}


# ----- registering a candidate -----------------------------------------------
def _stage(
    tmp: Path,
    folder: Path,
    eval_dir: Path | None,
    verdict: dict | None,
    verdict_md: str | None,
    calibration: Path | None,
    sps_table: dict | None,
    lineage: dict,
    data_profile: dict | None,
) -> None:
    for item in folder.iterdir():
        if item.is_file():
            shutil.copy2(item, tmp / item.name)
    if calibration is not None and not (tmp / "calibration.json").exists():
        shutil.copy2(calibration, tmp / "calibration.json")
    if sps_table is not None:
        atomic_write_json(tmp / "sps_cost_table.json", sps_table)
    if eval_dir is not None:
        dest = tmp / "reports" / "eval"
        dest.mkdir(parents=True)
        for item in Path(eval_dir).iterdir():
            if item.is_file() and item.suffix in (".json", ".md", ".csv", ".png", ".yaml"):
                shutil.copy2(item, dest / item.name)
    if verdict is not None:
        atomic_write_json(tmp / "reports" / "gate" / "verdict.json", verdict)
        if verdict_md:
            atomic_write_text(tmp / "reports" / "gate" / "verdict.md", verdict_md)
    atomic_write_json(tmp / "lineage.json", lineage)
    if data_profile is not None:
        atomic_write_json(tmp / "data_profile.json", data_profile)


def register_candidate(
    cfg: Config,
    drafter_dir: str | Path,
    *,
    eval_dir: str | Path | None = None,
    gate_verdict: GateVerdict | None = None,
    gate_markdown: str | None = None,
    calibration: str | Path | None = None,
    sps_table: Path | None = None,
    lineage: dict | None = None,
    data_profile: dict | None = None,
    run_id: str | None = None,
    plots_url: str | None = None,
) -> Candidate:
    """Log a new version of the target's drafter and point `candidate` at it.

    Refuses (GateFailed, registry unchanged) when the gate verdict says the candidate did
    not pass. The version starts `approval.state=pending`: only `approve` promotes it.
    Registering the same weights again returns the existing version (`reused=True`).
    """
    from drafter.lineage import collect_lineage, domain_counts, lineage_tags

    folder = speculators_folder(drafter_dir)
    if gate_verdict is not None and not gate_verdict.passed:
        reasons = gate_verdict.reasons or "see the gate report"
        raise GateFailed(f"the candidate failed its gate ({reasons}); the registry is unchanged")
    eval_dir = Path(eval_dir) if eval_dir is not None else None
    if eval_dir is not None and not eval_dir.is_dir():
        raise RegistryError(f"{eval_dir}: no evaluation folder")
    report = read_eval_report(eval_dir)
    tau_macro = report.macro.tau if report else None
    if calibration is None:
        from drafter.scheduler import find_calibration

        calibration = find_calibration(folder, cfg.data_dir / "calibration")
    sps = read_json(Path(sps_table), RegistryError) if sps_table is not None else None
    lineage = lineage if lineage is not None else collect_lineage(cfg)
    if data_profile is None and (cfg.data_dir / "ingested" / "train").is_dir():
        data_profile = {"domains": domain_counts(cfg.data_dir / "ingested", ("train",))}
    facts = drafter_facts(folder, cfg)
    weights = sha256_file(folder / "model.safetensors")

    name = model_name(cfg)
    c = client()
    gated_against = aliases(name, c).get(PRODUCTION, "none") if _model_exists(c, name) else "none"
    existing = _find_by_weights(c, name, weights)
    if existing is not None:
        if gate_verdict is not None:  # gated again today: against today's production
            c.set_model_version_tag(name, existing.version, "gate.production_version", gated_against)
            c.set_model_version_tag(name, existing.version, "gate.passed", "true")
        if existing.tags.get("approval.state") == PENDING:
            c.set_registered_model_alias(name, CANDIDATE, existing.version)
        return Candidate(name, str(existing.version), existing.run_id, existing.model_id or "", reused=True)
    exp_id = experiment_id(cfg, c)
    own_run = run_id is None
    if own_run:
        run_id = c.create_run(exp_id, run_name=f"register {name}", tags={"drafter.stage": "register"}).info.run_id
    tags = {
        **lineage_tags(lineage),
        "drafter.algorithm": str(facts["algorithm"]),
        "drafter.num_speculative_tokens": str(facts["num_speculative_tokens"]),
        "drafter.weights_sha256": weights,
        "target.name": str(lineage.get("target_name")),
        "eval.tau_macro": "" if tau_macro is None else f"{tau_macro:.4f}",
        "gate.passed": "unknown" if gate_verdict is None else "true",
        "gate.production_version": gated_against,  # what the gate compared against (the flow gates, then registers)
        "approval.state": PENDING,
        "approval.requested_at": _now(),
    }
    logged = None
    try:
        logged = c.create_logged_model(
            exp_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE,
            params={"algorithm": str(facts["algorithm"]), "config_hash": cfg.hash()},
        )
        with tempfile.TemporaryDirectory(prefix="drafter-register-") as tmp:
            _stage(Path(tmp), folder, eval_dir, gate_verdict and gate_verdict.to_json(), gate_markdown, calibration and Path(calibration),
                   sps, lineage, data_profile)
            c.log_model_artifacts(logged.model_id, tmp)
            # The run keeps the evidence too (reports, lineage), not a second copy of the weights.
            for sub in ("reports", "lineage.json", "data_profile.json", "sps_cost_table.json"):
                if (Path(tmp) / sub).is_dir():
                    c.log_artifacts(run_id, str(Path(tmp) / sub), sub)
                elif (Path(tmp) / sub).is_file():
                    c.log_artifact(run_id, str(Path(tmp) / sub))
        c.finalize_logged_model(logged.model_id, "READY")
        if tau_macro is not None:
            c.log_metric(run_id, "tau_macro", tau_macro)
        for dataset, tau in (report.tau_by_dataset if report else {}).items():
            if tau is not None:  # undefined: no rounds on that set
                c.log_metric(run_id, f"tau.{_metric_key(dataset)}", tau)
        _ensure_registered_model(c, name, lineage.get("target_name"))
        mv = c.create_model_version(
            name, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags, model_id=logged.model_id,
            description=f"{facts['algorithm']} drafter for {lineage.get('target_name')}, "
            f"tau {tags['eval.tau_macro'] or 'n/a'}; awaiting approval"
            + (f". Plots (candidate vs production, acceptance, reliability, training): [MLflow]({plots_url})"
               if plots_url else ""),
        )
        c.set_registered_model_alias(name, CANDIDATE, mv.version)
    except Exception:
        if logged is not None and c.get_logged_model(logged.model_id).status != "READY":
            c.finalize_logged_model(logged.model_id, "FAILED")
        if own_run:
            c.set_terminated(run_id, "FAILED")
        raise
    if own_run:
        c.set_terminated(run_id, "FINISHED")
    return Candidate(name=name, version=str(mv.version), run_id=run_id, model_id=logged.model_id)


def _find_by_weights(c, name: str, sha256: str):
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name='{name}' and tags.`drafter.weights_sha256` = '{sha256}'")
    except MlflowException:
        return None
    return found[0] if found else None


def _model_exists(c, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
        return True
    except MlflowException:
        return False


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", name)


def _ensure_registered_model(c, name: str, target: str | None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(
                name, tags={"target.name": str(target)},
                description=f"Speculative-decoding drafters for {target}. Aliases: candidate, production, previous.",
            )
        except MlflowException:  # created concurrently
            c.get_registered_model(name)


# ----- reading the registry --------------------------------------------------
def aliases(name: str, mlflow_client=None) -> dict[str, str]:
    """`{alias: version}` (search_model_versions does not fill aliases; the model does)."""
    from mlflow.exceptions import MlflowException

    c = mlflow_client or client()
    try:
        return {k: str(v) for k, v in c.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        raise RegistryError(f"no registered model {name!r} at {tracking_uri()}") from exc


def _version(c, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} has no version {version}") from exc


def list_versions(name: str) -> list[dict[str, Any]]:
    """Versions, newest first, with aliases, approval state and evaluated tau."""
    c = client()
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(name, c).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in c.search_model_versions(f"name='{name}'"):
        t = mv.tags
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(by_version.get(str(mv.version), [])),
            "approval": t.get("approval.state", "none"),
            "by": t.get("approval.by", ""),
            "at": t.get("approval.at", ""),
            "reason": t.get("approval.reason", ""),
            "tau": t.get("eval.tau_macro", ""),
            "algorithm": t.get("drafter.algorithm", ""),
            # A rollback counts until the version is approved again (ISO times compare as text).
            "rolled_back": t.get("rollback.at", "") if t.get("rollback.at", "") > t.get("approval.at", "") else "",
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
            "run_id": mv.run_id,
        })
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def version_evidence(name: str, alias: str) -> dict[str, Any] | None:
    """The evaluation report (an EvalReport) and training-data profile of the version behind
    `alias` (read from its run, without downloading the weights); None when the alias is unset."""
    from mlflow.exceptions import MlflowException

    c = client()
    version = aliases(name, c).get(alias)
    if version is None:
        return None
    mv = _version(c, name, version)
    found: dict[str, Any] = {"version": version, "tags": dict(mv.tags)}
    with tempfile.TemporaryDirectory(prefix="drafter-evidence-") as tmp:
        for key, path in (("eval_report", "reports/eval/report.json"), ("data_profile", "data_profile.json")):
            try:
                found[key] = json.loads(Path(c.download_artifacts(mv.run_id, path, tmp)).read_text())
            except (MlflowException, OSError, json.JSONDecodeError):
                found[key] = None
    if found["eval_report"] is not None:
        found["eval_report"] = parse(EvalReport, found["eval_report"], f"{name} version {version}'s evaluation report")
    return found


# ----- decisions ---------------------------------------------------------------
def normalize_version(version: str | int) -> str:
    """"02", " 2" and 2 are version "2"; anything else is refused (never a different version)."""
    text = str(version).strip()
    if not text.isdigit() or int(text) == 0:
        raise RegistryError(f"version {version!r}: expected a version number such as 3")
    return str(int(text))


def lock_path() -> Path:
    """The decision lock: $DRAFTER_REGISTRY_LOCK, else beside the SQLite store, else in the
    state dir. A server backend with deciders on several hosts needs DRAFTER_REGISTRY_LOCK on
    storage they all see: MLflow has no compare-and-set on aliases."""
    if os.environ.get(LOCK_ENV):
        return Path(os.environ[LOCK_ENV])
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///") + ".decisions.lock")
    from drafter.state import state_paths

    return state_paths().root / "registry-decisions.lock"


@contextlib.contextmanager
def decision_lock(timeout_s: float = 300):
    """One registry decision at a time (approve, promote, reject, rollback)."""
    from filelock import FileLock, Timeout

    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=timeout_s):
            yield
    except Timeout:
        raise RegistryError(f"another registry decision holds {path} for over {timeout_s:.0f} s") from None


def _decisions_experiment(c) -> str:
    from mlflow.exceptions import MlflowException

    from drafter.state import state_paths

    exp = c.get_experiment_by_name(DECISIONS_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = state_paths().mlflow_artifacts.as_uri() if is_local_store() else None
    try:
        return c.create_experiment(DECISIONS_EXPERIMENT, artifact_location=location,
                                   tags={"drafter.purpose": "append-only log of registry decisions"})
    except MlflowException:  # created concurrently
        return c.get_experiment_by_name(DECISIONS_EXPERIMENT).experiment_id


def _open_entry(c, name: str, decision: str, version: str | None, by: str, reason: str, via: str,
                before: dict[str, str], forced: list[str]) -> tuple[str, dict[str, str]]:
    """Start the decision's log entry (an MLflow run, left RUNNING until the decision is done).
    -> (run id, its tags: all that `_carry_out` needs to do the decision, or finish it later)."""
    tags = {
        "registry.model": name, "decision": decision, "version": version or "", "by": by, "reason": reason[:5000],
        "via": via, "os_user": getpass.getuser(), "host": socket.gethostname(), "at": _now(),
        "production_before": before.get(PRODUCTION, ""), "previous_before": before.get(PREVIOUS, ""),
        "forced": "; ".join(forced),
    }
    run = c.create_run(_decisions_experiment(c), run_name=f"{decision} {name} {version or ''}".strip(), tags=tags)
    return run.info.run_id, tags


def _close_entry(c, run_id: str, after: dict[str, str], finished_late: bool = False) -> None:
    if finished_late:
        c.set_tag(run_id, "finished_late", f"{_now()} by {getpass.getuser()}@{socket.gethostname()}")
    c.set_tag(run_id, "production_after", after.get(PRODUCTION, ""))
    c.set_tag(run_id, "previous_after", after.get(PREVIOUS, ""))
    c.set_terminated(run_id, "FINISHED")


def _decide(c, name: str, decision: str, version: str | None, by: str, reason: str, via: str,
            before: dict[str, str], forced: list[str] | None = None) -> dict[str, Any]:
    """Log the decision, carry it out, close the entry."""
    run_id, tags = _open_entry(c, name, decision, version, by, reason, via, before, forced or [])
    result = _carry_out(c, name, tags)
    _close_entry(c, run_id, aliases(name, c))
    return result


def _carry_out(c, name: str, t: dict[str, str]) -> dict[str, Any]:
    """What a logged decision does, from its entry's tags. Every step may be repeated, so a
    decision a crash cut short is finished by running this again (`_finish_interrupted`)."""
    decision, version = t["decision"], t["version"]
    if decision in (APPROVED, REJECTED):
        if t.get("forced"):
            c.set_model_version_tag(name, version, "approval.forced", t["forced"])
        _record_decision(c, name, version, decision, t["by"], t["reason"], t["via"], t["at"])
    if decision in (APPROVED, "promote"):
        return _set_production(c, name, version)
    if decision == REJECTED:
        current = aliases(name, c)
        if current.get(CANDIDATE) == version:
            c.delete_registered_model_alias(name, CANDIDATE)
        return {"name": name, "rejected": version, "production": current.get(PRODUCTION)}
    if decision != "rollback":
        raise RegistryError(f"unknown decision {decision!r} in the decision log of {name}")
    # `version` leaves production for the previous version the entry saw (none: plain decoding).
    mv = _version(c, name, version)
    _append_history(c, name, version, mv.tags, {"decision": "rolled_back", "by": t["by"], "at": t["at"],
                                                "reason": t["reason"], "via": t["via"]})
    for key, value in [("rollback.by", t["by"]), ("rollback.reason", t["reason"]), ("rollback.at", t["at"])]:
        c.set_model_version_tag(name, version, key, value)
    target = t.get("previous_before") or None
    if target is not None:
        result = _set_production(c, name, target, rollback=True)
    else:
        if PRODUCTION in aliases(name, c):
            c.delete_registered_model_alias(name, PRODUCTION)
        result = {"name": name, "production": None}
    return {**result, "previous": None, "rolled_back": version}


def _finish_interrupted(c, name: str) -> dict[str, Any] | None:
    """Finish the last decision on `name` if a crash cut it short (its entry still RUNNING):
    the entry holds what it was and the aliases before it, and every step can be repeated.
    Runs under the decision lock before every decision, so production is never left
    half-moved for the next one. -> {"decision", "version", "result"} of the finished one."""
    exp = c.get_experiment_by_name(DECISIONS_EXPERIMENT)
    if exp is None:
        return None
    last = c.search_runs([exp.experiment_id], f"tags.`registry.model` = '{name}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    if not last or last[0].info.status != "RUNNING":
        return None
    run, tags = last[0], last[0].data.tags
    try:
        result = _carry_out(c, name, tags)
    except RegistryError as exc:  # e.g. its version was deleted since: say so, and let decisions go on
        log.warning("the interrupted %s of %s cannot be finished: %s", tags.get("decision"), name, exc)
        c.set_tag(run.info.run_id, "finished_late", f"no: {exc}"[:5000])
        c.set_terminated(run.info.run_id, "FAILED")
        return None
    _close_entry(c, run.info.run_id, aliases(name, c), finished_late=True)
    return {"decision": tags["decision"], "version": tags["version"], "result": result}


@contextlib.contextmanager
def _deciding(name: str, decision: str, version: str | None = None):
    """What every decision starts with: the lock, a client, and a decision a crash cut short
    finished first. Yields (client, that decision's result when this call repeats it, else
    None): the same decision on the same version, or any rollback after a rollback. Re-running
    a killed command then does not decide twice (nor roll back two versions)."""
    with decision_lock():
        c = client()
        finished = _finish_interrupted(c, name)
        repeats = finished is not None and finished["decision"] == decision and (
            decision == "rollback" or finished["version"] == version)
        yield c, finished["result"] if repeats else None


def decision_log(name: str) -> list[dict[str, Any]]:
    """Every decision on `name`, oldest first; `complete` is False for one a crash cut short and
    no decision has finished since (`finished_late` says when the next one did)."""
    c = client()
    exp = c.get_experiment_by_name(DECISIONS_EXPERIMENT)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], f"tags.`registry.model` = '{name}'", max_results=50000,
                         order_by=["attributes.start_time ASC"])
    keys = ("decision", "version", "by", "reason", "via", "os_user", "host", "at", "forced", "production_before",
            "previous_before", "production_after", "previous_after", "finished_late")
    return [{k: r.data.tags.get(k, "") for k in keys} | {"complete": r.info.status == "FINISHED",
                                                          "run_id": r.info.run_id} for r in runs]


def _approval_logged(name: str, version: str, tags: dict[str, str]) -> bool:
    """Is the version's approval record the one an approve decision in the log wrote?"""
    return any(e["decision"] == APPROVED and e["version"] == version and e["by"] == tags.get("approval.by")
               and e["at"] == tags.get("approval.at") for e in decision_log(name))


def _require_by_reason(decision: str, by: str | None, reason: str | None) -> tuple[str, str]:
    if not (by or "").strip() or not (reason or "").strip():
        raise RegistryError(f"a {decision} record needs who decided (--by) and why (--reason)")
    return by.strip(), reason.strip()


def _record_decision(c, name: str, version: str, decision: str, by: str, reason: str, via: str, at: str) -> None:
    """The version's approval tags; the state last, so a crash never pairs it with an old record."""
    mv = _version(c, name, version)
    entry = {"decision": decision, "by": by, "at": at, "reason": reason, "via": via}
    _append_history(c, name, version, mv.tags, entry)
    for key, value in [("approval.by", by), ("approval.at", entry["at"]), ("approval.reason", reason[:1000]),
                       ("approval.via", via), ("approval.state", decision)]:
        c.set_model_version_tag(name, version, key, value)


def _append_history(c, name: str, version: str, tags: dict[str, str], entry: dict[str, str]) -> None:
    """Recent decisions on the version (a tag has a size limit); the decision log keeps them all."""
    history = json.loads(tags.get("approval.history", "[]"))
    if history and history[-1] == entry:  # written before a crash; the decision is being finished
        return
    history.append(entry)
    dropped = int(tags.get("approval.history_dropped", "0"))
    while len(json.dumps(history)) > _HISTORY_MAX_CHARS and len(history) > 1:
        history.pop(0)
        dropped += 1
    if dropped:
        c.set_model_version_tag(name, version, "approval.history_dropped", str(dropped))
    c.set_model_version_tag(name, version, "approval.history", json.dumps(history))


def approval_problems(mv, current: dict[str, str]) -> list[str]:
    """Why approving this version now would skip a check: its gate did not pass, it was gated
    against another production, or it was rejected."""
    t, problems = mv.tags, []
    if t.get("gate.passed") != "true":
        problems.append(f"its gate has not passed (gate.passed={t.get('gate.passed', 'unknown')})")
    gated = t.get("gate.production_version")
    if gated is None:
        problems.append("the production it was gated against is unknown")
    elif gated != current.get(PRODUCTION, "none") and current.get(PRODUCTION) != str(mv.version):
        problems.append(f"it was gated against production {gated}; production is now "
                        f"{current.get(PRODUCTION, 'none')}: run the gate again")
    if t.get("approval.state") == REJECTED:
        problems.append(f"it was rejected by {t.get('approval.by')} ({t.get('approval.reason', '')[:80]})")
    return problems


def _require_approved(c, name: str, version: str) -> None:
    mv = _version(c, name, version)
    if mv.tags.get("approval.state") != APPROVED or not mv.tags.get("approval.by"):
        raise ApprovalRequired(
            f"{name} version {version} has no approval record (state: "
            f"{mv.tags.get('approval.state', 'none')}); production is unchanged. "
            f"Approve it first: drafter approve {name} {version} --by WHO --reason ..."
        )


def _set_production(c, name: str, version: str, rollback: bool = False) -> dict[str, Any]:
    """The only code that moves `production`: it requires an approval record. A promotion
    keeps the old version as `previous`; a rollback clears `previous` first, so it never
    names the version leaving production (a rollback repeated would bring that one back)."""
    _require_approved(c, name, version)
    current = aliases(name, c)
    old = current.get(PRODUCTION)
    if rollback:
        if PREVIOUS in current:
            c.delete_registered_model_alias(name, PREVIOUS)
        if old != version:
            c.set_registered_model_alias(name, PRODUCTION, version)
            c.set_model_version_tag(name, version, "production.promoted_at", _now())
        return {"name": name, "production": version, "previous": None}
    if old != version:
        if old is not None:
            c.set_registered_model_alias(name, PREVIOUS, old)
        c.set_registered_model_alias(name, PRODUCTION, version)
        c.set_model_version_tag(name, version, "production.promoted_at", _now())
    if current.get(CANDIDATE) == version:
        c.delete_registered_model_alias(name, CANDIDATE)
    return {"name": name, "production": version, "previous": old if old != version else current.get(PREVIOUS)}


def approve(name: str, version: str | int, by: str, reason: str, via: str = "cli",
            force: bool = False) -> dict[str, Any]:
    """Record an approval and promote: production -> this version, previous -> the old one.
    Refused when the version's gate did not pass against today's production, or it was
    rejected, unless `force` (logged with what it overrode)."""
    version = normalize_version(version)
    by, reason = _require_by_reason(APPROVED, by, reason)
    with _deciding(name, APPROVED, version) as (c, repeated):
        if repeated is not None:
            return repeated
        mv = _version(c, name, version)
        current = aliases(name, c)
        problems = approval_problems(mv, current)
        if problems and not force:
            raise ApprovalRequired(f"{name} version {version} cannot be approved: " + "; ".join(problems)
                                   + ". Production is unchanged (--force overrides, and is logged).")
        return _decide(c, name, APPROVED, version, by, reason, via, current, problems)


def promote(name: str, version: str | int, by: str | None = None, via: str = "cli") -> dict[str, Any]:
    """Put an already approved version back into production (refused without a record)."""
    version = normalize_version(version)
    with _deciding(name, "promote", version) as (c, repeated):
        if repeated is not None:
            return repeated
        current = aliases(name, c)
        _require_approved(c, name, version)
        return _decide(c, name, "promote", version, by or getpass.getuser(), "promote", via, current)


def reject(name: str, version: str | int, by: str, reason: str, via: str = "cli") -> dict[str, Any]:
    """Record a rejection; the version loses the `candidate` alias and is never promoted by it."""
    version = normalize_version(version)
    by, reason = _require_by_reason(REJECTED, by, reason)
    with _deciding(name, REJECTED, version) as (c, repeated):
        if repeated is not None:
            return repeated
        _version(c, name, version)
        current = aliases(name, c)
        if current.get(PRODUCTION) == version:
            raise RegistryError(f"{name} version {version} is in production: use `drafter rollback {name}`")
        return _decide(c, name, REJECTED, version, by, reason, via, current)


def record_timeout(name: str, version: str | int, waited_s: int) -> None:
    """The approval window closed without a decision: not promoted, still awaiting the CLI."""
    c, version = client(), normalize_version(version)
    c.set_model_version_tag(name, version, "approval.timed_out_at", _now())
    c.set_model_version_tag(name, version, "approval.timed_out_after_s", str(waited_s))


def rollback(name: str, by: str | None = None, reason: str | None = None, via: str = "cli") -> dict[str, Any]:
    """Undo the last promotion: production -> previous (which must carry an approval record),
    `previous` then cleared. With no previous version, production is cleared: the fleet
    serves the target without this drafter (plain decoding) until a version is approved."""
    by, reason = (by or getpass.getuser()).strip(), (reason or "rollback").strip()
    with _deciding(name, "rollback") as (c, repeated):
        if repeated is not None:
            return repeated
        current = aliases(name, c)
        old, target = current.get(PRODUCTION), current.get(PREVIOUS)
        if old is None:
            raise RegistryError(f"{name} has no version in production to roll back (aliases: {current})")
        if target is not None:
            _require_approved(c, name, target)  # before anything is logged or moved
        return _decide(c, name, "rollback", old, by, reason, via, current)


# ----- export for serving -----------------------------------------------------
def speculative_config(folder: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """The `--speculative-config` JSON vLLM takes (methods eagle3 | dflash | dspark)."""
    return {
        "method": facts["algorithm"],
        "model": str(folder.resolve()),
        "num_speculative_tokens": int(facts["num_speculative_tokens"]),
    }


def export_alias(name: str, alias: str, out: str | Path, allow_unapproved: bool = False,
                 force: bool = False) -> dict[str, Any]:
    """Write the version behind `alias` to `out`: the drafter folder vLLM loads, its evidence,
    `speculative_config.json` and `SERVE.md` with the `vllm serve` command.

    Refuses (NotServable, `out` untouched) a version that is not approved, whatever alias
    points at it (an alias set in the MLflow UI included), unless `allow_unapproved` (said
    in SERVE.md), and always weights whose hash differs from the registered one."""
    import mlflow

    c = client()
    version = aliases(name, c).get(alias)
    if version is None:
        raise RegistryError(f"{name} has no version with alias {alias!r} (aliases: {aliases(name, c)})")
    mv = _version(c, name, version)
    state = mv.tags.get("approval.state", "none")
    approved = state == APPROVED and bool(mv.tags.get("approval.by"))
    if not approved and not allow_unapproved:
        raise NotServable(f"{name} version {version} (@{alias}) is not approved (approval.state={state}): not "
                          f"exported. Approve it (drafter approve {name} {version} ...), or pass "
                          "--allow-unapproved to export a candidate for testing")
    if approved and not _approval_logged(name, str(version), mv.tags):
        # Tags can be edited in the MLflow UI too: an approval counts only if a decision made it.
        raise NotServable(f"{name} version {version}: its approval (by {mv.tags.get('approval.by')}, at "
                          f"{mv.tags.get('approval.at')}) is in no decision of the registry's decision log: "
                          "it was set outside drafter; not exported. Approve it with drafter approve")
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
        speculators_folder(tmp)
        registered = mv.tags.get("drafter.weights_sha256")
        if not registered or sha256_file(tmp / "model.safetensors") != registered:
            raise NotServable(f"{name} version {version}: the downloaded weights' sha256 is not the registered "
                              f"{registered or '(none recorded)'}; the artifact store was changed: not exported")
        facts = drafter_facts(tmp)
        if not facts["algorithm"] or not facts["num_speculative_tokens"]:
            facts["algorithm"] = facts["algorithm"] or mv.tags.get("drafter.algorithm")
            facts["num_speculative_tokens"] = facts["num_speculative_tokens"] or mv.tags.get(
                "drafter.num_speculative_tokens")
        spec = speculative_config(out, facts)
        target = facts["verifier"] or mv.tags.get("target.name") or "TARGET"
        atomic_write_json(tmp / "speculative_config.json", spec)
        atomic_write_json(tmp / "registry.json", {
            "name": name, "version": version, "alias": alias, "exported_at": _now(),
            "tracking_uri": redact_url(tracking_uri()), "tags": dict(mv.tags),
        })
        warning = "" if approved else (
            f"**Not approved** (approval.state={state}): exported with --allow-unapproved, for testing only. "
            "Do not serve it to users.\n\n")
        atomic_write_text(tmp / "SERVE.md", (
            f"# {name} version {version} (@{alias})\n\n{warning}"
            f"Serve the target with this drafter:\n\n```bash\nvllm serve {target} \\\n"
            f"  --speculative-config '{json.dumps(spec)}'\n```\n\n"
            "Add `--per-request-spec-decode-metrics summary` to log per-request acceptance, and point "
            "`drafter monitor --metrics http://HOST:PORT/metrics` at the server to watch tau.\n"
        ))
    return {"name": name, "version": version, "alias": alias, "out": str(out), "speculative_config": spec,
            "approved": approved}
