"""Stage 3, clip: cut each track into consecutive ``clip_len``-frame clips and crop them.

Windows and crops are those of training (``common.geometry``): back-to-back windows
from a track's first frame, a track's remainder dropped (as in the WAUVE paper); a track
shorter than ``clip_len`` but at least ``min_track_frames`` long gives one clip of its
frames resampled (the paper drops it: see ``PipelineConfig.min_track_frames``); and one
square crop per clip around the union of its boxes plus ``CLIP_MARGIN``, resized to
``clip_size`` by ``roi_align``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.geometry import Box, clip_region, consecutive_windows, crop_clip
from common.pipeline.track import Track


@dataclass(frozen=True)
class ClipPlan:
    """Where one clip comes from.

    Attributes
    ----------
    track_id : int
        The track it was cut from.
    frames : tuple of int
        ``clip_len`` frame indices: consecutive, or a short track's frames resampled
        (in order, some repeated; see ``plan_clips``).
    boxes : tuple of Box
        The track's box in each of those frames, x1y1x2y2 in video pixels.
    interpolated : tuple of bool
        Per frame: True where the box was interpolated across a missed detection.
    region : Box
        The square crop, x1y1x2y2 in video pixels (``clip_region(boxes)``); may reach
        outside the frame, where the crop is black.
    """

    track_id: int
    frames: tuple[int, ...]
    boxes: tuple[Box, ...]
    interpolated: tuple[bool, ...]
    region: Box


def fewest_clip_frames(*, clip_len: int, min_track_frames: int) -> int:
    """The shortest track, and so video, that ``plan_clips`` makes a clip of."""
    return min_track_frames if 0 < min_track_frames < clip_len else clip_len


def plan_clips(
    tracks: Sequence[Track], *, clip_len: int, min_track_frames: int = 0
) -> list[ClipPlan]:
    """The clips of every track, in track order then frame order.

    A track's gaps are filled with interpolated boxes first (``Track.filled_boxes``), so a
    track from ``first`` to ``last`` gives ``(last - first + 1) // clip_len`` clips. A
    track shorter than ``clip_len`` but at least ``min_track_frames`` long (0: no such
    track is kept, as in the WAUVE paper) gives one clip whose ``clip_len`` frames are the
    track's frames, evenly resampled (some repeated): a lesion the probe crossed quickly
    is still scored.
    """
    plans: list[ClipPlan] = []
    for track in tracks:
        filled = track.filled_boxes()
        windows = consecutive_windows(sorted(filled), clip_len)
        if not windows and 0 < min_track_frames <= len(filled):
            span = sorted(filled)
            picks = np.linspace(0, len(span) - 1, clip_len).round().astype(int)
            windows = [[span[i] for i in picks]]
        for window in windows:
            boxes = tuple(filled[f] for f in window)
            plans.append(
                ClipPlan(
                    track_id=track.track_id,
                    frames=tuple(window),
                    boxes=boxes,
                    interpolated=tuple(f not in track.boxes for f in window),
                    region=clip_region(boxes),
                )
            )
    return plans


def crop_clips(
    frames: np.ndarray, plans: Sequence[ClipPlan], *, clip_len: int, clip_size: int
) -> Tensor:
    """Crop the planned clips out of the video.

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]``.
    plans : sequence of ClipPlan
    clip_len, clip_size : int
        The preset's classifier clip length and crop side (``preset.classifier``).

    Returns
    -------
    Tensor
        FloatTensor[K, 3, clip_len, clip_size, clip_size] in [0, 1], K = ``len(plans)``
        (may be 0); grayscale broadcast to 3 channels, as the classifier was trained.
    """
    if not plans:
        return torch.zeros(0, 3, clip_len, clip_size, clip_size)
    crops = [crop_clip(frames, plan.frames, plan.boxes, clip_size) for plan in plans]
    return torch.stack(crops).expand(-1, 3, -1, -1, -1)
