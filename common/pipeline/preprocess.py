"""Optional stage 0, preprocess: speckle reduction and contrast normalisation of B-mode frames.

Off by default (``PipelineConfig.preprocess is None``): a model must see at inference what it
saw in training, and the sites' training does not preprocess. ``build_units(preprocess=...)``
cuts training units from preprocessed videos, so a model trained that way is run with the
same ``PreprocessConfig`` here; ``benchmarks/preprocess_auc.py`` measures the effect on AUC.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from common.pipeline.config import PreprocessConfig


def preprocess_frames(frames: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Speckle-reduce and contrast-normalise a video.

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]`` B-mode frames, as ``read_video`` returns them.
    config : PreprocessConfig

    Returns
    -------
    np.ndarray
        ``uint8 [T, H, W]``, same shape: the rest of the pipeline is unchanged by it.
    """
    out = frames.astype(np.float32)
    if config.speckle_filter == "lee":
        out = lee_filter(out, window=config.window)
    elif config.speckle_filter == "median":
        out = ndimage.median_filter(out, size=(1, config.window, config.window))
    if config.contrast:
        low, high = np.percentile(out, [config.low_percentile, config.high_percentile])
        if high > low:
            out = (out - low) * (255.0 / (high - low))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def lee_filter(frames: np.ndarray, *, window: int) -> np.ndarray:
    """Lee's filter on each frame: ``mean + k (x - mean)``, ``k = max(var - noise, 0) / var``.

    After log compression, B-mode speckle is close to additive noise, so the additive form
    of Lee's filter applies. ``mean`` and ``var`` are the local moments in a
    ``window`` x ``window`` square; the noise variance of a frame is estimated as the
    median of its local variances (speckle covers most of the image, edges few pixels).
    Flat regions are smoothed towards their mean, edges (high local variance) are kept.

    Parameters
    ----------
    frames : np.ndarray
        ``float32 [T, H, W]``.
    window : int
        Odd side of the square window in pixels.

    Returns
    -------
    np.ndarray
        ``float32 [T, H, W]``.
    """
    size = (1, window, window)
    mean = ndimage.uniform_filter(frames, size=size)
    var = np.maximum(ndimage.uniform_filter(frames * frames, size=size) - mean * mean, 0.0)
    noise = np.median(var, axis=(1, 2), keepdims=True)
    gain = np.maximum(var - noise, 0.0) / np.maximum(var, 1e-6)
    return (mean + gain * (frames - mean)).astype(np.float32)
