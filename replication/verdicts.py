"""Verdicts: what a set of measurements says about one claim, and how much it could have resolved.

Statuses (DESIGN.md, "Verdicts"; issue 12):
- `reproduced`: the 95% interval of the difference lies on the claimed side (directional), the 90% interval
  lies inside the equivalence margin (TOST), or a paper-scale number lies within the claim's tolerance;
- `contradicted`: the interval lies wholly on the other side (or outside the margin), or the number is
  outside the tolerance;
- `inconclusive`: the interval straddles zero; the verdict then says the minimum detectable effect (MDE) at
  80% power for the measured SD, and how many seeds would resolve the measured mean;
- `not run (why)`, `not comparable (scale)` (a paper-scale number and only small-scale runs),
  `not transcribed` (no value), `no code path` (no registered protocol measures it).

Directional claims pair runs by seed (the same seed gives both methods the same initial weights, data order
and augmentations), so the differences carry little run-to-run noise; at paper scale a single pair of
released checkpoints is compared against the protocol's noise band instead.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from baselines.infra import UserError
from replication.claims import Claim, default_tolerance

STATUSES = ("reproduced", "contradicted", "inconclusive", "not comparable (scale)", "not run", "not transcribed",
            "no code path")
RESOLVED = ("reproduced", "contradicted")
ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 10_000


class VerdictError(UserError, ValueError):
    """A claim or a set of measurements that cannot be judged as asked; one line."""


@dataclass(frozen=True)
class Measurement:
    """One number a stored run measured, with what the claims match on."""

    method: str  # paper naming: DenseCL, MoCo-v2, Random, ...
    seed: int | None
    scale: str  # small | paper
    pretrain_data: str
    epochs: int | None
    backbone: str
    protocol_id: str
    layer: str
    k: int | None
    value: float
    run_id: str
    metric: str = "mAP"
    unit: str = ""  # what pairs two methods' numbers: "seed:<n>" or "<run>#<round>"

    @property
    def pair_key(self) -> str:
        return self.unit or f"seed:{self.seed}"


@dataclass
class Verdict:
    claim: Claim
    status: str
    reason: str = ""
    measured: float | None = None  # the mean difference (directional, equivalence, delta) or mean value
    interval: tuple[float, float] | None = None  # 95% (directional) or 90% (TOST) interval of `measured`
    n: int = 0
    sd: float | None = None  # SD of the paired differences (or of the values)
    mde: float | None = None  # smallest true effect this design detects with 80% power
    seeds_needed: int | None = None  # seeds that would resolve the measured mean with 80% power
    claimed_effect: float | None = None  # the paper's own difference, where the claim cites one
    scale: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        c = self.claim

        def rounded(value: float | None) -> Any:
            return "" if value is None or not math.isfinite(value) else round(value, 4)

        return {
            "claim_id": c.claim_id, "status": self.status, "reason": self.reason, "kind": c.kind,
            "protocol_id": c.protocol_id, "method": c.method, "baseline": c.baseline, "relation": c.relation,
            "layer": c.layer, "k": "" if c.k is None else c.k, "reported": "" if c.value is None else c.value,
            "tolerance": "" if c.tolerance is None else c.tolerance, "scale": self.scale,
            "measured": rounded(self.measured),
            "interval_low": "" if self.interval is None else rounded(self.interval[0]),
            "interval_high": "" if self.interval is None else rounded(self.interval[1]),
            "n": self.n or "", "sd": rounded(self.sd), "mde": rounded(self.mde),
            "seeds_needed": "" if self.seeds_needed is None else self.seeds_needed,
            "claimed_effect": rounded(self.claimed_effect), "source": c.source_key,
        }


# ---------------------------------------------------------------------------------------------- statistics


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def t_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the two-sided t-interval of the mean; needs at least 2 values."""
    n = len(differences)
    if n < 2:
        raise VerdictError(f"an interval needs at least 2 paired values, got {n}")
    mean = statistics.fmean(differences)
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample t-test on n paired differences (noncentral t, exact)."""
    from scipy.stats import nct, t

    if n < 2:
        return 0.0
    if sd <= 0:
        return 1.0 if effect != 0 else alpha
    df = n - 1
    critical = t.ppf(1 - alpha / 2, df)
    shift = abs(effect) / sd * math.sqrt(n)
    power = float(nct.sf(critical, df, shift) + nct.cdf(-critical, df, shift))
    if not math.isfinite(power):  # scipy's noncentral t gives NaN in parts of its tail (seen at df=1)
        power = _power_by_integration(critical, df, shift)
    return power


def _power_by_integration(critical: float, df: int, shift: float) -> float:
    """P(|Z + shift| > critical * sqrt(V / df)), V ~ chi2(df): the same power, integrated over V directly."""
    from scipy import integrate
    from scipy.stats import chi2, norm

    def integrand(v: float) -> float:
        bound = critical * math.sqrt(v / df)
        return (norm.sf(bound - shift) + norm.cdf(-bound - shift)) * chi2.pdf(v, df)

    value, _ = integrate.quad(integrand, 0, math.inf, limit=200)
    return float(value)


def minimum_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true mean difference that `n` pairs with difference SD `sd` detect with `power` (two-sided `alpha`).

    Solves the noncentral-t power equation, as statsmodels' `TTestPower().solve_power(effect_size=None)` does
    (it returns the effect in SD units; this is that times `sd`).
    """
    from scipy.optimize import brentq

    if n < 2:
        return math.inf
    if sd <= 0:
        return 0.0
    upper = 1.0
    while paired_power(upper * sd, sd, n, alpha) < power:
        upper *= 2
    return float(brentq(lambda d: paired_power(d * sd, sd, n, alpha) - power, 0.0, upper, xtol=1e-10)) * sd


