"""Runs INSIDE the speculators virtualenv (see check_speculators.py): loads each exported
drafter with speculators' own classes and checks config, weights and outputs.

Usage: <venv>/bin/python bench/speculators_checker.py WORK_DIR  -> prints one JSON report.
WORK_DIR holds one folder per case (the export) and `<case>.reference.safetensors` with
inputs and the outputs this project's implementation computed for them.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def block_logits(m, ref):
    """DFlash/DSpark inference pass with speculators' modules: one block after a context."""
    ctx = m.hidden_norm(m.fc(ref["features"][None]))
    x = m.embed_tokens(ref["block_ids"][None])
    L, S = ctx.shape[1], x.shape[1]
    pos = torch.arange(L + S)[None]
    pe = m.rotary_emb(x, pos)
    for layer in m.layers:  # attention_mask None: the block sees all context and itself
        x = layer(hidden_states=x, target_hidden=ctx, attention_mask=None, position_ids=pos, position_embeddings=pe)
    hidden = m.norm(x)
    logits = m.lm_head(hidden)
    out = {}
    prev = ref["prev"][None]
    if getattr(m, "markov_head", None) is not None:
        logits = logits + m.markov_head.block_bias(prev_token_ids=prev, hidden_states=hidden)
    if getattr(m, "confidence_head", None) is not None:
        feats = torch.cat([hidden, m.markov_head.prev_embeddings(prev)], -1) if m.markov_head is not None else hidden
        out["confidence"] = torch.sigmoid(m.confidence_head(feats))[0]
    out["logits"] = logits[0]
    return out


def eagle_logits(m, ref):
    """EAGLE-3 first (non-unrolled) step over a sequence with speculators' modules."""
    h = m.fc(ref["features"][None])
    x = torch.cat([m.embed_tokens(ref["tokens"][None]), h], -1)
    pos = ref["positions"][None]
    n = pos.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    pe = m.rotary_emb(x, pos)
    out = m.layers[0](x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
    return {"logits": m.lm_head(m.norm(out))[0]}


def check(case_dir: Path) -> dict:
    from speculators import SpeculatorModel, SpeculatorModelConfig

    ours = json.loads((case_dir / "config.json").read_text())
    weights = load_file(str(case_dir / "model.safetensors"))
    ref = load_file(str(case_dir.parent / f"{case_dir.name}.reference.safetensors"))
    report: dict = {"case": case_dir.name, "speculators_model_type": ours["speculators_model_type"]}

    config = SpeculatorModelConfig.from_pretrained(str(case_dir))
    report["config_class"] = type(config).__name__
    dumped = config.to_dict()
    skip = {"transformer_layer_config", "speculators_config", "speculators_version", "dtype", "architectures"}
    report["config_fields_mismatched"] = sorted(
        k for k, v in ours.items() if k not in skip and dumped.get(k, "<missing>") != v
    )
    tl = config.transformer_layer_config
    report["layer_config"] = {k: getattr(tl, k) for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")}

    model = SpeculatorModel.from_pretrained(str(case_dir)).eval()
    report["model_class"] = type(model).__name__
    model.config.transformer_layer_config._attn_implementation = "eager"  # CPU, no flex attention
    state = model.state_dict()
    report["weights_missing_in_speculators"] = sorted(k for k in weights if k not in state)
    report["weights_differing"] = sorted(k for k in weights if k in state and not torch.equal(state[k], weights[k]))
    report["speculators_only_keys"] = sorted(k for k in state if k not in weights)
    report["weights_checked"] = len(weights)

    with torch.no_grad():
        got = block_logits(model, ref) if "block_ids" in ref else eagle_logits(model, ref)
    report["logits_max_abs_diff"] = max_diff(got["logits"], ref["logits"])
    report["argmax_agree"] = bool(torch.equal(got["logits"].argmax(-1), ref["logits"].argmax(-1)))
    if "confidence" in ref:
        report["confidence_max_abs_diff"] = max_diff(got["confidence"], ref["confidence"])

    resaved = case_dir.parent / f"{case_dir.name}.resaved"
    model.save_pretrained(str(resaved))  # for the way back: our loader reads what speculators writes
    report["resaved"] = str(resaved)
    return report


def main() -> None:
    from importlib import metadata

    import transformers

    work = Path(sys.argv[1])
    reports = []
    for case_dir in sorted(p for p in work.iterdir() if (work / f"{p.name}.reference.safetensors").is_file()):
        try:
            reports.append(check(case_dir))
        except Exception as exc:  # report every case, not just the first failure
            reports.append({"case": case_dir.name, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-2000:]})
    print(json.dumps({
        "versions": {"speculators": metadata.version("speculators"),
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "cases": reports,
    }, indent=2))


if __name__ == "__main__":
    main()
