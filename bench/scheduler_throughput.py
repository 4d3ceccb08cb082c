"""Throughput of confidence-scheduled verification: fixed block vs threshold vs Algorithm 1
(packed verification, and padded verification with the shared-width rule; drafter/scheduler.py,
drafter/attention.py). Decoding here is greedy, so both weigh every choice instead of stopping
early (`prefix_lengths(any_width=True)`): packed, every token budget; padded, every width.

For each concurrency R in {1, 2, 4, 8, 16}, R prompts are decoded together by the engine
(one batched target verification per round) under each policy, in one process and one
run, with the SPS cost table profiled at the start of the same run. Reported: generated
(accepted) tokens per second over all R requests, tau, drafts verified per round.

Drafter: `--drafter DIR` (a trained drafter with a confidence head, e.g. DSpark), or by
default a synthetic drafter (tests/drafters.py `ScriptedDrafter`) that follows the
target's own greedy answers with random corruptions whose per-position rate is drawn
before each token and reported as its (calibrated) confidence. The synthetic drafter
drafts for free (and where bf16 rounding takes the answer off its script, its resync is
left out of the clock: bench/_common.py `Resync`), so the table isolates the verification
side the scheduler controls. "fixed", "threshold" and "alg. 1, packed" verify packed (each
request its own drafts); "algorithm 1" is `scheduler.mode=prefix` as shipped: every row padded to
the longest block, a draft judged with the block width it shares (`scheduler.shared_width`).
The ratios are the shipped Algorithm 1's.

    python bench/scheduler_throughput.py [--drafter data/drafter] [--rows 1 2 4 8 16]
                                         [--clock process --threads 1] [-s section.key=value]

On a machine shared with other jobs, `--clock process --threads 1` times the CPU work of
this process (the SPS table and the throughput use the same clock), which other tenants
barely disturb; the default is the wall clock.

With the synthetic drafter, `headroom` also reports what choosing the verified drafts could gain
over the fixed block at all, from the same run's SPS table: the expected-throughput-best choice
every round (padded and packed) and a clairvoyant ceiling.

Writes bench/results/scheduler_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._common import RESULTS, Resync, add_clock_args, apply_threads, command, machine, write_results  # noqa: E402
from drafter.config import load_config  # noqa: E402
from drafter.decoding import SpecEngine, block_size_of, load_drafter, round_totals  # noqa: E402
from drafter.evaluate import load_prompts  # noqa: E402
from drafter.scheduler import CLOCKS, Scheduler, load_temperatures, profile_target  # noqa: E402
from drafter.target import load_target  # noqa: E402

ALG1 = "algorithm 1 (padded, shared width)"  # scheduler.mode=prefix as shipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m-dspark.yaml"))
    ap.add_argument("--drafter", type=Path, default=None, help="trained drafter folder; default: synthetic")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--gamma", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--error", type=float, nargs=2, default=[1.0, 3.0], help="synthetic drafter: Beta(a, b) corruption rate")
    ap.add_argument("--context", type=int, default=None,
                    help="cached tokens when profiling SPS (default: longest prompt + half the answer, as in the runs)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds over the widths when profiling SPS")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every policy at each R (the median is reported)")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="section.key=value")
    add_clock_args(ap)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    apply_threads(args)
    clock = CLOCKS[args.clock]

    cfg = load_config(args.config, ["evaluate.datasets=[gsm8k,humaneval,mt-bench,mbpp]",
                                    f"evaluate.samples_per_dataset={max(args.rows)}", *args.overrides])
    target = load_target(cfg)
    prompts = [p.ids for p in load_prompts(cfg, target.tokenizer, None)[0]]
    random.Random(0).shuffle(prompts)
    prompts = prompts[: max(args.rows)]

    if args.drafter:
        drafter, folder = load_drafter(args.drafter, target)
        temps = load_temperatures(folder)
        name = f"{drafter.algorithm} ({folder})"
    else:
        from tests.drafters import ScriptedDrafter

        resync = Resync(target, prompts, args.max_new_tokens, clock)
        scripts = {tuple(p): resync.plain.generate(p, args.max_new_tokens).tokens for p in prompts}
        torch.manual_seed(0)
        drafter = ScriptedDrafter(scripts, target.vocab_size, error=tuple(args.error), resync=resync)
        clock = resync.clock
        temps, name = None, f"synthetic (scripted greedy answer, corruption ~ Beta{tuple(args.error)})"
    gamma = args.gamma or block_size_of(drafter, cfg.drafter.block_size)

    print(f"profiling SPS(R, w) for R in {args.rows}, w in 1..{gamma + 1}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    context = args.context or max(len(p) for p in prompts) + args.max_new_tokens // 2
    table = profile_target(target, args.rows, gamma + 1, context, args.reps, progress=False, clock=clock)
    profile_s = time.perf_counter() - start

    policies = {  # label: scheduler (the engine verifies packed or padded as its rule assumes)
        "fixed": None,
        f"threshold {args.threshold}": Scheduler("threshold", args.threshold, temps),
        "alg. 1, packed": Scheduler("prefix", temperatures=temps, cost_table=table),
        ALG1: Scheduler("prefix", temperatures=temps, cost_table=table, packed=False),
    }
    results = []
    for rows in args.rows:
        batch = prompts[:rows]
        runs: dict[str, list[dict]] = {label: [] for label in policies}
        for rep in range(args.repeats):  # policies in turn, so that a slow spell does not fall on one
            for label, scheduler in policies.items():
                engine = SpecEngine(target, drafter, gamma=gamma, scheduler=scheduler, seed=0, clock=clock)
                engine.generate_batch(batch[:1], 4)  # warm-up, not measured
                torch.manual_seed(0)
                if not args.drafter:
                    # Every policy of a repeat meets the same draft at each position of each answer (the
                    # repeats draw anew), from the same scripts (earlier runs' resyncs would steer it).
                    drafter.scripts, drafter.draws_seed = dict(scripts), rep
                runs[label].append(measure(engine.generate_batch(batch, args.max_new_tokens)))
        for label, measured in runs.items():
            results.append({"rows": rows, "policy": label, **pooled(measured, rows),
                            "decode_tokens_per_s_runs": [m["decode_tokens_per_s"] for m in measured]})
            line = results[-1]
            print(f"R={rows:>2} {label:<30} {line['decode_tokens_per_s']:7.1f} decode tok/s  tau {line['tau']:.2f}  "
                  f"verified/round {line['verified_per_round']:.2f}", file=sys.stderr, flush=True)

    bounds = {}
    if not args.drafter:  # the synthetic drafter's confidences are its true rates: what any scheduler could reach
        for rows in args.rows:
            fixed = next(r for r in results if r["rows"] == rows and r["policy"] == "fixed")
            overhead = sum(ms for phase, ms in fixed["round_ms"].items() if phase != "verify") / 1e3
            bounds[rows] = headroom(table, rows, gamma, tuple(args.error), overhead, args.max_new_tokens)
            print(f"R={rows:>2} against fixed, from the SPS table: best padded width {bounds[rows]['padded']:.2f}x, "
                  f"best packed budget {bounds[rows]['packed']:.2f}x, clairvoyant {bounds[rows]['clairvoyant']:.2f}x",
                  file=sys.stderr, flush=True)

    out = {
        "command": command(),
        "target": target.info(),
        "drafter": name,
        "gamma": gamma,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "machine": machine(),
        "clock": args.clock,
        "profile_seconds": profile_s,
        "profile_context": context,
        "cost_table": {"rows": table.rows, "widths": table.widths, "sps": table.sps},
        "results": results,
        "headroom": bounds,
    }
    write_results(args.out, "scheduler_throughput", out, render(out))


def headroom(table, rows: int, gamma: int, error: tuple[float, float], overhead_s: float, max_new: int,
             batches: int = 100, seed: int = 0) -> dict:
    """What choosing the drafts to verify can gain over the fixed block at `rows` rows, from the
    run's SPS table and the fixed policy's measured rest of a round (`overhead_s` at `rows` rows,
    taken as proportional to the rows still decoding). Simulated as the bench runs: static batches
    of `rows` requests of `max_new` tokens each (the first from the prefill), a request leaving the
    batch when done, so the last rounds run with few rows; each position of each answer has its
    corruption rate ~ Beta(error), its complement the (exact) confidence, and its coin, the same
    for every policy (common random numbers). `padded`/`packed`: the expected-throughput-best
    choice every round, as `prefix_lengths(any_width=True)` makes it (the best any scheduler can
    do without seeing the drafts' fate); `clairvoyant`: each row verifies exactly the drafts that
    will be accepted, packed (a ceiling nothing reaches). Ratios of decode tokens per second."""
    import numpy as np

    from drafter.scheduler import prefix_lengths

    rng = np.random.default_rng(seed)
    policies = ("fixed", "padded", "packed", "clairvoyant")
    tokens, time_s = dict.fromkeys(policies, 0), dict.fromkeys(policies, 0.0)
    for _ in range(batches):
        conf = 1 - rng.beta(*error, size=(rows, max_new + gamma))
        hit = rng.random((rows, max_new + gamma)) < conf
        for name in policies:
            left, pos = np.full(rows, max_new - 1), np.zeros(rows, dtype=int)
            while (alive := np.flatnonzero(left > 0)).size:
                n = alive.size
                drafts = [min(gamma, int(left[r]) - 1) for r in alive]  # as the engine caps a block
                accepted = [int(hit[r, pos[r] : pos[r] + g].cumprod().sum()) for r, g in zip(alive, drafts)]
                survival = [conf[r, pos[r] : pos[r] + g].cumprod() for r, g in zip(alive, drafts)]
                overhead = overhead_s * n / rows
                if name == "fixed":
                    verified = drafts
                elif name == "clairvoyant":
                    verified = accepted
                else:
                    verified = prefix_lengths(survival, table, overhead_s=overhead, packed=name == "packed", any_width=True)
                width = max(verified) + 1 if name in ("fixed", "padded") else (n + sum(verified)) / n
                time_s[name] += 1.0 / table(n, width) + overhead
                for r, k, a in zip(alive, verified, accepted):
                    emitted = min(min(a, k) + 1, int(left[r]))
                    tokens[name] += emitted
                    left[r] -= emitted
                    pos[r] += emitted
    fixed = tokens["fixed"] / time_s["fixed"]
    return {"overhead_ms": 1e3 * overhead_s, "fixed_tokens_per_s": fixed,
            **{name: tokens[name] / time_s[name] / fixed for name in policies[1:]}}


def pooled(measured: list[dict], rows: int) -> dict:
    """The repeats of one policy as one run: tokens and seconds summed (their draws differ, so
    each repeat counts by its length, not as one vote), round phases averaged."""
    rounds = sum(m["rounds"] for m in measured)
    verified = sum(m["verified_per_round"] * m["rounds"] for m in measured)
    return {
        "tokens": sum(m["tokens"] for m in measured), "seconds": sum(m["seconds"] for m in measured),
        "prefill_seconds": sum(m["prefill_seconds"] for m in measured),
        "decode_tokens_per_s": sum(m["tokens"] - rows for m in measured)
        / sum(m["seconds"] - m["prefill_seconds"] for m in measured),
        "tau": sum(m["tau"] * m["rounds"] for m in measured) / rounds, "rounds": rounds,
        "verified_per_round": verified / rounds,
        "acceptance_rate": sum(m["acceptance_rate"] * m["verified_per_round"] * m["rounds"] for m in measured)
        / max(verified, 1),
        "round_ms": {phase: sum(m["round_ms"][phase] for m in measured) / len(measured) for phase in measured[0]["round_ms"]},
    }


def measure(gens) -> dict:
    """One batch's figures: decode-phase tokens/s after the batched prefill (the same work for
    every policy), tau, drafts verified per round."""
    seconds = max(g.seconds for g in gens)
    prefill = gens[0].prefill_seconds
    totals = round_totals(gens)
    tokens = sum(len(g.tokens) for g in gens)
    return {
        "tokens": tokens, "seconds": seconds, "prefill_seconds": prefill, "tokens_per_s": tokens / seconds,
        "decode_tokens_per_s": (tokens - len(gens)) / (seconds - prefill), "tau": totals["tau"],
        "rounds": totals["rounds"], "verified_per_round": totals["verified"] / max(totals["rounds"], 1),
        "acceptance_rate": totals["accepted"] / max(totals["verified"], 1),
        # the batch's rounds (one per engine step, until its last request ends), by phase
        "round_ms": {phase: 1e3 * t / max(len(g.rounds) for g in gens) for phase, t in gens[0].breakdown.items()},
    }


def render(out: dict) -> str:
    policies = list(dict.fromkeys(r["policy"] for r in out["results"]))
    lines = [
        "# Scheduler throughput: fixed block vs threshold vs Algorithm 1",
        "",
        f"Target {out['target']['name']} ({out['target']['dtype']}) on {out['target']['device']} "
        f"({out['machine'].get('cpu') or 'CPU'}, {out['machine']['cpus']} CPUs, "
        f"load average {out['machine']['load_average'][0]:.1f} at the end); drafter: {out['drafter']}; "
        f"block {out['gamma']}, greedy, {out['max_new_tokens']} new tokens per request; "
        f"{'CPU time of the process' if out['clock'] == 'process' else 'wall clock'}, "
        f"{out['machine']['torch_threads']} torch thread(s).",
        f"Command: `{out['command']}`",
        "",
        "Decode-phase throughput: generated (accepted) tokens per second over all R concurrent requests, after the "
        f"batched prefill (the same work for every policy), {out.get('repeats', 1)} run(s) taken in turn and pooled "
        "(each policy of a run meets the same draft at every position; the runs draw anew); "
        "in brackets tau and drafts verified per round:",
        "",
        "| R | " + " | ".join(policies) + " | alg. 1 / fixed | alg. 1 / threshold |",
        "|---|" + "---|" * (len(policies) + 2),
    ]
    threshold = next(p for p in policies if p.startswith("threshold"))
    for rows in dict.fromkeys(r["rows"] for r in out["results"]):
        cells = {r["policy"]: r for r in out["results"] if r["rows"] == rows}
        alg1 = cells[ALG1]["decode_tokens_per_s"]
        lines.append(f"| {rows} | " + " | ".join(
            f"{cells[p]['decode_tokens_per_s']:.1f} ({cells[p]['tau']:.2f}; {cells[p]['verified_per_round']:.1f})"
            for p in policies
        ) + f" | {alg1 / cells['fixed']['decode_tokens_per_s']:.2f} | {alg1 / cells[threshold]['decode_tokens_per_s']:.2f} |")
    lines += ["", f"SPS(R, w), target forward steps per second after {out['profile_context']} cached tokens "
              "(profiled in the same run, made monotone):", "",
              "| R \\ w | " + " | ".join(str(w) for w in out["cost_table"]["widths"]) + " |",
              "|---|" + "---|" * len(out["cost_table"]["widths"])]
    for r, line in zip(out["cost_table"]["rows"], out["cost_table"]["sps"]):
        lines.append(f"| {r} | " + " | ".join(f"{v:.1f}" for v in line) + " |")
    if out.get("headroom"):
        lines += ["", "What choosing the verified drafts can gain over the fixed block here (`headroom`: this run's SPS "
                  "table, the fixed policy's measured rest of a round, static batches of R requests simulated with the "
                  "synthetic drafter's law, rows leaving as they finish): the expected-throughput-best choice each "
                  "round, padded and packed, and a clairvoyant ceiling (each row verifies exactly its accepted "
                  "drafts):", "",
                  "| R | rest of a round (ms) | fixed tok/s, measured / modelled | best padded width | best packed budget "
                  "| clairvoyant |", "|---|---:|---:|---:|---:|---:|"]
        for r, b in out["headroom"].items():
            fixed = next(x for x in out["results"] if x["rows"] == int(r) and x["policy"] == "fixed")
            lines.append(f"| {r} | {b['overhead_ms']:.1f} | {fixed['decode_tokens_per_s']:.0f} / {b['fixed_tokens_per_s']:.0f} | "
                         f"{b['padded']:.2f}x | {b['packed']:.2f}x | {b['clairvoyant']:.2f}x |")
        lines += ["", "Where the modelled fixed throughput runs above the measured one, the table prices a round below "
                  "what it costs in the engine, and the ratios are that much less certain."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
