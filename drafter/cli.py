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
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Stream an answer with speculative decoding; print tokens/s and tau."""
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
        text = tok.decode(tokens, skip_special_tokens=True)
        settled = text if final else text.rstrip("\ufffd")  # hold back half a multi-byte character
        if settled.startswith(shown):
            sys.stdout.write(settled[len(shown):])
            sys.stdout.flush()
            shown = settled

    gen = engine.generate(ids, max_new_tokens, on_tokens=stream)
    stream(0, [], final=True)
    sys.stdout.write("\n")
    rate = len(gen.tokens) / gen.seconds if gen.seconds else float("nan")
    what = f"tau {gen.tau:.2f} over {len(gen.rounds)} rounds" if model is not None else "plain decoding"
    console.print(f"{len(gen.tokens)} tokens in {gen.seconds:.2f} s: {rate:.1f} tokens/s, {what} ({gen.finish_reason})")


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

    cfg = load(config, set_)
    if ingested is None and not no_holdout and (cfg.data_dir / "ingested" / "holdout").is_dir():
        ingested = cfg.data_dir / "ingested"
    out_dir = out_dir or cfg.data_dir / "eval"
    report = evaluate(cfg, drafter or cfg.data_dir / "drafter", out_dir, None if no_holdout else ingested)
    summary = {f"tau {d}": round(t, 3) for d, t in report["tau"].items()}
    summary |= {
        "macro tau": round(report["macro_tau"], 3),
        "speedup": None if report["speedup"] is None else round(report["speedup"], 3),
        "lossless": report["lossless"]["passed"],
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

    cfg = load(config, set_)
    out_dir = out_dir or cfg.data_dir / "calibration"
    result = calibrate(cfg, drafter or cfg.data_dir / "drafter", cache or cfg.data_dir / "cache", out_dir)
    summary = {"applicable": result["applicable"], "temperatures": result.get("temperatures")}
    summary |= {k: round(v, 4) for k, v in (result.get("summary") or {}).items()}
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
    """Apply the promotion policy (verdict in DATA_DIR/gate/); exit status 1 when the candidate fails."""
    from drafter.gates import gate

    cfg = load(config, set_)
    verdict = gate(cfg, candidate, production, out_dir or cfg.data_dir / "gate")
    if as_json:
        out.print_json(json.dumps(verdict, default=str))
    else:
        table = Table(title=f"gate: {'PASSED' if verdict['passed'] else 'FAILED'}")
        for column in ("check", "result", "value", "threshold", "detail"):
            table.add_column(column)
        for c in verdict["checks"]:
            fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
            table.add_row(c["name"], "pass" if c["passed"] else "[red]FAIL[/]", fmt(c["value"]), fmt(c["threshold"]), c["detail"])
        out.print(table)
    if not verdict["passed"]:
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
