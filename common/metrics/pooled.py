"""Pooled ROC and AUC across sites from per-site score histograms.

For federated evaluation no individual score leaves a site: each site sends, per bin of a
fixed grid on [0, 1] shared by all sites, how many positives and how many negatives scored
in that bin. Only the sums over sites enter the pooled curve, so the histograms can also
travel through secure aggregation.

The pooled AUC counts a positive above a negative as 1, below as 0, and a pair in the same
bin as one half (the bin is all that is known). It differs from the exact AUC of the pooled
scores only through pairs that share a bin: ``|exact - binned| <= 0.5 * sum_b pos_b neg_b /
(P N)``, which shrinks with the bin width; it is exact when every bin holds a single
distinct score value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.metrics._checks import binary_labels, finite_scores
from common.metrics.roc import roc_from_counts

Histogram = tuple[NDArray[np.int64], NDArray[np.int64]]


def bin_edges(bins: int) -> NDArray[np.float64]:
    """The ``bins + 1`` shared edges ``0, 1/bins, ..., 1``."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return np.linspace(0.0, 1.0, bins + 1)


def histogram_counts(labels: ArrayLike, scores: ArrayLike, bins: int) -> Histogram:
    """One site's counts of positives and negatives per bin of the shared grid.

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative.
    scores : array [N]
        Probabilities in [0, 1]. Bin ``b`` holds ``b / bins <= score < (b + 1) / bins``;
        the last bin also holds 1.
    bins : int
        Number of equal bins on [0, 1]; every site must use the same.

    Returns
    -------
    pos_counts, neg_counts : int64 arrays [bins]
    """
    bin_edges(bins)
    is_pos = binary_labels(labels)
    values = finite_scores(scores, len(is_pos))
    if ((values < 0) | (values > 1)).any():
        raise ValueError("scores must lie in [0, 1] to be binned on the shared grid")
    index = np.minimum((values * bins).astype(np.int64), bins - 1)
    return (
        np.bincount(index[is_pos], minlength=bins).astype(np.int64),
        np.bincount(index[~is_pos], minlength=bins).astype(np.int64),
    )


def _summed(histograms: Sequence[tuple[ArrayLike, ArrayLike]]) -> Histogram:
    """The sites' counts added bin by bin, after checking that every site used one grid."""
    if not histograms:
        raise ValueError("no histogram to pool")
    pairs = [(np.asarray(pos), np.asarray(neg)) for pos, neg in histograms]
    shape = pairs[0][0].shape
    for site, (pos, neg) in enumerate(pairs):
        if pos.ndim != 1 or pos.shape != shape or neg.shape != shape:
            raise ValueError(
                f"site {site}: counts of shapes {pos.shape} and {neg.shape}, site 0 has {shape}"
            )
        if (pos < 0).any() or (neg < 0).any() or (pos % 1).any() or (neg % 1).any():
            raise ValueError(f"site {site}: counts must be whole numbers >= 0")
    pos_total = np.stack([pos for pos, _ in pairs]).astype(np.int64).sum(axis=0)
    neg_total = np.stack([neg for _, neg in pairs]).astype(np.int64).sum(axis=0)
    return pos_total, neg_total


def pooled_auc_from_histograms(histograms: Sequence[tuple[ArrayLike, ArrayLike]]) -> float:
    """AUC of all sites' scores pooled, from their histograms (ties in a bin count 1/2).

    Parameters
    ----------
    histograms : sequence of ``(pos_counts [B], neg_counts [B])``
        One pair per site, from ``histogram_counts`` with the same ``bins``.

    Returns
    -------
    float
        NaN when no site has a positive or none has a negative.
    """
    pos, neg = _summed(histograms)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    wins = float((pos * neg_below).sum()) + 0.5 * float((pos * neg).sum())
    return wins / (n_pos * n_neg)


def pooled_roc_from_histograms(
    histograms: Sequence[tuple[ArrayLike, ArrayLike]],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """The pooled ROC curve at the bin edges.

    Returns
    -------
    thresholds : array [B + 1]
        ``0, 1/B, ..., (B-1)/B, inf``: at threshold ``b / B`` the cases in bins ``b`` and
        above are called positive.
    sensitivity, specificity : arrays [B + 1]
        From (1, 0) at threshold 0 to (0, 1) at ``inf``. The trapezoidal area under
        ``(1 - specificity, sensitivity)`` equals ``pooled_auc_from_histograms``. The bins
        are the ordered classes of ``common.metrics.roc.roc_from_counts``, as distinct
        scores are for ``roc_curve``.
    """
    pos, neg = _summed(histograms)
    thresholds = np.concatenate([bin_edges(len(pos))[:-1], [np.inf]])
    sensitivity, specificity = roc_from_counts(pos, neg)
    return thresholds, sensitivity, specificity
