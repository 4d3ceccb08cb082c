"""Prove the export: speculators' own classes load every exported drafter.

    /work/main/.venv/bin/python bench/check_speculators.py [--venv DIR] [--work DIR]

1. Builds (once) a separate virtualenv with `speculators==0.9.0`: its pins differ from this
   project's (transformers<=5.19, datasets<=5.1), and its declared torchvision/torchaudio
   are not imported by the model code, so it is installed with --no-deps next to the
   modules it really imports (torch 2.13 CPU, transformers 5.19, hs-connectors, ...).
2. Here: saves a tiny Llama and a tiny Qwen3 target as HF folders (the verifiers), builds
   each drafter (EAGLE-3 full and reduced vocabulary, DFlash, DSpark vanilla and gated),
   perturbs its weights, exports it, and computes reference outputs with this project's code.
3. In the venv: `bench/speculators_checker.py` loads each folder with
   `SpeculatorModelConfig.from_pretrained` / `SpeculatorModel.from_pretrained`, compares
   config fields and every weight, recomputes the logits (and confidences) with
   speculators' modules, and saves the model back with `save_pretrained`.
4. Here again: loads speculators' re-saved folders with `drafter.models.load_drafter` and
   compares the weights (the round trip back).
Writes bench/results/check_speculators.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PINS = [
    "torch==2.13.0", "transformers==5.19.0", "datasets>=4.0,<=5.1.0", "loguru==0.7.3", "numpy<=2.4.4",
    "pydantic>=2", "pydantic-settings>=2", "safetensors", "tqdm", "httpx", "aiohttp", "psutil", "protobuf",
    "huggingface-hub", "openai>=2", "click", "typer", "rich",
]
NO_DEPS = ["speculators==0.9.0", "hs-connectors==0.9.0"]
CASES = [  # (name, target family, algorithm, config overrides)
    ("eagle3-llama", "llama", "eagle3", []),
    ("eagle3-llama-vocab128", "llama", "eagle3", ["drafter.draft_vocab_size=128"]),
    ("eagle3-qwen3", "qwen3", "eagle3", []),
    ("dflash-llama", "llama", "dflash", []),
    ("dflash-llama-vocab128", "llama", "dflash", ["drafter.draft_vocab_size=128"]),
    ("dspark-llama", "llama", "dspark", []),
    ("dspark-llama-vocab128", "llama", "dspark", ["drafter.draft_vocab_size=128"]),
    ("dspark-qwen3-gated", "qwen3", "dspark", ["drafter.markov_head_type=gated"]),
]


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import speculators.models.dspark, speculators.models.eagle3"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"building {venv} (a few minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + PINS, check=True)
    subprocess.run(pip + ["--no-deps"] + NO_DEPS, check=True)
    subprocess.run(probe, check=True)
    return python


def save_verifier(shape: str, folder: Path):
    from drafter.config import TargetConfig, TinyTargetConfig
    from drafter.target import load_target

    target = load_target(TargetConfig(source="tiny", dtype="float32", tiny=TinyTargetConfig(shape=shape, seed=3)))
    target.model.config.architectures = [type(target.model).__name__]
    target.model.save_pretrained(folder)
    target.tokenizer.save_pretrained(folder)
    return target


def build_case(name: str, target, algo: str, sets: list[str], verifier: Path, work: Path) -> None:
    from safetensors.torch import save_file

    from drafter.config import load_config
    from drafter.models import TargetHeads, TrainBatch, build

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"drafter.algorithm={algo}", "drafter.block_size=5", *sets])
    heads = TargetHeads.from_target(target)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, heads.vocab_size, (1, 20), generator=gen)
    counts = torch.bincount(ids[0], minlength=heads.vocab_size) + torch.arange(heads.vocab_size).flip(0)
    torch.manual_seed(0)
    model = build(cfg, heads, target.layer_ids, counts).eval()
    with torch.no_grad():
        for p in model.parameters():  # not a fresh init: every weight distinct
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.verifier = {"name_or_path": str(verifier), "architectures": [type(target.model).__name__]}
    model.export(work / name)
    feats = target.capture(ids)
    with torch.no_grad():
        if algo == "eagle3":
            batch = TrainBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool),
                               feats.layers, feats.final)
            logits = model.vocab_logits(model.ttt_hidden(batch)[0][0])
            ref = {"tokens": ids[0, 1:], "features": feats.layers[0, :-1].flatten(-2),
                   "positions": torch.arange(1, ids.shape[1]), "logits": logits}
        else:
            L, S = 12, model.config.block_size
            state = model.init_state()
            model.extend(state, feats.layers[:, :L], ids[:, :L])
            block = model.block_ids(ids[0, L : L + 1])[0]
            hidden = model.block_hidden(block[None, None], (L + torch.arange(S))[None, None],
                                        list(zip(state.k, state.v)), torch.ones(1, 1, L, dtype=torch.bool))[0, 0]
            prev = torch.cat([ids[0, L : L + 1], torch.randint(10, heads.vocab_size, (S - 1,), generator=gen)])
            logits, emb = model.draft_logits(hidden, prev)
            ref = {"features": feats.layers[0, :L].flatten(-2), "block_ids": block, "prev": prev, "logits": logits}
            if model.confidence_head is not None:
                ref["confidence"] = torch.sigmoid(model.confidence_logit(hidden, emb))
    save_file({k: v.contiguous() for k, v in ref.items()}, str(work / f"{name}.reference.safetensors"))


def round_trip_back(report: dict, targets: dict, work: Path) -> None:
    """Our loader on what speculators saved: same weights as ours."""
    from safetensors.torch import load_file

    from drafter.models import TargetHeads, load_drafter

    for case in report["cases"]:
        if "resaved" not in case:
            continue
        shape = next(s for n, s, _, _ in CASES if n == case["case"])
        model = load_drafter(Path(case["resaved"]), TargetHeads.from_target(targets[shape]))
        ours = load_file(str(work / case["case"] / "model.safetensors"))
        state = model.state_dict()
        case["back_weights_differing"] = sorted(k for k, v in ours.items() if k in state and not torch.equal(state[k], v))
        case["back_loaded_class"] = type(model).__name__


def verdict(case: dict) -> bool:
    return (
        "error" not in case
        and not case["config_fields_mismatched"]
        and not case["weights_missing_in_speculators"]
        and not case["weights_differing"]
        and case["logits_max_abs_diff"] < 1e-4
        and case.get("confidence_max_abs_diff", 0.0) < 1e-5
        and not case.get("back_weights_differing", ["not checked"])
    )


def write_results(report: dict, command: str) -> bool:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    ok = all(verdict(c) for c in report["cases"])
    report = {"command": command, "all_passed": ok, **report}
    (out / "check_speculators.json").write_text(json.dumps(report, indent=2) + "\n")
    v = report["versions"]
    lines = [
        "# Exported drafters loaded by speculators' own classes",
        "",
        f"Command: `{command}`  ",
        f"speculators {v['speculators']}, transformers {v['transformers']}, torch {v['torch']} (separate venv)",
        "",
        "| case | speculators class | weights equal | speculators-only keys | max abs logit diff | confidence diff | back to ours | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        if "error" in c:
            lines.append(f"| {c['case']} | error: {c['error']} | | | | | | no |")
            continue
        lines.append(
            f"| {c['case']} | {c['model_class']} | {c['weights_checked'] - len(c['weights_differing'])}/{c['weights_checked']} "
            f"| {', '.join(c['speculators_only_keys'])} | {c['logits_max_abs_diff']:.2e} "
            f"| {format(c['confidence_max_abs_diff'], '.2e') if 'confidence_max_abs_diff' in c else '-'} "
            f"| {'equal' if not c.get('back_weights_differing') else 'DIFF'} "
            f"| {'yes' if verdict(c) else 'NO'} |"
        )
    lines += [
        "",
        "Each case: `SpeculatorModelConfig.from_pretrained` (every field we write read back equal), "
        "`SpeculatorModel.from_pretrained` (auto class), every exported tensor equal in the loaded model, "
        "logits (and DSpark confidences) recomputed with speculators' own modules against this project's, "
        "then speculators' `save_pretrained` output loaded back with `drafter.models.load_drafter` (weights equal).",
        "",
        "speculators-only keys are the verifier's frozen tensors that speculators reloads from the verifier "
        "folder (DFlash/DSpark exports do not store the embedding or LM head; EAGLE-3 exports carry copies, "
        "which speculators' EAGLE-3 loader needs).",
    ]
    (out / "check_speculators.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "drafter-speculators-venv")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    work = args.work or Path(tempfile.mkdtemp(prefix="drafter-speculators-check-"))
    work.mkdir(parents=True, exist_ok=True)
    targets = {}
    for shape in ("llama", "qwen3"):
        targets[shape] = save_verifier(shape, work / f"verifier-{shape}")
    for name, shape, algo, sets in CASES:
        build_case(name, targets[shape], algo, sets, work / f"verifier-{shape}", work)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([str(python), str(ROOT / "bench" / "speculators_checker.py"), str(work)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
        return 1
    report = json.loads(proc.stdout)
    round_trip_back(report, targets, work)
    command = "/work/main/.venv/bin/python bench/check_speculators.py"
    return 0 if write_results(report, command) else 1


if __name__ == "__main__":
    sys.exit(main())
