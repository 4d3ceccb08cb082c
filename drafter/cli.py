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

    manifest = train(load(config, set_), cache, out_dir)
    outputs, counts = manifest["outputs"], manifest["counts"]
    print_mapping("trained drafter", {
        "algorithm": manifest["params"]["algorithm"],
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
    as_json: JsonOpt = False,
) -> None:
    """Write a trained drafter in the speculators format vLLM loads (config.json + model.safetensors)."""
    from drafter.models.speculators_format import export_drafter

    print_mapping("exported drafter", export_drafter(drafter_dir, out_dir, verifier, which), as_json)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except DrafterError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
