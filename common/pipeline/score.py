"""Stage 5, score: the video's cancer-risk score and its BI-RADS-aligned category."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import UsageError

CATEGORIES = ("3", "4A", "4B", "4C", "5")


@dataclass(frozen=True, kw_only=True)
class BiradsThresholds:
    """Probability-of-malignancy bounds of the BI-RADS assessment categories.

    Defaults are the likelihoods of malignancy of the ACR BI-RADS Atlas (5th edition):
    category 3 at most 2%, 4A above 2% up to 10%, 4B above 10% up to 50%, 4C above 50% and
    below 95%, 5 at least 95%. The synthetic generator (``deploy.synth``) categorises its
    lesions with these defaults, so a synthetic lesion's category and a predicted one are
    comparable.

    Attributes
    ----------
    category_3_max, category_4a_max, category_4b_max : float
        Inclusive upper bounds of categories 3, 4A and 4B.
    category_5_min : float
        Inclusive lower bound of category 5 (so the exclusive upper bound of 4C).
    """

    category_3_max: float = 0.02
    category_4a_max: float = 0.10
    category_4b_max: float = 0.50
    category_5_min: float = 0.95

    def __post_init__(self) -> None:
        bounds = (self.category_3_max, self.category_4a_max, self.category_4b_max)
        if not 0 < bounds[0] < bounds[1] < bounds[2] < self.category_5_min < 1:
            raise UsageError(
                "BI-RADS thresholds must increase strictly inside (0, 1): "
                f"3 <= {bounds[0]}, 4A <= {bounds[1]}, 4B <= {bounds[2]}, "
                f"5 >= {self.category_5_min}"
            )


def categorise(score: float, *, thresholds: BiradsThresholds = BiradsThresholds()) -> str:
    """BI-RADS-aligned category ("3", "4A", "4B", "4C" or "5") of a risk score in [0, 1]."""
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"a risk score is a probability in [0, 1], got {score}")
    if score <= thresholds.category_3_max:
        return "3"
    if score <= thresholds.category_4a_max:
        return "4A"
    if score <= thresholds.category_4b_max:
        return "4B"
    return "4C" if score < thresholds.category_5_min else "5"


@dataclass(frozen=True)
class VideoScore:
    """A video's verdict.

    Attributes
    ----------
    score : float or None
        Cancer-risk score in [0, 1]: the mean malignancy probability of the video's clips.
        None when no clip could be made (never 0: "nothing seen" is not "benign").
    category : str or None
        BI-RADS-aligned category of ``score``; None with it.
    no_lesion_tracked : bool
        True exactly when ``score`` is None.
    """

    score: float | None
    category: str | None
    no_lesion_tracked: bool


def score_video(
    probabilities: Sequence[float] | np.ndarray,
    *,
    thresholds: BiradsThresholds = BiradsThresholds(),
) -> VideoScore:
    """Risk score = mean of the clip probabilities (WAUVE), and its category.

    Parameters
    ----------
    probabilities : sequence of float
        P(malignant) of each clip of the video, in [0, 1]; may be empty.
    thresholds : BiradsThresholds
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size == 0:
        return VideoScore(score=None, category=None, no_lesion_tracked=True)
    score = float(p.mean())
    return VideoScore(
        score=score, category=categorise(score, thresholds=thresholds), no_lesion_tracked=False
    )
