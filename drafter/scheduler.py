"""Confidence-scheduled verification: how many drafted tokens each request sends to the target.

Modes (config `scheduler.mode`):
- `fixed`: verify every drafted token.
- `threshold`: per request, cut the draft at the first position whose calibrated
  confidence c_k falls below `scheduler.threshold`.
- `prefix`: the hardware-aware prefix scheduler (DSpark paper, Algorithm 1) over the R
  requests of a batch. With a_{r,j} = prod_{i<=j} c_{r,i}, candidates (r, j) are admitted
  in descending a; each admission raises the expected tokens tau* by a_{r,j}; it is kept
  while throughput tau* x SPS(forward) improves and the search STOPS at the first
  candidate that does not improve it. The early stop keeps decoding lossless: admitting
  position j never depends on a token drafted at j or later. With packed verification
  (`scheduler.packed=true`) a forward costs what its token count costs, and this is the
  paper's rule verbatim. Padded (the default in this mode), `scheduler.shared_width`
  (default on) adapts the widening step to the padding (see `prefix_lengths`); off, it is
  the paper's rule over padded widths. On CPUs a forward's cost is concave in its tokens
  (the first extra tokens cost the most, later ones less), and the paper's rule stops on
  that first steep step; the shared-width rule weighs whole width steps and measured
  faster (bench/RESULTS.md). Greedy decoding emits the target's argmax whatever is verified,
  so there the early stop is not needed: padded, every width is weighed with every row's
  survival and the fastest is taken (`any_width`); a step in the cost (the AMX tiles pad rows
  to 16, so past a block boundary the next widths cost little more) no longer stops the search;
  packed, every token budget is weighed with the drafts most likely to survive.

SPS comes from a cost table profiled on this machine (`drafter profile`): target forward
steps per second. The rest of an engine step (drafting, sampling, cache bookkeeping) does
not depend on the block width and, on a CPU, is far from negligible; the engine measures it
online and the scheduler adds it, so that its SPS is the whole step's rate, as in the paper.
The table is indexed by (rows R, width w), profiled with every row w tokens wide. Packed, a
forward of N tokens over R rows costs about what R rows of N / R tokens cost, so the
scheduler reads the table at that (fractional) width: the paper's SPS(B) with B = N. Padded,
a forward costs what its shape (R, longest prefix + 1) costs; with one request both are
the paper's SPS(B) with B = w.

Confidences are calibrated with the STS temperatures in `calibration.json` before use:
c_k = sigmoid(logit(c_k) / T_k).
"""

from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from drafter.errors import DrafterError
from drafter.manifest import atomic_write_json, sha256_file

EPS = 1e-6
# Wall clock, or the CPU time of this process: steadier on a machine shared with other jobs
# (meaningful with one torch thread, where CPU time and compute time coincide).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


class SchedulerError(DrafterError, ValueError):
    """The scheduler lacks what it needs (confidences, a cost table)."""


# ----- confidences ----------------------------------------------------------------------
def apply_temperatures(conf: torch.Tensor, temperatures: Sequence[float] | None) -> torch.Tensor:
    """sigma(logit(c_k) / T_k); positions beyond the fitted ones reuse the last temperature."""
    if not temperatures:
        return conf
    g = conf.shape[-1]
    temps = torch.tensor([temperatures[min(k, len(temperatures) - 1)] for k in range(g)], dtype=torch.float64)
    c = conf.double().clamp(EPS, 1 - EPS)
    return torch.sigmoid((torch.log(c) - torch.log1p(-c)) / temps).to(conf.dtype)


def prefix_survival(conf: torch.Tensor) -> torch.Tensor:
    """a_k = prod_{i<=k} c_i: the probability that the first k drafts all survive."""
    return torch.cumprod(conf.double(), dim=-1)


def threshold_lengths(confidences: Sequence[torch.Tensor], threshold: float) -> list[int]:
    """Per request: the number of leading drafts whose confidence is at least `threshold`."""
    return [int((c >= threshold).long().cumprod(0).sum()) for c in confidences]


