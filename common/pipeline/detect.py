"""Stage 1, detect: the Faster R-CNN lesion detector on every frame of a video."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from common.geometry import boxes_to_video, detector_samples


@dataclass(frozen=True)
class FrameDetections:
    """The lesions found in one frame.

    Attributes
    ----------
    boxes : np.ndarray
        ``float32 [N, 4]``, x1y1x2y2 in pixels of the video frame (not of the detector's
        resized input), clipped to the frame; N may be 0.
    scores : np.ndarray
        ``float32 [N]``, lesion confidence in [0, 1], in decreasing order.
    """

    boxes: np.ndarray
    scores: np.ndarray


@torch.no_grad()
def detect_lesions(
    frames: np.ndarray,
    detector: FasterRCNN,
    *,
    image_size: int,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    batch_size: int,
) -> list[FrameDetections]:
    """Run the detector on every frame, ``batch_size`` frames per forward pass.

    Frames are resized to ``image_size`` x ``image_size`` by the same function that makes
    the detector's training images (``common.geometry.detector_samples``), so the
    detector sees at inference the pixels it was trained on; boxes are mapped back to
    video pixels.

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]`` grayscale frames.
    detector : FasterRCNN
        Put in eval mode; runs on the device its parameters are on.
    image_size : int
        The preset's detector input side, ``preset.detector.image_size``.
    score_threshold : float
        Keep detections scoring above this, in [0, 1).
    nms_iou : float
        IoU above which the lower-scoring of two boxes is suppressed, in (0, 1].
    max_detections : int
        Keep at most this many boxes per frame, the highest-scoring.
    batch_size : int
        Frames per forward pass.

    Returns
    -------
    list of FrameDetections
        One per frame, in frame order.
    """
    detector.eval()
    device = next(detector.parameters()).device
    n_frames, height, width = frames.shape
    found: list[FrameDetections] = []
    with _box_thresholds(
        detector.roi_heads, score=score_threshold, nms=nms_iou, keep=max_detections
    ):
        for start in range(0, n_frames, batch_size):
            picked = list(range(start, min(start + batch_size, n_frames)))
            images, _ = detector_samples(frames, picked, {}, image_size, where="inference")
            for output in detector([image.to(device) for image in images]):
                boxes = output["boxes"].float().cpu().numpy()
                found.append(
                    FrameDetections(
                        boxes=boxes_to_video(
                            boxes, image_size=image_size, height=height, width=width
                        ),
                        scores=output["scores"].float().cpu().numpy(),
                    )
                )
    return found


@contextmanager
def _box_thresholds(heads: RoIHeads, *, score: float, nms: float, keep: int) -> Iterator[None]:
    """Use these thresholds in the box head's post-processing, then restore its own.

    The box head already thresholds, runs NMS per class and keeps the best boxes; with one
    lesion class that is plain NMS, so setting its thresholds does the job in one pass.
    """
    saved = heads.score_thresh, heads.nms_thresh, heads.detections_per_img
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = score, nms, keep
    try:
        yield
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved
