"""The metrics against pROC, the reference implementation, on pROC's own aSAH data.

Every expected figure is copied from pROC's test suite (repository ``xrobin/pROC``, folder
``tests/testthat``); the comment above each names the file. pROC's curves there are
``roc(aSAH$outcome, aSAH$<marker>)``: outcome "Poor" is the case (positive), "Good" the
control, and ``direction = "auto"``, which picks ``"<"`` for wfns, s100b and ndka.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from common.metrics import (
    auc_ci,
    delong_covariance,
    delong_test,
    evaluate_by_group,
    resolve_directions,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
    threshold_metrics,
)

ASAH = Path("/work/shared/reference/asah.csv")
TOL = 1e-6

pytestmark = pytest.mark.skipif(
    not ASAH.is_file(), reason=f"pROC's aSAH data not found at {ASAH} (see its README)"
)


@pytest.fixture(scope="module")
def asah() -> dict[str, np.ndarray]:
    with ASAH.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    data = {marker: np.array([float(r[marker]) for r in rows]) for marker in MARKERS}
    data["poor"] = np.array([r["outcome"] == "Poor" for r in rows])
    data["gender"] = np.array([r["gender"] for r in rows])
    return data


MARKERS = ("wfns", "s100b", "ndka")

# AUCs, direction "<". wfns and ndka: tests/testthat/test-auc.R ("full auc works");
# s100b: tests/testthat/r_auc.R (expected.s100b$full).
PROC_AUC = {"wfns": 0.823678861788618, "s100b": 0.731368563685637, "ndka": 0.611957994579946}

# AUCs with direction ">" forced: tests/testthat/helper-roc-expected.R
# (expected.roc$<marker>$forward$`>`$auc).
PROC_AUC_GREATER = {
    "wfns": 0.17632113821138212,
    "s100b": 0.26863143631436315,
    "ndka": 0.38804200542005424,
}

# DeLong variances: tests/testthat/test-var.R ("var with delong works").
PROC_VAR = {"wfns": 0.00146991470882363, "s100b": 0.00266868245717244, "ndka": 0.0031908105493913}

# DeLong covariances: tests/testthat/test-cov.R ("cov with delong works").
PROC_COV = {
    ("wfns", "ndka"): -0.000532967856762438,
    ("ndka", "s100b"): -0.000756164938056579,
    ("s100b", "wfns"): 0.00119615567376754,
}

# DeLong 95% CIs as (lower, auc, upper).
# ndka: tests/testthat/test-ci.auc.R (expected.ci.auc); wfns: tests/testthat/r_ci.auc.R
# ("ci.auc works", DeLong). pROC's test suite publishes no full-precision s100b interval; its
# variance (test-var.R) fixes it, see test_s100b_interval_from_published_variance.
PROC_CI = {
    "ndka": (0.501244999271703, 0.611957994579946, 0.722670989888189),
    "wfns": (0.748534887819453, 0.823678861788618, 0.898822835757783),
}

# ci.auc(outcome ~ ndka, data = aSAH, subset = (gender == "Female")):
# tests/testthat/test-ci.auc.R ("ci.auc works with a formula").
PROC_CI_NDKA_FEMALE = (0.5261398281, 0.6671428571, 0.8081458862)

# roc.test(r.a, r.b), DeLong paired, two-sided: tests/testthat/test-roc.test.R
# ("roc.test statistic and p are as expected with defaults"): Z, p, 95% CI of auc_a - auc_b.
PROC_ROC_TEST = {
    ("wfns", "s100b"): (
        2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478,
    ),
    ("wfns", "ndka"): (
        2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566,
    ),
    ("ndka", "s100b"): (
        -1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094,
    ),
}  # fmt: skip

# ROC coordinates of roc(aSAH$outcome, aSAH$<marker>, direction = "<"):
# tests/testthat/helper-roc-expected.R (expected.roc$<marker>$forward$`<`). A case is positive
# when its value is >= the threshold; the thresholds are pROC's (midpoints for s100b).
PROC_COORDS_WFNS = {
    "thresholds": [1, 2, 3, 4, 5, np.inf],
    "sensitivities": [
        1, 0.95121951219512191, 0.65853658536585369, 0.63414634146341464, 0.43902439024390244, 0,
    ],
    "specificities": [
        0, 0.51388888888888884, 0.79166666666666663, 0.83333333333333337, 0.94444444444444442, 1,
    ],
}  # fmt: skip
PROC_COORDS_S100B = {
    "thresholds": [
        -np.inf, 0.035000000000000003, 0.044999999999999998, 0.055, 0.065000000000000002,
        0.075000000000000011, 0.084999999999999992, 0.095000000000000001, 0.10500000000000001,
        0.11499999999999999, 0.125, 0.13500000000000001, 0.14500000000000002, 0.155,
        0.16500000000000001, 0.17499999999999999, 0.185, 0.20500000000000002,
        0.22500000000000001, 0.23499999999999999, 0.245, 0.255, 0.26500000000000001,
        0.27500000000000002, 0.29000000000000004, 0.31, 0.32500000000000001,
        0.33500000000000002, 0.34499999999999997, 0.36499999999999999, 0.39500000000000002,
        0.41999999999999998, 0.435, 0.44500000000000001, 0.45500000000000002,
        0.46499999999999997, 0.47499999999999998, 0.48499999999999999, 0.495,
        0.51000000000000001, 0.54000000000000004, 0.57000000000000006, 0.6399999999999999,
        0.70499999999999996, 0.72499999999999998, 0.755, 0.79499999999999993,
        0.83999999999999997, 0.90999999999999992, 1.5149999999999999, np.inf,
    ],
    "sensitivities": [
        1, 0.97560975609756095, 0.97560975609756095, 0.97560975609756095, 0.97560975609756095,
        0.90243902439024393, 0.87804878048780488, 0.82926829268292679, 0.78048780487804881,
        0.75609756097560976, 0.73170731707317072, 0.68292682926829273, 0.65853658536585369,
        0.65853658536585369, 0.63414634146341464, 0.63414634146341464, 0.63414634146341464,
        0.63414634146341464, 0.6097560975609756, 0.58536585365853655, 0.58536585365853655,
        0.56097560975609762, 0.53658536585365857, 0.51219512195121952, 0.51219512195121952,
        0.48780487804878048, 0.46341463414634149, 0.43902439024390244, 0.43902439024390244,
        0.41463414634146339, 0.41463414634146339, 0.3902439024390244, 0.3902439024390244,
        0.34146341463414637, 0.34146341463414637, 0.34146341463414637, 0.34146341463414637,
        0.31707317073170732, 0.29268292682926828, 0.29268292682926828, 0.26829268292682928,
        0.24390243902439024, 0.21951219512195122, 0.1951219512195122, 0.14634146341463414,
        0.12195121951219512, 0.097560975609756101, 0.073170731707317069, 0.04878048780487805,
        0.024390243902439025, 0,
    ],
    "specificities": [
        0, 0, 0.069444444444444448, 0.1111111111111111, 0.1388888888888889,
        0.22222222222222221, 0.30555555555555558, 0.3888888888888889, 0.4861111111111111,
        0.54166666666666663, 0.54166666666666663, 0.58333333333333337, 0.63888888888888884,
        0.69444444444444442, 0.73611111111111116, 0.76388888888888884, 0.77777777777777779,
        0.80555555555555558, 0.80555555555555558, 0.80555555555555558, 0.81944444444444442,
        0.81944444444444442, 0.81944444444444442, 0.81944444444444442, 0.83333333333333337,
        0.83333333333333337, 0.84722222222222221, 0.86111111111111116, 0.875, 0.875,
        0.88888888888888884, 0.88888888888888884, 0.90277777777777779, 0.90277777777777779,
        0.91666666666666663, 0.93055555555555558, 0.95833333333333337, 0.97222222222222221,
        0.97222222222222221, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ],
}  # fmt: skip


@pytest.mark.parametrize("marker", MARKERS)
def test_auc_matches_proc(asah, marker):
    assert roc_auc(asah["poor"], asah[marker]) == pytest.approx(PROC_AUC[marker], abs=TOL)
    result = auc_ci(asah["poor"], asah[marker], direction="auto")
    assert result.direction == "<"
    assert result.auc == pytest.approx(PROC_AUC[marker], abs=TOL)


@pytest.mark.parametrize("marker", MARKERS)
def test_forced_direction_greater_matches_proc(asah, marker):
    result = auc_ci(asah["poor"], asah[marker], direction=">")
    assert result.auc == pytest.approx(PROC_AUC_GREATER[marker], abs=TOL)


@pytest.mark.parametrize("marker", MARKERS)
def test_delong_variance_matches_proc(asah, marker):
    assert auc_ci(asah["poor"], asah[marker], direction="<").variance == pytest.approx(
        PROC_VAR[marker], abs=TOL
    )


def test_delong_covariance_matches_proc(asah):
    aucs, covariance = delong_covariance(
        asah["poor"], np.stack([asah[m] for m in MARKERS]), directions=["<"] * 3
    )
    index = {marker: i for i, marker in enumerate(MARKERS)}
    assert aucs == pytest.approx([PROC_AUC[m] for m in MARKERS], abs=TOL)
    assert np.diag(covariance) == pytest.approx([PROC_VAR[m] for m in MARKERS], abs=TOL)
    for (a, b), expected in PROC_COV.items():
        assert covariance[index[a], index[b]] == pytest.approx(expected, abs=TOL)
        assert covariance[index[b], index[a]] == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("marker", sorted(PROC_CI))
def test_delong_interval_matches_proc(asah, marker):
    low, auc, high = PROC_CI[marker]
    result = auc_ci(asah["poor"], asah[marker], direction="auto")
    assert (result.ci_low, result.auc, result.ci_high) == pytest.approx((low, auc, high), abs=TOL)


def test_s100b_interval_from_published_variance(asah):
    # pROC's ci.auc is qnorm(c(.025, .975), auc, sqrt(var)); with the published AUC
    # (r_auc.R) and variance (test-var.R) this is the interval pROC prints as
    # "95% CI: 0.6301-0.8326 (DeLong)".
    half = 1.959963984540054 * np.sqrt(PROC_VAR["s100b"])
    expected = (PROC_AUC["s100b"] - half, PROC_AUC["s100b"] + half)
    result = auc_ci(asah["poor"], asah["s100b"], direction="auto")
    assert (result.ci_low, result.ci_high) == pytest.approx(expected, abs=TOL)
    assert (round(result.ci_low, 4), round(result.ci_high, 4)) == (0.6301, 0.8326)


def test_negated_marker_with_auto_direction_gives_the_same_interval(asah):
    # test-ci.auc.R: ci.auc(aSAH$outcome, -aSAH$ndka) equals expected.ci.auc.
    result = auc_ci(asah["poor"], -asah["ndka"], direction="auto")
    assert result.direction == ">"
    assert (result.ci_low, result.auc, result.ci_high) == pytest.approx(PROC_CI["ndka"], abs=TOL)


def test_subgroup_interval_matches_proc(asah):
    scores = {"ndka": asah["ndka"]}
    directions = resolve_directions(asah["poor"], scores, "auto")
    groups = evaluate_by_group(
        asah["poor"], scores, asah["gender"].tolist(), directions=directions, thresholds={}
    )
    female = next(g for g in groups if g.group == "Female")
    auc = female.scores[0].auc
    assert (auc.ci_low, auc.auc, auc.ci_high) == pytest.approx(PROC_CI_NDKA_FEMALE, abs=TOL)


@pytest.mark.parametrize(("a", "b"), sorted(PROC_ROC_TEST))
def test_delong_test_matches_proc(asah, a, b):
    z, p, low, high = PROC_ROC_TEST[(a, b)]
    result = delong_test(asah["poor"], asah[a], asah[b], direction="auto")
    assert result.z == pytest.approx(z, abs=TOL)
    assert result.p_value == pytest.approx(p, abs=TOL)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), abs=TOL)
    assert result.difference == pytest.approx(PROC_AUC[a] - PROC_AUC[b], abs=TOL)
    # test-roc.test.R: swapping the curves negates Z and keeps p.
    swapped = delong_test(asah["poor"], asah[b], asah[a], direction="auto")
    assert swapped.z == pytest.approx(-z, abs=TOL)
    assert swapped.p_value == pytest.approx(p, abs=TOL)


def test_delong_test_of_identical_curves_is_zero_with_p_one(asah):
    # test-roc.test.R: "DeLong roc.test works when curves are identical".
    result = delong_test(asah["poor"], asah["wfns"], asah["wfns"], direction="auto")
    assert (result.z, result.p_value) == (0.0, 1.0)


def test_delong_test_of_negated_markers_matches_proc(asah):
    # test-roc.test.R: roc.test(roc(outcome, -wfns), roc(outcome, -s100b)) has t1's statistic.
    result = delong_test(asah["poor"], -asah["wfns"], -asah["s100b"], direction="auto")
    assert result.directions == (">", ">")
    assert result.z == pytest.approx(PROC_ROC_TEST[("wfns", "s100b")][0], abs=TOL)


@pytest.mark.parametrize(
    ("marker", "coords"), [("wfns", PROC_COORDS_WFNS), ("s100b", PROC_COORDS_S100B)]
)
def test_sensitivity_and_specificity_at_thresholds_match_proc(asah, marker, coords):
    for threshold, sensitivity, specificity in zip(
        coords["thresholds"], coords["sensitivities"], coords["specificities"], strict=True
    ):
        point = threshold_metrics(asah["poor"], asah[marker], threshold=threshold)
        assert point.sensitivity.estimate == pytest.approx(sensitivity, abs=TOL), threshold
        assert point.specificity.estimate == pytest.approx(specificity, abs=TOL), threshold


@pytest.mark.parametrize("target", [0.5, 0.75, 0.9, 0.95, 1.0])
def test_matched_threshold_is_procs_most_specific_point_reaching_the_target(asah, target):
    coords = PROC_COORDS_S100B
    reaching = [
        (se, sp)
        for se, sp in zip(coords["sensitivities"], coords["specificities"], strict=True)
        if se >= target
    ]
    # The most specific point; of equally specific ones, the highest threshold.
    best_sensitivity, best_specificity = max(reaching, key=lambda point: (point[1], -point[0]))
    match = threshold_for_sensitivity(asah["poor"], asah["s100b"], target=target)
    assert match.specificity == pytest.approx(best_specificity, abs=TOL)
    assert match.sensitivity == pytest.approx(best_sensitivity, abs=TOL)


def test_roc_curve_is_procs_coords(asah):
    # wfns takes the values 1..5, so pROC's thresholds are the distinct values themselves.
    wfns = roc_curve(asah["poor"], asah["wfns"], direction="auto")
    assert wfns.thresholds.tolist() == PROC_COORDS_WFNS["thresholds"]
    assert wfns.sensitivity == pytest.approx(PROC_COORDS_WFNS["sensitivities"], abs=TOL)
    assert wfns.specificity == pytest.approx(PROC_COORDS_WFNS["specificities"], abs=TOL)
    # s100b: the same points; pROC puts each threshold halfway below the distinct value.
    s100b = roc_curve(asah["poor"], asah["s100b"], direction="auto")
    assert s100b.sensitivity == pytest.approx(PROC_COORDS_S100B["sensitivities"], abs=TOL)
    assert s100b.specificity == pytest.approx(PROC_COORDS_S100B["specificities"], abs=TOL)
    proc = np.array(PROC_COORDS_S100B["thresholds"])
    assert np.all(proc[:-1] <= s100b.thresholds[:-1])
    assert np.all(s100b.thresholds[:-1] < proc[1:])
    assert s100b.area() == pytest.approx(PROC_AUC["s100b"], abs=TOL)
