"""Properties of the metrics' maths, and their contracts at the edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, mannwhitneyu

from common.metrics import (
    auc_ci,
    clopper_pearson,
    delong_covariance,
    delong_test,
    evaluate_by_group,
    evaluate_scores,
    histogram_counts,
    operating_thresholds,
    pooled_auc_from_histograms,
    pooled_roc_from_histograms,
    resolve_direction,
    resolve_directions,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
    threshold_metrics,
)

# Small integer scores make ties, the case where AUC and DeLong formulas go wrong first.
cases = st.lists(st.tuples(st.booleans(), st.integers(0, 12)), min_size=2, max_size=60)


def _split(data: list[tuple[bool, int]]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([label for label, _ in data], dtype=bool)
    scores = np.array([score for _, score in data], dtype=float)
    return labels, scores


def _both_classes(labels: np.ndarray, at_least: int = 1) -> bool:
    return int(labels.sum()) >= at_least and int((~labels).sum()) >= at_least


def _naive_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) straight from the definition, O(m n)."""
    pos, neg = scores[labels], scores[~labels]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


# ---------------------------------------------------------------- AUC and DeLong


@given(cases)
def test_auc_is_the_mann_whitney_u_over_the_pairs(data):
    labels, scores = _split(data)
    assume(_both_classes(labels))
    pos, neg = scores[labels], scores[~labels]
    u = mannwhitneyu(pos, neg).statistic
    assert roc_auc(labels, scores) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)
    assert auc_ci(labels, scores, direction="<").auc == pytest.approx(roc_auc(labels, scores))


@given(cases)
def test_auc_of_the_negated_score_is_the_complement(data):
    labels, scores = _split(data)
    assume(_both_classes(labels))
    assert roc_auc(labels, scores) + roc_auc(labels, -scores) == pytest.approx(1.0, abs=1e-12)
    assert auc_ci(labels, scores, direction=">").auc == pytest.approx(roc_auc(labels, -scores))


@given(cases)
def test_fast_delong_equals_the_definition(data):
    labels, scores = _split(data)
    assume(_both_classes(labels, at_least=2))
    auc, variance = _naive_delong(labels, scores)
    result = auc_ci(labels, scores, direction="<")
    assert result.auc == pytest.approx(auc, abs=1e-12)
    assert result.variance == pytest.approx(variance, abs=1e-12)


three_scores = st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 5), st.integers(0, 9))


@given(st.lists(three_scores, min_size=4, max_size=50))
def test_delong_covariance_is_symmetric_positive_semidefinite(data):
    labels = np.array([row[0] for row in data], dtype=bool)
    assume(_both_classes(labels, at_least=2))
    scores = np.array([[row[k] for row in data] for k in (1, 2, 3)], dtype=float)
    aucs, covariance = delong_covariance(labels, scores, directions=["<", ">", "<"])
    assert covariance == pytest.approx(covariance.T, abs=1e-15)
    assert (np.diag(covariance) >= 0).all()
    assert np.linalg.eigvalsh(covariance).min() >= -1e-12
    assert aucs[1] == pytest.approx(roc_auc(labels, -scores[1]))


@given(cases, st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_interval_contains_the_auc_and_stays_in_the_unit_interval(data, conf_level):
    labels, scores = _split(data)
    assume(_both_classes(labels, at_least=2))
    result = auc_ci(labels, scores, direction="auto", conf_level=conf_level)
    assert 0 <= result.ci_low <= result.auc <= result.ci_high <= 1


@given(cases)
def test_delong_test_is_antisymmetric(data):
    labels, scores = _split(data)
    assume(_both_classes(labels, at_least=2))
    other = scores[::-1].copy()
    ab = delong_test(labels, scores, other, direction="<")
    ba = delong_test(labels, other, scores, direction="<")
    if math.isfinite(ab.z):
        assert ab.z == pytest.approx(-ba.z, abs=1e-9)
        assert ab.p_value == pytest.approx(ba.p_value, abs=1e-12)
        assert 0 <= ab.p_value <= 1
    assert ab.ci_low <= ab.difference <= ab.ci_high


def test_auto_direction_compares_the_medians():
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert resolve_direction(labels, [3, 4, 5, 0, 1, 2], "auto") == "<"
    assert resolve_direction(labels, [0, 1, 2, 3, 4, 5], "auto") == ">"
    assert resolve_direction(labels, [1, 1, 1, 1, 1, 1], "auto") == "<"  # ties: "<"
    assert resolve_direction(labels, [0, 1, 2, 3, 4, 5], "<") == "<"  # explicit wins


def test_a_class_absent_gives_nan_not_an_error():
    result = auc_ci([1, 1, 1], [0.1, 0.2, 0.3], direction="<")
    assert math.isnan(result.auc) and math.isnan(result.ci_low) and math.isnan(result.variance)
    one_negative = auc_ci([1, 1, 0], [0.3, 0.2, 0.1], direction="<")
    assert one_negative.auc == 1.0 and math.isnan(one_negative.variance)
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))


