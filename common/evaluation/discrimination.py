"""Video-level discrimination, the blocks of ``busfed evaluate``'s metrics.json.

A block holds the AUC with DeLong's 95% CI and the confusion table at the biopsy threshold
(BI-RADS 4A or above); a figure that is undefined (one class only, no video) is None, so the
block is valid JSON. Videos the model could not score (no tracked lesion, no annotated ROI)
are excluded from ``video_level`` and counted; ``with_fallback`` scores them
``FALLBACK_SCORE`` (0.0: nothing suspicious was found, the reading a negative detector
gives) over every scored video, so that a model that misses lesions is not flattered by
their exclusion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.metrics import auc_ci, threshold_metrics
from common.pipeline.score import BiradsThresholds

FALLBACK_SCORE = 0.0
OPERATING_POINT = "BI-RADS 4A or above (biopsy recommended): score > the category 3 bound"


def biopsy_threshold(birads: BiradsThresholds) -> float:
    """The lowest score called positive: BI-RADS 4A or above, i.e. above category 3."""
    return float(np.nextafter(birads.category_3_max, 1.0))


def malignant(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """bool [N]: True where a scores-file record's ``label`` is malignant."""
    return np.array([r["label"] == "malignant" for r in records], dtype=bool)


def discrimination(labels: np.ndarray, scores: np.ndarray, *, threshold: float) -> dict[str, Any]:
    """AUC with DeLong 95% CI, and the confusion table at ``threshold``; None where undefined."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    block: dict[str, Any] = {
        "n": len(labels), "n_malignant": n_pos, "n_benign": n_neg, "auc": None,
        "auc_ci95": None, "operating_point": OPERATING_POINT, "threshold": threshold,
        "sensitivity": None, "specificity": None,
    }  # fmt: skip
    if n_pos and n_neg:
        ci = auc_ci(labels, scores, direction="<")
        block["auc"] = ci.auc
        if math.isfinite(ci.variance):
            block["auc_ci95"] = [ci.ci_low, ci.ci_high]
    if len(labels):
        at = threshold_metrics(labels, scores, threshold=threshold)
        for name in ("sensitivity", "specificity"):
            value = getattr(at, name).estimate
            block[name] = value if math.isfinite(value) else None
    return block


def with_and_without_fallback(
    records: Sequence[dict[str, Any]], *, column: str, unscored: str, threshold: float
) -> dict[str, Any]:
    """``video_level`` over the records whose ``unscored`` flag is false, ``with_fallback``
    over all of them with ``FALLBACK_SCORE`` for the others; scores from ``column``."""
    scored = [r for r in records if not r[unscored]]
    scores = np.array([r[column] for r in scored], dtype=float)
    fallback = np.array([FALLBACK_SCORE if r[unscored] else r[column] for r in records], float)
    return {
        "video_level": discrimination(malignant(scored), scores, threshold=threshold),
        "with_fallback": {
            "fallback_score": FALLBACK_SCORE,
            **discrimination(malignant(records), fallback, threshold=threshold),
        },
    }
