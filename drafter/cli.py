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
    summary = {f"{split} {k}": v for split, c in manifest["counts"].items()
               for k, v in c.items() if k in ("input", "succeeded", "errors", "skipped", "completion_tokens")}
    print_mapping("regenerate", {"backend": manifest["params"]["backend"], "model": manifest["params"]["model"],
                                 **summary, "tokens/s": manifest["throughput"]["tokens_per_s"]}, as_json)


@app.command("build-cache")
def build_cache_cmd(
    in_dir: InOpt = None, out_dir: OutOpt = None, config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cache the target's feature-layer and final hidden states over the regenerated data."""
    from drafter.cache import build_cache

    cfg = load(config, set_)
    manifest = build_cache(cfg, in_dir or cfg.data_dir / "regenerated", out_dir or cfg.data_dir / "cache")
    if not manifest:  # a non-zero rank under accelerate launch
        return
    summary = {}
    for split, c in manifest["counts"].items():
        size = manifest["size"][split]
        summary |= {f"{split} samples": c["samples"], f"{split} skipped": c["skipped"], f"{split} tokens": c["tokens"],
                    f"{split} reused": c["reused"], f"{split} bytes/token": size["bytes_per_token"],
                    f"{split} vs plain bf16": size["size_vs_plain"], f"{split} tokens/s": size["tokens_per_s"],
                    f"{split} cache": manifest["outputs"][f"{split}.json"]["path"]}
    print_mapping("build-cache", summary, as_json)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except DrafterError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
