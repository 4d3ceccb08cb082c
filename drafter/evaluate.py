"""Evaluation of a drafter by real speculative decoding against its target.

Prompts: seeded subsets of the bundled evaluation sets (first user turn, the target's chat
template) and of the ingested holdout split (production-like traffic: leading system
messages + first user turn), each tagged with its domain.

Per prompt the same engine decodes twice, interleaved so both see the same machine load:
with the drafter, and plain autoregressive (no drafter). Warm-up runs are excluded.

Metrics, per dataset, per domain and overall (ALGORITHMS.md section 0):
- `tau_pooled` (DeepSpec): all tokens emitted in rounds / all rounds; the first token of
  each answer comes from the prefill, not from a round, and is not counted;
- `tau_per_sample_mean`: mean over prompts of each prompt's own tau;
- `tau_ci`: percentile bootstrap interval of the pooled tau, resampling prompts;
- `accept_rate_at_k` (k = 1..gamma): rounds whose first k drafts were all accepted /
  rounds that verified at least k (survival of position k); `conditional_accept_at_k`;
- `acceptance_rate` = accepted / verified drafts; `verify_rate` = verified / drafted;
- `tokens_per_s` with the drafter and `plain_tokens_per_s` without, end to end (prefill
  included), and `speedup` = their ratio; `decode_speedup` leaves the prefill out;
- `round_ms`: an average round's milliseconds by phase (draft, verify, accept, extend, kv,
  other) and `round_cost_in_plain_steps`: what a round costs against one plain decoding step
  (speedup = tau / that cost, up to the prefill);
- losslessness: at temperature 0 the two outputs must be identical token for token; a
  divergence where the two tokens' logits are within the target's own rounding noise there
  (`classify_divergence`) is a floating-point tie (block vs single-token verification),
  counted apart.
- calibration of the confidence head on the observed rounds (ECE raw and with the STS
  temperatures), when the drafter has one.

Interrupted runs resume: finished prompts are kept in `samples.partial.jsonl`, keyed by a
fingerprint of everything that determines their result.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from drafter.config import BUNDLED_EVAL_DIR, Config
from drafter.decoding import PHASES, Generation, Round, SpecEngine, block_size_of, load_drafter, resolve_drafter_dir
from drafter.errors import DrafterError
from drafter.progress import StageProgress
from drafter.reports import EvalReport, Manifest, parse
from drafter import plots
from drafter.manifest import (
    Timer,
    atomic_write_json,
    atomic_write_text,
    check_accounting,
    read_manifest,
    sha256_json,
    sha256_tree,
    write_manifest,
)
from drafter.scheduler import CLOCKS, build_scheduler, cost_table_path, load_temperatures

log = logging.getLogger(__name__)

# Domains of the bundled sets (drafter/data/eval_datasets/README.md).
DOMAINS = {
    "gsm8k": "math", "math500": "math", "aime25": "math",
    "humaneval": "code", "mbpp": "code", "livecodebench": "code",
    "mt-bench": "chat", "arena-hard-v2": "chat",
}
HOLDOUT = "holdout"


class EvaluateError(DrafterError, ValueError):
    """Evaluation inputs are missing or unusable."""


@dataclass
class EvalPrompt:
    id: str  # dataset:row
    dataset: str
    domain: str
    ids: list[int]


# ----- prompts --------------------------------------------------------------------------------
def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` under the target's chat template, ready for the answer."""
    if tokenizer is None:
        raise EvaluateError("the target has no tokenizer: cannot build chat prompts")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # A base model without a template: the plain text of the turns.
    return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]


def _subset(n: int, k: int, seed: int, name: str) -> list[int]:
    rows = list(range(n))
    random.Random(f"{seed}:{name}").shuffle(rows)
    return sorted(rows[:k])