def test_perfect_but_different_curves_give_an_infinite_z():
    labels = np.array([1, 1, 0, 0])
    result = delong_test(labels, [3, 4, 1, 2], [1, 2, 3, 4], direction="<")
    assert (result.difference, result.z, result.p_value) == (1.0, math.inf, 0.0)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 2, 0], [0.1, 0.2, 0.3], "0/1"),
        ([1, 0], [0.1, float("nan")], "finite"),
        ([1, 0], [0.1, 0.2, 0.3], "shape"),
    ],
)
def test_bad_arguments_are_named(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        auc_ci(labels, scores, direction="<")


def test_conf_level_and_direction_are_checked():
    with pytest.raises(ValueError, match="conf_level"):
        auc_ci([1, 0], [1, 0], direction="<", conf_level=95)
    with pytest.raises(ValueError, match="direction"):
        auc_ci([1, 0], [1, 0], direction="up")  # type: ignore[arg-type]


# ---------------------------------------------------------------- operating point


@given(st.integers(0, 60), st.integers(0, 60), st.sampled_from([0.9, 0.95, 0.99]))
def test_clopper_pearson_equals_scipys_exact_interval(successes, extra, conf_level):
    total = successes + extra
    assume(total > 0)
    expected = binomtest(successes, total).proportion_ci(
        confidence_level=conf_level, method="exact"
    )
    low, high = clopper_pearson(successes, total, conf_level=conf_level)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert low <= successes / total <= high


def test_clopper_pearson_edges():
    assert clopper_pearson(0, 10)[0] == 0.0
    assert clopper_pearson(10, 10)[1] == 1.0
    assert all(math.isnan(bound) for bound in clopper_pearson(0, 0))
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(11, 10)


def test_threshold_metrics_count_the_confusion_table():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.5, 0.2, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0])
    point = threshold_metrics(labels, scores, threshold=0.5)  # 0.5 itself is positive
    assert (point.tp, point.fp, point.tn, point.fn) == (3, 2, 4, 1)
    assert point.sensitivity.estimate == 3 / 4 and point.sensitivity.total == 4
    assert point.specificity.estimate == 4 / 6
    assert point.ppv.estimate == 3 / 5
    assert point.npv.estimate == 4 / 5
    assert point.accuracy.estimate == 7 / 10
    assert point.f1 == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert (point.sensitivity.ci_low, point.sensitivity.ci_high) == clopper_pearson(3, 4)


def test_nothing_called_positive_leaves_ppv_undefined():
    point = threshold_metrics([1, 0, 0], [0.2, 0.1, 0.3], threshold=0.9)
    assert math.isnan(point.ppv.estimate) and point.ppv.total == 0
    assert point.specificity.estimate == 1.0 and point.f1 == 0.0


@given(cases, st.floats(0.01, 1.0))
def test_matched_threshold_is_the_highest_reaching_the_target(data, target):
    labels, scores = _split(data)
    assume(labels.any())
    match = threshold_for_sensitivity(labels, scores, target=target)
    assert match.threshold in scores[labels]
    assert match.sensitivity >= target - 1e-9
    above = scores[labels][scores[labels] > match.threshold]
    if len(above):
        # The next higher candidate threshold falls short of the target.
        assert (scores[labels] >= above.min()).mean() < target - 1e-9
    point = threshold_metrics(labels, scores, threshold=match.threshold)
    assert point.sensitivity.estimate == match.sensitivity
    assert point.specificity.estimate == pytest.approx(match.specificity, nan_ok=True)


def test_matched_threshold_tolerates_a_rounded_target():
    labels = np.array([1] * 10 + [0] * 5)
    scores = np.arange(15, dtype=float)[::-1]  # positives 14..5, negatives 4..0
    match = threshold_for_sensitivity(labels, scores, target=0.7)  # 0.7 * 10 > 7 in floats
    assert (match.threshold, match.sensitivity) == (8.0, 0.7)
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity(labels, scores, target=0.0)