def prefix_lengths(
    survival: Sequence[torch.Tensor], sps, shared_width: bool = False, overhead_s: float = 0.0, packed: bool = False,
    any_width: bool = False,
) -> list[int]:
    """Algorithm 1. `survival[r]` = a_{r,1..g_r}; `sps(rows, width)` = forward steps per second;
    `overhead_s` = the rest of an engine step (drafting, sampling, cache bookkeeping), which
    does not depend on the width: SPS(B) of the paper is the whole step's rate,
    1 / (1 / sps + overhead_s).

    Candidates are taken in descending a (each request's next draft, from a heap); each
    admission adds a_{r,j} to the expected tokens tau*; the first one that does not raise
    tau* x SPS stops the search. Every decision reads only each request's *next* candidate,
    whose a depends on drafts already admitted, never on the draft being decided.

    `shared_width`: our engine pads every row to the widest block, so the first draft that
    widens the block makes all R rows pay for one more slot; judged alone it rarely pays,
    though the other requests' next drafts would then ride along for free. With this flag a
    widening step compares "admit every request's next draft that fits the current width,
    then stop" with "widen and admit every request's next draft that fits the wider block"
    (the same next-candidate information, so still lossless). With one request both rules
    are the paper's.

    `packed`: the engine verifies each request's own tokens only, so a forward costs what its
    token count N costs, read at width N / R (`shared_width` does not apply): the paper's rule.

    `any_width`: which drafts are verified cannot change the output (greedy decoding), so no
    early stop is needed. Padded, each width w is weighed with every row's first w - 1 drafts;
    packed, each token budget N with the N - R drafts of highest a (prefix-closed: a falls along
    a row); the one with the highest expected throughput is taken.
    """
    rows = len(survival)
    a = [[float(x) for x in s] for s in survival]
    lengths = [0] * rows

    def step_rate(r: int, w: int) -> float:
        return 1.0 / (1.0 / sps(r, w) + overhead_s)

    if any_width and not packed:
        widest = max((len(s) for s in a), default=0) + 1
        throughput = {w: (rows + sum(sum(s[: w - 1]) for s in a)) * step_rate(rows, w) for w in range(1, widest + 1)}
        width = max(throughput, key=lambda w: (throughput[w], -w))  # the narrowest of equals
        return [min(len(s), width - 1) for s in a]
    if any_width:  # packed
        order = sorted((-x, j, r) for r, s in enumerate(a) for j, x in enumerate(s))  # a desc, then along the row
        tau, best, budget = float(rows), rows * step_rate(rows, 1), 0
        for k, (neg_a, _, _) in enumerate(order, 1):
            tau -= neg_a
            theta = tau * step_rate(rows, (rows + k) / rows)
            if theta > best:
                best, budget = theta, k
        for _, _, r in order[:budget]:
            lengths[r] += 1
        return lengths

    heap = [(-a[r][0], 0, r) for r in range(rows) if a[r] and a[r][0] > 0]
    heapq.heapify(heap)
    tau = float(rows)  # every request emits at least one token (the target's own)
    width = 1
    best = tau * step_rate(rows, width)

    def admit(q: int) -> None:
        nonlocal tau
        tau += a[q][lengths[q]]
        lengths[q] += 1
        if lengths[q] < len(a[q]) and a[q][lengths[q]] > 0:
            heapq.heappush(heap, (-a[q][lengths[q]], lengths[q], q))

    def next_fitting(w: int) -> list[int]:
        return [q for q in range(rows) if lengths[q] < len(a[q]) and a[q][lengths[q]] > 0 and lengths[q] + 2 <= w]

    while heap:
        _, j, r = heapq.heappop(heap)
        if j != lengths[r]:
            continue  # stale entry
        if packed:
            theta = (tau + a[r][j]) * step_rate(rows, (rows + sum(lengths) + 1) / rows)
            if theta <= best:
                break  # the early stop
            admit(r)
            best = theta
            continue
        if j + 2 <= width or not shared_width:
            theta = (tau + a[r][j]) * step_rate(rows, max(width, j + 2))
            if theta <= best:
                break  # the early stop
            width = max(width, j + 2)
            admit(r)
            best = theta
            continue
        keep, widen = next_fitting(width), next_fitting(width + 1)
        keep_theta = (tau + sum(a[q][lengths[q]] for q in keep)) * step_rate(rows, width)
        widen_theta = (tau + sum(a[q][lengths[q]] for q in widen)) * step_rate(rows, width + 1)
        chosen = widen if widen_theta > keep_theta else keep
        for q in chosen:
            admit(q)
        if chosen is keep:
            break  # the early stop, after the drafts the current width carries for free
        width += 1
        best = widen_theta
    return lengths


