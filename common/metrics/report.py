"""One evaluation of one or more scores of the same cases, overall and per subgroup.

The stages are those of the WAUVE paper's evaluation: fix each score's direction and
operating threshold on all cases, then report per score the AUC with its DeLong interval
and the operating-point metrics with exact intervals, and compare every pair of scores with
DeLong's paired test; subgroups reuse the directions and thresholds fixed on all cases, so
a subgroup is judged at the operating point the model would be used at.

``build_report`` runs the stages in order; ``comparison_rows`` lays one set of cases out as
the rows of the paper's Table 2.

A threshold is in the score's own units. For direction ``"<"`` a case is called positive
when ``score >= threshold``; for ``">"`` when ``score <= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.errors import UsageError
from common.metrics._checks import binary_labels
from common.metrics.roc import (
    AucCI,
    DelongTest,
    Direction,
    ResolvedDirection,
    auc_ci,
    delong_test,
    resolve_direction,
)
from common.metrics.threshold import (
    Proportion,
    ThresholdMetrics,
    threshold_for_sensitivity,
    threshold_metrics,
)

# The operating-point columns of the WAUVE paper's Table 2, in its order.
TABLE_MEASURES = ("sensitivity", "specificity", "accuracy", "ppv", "npv")


@dataclass(frozen=True)
class ScoreReport:
    """One score's AUC and, when a threshold was fixed, its operating point.

    ``at_threshold.threshold`` is in the score's units; ``auc.direction`` says which side of
    it is positive (see the module docstring).
    """

    name: str
    auc: AucCI
    at_threshold: ThresholdMetrics | None


@dataclass(frozen=True)
class Comparison:
    """DeLong's paired test of score ``a`` against score ``b`` (``auc_a - auc_b``)."""

    score_a: str
    score_b: str
    test: DelongTest


@dataclass(frozen=True)
class GroupReport:
    """Every score and every pair of scores on one set of cases.

    Attributes
    ----------
    group : str or None
        The subgroup's value; None for all cases.
    n_pos, n_neg : int
    scores : list[ScoreReport]
        In the order the scores were given.
    comparisons : list[Comparison]
        Every pair ``(a, b)`` with ``a`` before ``b`` in that order.
    """

    group: str | None
    n_pos: int
    n_neg: int
    scores: list[ScoreReport]
    comparisons: list[Comparison]


def resolve_directions(
    labels: ArrayLike, scores: Mapping[str, ArrayLike], direction: Direction
) -> dict[str, ResolvedDirection]:
    """Each score's direction on all cases (``"auto"`` resolved score by score)."""
    return {name: resolve_direction(labels, values, direction) for name, values in scores.items()}


def _oriented(values: ArrayLike, direction: ResolvedDirection) -> NDArray[np.float64]:
    """The score turned so that a higher value means positive."""
    array = np.asarray(values, dtype=float)
    return array if direction == "<" else -array


def operating_thresholds(
    labels: ArrayLike,
    scores: Mapping[str, ArrayLike],
    *,
    directions: Mapping[str, ResolvedDirection],
    threshold: float | None = None,
    match_sensitivity: float | None = None,
) -> dict[str, float]:
    """Each score's threshold: the one given, or the one matching a target sensitivity.

    Parameters
    ----------
    threshold : float, optional
        The same threshold for every score.
    match_sensitivity : float, optional
        Target sensitivity in (0, 1]; each score gets the most specific threshold that
        reaches it on these cases (``threshold_for_sensitivity``).

    Returns
    -------
    dict
        Score name to threshold; empty when neither option is given.
    """
    if threshold is not None and match_sensitivity is not None:
        raise ValueError("give a threshold or a sensitivity to match, not both")
    if threshold is not None:
        return dict.fromkeys(scores, float(threshold))
    if match_sensitivity is None:
        return {}
    thresholds = {}
    for name, values in scores.items():
        match = threshold_for_sensitivity(
            labels, _oriented(values, directions[name]), target=match_sensitivity
        )
        thresholds[name] = match.threshold if directions[name] == "<" else -match.threshold
    return thresholds


def evaluate_scores(
    labels: ArrayLike,
    scores: Mapping[str, ArrayLike],
    *,
    directions: Mapping[str, ResolvedDirection],
    thresholds: Mapping[str, float],
    conf_level: float = 0.95,
    group: str | None = None,
) -> GroupReport:
    """AUCs, operating points and pairwise DeLong tests of paired scores.

    Parameters
    ----------
    labels : array [N]
        1 = positive, 0 = negative.
    scores : mapping of name to array [N]
        Finite scores of the same N cases.
    directions : mapping of name to ``"<"`` / ``">"``
        From ``resolve_directions`` on all cases.
    thresholds : mapping of name to float
        From ``operating_thresholds``; a score without one gets no operating point.
    conf_level : float
        Level of every interval.
    group : str, optional
        Recorded in the report.
    """
    is_pos = binary_labels(labels)
    reports = []
    for name, values in scores.items():
        direction = directions[name]
        at_threshold = None
        if name in thresholds:
            sign = 1.0 if direction == "<" else -1.0
            oriented = threshold_metrics(
                is_pos,
                sign * np.asarray(values, dtype=float),
                threshold=sign * thresholds[name],
                conf_level=conf_level,
            )
            at_threshold = replace(oriented, threshold=float(thresholds[name]))
        reports.append(
            ScoreReport(
                name=name,
                auc=auc_ci(is_pos, values, direction=direction, conf_level=conf_level),
                at_threshold=at_threshold,
            )
        )
    comparisons = [
        Comparison(
            a,
            b,
            delong_test(
                is_pos,
                scores[a],
                scores[b],
                direction=(directions[a], directions[b]),
                conf_level=conf_level,
            ),
        )
        for a, b in combinations(scores, 2)
    ]
    return GroupReport(
        group=group,
        n_pos=int(is_pos.sum()),
        n_neg=int((~is_pos).sum()),
        scores=reports,
        comparisons=comparisons,
    )