def seeds_to_resolve(mean: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Paired seeds at which a true difference of `mean` (SD `sd`) is detected with `power`; None if beyond reach."""
    if mean == 0 or not math.isfinite(mean) or not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    n = 2
    while paired_power(mean, sd, n, alpha) < power:
        n = n + 1 if n < 64 else int(n * 1.25)
        if n > MAX_SEEDS:
            return None
    return n


def _holds(value: float, comparator: str) -> bool:
    return {"<": value < 0, "<=": value <= 0, ">": value > 0, ">=": value >= 0}[comparator]


def _welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean difference, low, high, df) of mean(a) - mean(b) for unpaired samples (Welch)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    mean = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return mean, mean, mean, math.inf
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, df)) * se
    return mean, mean - half, mean + half, df


# ---------------------------------------------------------------------------------------------- matching


def select(rows: list[Measurement], claim: Claim, method: str) -> list[Measurement]:
    """Rows of `method` that measure what `claim` is about (protocol, layer, k, metric, and the claim's scope)."""
    return [m for m in rows if m.protocol_id == claim.protocol_id and m.method == method
            and (not claim.layer or m.layer == claim.layer) and (claim.k is None or m.k == claim.k)
            and (not claim.metric or m.metric == claim.metric)]


def in_scope(m: Measurement, claim: Claim) -> bool:
    """Pretraining data, epochs and backbone, where the claim names them."""
    return ((not claim.pretrain_data or m.pretrain_data == claim.pretrain_data)
            and (claim.epochs is None or m.epochs == claim.epochs)
            and (not claim.backbone or m.backbone == claim.backbone))


def missing_reason(rows: list[Measurement], claim: Claim) -> str:
    same = [m for m in rows if m.protocol_id == claim.protocol_id]
    if not same:
        return f"no run of protocol {claim.protocol_id} among the selected runs"
    if claim.layer and claim.layer not in {m.layer for m in same}:
        return f"layer {claim.layer} not evaluated (ran {', '.join(sorted({m.layer for m in same}))})"
    if claim.k is not None and claim.k not in {m.k for m in same}:
        ran = sorted({m.k for m in same if m.k is not None})
        return f"k={claim.k} not evaluated (ran k={ran}; the dataset has too few images per class)"
    if claim.metric and claim.metric not in {m.metric for m in same}:
        return f"metric {claim.metric} not measured (measured {', '.join(sorted({m.metric for m in same}))})"
    methods = sorted({m.method for m in same})
    return f"no {claim.method} run of {claim.protocol_id} (ran {', '.join(methods)})"


def _pairs(ours: list[Measurement], theirs: list[Measurement]) -> list[tuple[float, float]]:
    by_key: dict[str, list[float]] = {}
    for m in theirs:
        by_key.setdefault(m.pair_key, []).append(m.value)
    pairs = []
    for m in ours:
        if m.pair_key in by_key:
            pairs.append((m.value, statistics.fmean(by_key[m.pair_key])))
    return pairs


def _choose_scale(ours: list[Measurement], theirs: list[Measurement]) -> str:
    """Judge at paper scale when both methods have paper-scale rows, else at small scale."""
    scales = {m.scale for m in ours} & {m.scale for m in theirs}
    return "paper" if "paper" in scales else ("small" if "small" in scales else "")


# ---------------------------------------------------------------------------------------------- judging


def judge_directional(claim: Claim, rows: list[Measurement], claimed_effect: float | None = None) -> Verdict:
    ours_all, theirs_all = select(rows, claim, claim.method), select(rows, claim, claim.baseline)
    if not ours_all or not theirs_all:
        reason = missing_reason(rows, claim) if not ours_all else f"no {claim.baseline} run to compare with"
        return Verdict(claim, "not run", reason, claimed_effect=claimed_effect)
    ours_scoped = [m for m in ours_all if in_scope(m, claim)]
    theirs_scoped = [m for m in theirs_all if in_scope(m, claim)]
    if not ours_scoped or not theirs_scoped:
        scope = ", ".join(filter(None, (claim.pretrain_data, str(claim.epochs or ""), claim.backbone)))
        return Verdict(claim, "not comparable (scale)",
                       f"the claim is about {scope} pretraining; the runs were pretrained otherwise",
                       claimed_effect=claimed_effect)
    scale = _choose_scale(ours_scoped, theirs_scoped)
    if not scale:
        return Verdict(claim, "not run", "the two methods were run at different scales", claimed_effect=claimed_effect)
    ours = [m for m in ours_scoped if m.scale == scale]
    theirs = [m for m in theirs_scoped if m.scale == scale]
    comparator, factor = claim.comparator, claim.factor
    pairs = _pairs(ours, theirs)
    label = f"{claim.method} - {factor:g}x {claim.baseline}" if factor != 1 else f"{claim.method} - {claim.baseline}"
    if len(pairs) >= 2:
        differences = [a - factor * b for a, b in pairs]
        mean, low, high = t_interval(differences)
        sd = statistics.stdev(differences)
        design = f"{len(pairs)} paired {'rounds' if ours[0].unit else 'seeds'}"
    elif (len(pairs) == 1 and scale == "paper") or (not pairs and (len(ours) < 2 or len(theirs) < 2)):
        return _point_directional(claim, ours, theirs, scale, label, claimed_effect)
    elif not pairs:
        a, b = [m.value for m in ours], [factor * m.value for m in theirs]
        mean, low, high, _ = _welch_interval(a, b)
        sd = math.sqrt(statistics.variance(a) + statistics.variance(b))
        differences, design = [], f"{len(a)} vs {len(b)} unpaired runs (Welch)"
    else:
        return Verdict(claim, "inconclusive", f"one paired seed ({label} = {pairs[0][0] - factor * pairs[0][1]:+.3f}): "
                       "an interval needs at least 2", measured=pairs[0][0] - factor * pairs[0][1], n=1, scale=scale,
                       claimed_effect=claimed_effect)
    n = len(differences) or min(len(ours), len(theirs))
    if _holds(low, comparator) and _holds(high, comparator):
        status, why = "reproduced", "the whole 95% interval is on the claimed side"
    elif not _holds(low, comparator) and not _holds(high, comparator):
        status, why = "contradicted", "the whole 95% interval is on the other side"
    else:
        status, why = "inconclusive", "the 95% interval straddles zero"
    mde = minimum_detectable_effect(sd, n) if n >= 2 else None
    needed = seeds_to_resolve(mean, sd) if status == "inconclusive" else None
    reason = f"{label} = {mean:+.3f} (95% CI {low:+.3f} .. {high:+.3f}, {design}): {why}"
    if status == "inconclusive":
        reach = (f"about {needed} seeds would resolve a true {mean:+.3f}" if needed
                 else "no seed count resolves a zero mean")
        reason += f"; MDE at 80% power {mde:.3f} for SD {sd:.3f}; {reach}"
    return Verdict(claim, status, reason, measured=mean, interval=(low, high), n=n, sd=sd, mde=mde,
                   seeds_needed=needed, claimed_effect=claimed_effect, scale=scale)


def _point_directional(claim: Claim, ours: list[Measurement], theirs: list[Measurement], scale: str, label: str,
                       claimed_effect: float | None) -> Verdict:
    """One run per method (released checkpoints): the difference against the protocol's noise band."""
    mean_ours = statistics.fmean(m.value for m in ours)
    mean_theirs = statistics.fmean(m.value for m in theirs)
    difference = mean_ours - claim.factor * mean_theirs
    band = default_tolerance(claim.protocol_id.removesuffix("_frozen").removesuffix("_minus_finetune"), claim.metric)
    if band is None or scale != "paper":
        return Verdict(claim, "inconclusive", f"{label} = {difference:+.3f} from one run each: an interval needs "
                       "at least 2 paired seeds", measured=difference, n=1, scale=scale, claimed_effect=claimed_effect)
    band = math.sqrt(2) * band  # a difference of two runs, each within the protocol's band
    if abs(difference) <= band:
        status, why = "inconclusive", f"within the protocol's noise band of ±{band:.2f}"
    elif _holds(difference, claim.comparator):
        status, why = "reproduced", f"beyond the protocol's noise band of ±{band:.2f}, on the claimed side"
    else:
        status, why = "contradicted", f"beyond the protocol's noise band of ±{band:.2f}, on the other side"
    return Verdict(claim, status, f"{label} = {difference:+.3f} ({mean_ours:.2f} vs {mean_theirs:.2f}, one run "
                   f"each): {why}", measured=difference, interval=(difference - band, difference + band), n=1,
                   scale=scale, claimed_effect=claimed_effect, mde=band)


def judge_equivalence(claim: Claim, rows: list[Measurement], claimed_effect: float | None = None) -> Verdict:
    """Two one-sided tests: equivalent when the 90% interval of the paired difference lies inside ±margin."""
    margin = claim.tolerance
    if margin is None or margin <= 0:
        raise VerdictError(f"{claim.claim_id}: an equivalence claim needs a margin > 0 (its tolerance), got {margin}")
    ours = [m for m in select(rows, claim, claim.method) if in_scope(m, claim)]
    theirs = [m for m in select(rows, claim, claim.baseline) if in_scope(m, claim)]
    if not ours or not theirs:
        reason = missing_reason(rows, claim) if not ours else f"no {claim.baseline} run to compare with"
        return Verdict(claim, "not run", reason, claimed_effect=claimed_effect)
    scale = _choose_scale(ours, theirs)
    pairs = _pairs([m for m in ours if m.scale == scale], [m for m in theirs if m.scale == scale])
    if len(pairs) < 2:
        return Verdict(claim, "inconclusive", f"{len(pairs)} paired seed(s): an equivalence test needs at least 2",
                       n=len(pairs), scale=scale, claimed_effect=claimed_effect)
    differences = [a - b for a, b in pairs]
    mean, low, high = t_interval(differences, confidence=0.90)
    sd = statistics.stdev(differences)
    _, low95, high95 = t_interval(differences, confidence=0.95)
    n = len(differences)
    label = f"{claim.method} - {claim.baseline} = {mean:+.3f} (90% CI {low:+.3f} .. {high:+.3f}, {n} paired seeds)"
    reach = abs(mean) + t_quantile(0.95, n - 1) * sd / math.sqrt(n)
    if -margin < low and high < margin:
        status, why = "reproduced", f"equivalent within ±{margin:g} (two one-sided tests at 5%)"
    elif low95 > margin or high95 < -margin:
        status, why = "contradicted", f"the 95% interval lies wholly outside ±{margin:g}"
    else:
        status, why = "inconclusive", (f"the 90% interval is not inside ±{margin:g}; this design could establish "
                                       f"equivalence within ±{reach:.3f} at the measured mean and SD {sd:.3f}")
    needed = _seeds_for_equivalence(mean, sd, margin) if status == "inconclusive" else None
    if status == "inconclusive":
        why += f"; about {needed} seeds would" if needed else "; no seed count would (|mean| >= margin)"
    return Verdict(claim, status, f"{label}: {why}", measured=mean, interval=(low, high), n=n, sd=sd, mde=reach,
                   seeds_needed=needed, claimed_effect=claimed_effect, scale=scale, extra={"margin": margin})


def _seeds_for_equivalence(mean: float, sd: float, margin: float, power: float = POWER) -> int | None:
    """Smallest n whose expected 90% interval (plus a power allowance) fits inside ±margin at this mean and SD."""
    if abs(mean) >= margin or not math.isfinite(sd):
        return None
    n = 2
    while abs(mean) + (t_quantile(0.95, n - 1) + t_quantile(0.5 + power / 2, n - 1)) * sd / math.sqrt(n) >= margin:
        n = n + 1 if n < 64 else int(n * 1.25)
        if n > MAX_SEEDS:
            return None
    return n


def judge_absolute(claim: Claim, rows: list[Measurement]) -> Verdict:
    """Paper-scale runs against the reported number: every seed counts (mean ± SD within the tolerance)."""
    same = select(rows, claim, claim.method)
    candidates = [m for m in same if m.scale == "paper" and in_scope(m, claim)]
    if not candidates:
        small = [m for m in same if m.scale == "small"]
        if small:
            measured = statistics.fmean(m.value for m in small)
            return Verdict(claim, "not comparable (scale)", f"measured {measured:.2f} at small scale vs reported "
                           f"{claim.value:g}: small-scale runs are judged by directional claims only",
                           measured=measured, n=len(small), scale="small")
        if same:
            return Verdict(claim, "not run", f"no {claim.method} {claim.backbone} {claim.pretrain_data} "
                           f"{claim.epochs or ''} run among the selected runs".replace("  ", " "))
        return Verdict(claim, "not run", missing_reason(rows, claim))
    values = [m.value for m in candidates]
    measured = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    tolerance = claim.tolerance if claim.tolerance is not None else 0.0
    gap = measured - claim.value
    status = "reproduced" if abs(gap) <= tolerance + claim.rounding else "contradicted"
    spread = f" ± {sd:.2f} over {len(values)} runs" if sd is not None else ""
    return Verdict(claim, status, f"measured {measured:.2f}{spread} vs reported {claim.value:g} (±{tolerance:g}); "
                   f"gap {gap:+.2f}", measured=measured, n=len(values), sd=sd, scale="paper")


def judge_delta(claim: Claim, rows: list[Measurement]) -> Verdict:
    """A paper-scale difference (method minus baseline) against the reported delta within its tolerance."""
    base = claim.metric.removeprefix("max_").removeprefix("delta_")
    as_metric = dataclasses.replace(claim, metric=base)
    ours = [m for m in select(rows, as_metric, claim.method) if in_scope(m, claim)]
    theirs = [m for m in select(rows, as_metric, claim.baseline) if in_scope(m, claim)]
    if not ours or not theirs:
        return Verdict(claim, "not run", missing_reason(rows, as_metric))
    if not any(m.scale == "paper" for m in ours) or not any(m.scale == "paper" for m in theirs):
        return Verdict(claim, "not comparable (scale)", "a paper-scale difference; small runs are judged by direction")
    a = [m.value for m in ours if m.scale == "paper"]
    b = [m.value for m in theirs if m.scale == "paper"]
    measured = statistics.fmean(a) - statistics.fmean(b)
    tolerance = claim.tolerance if claim.tolerance is not None else 0.0
    gap = measured - claim.value
    status = "reproduced" if abs(gap) <= tolerance + claim.rounding else "contradicted"
    return Verdict(claim, status, f"measured {claim.method} - {claim.baseline} = {measured:+.2f} vs reported "
                   f"{claim.value:+g} (±{tolerance:g})", measured=measured, n=min(len(a), len(b)), scale="paper")


def judge(claim: Claim, rows: list[Measurement], reachable: set[str] | None = None,
          claimed_effect: float | None = None) -> Verdict:
    """The verdict on one claim. `reachable`: the claims protocol_ids some registered protocol measures."""
    if reachable is not None and claim.protocol_id not in reachable:
        return Verdict(claim, "no code path", f"no registered protocol measures {claim.protocol_id}")
    if claim.kind == "directional":
        return judge_directional(claim, rows, claimed_effect)
    if claim.kind == "equivalence":
        return judge_equivalence(claim, rows, claimed_effect)
    if claim.value is None:
        return Verdict(claim, "not transcribed", "the source's table could not be read; value missing")
    if claim.kind == "absolute":
        return judge_absolute(claim, rows)
    if claim.kind == "delta":
        return judge_delta(claim, rows)
    return Verdict(claim, "not run", f"a {claim.kind} claim: not a quantity a protocol run measures")