def load_prompts(cfg: Config, tokenizer, ingested_dir: Path | None) -> tuple[list[EvalPrompt], list[dict]]:
    """The seeded prompt subsets; returns (prompts, skipped records with reasons)."""
    ec = cfg.evaluate
    prompts: list[EvalPrompt] = []
    skipped: list[dict] = []

    def add(pid: str, dataset: str, domain: str, messages: list[dict[str, str]]) -> None:
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            skipped.append({"id": pid, "reason": "no user turn"})
            return
        ids = encode_chat(tokenizer, messages)
        if len(ids) > ec.max_prompt_tokens:
            skipped.append({"id": pid, "reason": f"prompt of {len(ids)} tokens > evaluate.max_prompt_tokens"})
            return
        prompts.append(EvalPrompt(pid, dataset, domain, ids))

    folder = Path(ec.eval_dir) if ec.eval_dir else BUNDLED_EVAL_DIR
    for name in ec.datasets:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            known = sorted(p.stem for p in folder.glob("*.jsonl"))
            raise EvaluateError(f"evaluate.datasets: no {path.name} in {folder} (available: {known})")
        lines = path.read_text().splitlines()
        for row in _subset(len(lines), ec.samples_per_dataset, cfg.run.seed, name):
            pid = f"{name}:{row}"
            try:
                turns = json.loads(lines[row])["turns"]
                first = turns[0]
                if not isinstance(first, str):
                    raise TypeError("turn is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                skipped.append({"id": pid, "reason": f"unreadable line: {exc}"})
                continue
            add(pid, name, ec.domains.get(name, DOMAINS.get(name, "other")), [{"role": "user", "content": first}])

    if ingested_dir is not None and ec.include_holdout:
        from datasets import load_from_disk

        split = Path(ingested_dir) / HOLDOUT
        if not split.is_dir():
            raise EvaluateError(f"no holdout split at {split}: run `drafter ingest` first or drop --ingested")
        data = load_from_disk(str(split))
        count = ec.holdout_samples if ec.holdout_samples is not None else ec.samples_per_dataset
        for row in _subset(len(data), count, cfg.run.seed, HOLDOUT):
            record = data[row]
            messages = []
            for m in record["messages"]:  # leading system messages + the first user turn
                if m["role"] == "system":
                    messages.append({"role": "system", "content": m["content"]})
                elif m["role"] == "user":
                    messages.append({"role": "user", "content": m["content"]})
                    break
                else:
                    break
            add(f"{HOLDOUT}:{record.get('id', row)}", HOLDOUT, record.get("domain") or "other", messages)
    return prompts, skipped


# ----- metrics --------------------------------------------------------------------------------
def group_metrics(samples: list[dict], gamma: int, bootstrap: int, ci: float, seed: int) -> dict[str, Any]:
    """Every figure of one group of evaluated prompts (see the module docstring)."""
    rounds = [r for s in samples for r in s["spec"]["rounds"]]  # [proposed, verified, accepted, emitted]
    emitted = np.array([sum(r[3] for r in s["spec"]["rounds"]) for s in samples], dtype=float)
    n_rounds = np.array([len(s["spec"]["rounds"]) for s in samples], dtype=float)
    total_rounds = int(n_rounds.sum())
    tau = float(emitted.sum() / total_rounds) if total_rounds else float("nan")
    per_sample = [e / n for e, n in zip(emitted, n_rounds) if n]
    out: dict[str, Any] = {
        "samples": len(samples),
        "rounds": total_rounds,
        "tokens": int(sum(len(s["spec"]["tokens"]) for s in samples)),
        "tau": tau,  # = tau_pooled, the headline figure
        "tau_pooled": tau,
        "tau_per_sample_mean": float(np.mean(per_sample)) if per_sample else float("nan"),
        "tau_ci": _bootstrap(emitted, n_rounds, bootstrap, ci, seed),
    }
    verified = np.array([r[1] for r in rounds], dtype=int)
    accepted = np.array([r[2] for r in rounds], dtype=int)
    proposed = np.array([r[0] for r in rounds], dtype=int)
    out["accept_rate_at_k"] = [_ratio((accepted >= k).sum(), (verified >= k).sum()) for k in range(1, gamma + 1)]
    out["conditional_accept_at_k"] = [
        _ratio((accepted >= k).sum(), ((accepted >= k - 1) & (verified >= k)).sum()) for k in range(1, gamma + 1)
    ]
    out["acceptance_rate"] = _ratio(accepted.sum(), verified.sum())
    out["verify_rate"] = _ratio(verified.sum(), proposed.sum())
    out["verified_per_round"] = _ratio(verified.sum(), len(rounds))
    out["finish_reasons"] = _count(s["spec"]["finish_reason"] for s in samples)
    timed = [s for s in samples if s.get("plain")]
    if timed:
        spec_tok = sum(len(s["spec"]["tokens"]) for s in timed)
        plain_tok = sum(s["plain"]["tokens"] for s in timed)
        spec_s = sum(s["spec"]["seconds"] for s in timed)
        plain_s = sum(s["plain"]["seconds"] for s in timed)
        spec_dec = sum(s["spec"]["seconds"] - s["spec"]["prefill_seconds"] for s in timed)
        plain_dec = sum(s["plain"]["seconds"] - s["plain"]["prefill_seconds"] for s in timed)
        out["tokens_per_s"] = _ratio(spec_tok, spec_s)
        out["plain_tokens_per_s"] = _ratio(plain_tok, plain_s)
        out["speedup"] = _ratio(out["tokens_per_s"], out["plain_tokens_per_s"])
        out["decode_tokens_per_s"] = _ratio(spec_tok - len(timed), spec_dec)
        out["plain_decode_tokens_per_s"] = _ratio(plain_tok - len(timed), plain_dec)
        out["decode_speedup"] = _ratio(out["decode_tokens_per_s"], out["plain_decode_tokens_per_s"])
        out |= round_breakdown(timed)
    return out


def round_breakdown(samples: list[dict]) -> dict[str, Any]:
    """Milliseconds of an average round by phase (drafter.decoding.PHASES), and what a round
    costs in plain decoding steps (a plain step: plain decode time per token after the first)."""
    broken = [s for s in samples if s["spec"].get("breakdown") and s["spec"]["rounds"]]
    rounds = sum(len(s["spec"]["rounds"]) for s in broken)
    if not rounds:
        return {}
    ms = {k: 1000 * sum(s["spec"]["breakdown"].get(k, 0.0) for s in broken) / rounds for k in PHASES}
    ms["total"] = sum(ms.values())
    plain_steps = sum(s["plain"]["tokens"] - 1 for s in broken)
    plain_s = sum(s["plain"]["seconds"] - s["plain"]["prefill_seconds"] for s in broken)
    step_ms = _ratio(1000 * plain_s, plain_steps)
    return {"round_ms": ms, "plain_step_ms": step_ms, "round_cost_in_plain_steps": _ratio(ms["total"], step_ms)}


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else float("nan")


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _bootstrap(emitted: np.ndarray, rounds: np.ndarray, reps: int, ci: float, seed: int) -> list[float] | None:
    """Percentile interval of the pooled tau, resampling prompts with replacement."""
    n = len(emitted)
    if reps <= 0 or n == 0 or rounds.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n))
    den = rounds[idx].sum(1)
    taus = emitted[idx].sum(1)[den > 0] / den[den > 0]
    lo, hi = np.quantile(taus, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return [float(lo), float(hi)]


def calibration_metrics(samples: list[dict], gamma: int, temperatures: Sequence[float] | None, bins: int) -> dict[str, Any]:
    """ECE of the confidence head on the rounds this evaluation observed (raw and with STS)."""
    from drafter.calibrate import Survival, position_metrics

    rounds = [
        Round(*r, confidences=c)
        for s in samples
        for r, c in zip(s["spec"]["rounds"], s["spec"]["confidences"] or [None] * len(s["spec"]["rounds"]))
    ]
    data = Survival(rounds, gamma)
    if not len(data):
        return {"applicable": False, "reason": "the drafter returns no confidences"}
    raw = position_metrics(data, None, bins)
    out: dict[str, Any] = {"applicable": True, "temperatures": list(temperatures) if temperatures else None}
    out["ece_raw"] = [p["ece"] for p in raw]
    out["ece_raw_mean"] = _nanmean(out["ece_raw"])
    out["auroc_raw"] = [p["auroc"] for p in raw]
    if temperatures:
        cal = position_metrics(data, temperatures, bins)
        out["ece_calibrated"] = [p["ece"] for p in cal]
        out["ece_calibrated_mean"] = _nanmean(out["ece_calibrated"])
    out["ece"] = out.get("ece_calibrated_mean", out["ece_raw_mean"])  # what the scheduler will see
    out["rounds_per_position"] = [p["count"] for p in raw]
    return out


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


# ----- losslessness ---------------------------------------------------------------------------
@torch.inference_mode()
def classify_divergence(target, prompt: list[int], a: list[int], b: list[int], tolerance: float) -> dict[str, Any] | None:
    """None if a == b; otherwise where they diverge and whether the two tokens tie there.

    The engine computes the target in blocks of different widths (a prefill, verification
    blocks, single tokens), and in bf16 those round the logits apart, by more than the
    format's epsilon after 30 layers. So the rule measures that noise where the outputs part:
    the logits at the divergence through three forwards of other shapes (the whole prefix at
    once; the prompt, then the answer so far as one block; everything but the last token,
    then it alone). The two tokens tie when their gap is within `tolerance`, 4 ulps of the
    top logit, or twice the largest difference between those forwards."""
    if a == b:
        return None
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if i >= min(len(a), len(b)):  # one is a prefix of the other: a length/EOS disagreement
        return {"position": i, "margin": None, "noise": None, "tie": False}
    ids = prompt + a[:i]
    cuts = dict.fromkeys(c if 0 < c < len(ids) else 0 for c in (0, len(prompt), len(ids) - 1))  # distinct forwards
    paths = [_last_logits(target, ids, cut) for cut in cuts]
    logits = paths[0]
    margin = float((logits[a[i]] - logits[b[i]]).abs())
    noise = max(float((x - y).abs().max()) for x in paths for y in paths)
    top = float(logits.max().abs())
    limit = max(tolerance, 4 * torch.finfo(target.dtype).eps * top, 2 * noise)
    return {"position": i, "margin": margin, "noise": noise, "tie": margin <= limit}


def _last_logits(target, ids: list[int], cut: int) -> torch.Tensor:
    """The target's logits after `ids`, computed as ids[:cut] then ids[cut:] (cut 0: at once)."""
    from transformers import DynamicCache

    x = torch.tensor([ids], device=target.device)
    if cut:
        cache = DynamicCache()
        target.capture(x[:, :cut], past_key_values=cache, use_cache=True)
        feats = target.capture(x[:, cut:], position_ids=torch.arange(cut, len(ids), device=target.device)[None],
                               past_key_values=cache, use_cache=True)
    else:
        feats = target.capture(x)
    return target.logits_from_hidden(feats.final[0, -1]).float()


# ----- the stage ------------------------------------------------------------------------------
def evaluate(cfg: Config, drafter_dir: Path, out_dir: Path, ingested_dir: Path | None = None, target=None) -> Manifest:
    """`drafter evaluate`: lossless speculative decoding of the eval sets and holdout; write the report."""
    from drafter.target import load_target

    resolve_drafter_dir(drafter_dir)  # fail before loading the target
    timer = Timer()
    with timer("load"):
        target = target or load_target(cfg)
        drafter, model_dir = load_drafter(drafter_dir, target)
    evaluate_drafter(cfg, drafter, target, Path(out_dir), ingested_dir, drafter_dir=model_dir, timer=timer)
    return read_manifest(out_dir)


def evaluate_drafter(
    cfg: Config,
    drafter,
    target,
    out_dir: Path,
    ingested_dir: Path | None = None,
    drafter_dir: Path | None = None,
    timer: Timer | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Decode the prompts with and without `drafter`; `clock` replaces `evaluate.clock`'s."""
    ec = cfg.evaluate
    timer = timer or Timer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gamma = ec.block_size or block_size_of(drafter, cfg.drafter.block_size)
    temperatures = load_temperatures(drafter_dir, cfg.data_dir / "calibration")
    scheduler = build_scheduler(cfg, drafter_dir)
    with timer("prompts"):
        prompts, skipped = load_prompts(cfg, target.tokenizer, ingested_dir)
    if not prompts:
        raise EvaluateError(f"no prompts to evaluate ({len(skipped)} skipped: {skipped[:3]})")

    drafter_hash = sha256_tree(drafter_dir) if drafter_dir else f"in-memory:{type(drafter).__name__}"
    fingerprint = sha256_json({
        "target": target.fingerprint, "drafter": drafter_hash, "evaluate": ec.model_dump(mode="json"),
        "scheduler": cfg.scheduler.model_dump(mode="json"), "gamma": gamma, "temperatures": temperatures,
        "seed": cfg.run.seed,
    })[:16]
    clock = clock or CLOCKS[ec.clock]
    spec = SpecEngine(target, drafter, gamma=gamma, temperature=ec.temperature, scheduler=scheduler, seed=cfg.run.seed,
                      clock=clock)
    plain = SpecEngine(target, None, temperature=ec.temperature, seed=cfg.run.seed, clock=clock)
    greedy_spec = spec if ec.temperature == 0 else SpecEngine(target, drafter, gamma=gamma, scheduler=scheduler)
    greedy_plain = plain if ec.temperature == 0 else SpecEngine(target, None)

    partial = out_dir / "samples.partial.jsonl"
    done = _resume(partial, fingerprint)
    todo = [p for p in prompts if p.id not in done]
    if done:
        log.info("resuming: %d of %d prompts already evaluated", len(prompts) - len(todo), len(prompts))
    with timer("warmup"):  # first calls pay one-off costs (allocations, kernels): not measured
        spec.generate(prompts[0].ids, min(ec.warmup_tokens, ec.max_new_tokens))
        plain.generate(prompts[0].ids, min(ec.warmup_tokens, ec.max_new_tokens))
    # A header only where there is none: a run interrupted before its first prompt leaves a
    # header-only file that `_resume` keeps (with no records), and a second header there would
    # be read as a record by the next resume.
    headed = partial.is_file() and partial.stat().st_size > 0
    with timer("decode"), partial.open("a") as sink:
        if not headed:
            sink.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        bar = StageProgress(total=len(prompts), initial=len(prompts) - len(todo), desc="evaluate", unit="prompt",
                            disable=len(todo) < 2)
        for n, p in enumerate(todo):
            record = _evaluate_prompt(p, spec, plain, ec, cfg.run.seed)
            needs_check = ec.temperature > 0 and len(prompts) - len(todo) + n < ec.lossless_check_samples
            if ec.temperature == 0:
                record["divergence"] = classify_divergence(
                    target, p.ids, record["spec"]["tokens"], record.pop("plain_tokens"), ec.tie_tolerance)
                record["lossless_checked"] = True
            elif needs_check:
                a = greedy_spec.generate(p.ids, ec.max_new_tokens).tokens
                b = greedy_plain.generate(p.ids, ec.max_new_tokens).tokens
                record["divergence"] = classify_divergence(target, p.ids, a, b, ec.tie_tolerance)
                record["lossless_checked"] = True
            record.pop("plain_tokens", None)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[p.id] = record
            bar.update(1)
        bar.close()
    samples = [done[p.id] for p in prompts]

    report = build_report(cfg, target, drafter, samples, skipped, gamma, temperatures, drafter_dir, fingerprint)
    write_outputs(report, samples, out_dir)
    if scheduler is not None and scheduler.cost_table is not None:  # the cost table travels with the run
        shutil.copyfile(cost_table_path(cfg), out_dir / "sps_cost_table.json")
    partial.unlink(missing_ok=True)
    cfg.save(out_dir / "config.yaml")
    counts = {"selected": len(prompts) + len(skipped), "evaluated": len(samples), "skipped": len(skipped)}
    check_accounting(counts["selected"], {"evaluated": counts["evaluated"], "skipped": counts["skipped"]}, "eval prompts")
    write_manifest(
        out_dir, "evaluate",
        inputs={"drafter": str(drafter_dir) if drafter_dir else drafter_hash, "drafter_hash": drafter_hash,
                "target": target.fingerprint, "ingested": str(ingested_dir) if ingested_dir else None},
        params={"gamma": gamma, "temperature": ec.temperature, "max_new_tokens": ec.max_new_tokens,
                "samples_per_dataset": ec.samples_per_dataset, "scheduler": cfg.scheduler.mode, "seed": cfg.run.seed},
        counts=counts | {"rounds": report["overall"]["rounds"], "tokens": report["overall"]["tokens"]},
        durations=timer.durations,
        outputs={name: str(out_dir / name) for name in ("report.json", "report.md", "acceptance.csv")},
        metrics=report_metrics(report),
    )
    return report


def _evaluate_prompt(p: EvalPrompt, spec: SpecEngine, plain: SpecEngine, ec, seed: int) -> dict[str, Any]:
    """One prompt, with the drafter and (for the speedup) without; same sampling seed."""
    prompt_seed = int(sha256_json([seed, p.id])[:8], 16)
    spec.seed(prompt_seed)
    gen = spec.generate(p.ids, ec.max_new_tokens)
    record = {"id": p.id, "dataset": p.dataset, "domain": p.domain, "spec": gen.to_dict()}
    if ec.measure_speedup or ec.temperature == 0:
        plain.seed(prompt_seed)
        base: Generation = plain.generate(p.ids, ec.max_new_tokens)
        record["plain"] = {"tokens": len(base.tokens), "seconds": base.seconds, "prefill_seconds": base.prefill_seconds}
        record["plain_tokens"] = base.tokens
        if not ec.measure_speedup:
            record["plain"] = None
    return record


def _resume(partial: Path, fingerprint: str) -> dict[str, dict]:
    """Records of a previous interrupted run with the same fingerprint; anything else is discarded."""
    if not partial.is_file():
        return {}
    lines = partial.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        partial.unlink()
        return {}
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the interruption: that prompt runs again
            continue
        done[record["id"]] = record
    # Rewrite without a torn last line so appends stay valid JSONL.
    atomic_write_text(partial, "\n".join([lines[0], *(json.dumps(r) for r in done.values())]) + "\n")
    return done


def build_report(cfg, target, drafter, samples, skipped, gamma, temperatures, drafter_dir, fingerprint) -> dict[str, Any]:
    ec = cfg.evaluate
    seed = cfg.run.seed

    def metrics(group: list[dict], name: str) -> dict[str, Any]:
        return group_metrics(group, gamma, ec.bootstrap, ec.ci_level, int(sha256_json([seed, name])[:8], 16))

    datasets = list(dict.fromkeys(s["dataset"] for s in samples))
    domains = sorted({s["domain"] for s in samples})
    per_dataset = {d: {"domain": _domain_of(samples, d)} | metrics([s for s in samples if s["dataset"] == d], d) for d in datasets}
    per_domain = {d: metrics([s for s in samples if s["domain"] == d], f"domain:{d}") for d in domains}
    overall = metrics(samples, "overall")
    overall["macro_tau"] = _nanmean([m["tau_pooled"] for m in per_dataset.values()])
    checked = [s for s in samples if s.get("lossless_checked")]
    divergences = [s["divergence"] for s in checked if s.get("divergence")]
    ties = sum(1 for d in divergences if d["tie"])
    lossless = {
        "checked": len(checked),
        "identical": len(checked) - len(divergences),
        "ties": ties,
        "mismatches": len(divergences) - ties,
        "tie_tolerance": ec.tie_tolerance,
        "passed": bool(checked) and len(divergences) == ties,
        "how": "greedy output with the drafter vs plain greedy decoding of the same target, token for token",
    }
    return {
        "fingerprint": fingerprint,
        "target": target.info(),
        "drafter": {
            "algorithm": getattr(drafter, "algorithm", type(drafter).__name__),
            "path": str(drafter_dir) if drafter_dir else None,
            "gamma": gamma,
            "calibration_temperatures": temperatures,
        },
        "settings": {
            "temperature": ec.temperature, "max_new_tokens": ec.max_new_tokens,
            "samples_per_dataset": ec.samples_per_dataset, "seed": seed, "scheduler": cfg.scheduler.mode,
            "threshold": cfg.scheduler.threshold if cfg.scheduler.mode == "threshold" else None,
            "bootstrap": ec.bootstrap, "ci_level": ec.ci_level, "clock": ec.clock, "torch_threads": torch.get_num_threads(),
            "tau_definition": "tau_pooled = tokens emitted in rounds / rounds (DeepSpec); "
                              "tau_per_sample_mean = mean of per-prompt tau",
        },
        "tau": {d: m["tau_pooled"] for d, m in per_dataset.items()},
        "macro_tau": overall["macro_tau"],
        "speedup": overall.get("speedup"),
        # What the registry and monitoring read: macro tau over datasets, survival per position.
        "macro": {"tau": overall["macro_tau"], "accept_rate": overall["accept_rate_at_k"], "speedup": overall.get("speedup")},
        "datasets": per_dataset,
        "domains": per_domain,
        "overall": overall,
        "lossless": lossless,
        "calibration": calibration_metrics(samples, gamma, temperatures, cfg.calibrate.bins),
        "skipped": skipped,
    }


def _domain_of(samples: list[dict], dataset: str) -> str:
    found = sorted({s["domain"] for s in samples if s["dataset"] == dataset})
    return found[0] if len(found) == 1 else "mixed"


# ----- outputs --------------------------------------------------------------------------------
def write_outputs(report: dict[str, Any], samples: list[dict], out_dir: Path) -> None:
    parse(EvalReport, report, "the report")  # the shape the registry, the gate and monitoring read
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_text(out_dir / "acceptance.csv", acceptance_csv(report))
    atomic_write_json(out_dir / "metrics.json", report_metrics(report))  # flat: `dvc metrics show`
    plots.acceptance_per_position(report, out_dir / "acceptance_curve.png")
    plots.tau_per_dataset(report, out_dir / "tau_per_dataset.png")
    plots.accepted_length_histogram([r[3] for s in samples for r in s["spec"]["rounds"]], report["drafter"]["gamma"],
                                    out_dir / "accepted_length.png")


def acceptance_csv(report: dict[str, Any]) -> str:
    """Wide per-position table for DVC plots: x = position, one column per dataset + overall."""
    buf = io.StringIO()
    groups = {"overall": report["overall"], **report["datasets"]}
    writer = csv.writer(buf)
    writer.writerow(["position", *groups])
    for k in range(report["drafter"]["gamma"]):
        writer.writerow([k + 1, *(_fmt(g["accept_rate_at_k"][k]) for g in groups.values())])
    return buf.getvalue()


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(r: dict[str, Any]) -> str:
    s, o = r["settings"], r["overall"]
    lines = [
        f"# Drafter evaluation: {r['drafter']['algorithm']} on {r['target']['name']}",
        "",
        f"Block size {r['drafter']['gamma']}, temperature {s['temperature']}, up to {s['max_new_tokens']} new tokens, "
        f"{s['samples_per_dataset']} prompts per dataset (seed {s['seed']}), scheduler `{s['scheduler']}`.",
        f"tau = tokens emitted per round including the target's bonus token; *pooled* = all tokens / all rounds "
        f"(DeepSpec), *per-sample* = mean of each prompt's tau. CI: {int(s['ci_level'] * 100)}% bootstrap over prompts.",
        "",
        f"**macro tau {_fmt(r['macro_tau'], 3)}**, overall pooled tau {_fmt(o['tau_pooled'], 3)}, "
        f"speedup {_fmt(o.get('speedup'), 2)}x end to end ({_fmt(o.get('decode_speedup'), 2)}x decode only), "
        f"lossless check {'passed' if r['lossless']['passed'] else 'FAILED'} "
        f"({r['lossless']['identical']}/{r['lossless']['checked']} identical, {r['lossless']['ties']} float ties).",
        "",
        "| dataset | domain | prompts | rounds | tau pooled | tau CI | tau per-sample | accept@1 | accept rate | verify rate | tok/s | plain tok/s | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(name, m["domain"], m) for name, m in r["datasets"].items()]
    rows += [(f"*{d}*", d, m) for d, m in r["domains"].items()] + [("**overall**", "", o)]
    for name, domain, m in rows:
        ci = m["tau_ci"]
        lines.append(
            f"| {name} | {domain} | {m['samples']} | {m['rounds']} | {_fmt(m['tau_pooled'], 3)} | "
            f"{'' if not ci else f'{ci[0]:.2f}-{ci[1]:.2f}'} | {_fmt(m['tau_per_sample_mean'], 3)} | "
            f"{_fmt(m['accept_rate_at_k'][0] if m['accept_rate_at_k'] else None, 3)} | {_fmt(m['acceptance_rate'], 3)} | "
            f"{_fmt(m['verify_rate'], 3)} | {_fmt(m.get('tokens_per_s'), 1)} | {_fmt(m.get('plain_tokens_per_s'), 1)} | "
            f"{_fmt(m.get('speedup'), 2)} |"
        )
    lines += ["", "accept_rate@k (survival of position k):", "",
              "| k | " + " | ".join(["overall", *r["datasets"]]) + " |",
              "|---" * (len(r["datasets"]) + 2) + "|"]
    for k in range(r["drafter"]["gamma"]):
        vals = [o["accept_rate_at_k"][k], *(m["accept_rate_at_k"][k] for m in r["datasets"].values())]
        lines.append(f"| {k + 1} | " + " | ".join(_fmt(v, 3) for v in vals) + " |")
    if o.get("round_ms"):
        ms = o["round_ms"]
        lines += ["", f"A round takes {_fmt(ms['total'], 1)} ms, {_fmt(o['round_cost_in_plain_steps'], 2)} plain decoding "
                  f"steps of {_fmt(o['plain_step_ms'], 1)} ms: " + ", ".join(f"{k} {_fmt(ms[k], 1)}" for k in PHASES) + "."]
    cal = r["calibration"]
    lines.append("")
    if cal.get("applicable"):
        lines.append(f"Confidence head: ECE raw {_fmt(cal['ece_raw_mean'])}"
                     + (f", with STS temperatures {_fmt(cal['ece_calibrated_mean'])}" if cal.get("temperatures") else
                        " (not calibrated yet)") + " (mean over positions, on the rounds above).")
    else:
        lines.append("Confidence head: none.")
    if r["skipped"]:
        lines += ["", f"Skipped prompts: {len(r['skipped'])} (see report.json)."]
    return "\n".join(lines) + "\n"


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The headline figures of an evaluation, flat (the manifest's `metrics`, MLflow metrics)."""
    o = report["overall"]
    metrics = {"macro_tau": report["macro_tau"], "tau_pooled": o["tau_pooled"],
               "lossless_passed": float(report["lossless"]["passed"])}
    for key in ("speedup", "decode_speedup", "tokens_per_s", "plain_tokens_per_s", "acceptance_rate",
                "round_cost_in_plain_steps"):
        metrics[key] = o.get(key)
    metrics |= {f"accept_rate_at_{k + 1}": a for k, a in enumerate(o.get("accept_rate_at_k") or [])}
    metrics |= {f"tau.{d}": m["tau_pooled"] for d, m in report["datasets"].items()}
    metrics |= {f"domain_tau.{d}": m["tau_pooled"] for d, m in report["domains"].items()}
    if report["calibration"].get("applicable"):
        metrics["ece"] = report["calibration"]["ece"]
    return {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