# ---------------------------------------------------------------- subgroups


def test_subgroups_reuse_the_overall_directions_and_thresholds():
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    scores = {"model": np.array([0.9, 0.7, 0.6, 0.1, 0.8, 0.2, 0.4, 0.3])}
    groups = ["a", "a", "a", "a", "b", "b", "b", "c"]
    directions = resolve_directions(labels, scores, "<")
    thresholds = operating_thresholds(labels, scores, directions=directions, match_sensitivity=1.0)
    assert thresholds == {"model": 0.7}
    overall = evaluate_scores(labels, scores, directions=directions, thresholds=thresholds)
    assert (overall.n_pos, overall.n_neg) == (3, 5)
    by_group = evaluate_by_group(
        labels, scores, groups, directions=directions, thresholds=thresholds
    )
    assert [g.group for g in by_group] == ["a", "b", "c"]
    a, b, c = by_group
    assert a.scores[0].auc.auc == 1.0
    assert a.scores[0].at_threshold is not None and a.scores[0].at_threshold.threshold == 0.7
    assert (b.n_pos, b.n_neg) == (1, 2)
    assert math.isnan(c.scores[0].auc.auc)  # no positive in "c": NaN, not an error


def test_direction_greater_calls_low_scores_positive():
    labels = np.array([1, 1, 0, 0])
    scores = {"inverse": np.array([0.1, 0.2, 0.8, 0.9])}
    directions = resolve_directions(labels, scores, "auto")
    thresholds = operating_thresholds(labels, scores, directions=directions, match_sensitivity=1.0)
    assert directions == {"inverse": ">"} and thresholds == {"inverse": 0.2}
    report = evaluate_scores(labels, scores, directions=directions, thresholds=thresholds)
    point = report.scores[0].at_threshold
    assert point is not None and point.threshold == 0.2
    assert (point.tp, point.fp, point.tn, point.fn) == (2, 0, 2, 0)


def test_every_pair_of_scores_is_compared():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = {name: np.arange(6.0) * k % 5 for k, name in enumerate("abc", start=1)}
    report = evaluate_scores(labels, scores, directions=dict.fromkeys(scores, "<"), thresholds={})
    assert [(c.score_a, c.score_b) for c in report.comparisons] == [
        ("a", "b"), ("a", "c"), ("b", "c"),
    ]  # fmt: skip


# ---------------------------------------------------------------- ROC curve


def _brute_force_roc(labels: np.ndarray, scores: np.ndarray) -> set[tuple[float, float, float]]:
    """(threshold, sensitivity, specificity) for every score and +inf, by counting cases."""
    points = set()
    for threshold in [*scores.tolist(), math.inf]:
        called = scores >= threshold
        sensitivity = (called & labels).sum() / labels.sum()
        specificity = (~called & ~labels).sum() / (~labels).sum()
        points.add((float(threshold), float(sensitivity), float(specificity)))
    return points


@given(cases)
def test_roc_curve_is_every_threshold_counted_by_brute_force(data):
    labels, scores = _split(data)
    assume(_both_classes(labels))
    curve = roc_curve(labels, scores, direction="<")
    points = set(
        zip(
            curve.thresholds.tolist(),
            curve.sensitivity.tolist(),
            curve.specificity.tolist(),
            strict=True,
        )
    )
    assert points == _brute_force_roc(labels, scores)
    assert np.all(np.diff(curve.thresholds) > 0)
    assert np.all(np.diff(curve.sensitivity) <= 0) and np.all(np.diff(curve.specificity) >= 0)
    assert curve.area() == pytest.approx(roc_auc(labels, scores), abs=1e-12)


@given(cases)
def test_roc_curve_direction_greater_is_less_on_the_negated_score(data):
    labels, scores = _split(data)
    assume(_both_classes(labels))
    greater = roc_curve(labels, scores, direction=">")
    less = roc_curve(labels, -scores, direction="<")
    np.testing.assert_array_equal(greater.thresholds, -less.thresholds)
    np.testing.assert_array_equal(greater.sensitivity, less.sensitivity)
    np.testing.assert_array_equal(greater.specificity, less.specificity)
    for threshold, sensitivity in zip(greater.thresholds, greater.sensitivity, strict=True):
        assert sensitivity == pytest.approx((scores[labels] <= threshold).mean())
    assert greater.area() == pytest.approx(auc_ci(labels, scores, direction=">").auc, abs=1e-12)


