"""Verdicts: every status, the paired interval, TOST, the MDE against statsmodels/scipy, paper-scale seeds."""

from __future__ import annotations

import dataclasses
import math

import pytest

from replication.claims import load_claims
from replication.verdicts import (
    Measurement,
    VerdictError,
    judge,
    minimum_detectable_effect,
    paired_power,
    seeds_to_resolve,
    t_interval,
)

CLAIMS = {c.claim_id: c for c in load_claims()}
SVM_BELOW = CLAIMS["dir.voc07_svm.map.densecl-vs-mocov2.f5"]  # DenseCL < MoCo-v2, ImageNet-200 pretraining only
SVM_COMPARABLE = CLAIMS["eq.voc07_svm.map.densecl-vs-mocov2.f5"]  # within ±2 points
LOWSHOT = CLAIMS["dir.voc07_lowshot.map.densecl-vs-mocov2.f5.k1"]  # DenseCL <= MoCo-v2, any pretraining
SVM_ABS = CLAIMS["mmselfsup.voc07_svm.map.densecl.in1k200.f5"]  # 82.5 +- 0.5
DET = CLAIMS["dir.det_voc_c4.ap.densecl-vs-mocov2"]  # DenseCL >= MoCo-v2


def rows(densecl, mocov2, protocol_id="voc07_svm", scale="small", k=None, metric="mAP", layer="feature5", **kw):
    common = dict(scale=scale, pretrain_data=kw.get("pretrain_data", "synthetic-voc"), epochs=kw.get("epochs", 10),
                  backbone=kw.get("backbone", "R18"), protocol_id=protocol_id, layer=layer, k=k, run_id="r",
                  metric=metric)
    seeds = kw.get("seeds")
    return ([Measurement(method="DenseCL", seed=seeds[s] if seeds else s, value=v, **common)
             for s, v in enumerate(densecl)]
            + [Measurement(method="MoCo-v2", seed=seeds[s] if seeds else s, value=v, **common)
               for s, v in enumerate(mocov2)])


def lowshot(densecl, mocov2, **kw):
    return rows(densecl, mocov2, protocol_id="voc07_lowshot", k=1, **kw)


def test_directional_statuses_follow_the_paired_interval():
    assert judge(LOWSHOT, lowshot([30, 31, 32], [33, 34.5, 35])).status == "reproduced"
    assert judge(LOWSHOT, lowshot([36, 37, 38], [33, 34, 35])).status == "contradicted"
    inconclusive = judge(LOWSHOT, lowshot([30, 35, 31], [33, 32, 32]))
    assert inconclusive.status == "inconclusive" and "straddles zero" in inconclusive.reason
    assert inconclusive.mde is not None and inconclusive.mde > 0 and "MDE at 80% power" in inconclusive.reason
    assert inconclusive.seeds_needed is not None and inconclusive.seeds_needed > 3
    # Two seeds already give an interval (wide: t(1) = 12.7); one seed does not.
    assert judge(LOWSHOT, lowshot([30, 31], [33, 34.2])).status in ("reproduced", "inconclusive")
    one = judge(LOWSHOT, lowshot([30], [33]))
    assert one.status == "inconclusive" and "at least 2" in one.reason


def test_directional_claims_pair_by_seed_not_by_order():
    """Seed s of DenseCL is compared with seed s of MoCo-v2, whatever order the runs were stored in."""
    paired = lowshot([30, 40, 50], [31, 41, 51], seeds=[0, 1, 2])
    shuffled = [*paired[:3], paired[5], paired[3], paired[4]]
    verdict = judge(LOWSHOT, shuffled)
    assert verdict.status == "reproduced" and verdict.measured == pytest.approx(-1.0) and verdict.sd == 0.0


def test_a_scoped_directional_claim_does_not_judge_other_pretraining():
    verdict = judge(SVM_BELOW, rows([30, 31, 32], [33, 34.5, 35]))
    assert verdict.status == "not comparable (scale)" and "in1k" in verdict.reason
    imagenet = rows([82.1, 82.4, 82.6], [83.9, 84.0, 84.2], scale="paper", pretrain_data="in1k", epochs=200,
                    backbone="R50")
    assert judge(SVM_BELOW, imagenet).status == "reproduced"


