"""Area under the ROC curve with DeLong's variance, confidence interval and paired test.

Conventions follow pROC (Robin et al., BMC Bioinformatics 2011), the reference the tests
check against:

- ``labels`` are 1 (or True) for a positive case, 0 (or False) for a negative one;
- ``direction="<"``: negatives score lower, a higher score means positive;
  ``direction=">"``: negatives score higher; ``direction="auto"`` picks ``"<"`` when the
  median score of the negatives is <= that of the positives, else ``">"`` (pROC's
  default, ``roc(direction="auto")``). ``"auto"`` mostly turns a score that ranks the
  wrong way round into one above the diagonal, hiding the fault; pass ``"<"`` for a risk
  score.
- ties between a positive and a negative count one half (the Mann-Whitney statistic);
- ``roc_curve``: one point per distinct score, as pROC's ``coords``; the trapezoidal area
  under it is the AUC with that tie rule.

The DeLong variance is computed with the midrank algorithm of Sun & Xu (IEEE Signal
Processing Letters 21(11), 2014), in O(n log n), equal to DeLong, DeLong & Clarke-Pearson
(Biometrics 1988) placement by placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm, rankdata

from common.metrics._checks import binary_labels, check_conf_level, finite_scores

Direction = Literal["<", ">", "auto"]
ResolvedDirection = Literal["<", ">"]


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """AUC of ``scores`` for binary ``labels`` (1 = positive), ties counted as one half.

    A higher score means positive (``direction="<"``). Returns NaN when one class is absent
    (the AUC is undefined, not 0.5).
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=float)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_from_counts(
    pos_counts: ArrayLike, neg_counts: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Sensitivity and specificity at every cut of ordered score classes.

    The shared core of ``roc_curve`` (one class per distinct score) and
    ``common.metrics.pooled.pooled_roc_from_histograms`` (one class per bin).

    Parameters
    ----------
    pos_counts, neg_counts : int arrays [B]
        Positives and negatives in each of B classes, ordered from the least to the most
        suspicious.

    Returns
    -------
    sensitivity, specificity : float arrays [B + 1]
        Entry ``b`` calls the cases of classes ``b`` and above positive: from (1, 0) at
        ``b = 0`` to (0, 1) at ``b = B``. NaN where a class is absent.
    """
    pos = np.asarray(pos_counts, dtype=np.int64)
    neg = np.asarray(neg_counts, dtype=np.int64)
    true_pos = np.concatenate([np.cumsum(pos[::-1])[::-1], [0]])  # classes >= b
    true_neg = np.concatenate([[0], np.cumsum(neg)])  # classes < b
    with np.errstate(invalid="ignore", divide="ignore"):  # a class absent: NaN, as the AUC
        return true_pos / int(pos.sum()), true_neg / int(neg.sum())


@dataclass(frozen=True)
class RocCurve:
    """The empirical ROC curve of one score, one point per distinct score value.

    Attributes
    ----------
    thresholds : float array [P]
        Direction ``"<"``: the distinct scores in increasing order, then ``inf``; a case is
        called positive when ``score >= threshold``. Direction ``">"``: the distinct
        scores in decreasing order, then ``-inf``; positive when ``score <= threshold``.
        The points are pROC's ``coords``, whose thresholds are midpoints between the same
        distinct scores.
    sensitivity, specificity : float arrays [P]
        At each threshold: from (1, 0) (every case positive) to (0, 1) (none); NaN when a
        class is absent.
    direction : ``"<"`` or ``">"``
    """

    thresholds: NDArray[np.float64]
    sensitivity: NDArray[np.float64]
    specificity: NDArray[np.float64]
    direction: ResolvedDirection

    @property
    def false_positive_rate(self) -> NDArray[np.float64]:
        """``1 - specificity``, the x axis of a ROC plot."""
        return 1.0 - self.specificity

    def area(self) -> float:
        """Trapezoidal area under the curve: the AUC with ties counted one half."""
        fpr, tpr = self.false_positive_rate, self.sensitivity
        return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))


def roc_curve(labels: ArrayLike, scores: ArrayLike, *, direction: Direction) -> RocCurve:
    """The ROC curve of ``scores``: sensitivity and specificity at every distinct score.

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative.
    scores : array [N]
        Finite scores.
    direction : ``"<"``, ``">"`` or ``"auto"``
        As for ``auc_ci``; ``"auto"`` compares the medians as pROC does.
    """
    is_pos = binary_labels(labels)
    values = finite_scores(scores, len(is_pos))
    resolved = resolve_direction(is_pos, values, direction)
    # Direction ">" is direction "<" on the negated score (what pROC does).
    oriented = values if resolved == "<" else -values
    distinct, index = np.unique(oriented, return_inverse=True)
    sensitivity, specificity = roc_from_counts(
        np.bincount(index[is_pos], minlength=len(distinct)),
        np.bincount(index[~is_pos], minlength=len(distinct)),
    )
    thresholds = np.append(distinct, np.inf)
    return RocCurve(
        thresholds=thresholds if resolved == "<" else -thresholds,
        sensitivity=sensitivity,
        specificity=specificity,
        direction=resolved,
    )


def resolve_direction(
    labels: ArrayLike, scores: ArrayLike, direction: Direction
) -> ResolvedDirection:
    """``"<"`` or ``">"``; ``"auto"`` compares the medians as pROC does.

    ``"auto"`` with one class absent resolves to ``"<"``.
    """
    if direction != "auto":
        if direction not in ("<", ">"):
            raise ValueError(f"direction must be '<', '>' or 'auto', got {direction!r}")
        return direction
    is_pos = binary_labels(labels)
    values = finite_scores(scores, len(is_pos))
    if is_pos.all() or not is_pos.any():
        return "<"
    return "<" if np.median(values[~is_pos]) <= np.median(values[is_pos]) else ">"


def _placements(
    is_pos: NDArray[np.bool_], oriented: NDArray[np.float64]
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """AUC and DeLong's placement values (Sun & Xu's midrank form) of one score.

    Returns ``(auc, v_pos [m], v_neg [n])``: ``v_pos[i]`` is the fraction of negatives
    below positive ``i`` (ties one half), ``v_neg[j]`` the fraction of positives above
    negative ``j``; both average to the AUC.
    """
    pos, neg = oriented[is_pos], oriented[~is_pos]
    m, n = len(pos), len(neg)
    ranks_all = rankdata(np.concatenate([pos, neg]))
    v_pos = (ranks_all[:m] - rankdata(pos)) / n
    v_neg = 1.0 - (ranks_all[m:] - rankdata(neg)) / m
    auc = float((ranks_all[:m].sum() - m * (m + 1) / 2) / (m * n))
    return auc, v_pos, v_neg


def delong_covariance(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    directions: list[ResolvedDirection],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """AUCs of K scores of the same cases and DeLong's covariance matrix of those AUCs.

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative.
    scores : array [K, N]
        K scores of the same N cases (paired), finite.
    directions : list of K ``"<"`` / ``">"``
        Direction of each score (resolve ``"auto"`` first with ``resolve_direction``).

    Returns
    -------
    aucs : array [K]
    covariance : array [K, K]
        Symmetric, positive semi-definite: ``S10 / m + S01 / n`` with ``S10``, ``S01`` the
        sample covariances (ddof 1) of the placements of the ``m`` positives and ``n``
        negatives, as pROC's ``var()`` and ``cov()``. NaN when a class has fewer than
        two cases; the AUCs are NaN when a class is absent.
    """
    is_pos = binary_labels(labels)
    matrix = np.atleast_2d(np.asarray(scores, dtype=float))
    if len(directions) != len(matrix):
        raise ValueError(f"{len(matrix)} scores but {len(directions)} directions")
    k = len(matrix)
    m, n = int(is_pos.sum()), int((~is_pos).sum())
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    aucs = np.empty(k)
    v_pos = np.empty((k, m))
    v_neg = np.empty((k, n))
    for row, (values, direction) in enumerate(zip(matrix, directions, strict=True)):
        values = finite_scores(values, len(is_pos))
        # Direction ">" is direction "<" on the negated score (what pROC does).
        oriented = values if direction == "<" else -values
        aucs[row], v_pos[row], v_neg[row] = _placements(is_pos, oriented)
    if m < 2 or n < 2:
        return aucs, np.full((k, k), np.nan)
    covariance = np.cov(v_pos, ddof=1).reshape(k, k) / m + np.cov(v_neg, ddof=1).reshape(k, k) / n
    return aucs, covariance


@dataclass(frozen=True)
class AucCI:
    """AUC with DeLong's variance and confidence interval.

    Attributes
    ----------
    auc : float
        Area under the ROC curve, in [0, 1]; NaN when a class is absent.
    ci_low, ci_high : float
        ``auc -/+ z * sqrt(variance)`` with ``z`` the normal quantile of ``conf_level``,
        clipped to [0, 1] as pROC's ``ci.auc(method="delong")``.
    variance : float
        DeLong's variance of the AUC; NaN when a class has fewer than two cases.
    direction : ``"<"`` or ``">"``
        The direction used (resolved when ``"auto"`` was asked).
    n_pos, n_neg : int
    conf_level : float
    """

    auc: float
    ci_low: float
    ci_high: float
    variance: float
    direction: ResolvedDirection
    n_pos: int
    n_neg: int
    conf_level: float


def auc_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    direction: Direction,
    conf_level: float = 0.95,
) -> AucCI:
    """AUC and its DeLong confidence interval (pROC ``ci.auc(method="delong")``).

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative.
    scores : array [N]
        Finite scores.
    direction : ``"<"``, ``">"`` or ``"auto"``
        See the module docstring; ``"auto"`` reproduces pROC's default.
    conf_level : float
        Two-sided confidence level, in (0, 1).
    """
    check_conf_level(conf_level)
    is_pos = binary_labels(labels)
    resolved = resolve_direction(is_pos, scores, direction)
    aucs, covariance = delong_covariance(
        is_pos, np.asarray(scores, dtype=float)[np.newaxis], directions=[resolved]
    )
    auc, variance = float(aucs[0]), float(covariance[0, 0])
    half_width = norm.ppf(0.5 + conf_level / 2) * np.sqrt(variance)
    return AucCI(
        auc=auc,
        ci_low=float(np.clip(auc - half_width, 0.0, 1.0)),
        ci_high=float(np.clip(auc + half_width, 0.0, 1.0)),
        variance=variance,
        direction=resolved,
        n_pos=int(is_pos.sum()),
        n_neg=int((~is_pos).sum()),
        conf_level=conf_level,
    )


@dataclass(frozen=True)
class DelongTest:
    """DeLong's test for two correlated ROC curves (same cases, two scores).

    Attributes
    ----------
    auc_a, auc_b : float
        The two AUCs.
    difference : float
        ``auc_a - auc_b``.
    ci_low, ci_high : float
        Confidence interval of the difference, ``difference -/+ z * sd``.
    z : float
        ``difference / sd`` with ``sd`` DeLong's standard deviation of the difference;
        0 when the curves are identical (``sd`` = 0 and equal AUCs).
    p_value : float
        Two-sided, ``2 * Phi(-|z|)``.
    directions : tuple of ``"<"`` / ``">"``
        The directions used for score a and score b.
    conf_level : float
    """

    auc_a: float
    auc_b: float
    difference: float
    ci_low: float
    ci_high: float
    z: float
    p_value: float
    directions: tuple[ResolvedDirection, ResolvedDirection]
    conf_level: float


def delong_test(
    labels: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    *,
    direction: Direction | tuple[Direction, Direction],
    conf_level: float = 0.95,
) -> DelongTest:
    """Compare two paired AUCs: pROC ``roc.test(method="delong", paired=TRUE)``.

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative.
    scores_a, scores_b : array [N]
        Two scores of the same N cases.
    direction : ``"<"``, ``">"`` or ``"auto"``, or a pair of them
        One value applies to both scores (with ``"auto"`` each score gets its own
        direction, as two pROC ``roc()`` curves built with the default would); a pair
        gives score a and score b their own.
    conf_level : float
        Level of the interval of the difference.
    """
    check_conf_level(conf_level)
    is_pos = binary_labels(labels)
    direction_a, direction_b = direction if isinstance(direction, tuple) else (direction,) * 2
    directions = (
        resolve_direction(is_pos, scores_a, direction_a),
        resolve_direction(is_pos, scores_b, direction_b),
    )
    aucs, covariance = delong_covariance(
        is_pos,
        np.stack([np.asarray(scores_a, float), np.asarray(scores_b, float)]),
        directions=list(directions),
    )
    difference = float(aucs[0] - aucs[1])
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    # Rounding can leave a tiny negative variance for (nearly) identical curves.
    sd = float(np.sqrt(max(variance, 0.0))) if np.isfinite(variance) else float("nan")
    if sd > 0:
        z = difference / sd
    elif sd == 0:
        # Identical curves: pROC reports Z = 0, p = 1; otherwise the difference is certain.
        z = float(np.copysign(np.inf, difference)) if difference else 0.0
    else:
        z = float("nan")
    half_width = norm.ppf(0.5 + conf_level / 2) * sd
    return DelongTest(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        difference=difference,
        ci_low=float(difference - half_width),
        ci_high=float(difference + half_width),
        z=float(z),
        p_value=float(2 * norm.sf(abs(z))),
        directions=directions,
        conf_level=conf_level,
    )
