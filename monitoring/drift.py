"""Drift tests: production acceptance against the drafter's evaluation, and the traffic mix.

Acceptance: drift when the production tau over the window falls more than
`tau_drop_tolerance` (relative) below the tau the production drafter was evaluated at,
provided the window holds at least `min_drafts` drafts. (Evaluation and serving may use
different sampling settings; the tolerance absorbs that, the trend is what matters.)

Traffic mix: a chi-square test of homogeneity (`scipy.stats.chi2_contingency`) on the
2 x K table of domain counts (training data of the production drafter vs new traffic).
Drift when p < `drift_pvalue` AND the total-variation distance between the two domain
distributions is at least `mix_min_shift`: with many traces a tiny, harmless shift is
"significant", so an effect-size floor keeps retraining for real changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OK, DRIFT, INSUFFICIENT, NO_REFERENCE = "ok", "drift", "insufficient-data", "no-reference"


@dataclass
class AcceptanceCheck:
    status: str
    production_tau: float | None
    evaluated_tau: float | None
    drafts: float
    relative_change: float | None
    production_per_position: list[float] = field(default_factory=list)
    evaluated_per_position: list[float] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MixCheck:
    status: str
    reference: dict[str, int]
    current: dict[str, int]
    pvalue: float | None = None
    chi2: float | None = None
    dof: int | None = None
    tv_distance: float | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def acceptance_check(
    production_tau: float | None,
    drafts: float,
    evaluated_tau: float | None,
    tolerance: float,
    min_drafts: int,
    production_per_position: list[float] | None = None,
    evaluated_per_position: list[float] | None = None,
) -> AcceptanceCheck:
    check = AcceptanceCheck(OK, production_tau, evaluated_tau, drafts, None,
                            list(production_per_position or []), list(evaluated_per_position or []))
    if evaluated_tau is None:
        check.status, check.message = NO_REFERENCE, "no evaluated tau for the production drafter"
    elif production_tau is None or drafts < min_drafts:
        check.status = INSUFFICIENT
        check.message = f"{int(drafts)} drafts in the window (need {min_drafts})"
    else:
        check.relative_change = production_tau / evaluated_tau - 1
        if check.relative_change < -tolerance:
            check.status = DRIFT
            check.message = (f"production tau {production_tau:.3f} is {-check.relative_change:.1%} below the "
                             f"evaluated {evaluated_tau:.3f} (tolerance {tolerance:.0%})")
        else:
            check.message = f"production tau {production_tau:.3f} vs evaluated {evaluated_tau:.3f}"
    return check


def mix_check(
    reference: dict[str, int] | None,
    current: dict[str, int],
    pvalue: float,
    min_shift: float,
    min_traces: int,
) -> MixCheck:
    from scipy.stats import chi2_contingency

    current = {k: int(v) for k, v in current.items() if v}
    if not reference:
        return MixCheck(NO_REFERENCE, {}, current, message="no training-data domain profile for production")
    reference = {k: int(v) for k, v in reference.items() if v}
    check = MixCheck(OK, reference, current)
    n_cur = sum(current.values())
    if n_cur < min_traces:
        check.status, check.message = INSUFFICIENT, f"{n_cur} new traces (need {min_traces})"
        return check
    domains = sorted(set(reference) | set(current))
    n_ref = sum(reference.values())
    check.tv_distance = 0.5 * sum(abs(reference.get(d, 0) / n_ref - current.get(d, 0) / n_cur) for d in domains)
    if len(domains) < 2:  # one domain on both sides: identical mixes
        check.pvalue, check.chi2, check.dof = 1.0, 0.0, 0
    else:
        result = chi2_contingency([[reference.get(d, 0) for d in domains], [current.get(d, 0) for d in domains]])
        check.pvalue, check.chi2, check.dof = float(result.pvalue), float(result.statistic), int(result.dof)
    shifted = check.pvalue < pvalue and check.tv_distance >= min_shift
    check.status = DRIFT if shifted else OK
    check.message = (f"chi-square p={check.pvalue:.3g} (threshold {pvalue}), total variation "
                     f"{check.tv_distance:.3f} (floor {min_shift})")
    return check