def test_roc_curve_of_one_class_is_nan_not_an_error():
    curve = roc_curve([1, 1], [0.2, 0.4], direction="auto")
    assert curve.direction == "<" and curve.sensitivity.tolist() == [1.0, 0.5, 0.0]
    assert np.isnan(curve.specificity).all()


# ---------------------------------------------------------------- pooled histograms


@given(
    st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=2, max_size=80),
    st.integers(1, 50),
    st.integers(1, 4),
)
def test_pooled_auc_is_within_the_same_bin_bound_of_the_exact_auc(data, bins, sites):
    labels, scores = np.array([d[0] for d in data]), np.array([d[1] for d in data])
    assume(_both_classes(labels))
    histograms = [
        histogram_counts(labels[part], scores[part], bins)
        for part in np.array_split(np.arange(len(labels)), sites)
    ]
    pos = sum(h[0] for h in histograms)
    neg = sum(h[1] for h in histograms)
    same_bin_pairs = float((pos * neg).sum()) / (labels.sum() * (~labels).sum())
    pooled = pooled_auc_from_histograms(histograms)
    assert abs(pooled - roc_auc(labels, scores)) <= 0.5 * same_bin_pairs + 1e-12


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 19)), min_size=2, max_size=80))
def test_pooled_auc_is_exact_when_scores_sit_on_the_bin_grid(data):
    labels = np.array([d[0] for d in data])
    assume(_both_classes(labels))
    scores = (np.array([d[1] for d in data]) + 0.5) / 20  # bin centres
    histograms = [
        histogram_counts(labels[::2], scores[::2], 20),
        histogram_counts(labels[1::2], scores[1::2], 20),
    ]
    assert pooled_auc_from_histograms(histograms) == pytest.approx(
        roc_auc(labels, scores), abs=1e-12
    )


def test_pooled_auc_of_realistic_sites_with_1000_bins_is_within_1e_3():
    rng = np.random.default_rng(7)
    histograms, all_labels, all_scores = [], [], []
    for shift in (0.0, 0.3, -0.2):  # three hospitals, different case mixes
        labels = rng.random(400) < 0.3
        logits = rng.normal(1.2 * labels + shift, 1.0)
        scores = 1 / (1 + np.exp(-logits))
        histograms.append(histogram_counts(labels, scores, 1000))
        all_labels.append(labels)
        all_scores.append(scores)
    exact = roc_auc(np.concatenate(all_labels), np.concatenate(all_scores))
    assert abs(pooled_auc_from_histograms(histograms) - exact) < 1e-3


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=2, max_size=60))
def test_pooled_roc_has_the_pooled_auc_under_it(data):
    labels, scores = np.array([d[0] for d in data]), np.array([d[1] for d in data])
    assume(_both_classes(labels))
    histograms = [histogram_counts(labels, scores, 10)]
    thresholds, sensitivity, specificity = pooled_roc_from_histograms(histograms)
    assert thresholds[0] == 0 and thresholds[-1] == np.inf
    assert (sensitivity[0], specificity[0], sensitivity[-1], specificity[-1]) == (1, 0, 0, 1)
    fpr = 1 - specificity
    area = float(np.sum((fpr[:-1] - fpr[1:]) * (sensitivity[:-1] + sensitivity[1:]) / 2))
    assert area == pytest.approx(pooled_auc_from_histograms(histograms), abs=1e-12)


def test_histogram_bins_and_checks():
    pos, neg = histogram_counts([1, 0, 1, 0], [0.0, 0.25, 0.999, 1.0], 4)
    assert pos.tolist() == [1, 0, 0, 1] and neg.tolist() == [0, 1, 0, 1]  # 1.0: last bin
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        histogram_counts([1], [1.5], 4)
    with pytest.raises(ValueError, match="site 1"):
        pooled_auc_from_histograms([(pos, neg), (pos[:3], neg[:3])])
    with pytest.raises(ValueError, match="whole numbers"):
        pooled_auc_from_histograms([(pos * 0.5, neg)])
    assert math.isnan(pooled_auc_from_histograms([(pos, np.zeros(4, dtype=int))]))


@settings(max_examples=20)
@given(st.integers(1, 3))
def test_pooling_is_the_sum_over_sites(copies):
    labels, scores = np.array([1, 0, 1, 0, 0]), np.array([0.9, 0.1, 0.45, 0.5, 0.2])
    one = histogram_counts(labels, scores, 10)
    assert pooled_auc_from_histograms([one] * copies) == pooled_auc_from_histograms([one])