# ----- the cost table -----------------------------------------------------------------------
@dataclass
class CostTable:
    """Target forward steps per second by batch rows and block width, measured here."""

    rows: list[int]
    widths: list[int]
    sps: list[list[float]]  # sps[i][k]: rows[i] rows, widths[k] tokens each
    context: int = 0
    target: str = ""  # target fingerprint
    device: str = ""
    meta: dict = field(default_factory=dict)

    def __call__(self, rows: int, width: int) -> float:
        """Interpolated linearly in rows (clamped at the ends); widths beyond the table extrapolate per token."""
        k = min(max(width, self.widths[0]), self.widths[-1])
        col = [line[self.widths.index(k)] if k in self.widths else self._interp_width(line, k) for line in self.sps]
        value = _interp(self.rows, col, rows)
        if width > self.widths[-1]:  # cost grows roughly linearly in tokens past the table
            value *= self.widths[-1] / width
        return value

    def _interp_width(self, line: list[float], width: int) -> float:
        return _interp(self.widths, line, width)

    def save(self, path: Path) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> CostTable:
        path = Path(path)
        if not path.is_file():
            raise SchedulerError(f"no cost table at {path}: run `drafter profile` first")
        data = json.loads(path.read_text())
        try:
            table = cls(**data)
        except TypeError as exc:
            raise SchedulerError(f"{path}: not a cost table ({exc})") from None
        if len(table.sps) != len(table.rows) or any(len(line) != len(table.widths) for line in table.sps):
            raise SchedulerError(f"{path}: sps must be a rows x widths table")
        return table


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _isotonic(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(int(c))]


def monotone_times(times: list[list[float]], sweeps: int = 10) -> list[list[float]]:
    """A forward with more rows or more tokens never takes less time: alternate isotonic fits
    along widths and rows, so timing noise cannot tell the scheduler that wider is cheaper."""
    t = [list(line) for line in times]
    for _ in range(sweeps):
        t = [_isotonic(line) for line in t]
        cols = [_isotonic([t[i][k] for i in range(len(t))]) for k in range(len(t[0]))]
        t = [[cols[k][i] for k in range(len(cols))] for i in range(len(t))]
    return t


