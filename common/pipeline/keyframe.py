"""The comparator's reading of one video: P(malignant) of each annotated (ROI) frame.

The key-frame model reads lesion ROIs as annotated (there is no detector in its bundle),
so every probability comes from a ground-truth box, or from a whole still image that was
archived without one (``common.geometry.roi_frames``). ``common.data.keyframes.mode_scores``
turns them into the paper's three readings (one key frame, two orthogonal key frames, all
ROI frames).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.geometry import Box, crop_frames, roi_frames
from common.models.keyframe import KeyFrameResNet
from common.pipeline.classify import classify_clips


def roi_probabilities(
    frames: np.ndarray,
    boxes: Mapping[int, Box],
    model: KeyFrameResNet,
    *,
    image_size: int,
    batch_size: int,
) -> dict[int, float]:
    """``{frame: P(malignant)}`` for every ROI frame of one video (``roi_frames``).

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]`` (``read_video``).
    boxes : mapping of int to Box
        ``{frame: (x1, y1, x2, y2)}`` in video pixels; boxes past the last frame are ignored.
        Empty for a still image read whole.
    model : KeyFrameResNet
        Put in eval mode; runs on the device its parameters are on.
    image_size : int
        Side of the crops (the preset's ``keyframe.image_size``).
    batch_size : int
        Crops cut and classified at a time (bounds memory on long videos).
    """
    picked = roi_frames(boxes, len(frames))
    probabilities: dict[int, float] = {}
    for start in range(0, len(picked), batch_size):
        chunk = picked[start : start + batch_size]
        crops = crop_frames(frames, chunk, boxes, image_size)
        output = classify_clips(model, crops, batch_size=batch_size, keep_features=False)
        probabilities.update(zip(chunk, output.probabilities.tolist(), strict=True))
    return probabilities
