"""Operating-point metrics: a score at or above a threshold calls a case positive.

Sensitivity, specificity, PPV, NPV and accuracy are proportions of counts of the confusion
table; each comes with an exact binomial (Clopper-Pearson) confidence interval, the
interval of R's ``binom.test`` and of epiR's ``epi.tests`` (``method = "exact"``), which
the WAUVE paper's tables report. F1 has no interval here.

The WAUVE paper compares the model with radiologists at the radiologists' sensitivity;
``threshold_for_sensitivity`` finds that operating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import beta

from common.metrics._checks import binary_labels, check_conf_level, finite_scores


def clopper_pearson(successes: int, total: int, *, conf_level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval of ``successes / total``.

    The bounds are quantiles of beta distributions (Clopper & Pearson, Biometrika 1934):
    ``Beta(a/2; x, n-x+1)`` and ``Beta(1-a/2; x+1, n-x)`` with ``a = 1 - conf_level``; the
    lower bound is 0 when ``x = 0`` and the upper 1 when ``x = n``. ``(nan, nan)`` when
    ``total`` is 0.
    """
    check_conf_level(conf_level)
    if not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if total == 0:
        return float("nan"), float("nan")
    alpha = 1 - conf_level
    low = 0.0 if successes == 0 else beta.ppf(alpha / 2, successes, total - successes + 1)
    high = 1.0 if successes == total else beta.ppf(1 - alpha / 2, successes + 1, total - successes)
    return float(low), float(high)


@dataclass(frozen=True)
class Proportion:
    """``successes / total`` with its Clopper-Pearson interval (NaN when ``total`` is 0)."""

    successes: int
    total: int
    estimate: float
    ci_low: float
    ci_high: float

    @classmethod
    def exact(cls, successes: int, total: int, *, conf_level: float) -> Proportion:
        low, high = clopper_pearson(successes, total, conf_level=conf_level)
        estimate = successes / total if total else float("nan")
        return cls(successes, total, estimate, low, high)


@dataclass(frozen=True)
class ThresholdMetrics:
    """The confusion table at one threshold and the proportions read from it.

    Attributes
    ----------
    threshold : float
        A case is called positive when ``score >= threshold``.
    tp, fp, tn, fn : int
        True/false positives and negatives.
    sensitivity : Proportion
        ``tp / (tp + fn)``.
    specificity : Proportion
        ``tn / (tn + fp)``.
    ppv : Proportion
        ``tp / (tp + fp)``; NaN when no case is called positive.
    npv : Proportion
        ``tn / (tn + fn)``; NaN when no case is called negative.
    accuracy : Proportion
        ``(tp + tn) / N``.
    f1 : float
        ``2 tp / (2 tp + fp + fn)``, the harmonic mean of PPV and sensitivity; NaN when
        there is no positive case and none is called positive.
    conf_level : float
        Level of every interval.
    """

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion
    npv: Proportion
    accuracy: Proportion
    f1: float
    conf_level: float


def threshold_metrics(
    labels: ArrayLike, scores: ArrayLike, *, threshold: float, conf_level: float = 0.95
) -> ThresholdMetrics:
    """Sensitivity, specificity, PPV, NPV, accuracy (each with a 95% CI) and F1.

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative.
    scores : array [N]
        Finite scores; ``score >= threshold`` is a positive call. For a score where lower
        means positive, pass ``-scores`` and ``-threshold``.
    threshold : float
    conf_level : float
        Level of the Clopper-Pearson intervals.
    """
    is_pos = binary_labels(labels)
    values = finite_scores(scores, len(is_pos))
    called = values >= threshold
    tp = int((called & is_pos).sum())
    fp = int((called & ~is_pos).sum())
    tn = int((~called & ~is_pos).sum())
    fn = int((~called & is_pos).sum())
    f1_denominator = 2 * tp + fp + fn

    def exact(successes: int, total: int) -> Proportion:
        return Proportion.exact(successes, total, conf_level=conf_level)

    return ThresholdMetrics(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=exact(tp, tp + fn),
        specificity=exact(tn, tn + fp),
        ppv=exact(tp, tp + fp),
        npv=exact(tn, tn + fn),
        accuracy=exact(tp + tn, len(values)),
        f1=2 * tp / f1_denominator if f1_denominator else float("nan"),
        conf_level=conf_level,
    )


@dataclass(frozen=True)
class SensitivityMatch:
    """The operating point that matches a target sensitivity.

    Attributes
    ----------
    target : float
        The sensitivity asked for.
    threshold : float
        The highest threshold whose sensitivity is >= ``target``: a positive case's score.
    sensitivity, specificity : float
        Achieved at ``threshold`` (``score >= threshold`` is positive); the sensitivity can
        exceed the target when it falls between two attainable values or scores tie.
    """

    target: float
    threshold: float
    sensitivity: float
    specificity: float


# Targets are often a radiologist's k/m written as a rounded decimal; without this slack
# 0.7 of 10 positives would ask for 7.000000000000001 of them.
_TARGET_SLACK = 1e-9


def threshold_for_sensitivity(
    labels: ArrayLike, scores: ArrayLike, *, target: float
) -> SensitivityMatch:
    """The highest threshold at which the sensitivity reaches ``target``.

    Sensitivity only changes at positive cases' scores, so the threshold is the ``k``-th
    highest positive score with ``k`` the smallest count such that ``k / m >= target``
    (``m`` positives). The highest such threshold gives the best specificity among the
    thresholds that reach the target.

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative; at least one positive.
    scores : array [N]
        Finite scores, ``score >= threshold`` is positive.
    target : float
        Sensitivity to reach, in (0, 1].
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    is_pos = binary_labels(labels)
    values = finite_scores(scores, len(is_pos))
    positives = np.sort(values[is_pos])[::-1]
    negatives = values[~is_pos]
    m = len(positives)
    if m == 0:
        raise ValueError("no positive case: no threshold has a sensitivity")
    k = min(int(np.ceil(target * m - _TARGET_SLACK)), m)
    threshold = float(positives[max(k, 1) - 1])
    return SensitivityMatch(
        target=target,
        threshold=threshold,
        sensitivity=float((positives >= threshold).mean()),
        specificity=float((negatives < threshold).mean()) if len(negatives) else float("nan"),
    )