@torch.inference_mode()
def profile_target(
    target, rows: Sequence[int], max_width: int, context: int, reps: int = 3, progress: bool = True, clock=time.perf_counter
) -> CostTable:
    """Wall time of one target forward of [R, w] tokens after `context` cached tokens.

    The widths of one R are timed in turn, `reps` times round (a first round warms up and
    is dropped), so that a slow spell of the machine falls on every width alike rather than
    on one; each shape keeps its fastest run (load from other processes only ever adds
    time), then the table is made monotone in rows and width (`monotone_times`).
    """
    from tqdm import tqdm

    from drafter.attention import PackedCache  # the engine's own cache: what it costs is part of a step

    gen = torch.Generator().manual_seed(0)
    widths = list(range(1, max_width + 1))
    table: list[list[float]] = []
    bar = tqdm(total=len(rows) * len(widths), desc="profiling SPS", disable=not progress)
    for r in rows:
        ids = torch.randint(target.vocab_size, (r, context), generator=gen).to(target.device)
        cache = PackedCache()
        target.capture(ids, past_key_values=cache, use_cache=True)
        blocks = [torch.randint(target.vocab_size, (r, w), generator=gen).to(target.device) for w in widths]
        line = [math.inf] * len(widths)
        for rep in range(reps + 1):  # the first round warms up and is dropped
            for k, block in enumerate(blocks):
                _sync(target.device)
                start = clock()
                feats = target.capture(block, past_key_values=cache, use_cache=True)
                target.logits_from_hidden(feats.final)
                _sync(target.device)
                if rep:
                    line[k] = min(line[k], clock() - start)
                cache.crop(-block.shape[1])
        bar.update(len(widths))
        table.append(line)
    bar.close()
    smooth = monotone_times(table)
    return CostTable(
        rows=list(rows), widths=widths, sps=[[1.0 / t for t in line] for line in smooth], context=context,
        target=target.fingerprint, device=str(target.device),
        meta={"reps": reps, "threads": torch.get_num_threads(), "clock": getattr(clock, "__name__", str(clock)),
              "raw_seconds": table},
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the policy the engine calls ------------------------------------------------------------
class Scheduler:
    """Chooses, each round, how many drafted tokens of each request the target verifies."""

    def __init__(
        self,
        mode: str = "fixed",
        threshold: float = 0.5,
        temperatures: Sequence[float] | None = None,
        cost_table: CostTable | None = None,
        shared_width: bool = True,
        packed: bool = True,
    ) -> None:
        if mode not in ("fixed", "threshold", "prefix"):
            raise SchedulerError(f"unknown scheduler mode {mode!r}")
        if mode == "prefix" and cost_table is None:
            raise SchedulerError("scheduler.mode=prefix needs a cost table: run `drafter profile` first")
        self.mode, self.threshold = mode, threshold
        self.temperatures = list(temperatures) if temperatures else None
        self.cost_table = cost_table
        self.shared_width = shared_width  # see prefix_lengths: padded rows share one width
        self.packed = packed  # the engine packs blocks of different lengths (SpecEngine(packed=...))

    def calibrated(self, conf: torch.Tensor) -> torch.Tensor:
        return apply_temperatures(conf, self.temperatures)

    def lengths(
        self, proposed: Sequence[int], confidences: Sequence[torch.Tensor | None], overhead_s: float = 0.0,
        greedy: bool = False,
    ) -> list[int]:
        """`overhead_s`: the engine's measured per-round time outside the target forward; `greedy`:
        the engine decodes greedily (any drafts may be verified: `prefix_lengths`' any_width)."""
        if self.mode == "fixed":
            return list(proposed)
        for n, c in zip(proposed, confidences):
            if n and c is None:
                raise SchedulerError(f"scheduler.mode={self.mode} needs a drafter with a confidence head")
        confs = [self.calibrated(c[:n]) if n else torch.empty(0) for n, c in zip(proposed, confidences)]
        if self.mode == "threshold":
            return threshold_lengths(confs, self.threshold)
        return prefix_lengths([prefix_survival(c) for c in confs], self.cost_table, self.shared_width, overhead_s,
                              self.packed, any_width=greedy)


def find_calibration(drafter_dir: Path | None, calibration_dir: Path | None = None) -> Path | None:
    """The `calibration.json` that belongs to this drafter, or None.

    Looked up in the model folder (exports and registry versions carry it), its parent,
    then `calibration_dir` (what `drafter calibrate` writes, kept out of the training
    output so DVC does not see train's output change); a file there is used only when
    it was fitted on these very weights.
    """
    if drafter_dir is None:
        return None
    model_dir = Path(drafter_dir)
    if not (model_dir / "config.json").is_file() and (model_dir / "best" / "config.json").is_file():
        model_dir = model_dir / "best"  # a training output folder
    for folder in (model_dir, model_dir.parent):
        if (folder / "calibration.json").is_file():
            return folder / "calibration.json"
    path = Path(calibration_dir) / "calibration.json" if calibration_dir else None
    if path is None or not path.is_file() or not (model_dir / "model.safetensors").is_file():
        return None
    fitted_on = json.loads(path.read_text()).get("drafter_weights")
    return path if fitted_on == sha256_file(model_dir / "model.safetensors") else None


def load_temperatures(drafter_dir: Path | None, calibration_dir: Path | None = None) -> list[float] | None:
    """STS temperatures saved by `drafter calibrate` for this drafter (see `find_calibration`)."""
    path = find_calibration(drafter_dir, calibration_dir)
    if path is None:
        return None
    temps = json.loads(path.read_text()).get("temperatures")
    if temps and all(isinstance(t, (int, float)) and t > 0 and math.isfinite(t) for t in temps):
        return [float(t) for t in temps]
    return None


def build_scheduler(cfg, drafter_dir: Path | None = None, mode: str | None = None) -> Scheduler | None:
    """The configured scheduler (None in fixed mode without calibration: the engine's default)."""
    sc = cfg.scheduler
    mode = mode or sc.mode
    if mode == "fixed":
        return None
    table = CostTable.load(cost_table_path(cfg)) if mode == "prefix" else None
    temperatures = load_temperatures(drafter_dir, cfg.data_dir / "calibration")
    packed = sc.packed if sc.packed is not None else mode != "prefix"
    return Scheduler(mode, sc.threshold, temperatures, table, sc.shared_width, packed)


def cost_table_path(cfg) -> Path:
    return Path(cfg.scheduler.cost_table) if cfg.scheduler.cost_table else cfg.data_dir / "profile" / "cost_table.json"


def profile(cfg, out_dir: Path | None = None, target=None) -> dict:
    """`drafter profile`: measure SPS(R, w) for the configured target; write the cost table."""
    from drafter.manifest import Timer, write_manifest
    from drafter.target import load_target

    sc = cfg.scheduler
    out_path = Path(out_dir) / "cost_table.json" if out_dir else cost_table_path(cfg)
    timer = Timer()
    with timer("load_target"):
        target = target or load_target(cfg)
    max_width = sc.profile_max_width or cfg.drafter.block_size + 1
    with timer("profile"):
        table = profile_target(target, sc.profile_rows, max_width, sc.profile_context, sc.profile_reps,
                               clock=CLOCKS[cfg.evaluate.clock])
    table.save(out_path)
    cfg.save(out_path.parent / "config.yaml")
    write_manifest(
        out_path.parent, "profile",
        inputs={"target": target.fingerprint},
        params={"rows": sc.profile_rows, "max_width": max_width, "context": sc.profile_context, "reps": sc.profile_reps},
        counts={"shapes": len(sc.profile_rows) * max_width},
        durations=timer.durations,
        outputs={"cost_table": str(out_path)},
    )
    return {"cost_table": str(out_path), "rows": table.rows, "widths": table.widths, "sps": table.sps}
