"""Argument checks shared by the metrics modules; they raise ``ValueError`` (a caller's bug)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def binary_labels(labels: ArrayLike) -> NDArray[np.bool_]:
    """``labels`` [N] as booleans; accepts booleans or 0/1 numbers."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.dtype != np.bool_ and not np.isin(array, (0, 1)).all():
        raise ValueError("labels must be 0/1 or boolean")
    return array.astype(bool)


def finite_scores(scores: ArrayLike, n: int) -> NDArray[np.float64]:
    """``scores`` as float [n], all finite."""
    array = np.asarray(scores, dtype=float)
    if array.shape != (n,):
        raise ValueError(f"scores have shape {array.shape}, labels have ({n},)")
    if not np.isfinite(array).all():
        raise ValueError("scores must be finite (drop missing scores before calling)")
    return array


def check_conf_level(conf_level: float) -> None:
    if not 0 < conf_level < 1:
        raise ValueError(f"conf_level must be in (0, 1), got {conf_level}")