def evaluate_by_group(
    labels: ArrayLike,
    scores: Mapping[str, ArrayLike],
    groups: Sequence[str],
    *,
    directions: Mapping[str, ResolvedDirection],
    thresholds: Mapping[str, float],
    conf_level: float = 0.95,
) -> list[GroupReport]:
    """``evaluate_scores`` on the cases of each value of ``groups`` [N], values sorted.

    Directions and thresholds are the ones fixed on all cases. A group without positives
    or without negatives gets NaN AUCs and tests, not an error.
    """
    is_pos = binary_labels(labels)
    group_of = np.asarray(groups, dtype=object)
    if group_of.shape != is_pos.shape:
        raise ValueError(f"groups have shape {group_of.shape}, labels have {is_pos.shape}")
    reports = []
    for value in sorted(set(group_of.tolist())):
        mask = group_of == value
        in_group = {name: np.asarray(values, dtype=float)[mask] for name, values in scores.items()}
        reports.append(
            evaluate_scores(
                is_pos[mask],
                in_group,
                directions=directions,
                thresholds=thresholds,
                conf_level=conf_level,
                group=str(value),
            )
        )
    return reports


@dataclass(frozen=True)
class Report:
    """The whole evaluation of paired scores: all cases, then each subgroup.

    Attributes
    ----------
    directions : dict of name to ``"<"`` / ``">"``
        Each score's direction, resolved on all cases.
    overall : GroupReport
    groups : list[GroupReport]
        One per subgroup value, sorted; empty without groups.
    """

    directions: dict[str, ResolvedDirection]
    overall: GroupReport
    groups: list[GroupReport]


def build_report(
    labels: ArrayLike,
    scores: Mapping[str, ArrayLike],
    groups: Sequence[str] | None = None,
    *,
    direction: Direction,
    threshold: float | None = None,
    match_sensitivity: float | None = None,
    conf_level: float = 0.95,
) -> Report:
    """The stages of the module docstring in order: directions and thresholds fixed on all
    cases, then ``evaluate_scores`` on all cases and ``evaluate_by_group`` per subgroup."""
    directions = resolve_directions(labels, scores, direction)
    thresholds = operating_thresholds(
        labels,
        scores,
        directions=directions,
        threshold=threshold,
        match_sensitivity=match_sensitivity,
    )
    overall = evaluate_scores(
        labels, scores, directions=directions, thresholds=thresholds, conf_level=conf_level
    )
    by_group = (
        evaluate_by_group(
            labels,
            scores,
            groups,
            directions=directions,
            thresholds=thresholds,
            conf_level=conf_level,
        )
        if groups is not None
        else []
    )
    return Report(directions=directions, overall=overall, groups=by_group)


def comparison_rows(report: GroupReport) -> list[dict[str, Any]]:
    """Table 2's rows for one set of cases: one per score, in the order given.

    Each row holds the AUC with its DeLong interval, the confusion table and the five
    proportions (with Clopper-Pearson intervals) at the score's operating threshold, and
    DeLong's test of its AUC against the first score's (``versus`` and ``delong_p`` are
    empty and NaN on the first row). The figures are those of ``evaluate_scores``; every
    score must have a threshold.
    """
    first = report.scores[0].name
    against_first = {c.score_b: c.test for c in report.comparisons if c.score_a == first}
    rows = []
    for score in report.scores:
        point = score.at_threshold
        if point is None:
            raise UsageError(f"score {score.name!r} has no operating threshold")
        row: dict[str, Any] = {
            "group": report.group,
            "score": score.name,
            "n_positive": report.n_pos,
            "n_negative": report.n_neg,
            "auc": score.auc.auc,
            "auc_ci_low": score.auc.ci_low,
            "auc_ci_high": score.auc.ci_high,
            "threshold": point.threshold,
            "positive_if": ">=" if score.auc.direction == "<" else "<=",
            "tp": point.tp,
            "fp": point.fp,
            "tn": point.tn,
            "fn": point.fn,
        }
        for measure in TABLE_MEASURES:
            proportion: Proportion = getattr(point, measure)
            row[measure] = proportion.estimate
            row[f"{measure}_ci_low"] = proportion.ci_low
            row[f"{measure}_ci_high"] = proportion.ci_high
        test = against_first.get(score.name)
        row["versus"] = first if test else ""
        row["delong_p"] = test.p_value if test else math.nan
        rows.append(row)
    return rows