def test_equivalence_is_two_one_sided_tests_against_the_margin():
    assert SVM_COMPARABLE.tolerance == 2.0
    close = judge(SVM_COMPARABLE, rows([30.0, 31.1, 29.9, 30.6], [30.3, 30.8, 30.1, 30.2]))
    assert close.status == "reproduced" and close.interval[0] > -2 and close.interval[1] < 2
    far = judge(SVM_COMPARABLE, rows([36.0, 36.5, 37.0], [30.0, 30.2, 30.9]))
    assert far.status == "contradicted"
    noisy = judge(SVM_COMPARABLE, rows([30.0, 35.0, 27.0], [31.0, 29.0, 32.0]))
    assert noisy.status == "inconclusive" and "could establish equivalence within" in noisy.reason
    with pytest.raises(VerdictError, match="margin > 0"):
        judge(dataclasses.replace(SVM_COMPARABLE, tolerance=0.0), rows([1, 2], [1, 2]))


def test_the_90_percent_interval_of_tost_is_the_t_interval():
    differences = [0.3, -0.2, 0.1, 0.5]
    mean, low, high = t_interval(differences, confidence=0.90)
    verdict = judge(SVM_COMPARABLE, rows([30 + d for d in differences], [30.0] * 4))
    assert verdict.interval == pytest.approx((low, high)) and verdict.measured == pytest.approx(mean)


def test_t_interval_matches_a_hand_computed_one():
    mean, _low, high = t_interval([-1.0, -2.0, -3.0])
    assert mean == -2.0
    assert high - mean == pytest.approx(4.302652729911275 * 1.0 / 3**0.5)  # t(0.975, 2) * sd / sqrt(n)
    with pytest.raises(VerdictError, match="at least 2"):
        t_interval([1.0])


@pytest.mark.parametrize("n", [2, 3, 5, 8, 20])
def test_mde_matches_statsmodels_power_analysis(n):
    power = pytest.importorskip("statsmodels.stats.power")
    expected = power.TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8,
                                              alternative="two-sided")
    assert minimum_detectable_effect(sd=1.7, n=n) == pytest.approx(1.7 * expected, rel=1e-6)


def test_power_matches_scipy_noncentral_t_and_seeds_resolve_the_mean():
    from scipy import stats

    n, effect, sd = 6, 1.0, 1.5
    df, shift = n - 1, effect / sd * math.sqrt(n)
    critical = stats.t.ppf(0.975, df)
    expected = 1 - stats.nct.cdf(critical, df, shift) + stats.nct.cdf(-critical, df, shift)
    assert paired_power(effect, sd, n) == pytest.approx(expected)
    needed = seeds_to_resolve(effect, sd)
    assert paired_power(effect, sd, needed) >= 0.8 > paired_power(effect, sd, needed - 1)
    assert seeds_to_resolve(0.0, sd) is None and minimum_detectable_effect(sd, 1) == math.inf


def test_absolute_claims_use_every_paper_scale_seed():
    assert judge(SVM_ABS, rows([30, 31, 32], [33, 34, 35])).status == "not comparable (scale)"
    paper = dict(scale="paper", pretrain_data="in1k", epochs=200, backbone="R50")
    assert judge(SVM_ABS, rows([82.3], [84.0], **paper)).status == "reproduced"
    seeds = judge(SVM_ABS, rows([82.0, 82.3, 82.9], [84.0, 84, 84], **paper))
    assert seeds.status == "reproduced" and seeds.n == 3 and seeds.measured == pytest.approx(82.4)
    assert "± 0.46 over 3 runs" in seeds.reason
    off = judge(SVM_ABS, rows([80.0], [84.0], **paper))
    assert off.status == "contradicted" and "gap -2.50" in off.reason
    assert judge(SVM_ABS, rows([82.3], [84.0], **{**paper, "epochs": 800})).status == "not run"
    missing = next(c for c in CLAIMS.values() if c.value is None and c.kind == "absolute" and not c.verified)
    assert judge(missing, []).status == "not transcribed"


def test_paper_scale_directional_uses_every_seed_and_one_pair_against_the_noise_band():
    paper = dict(scale="paper", pretrain_data="in1k", epochs=200, backbone="R50", protocol_id="det_voc_c4",
                 metric="AP", layer="")
    assert judge(DET, rows([58.7, 58.9, 58.5], [57.0, 57.2, 56.8], **paper)).status == "reproduced"
    released = judge(DET, rows([58.7], [57.0], **paper))  # one checkpoint each: +1.7 against ±0.57
    assert released.status == "reproduced" and released.n == 1 and "noise band" in released.reason
    assert judge(DET, rows([57.2], [57.0], **paper)).status == "inconclusive"
    assert judge(DET, rows([55.0], [57.0], **paper)).status == "contradicted"


def test_claims_no_protocol_measures_have_no_code_path():
    semisup = next(c for c in CLAIMS.values() if c.protocol_id == "semisup_in1k_1pct")
    assert judge(semisup, [], reachable={"voc07_svm"}).status == "no code path"
