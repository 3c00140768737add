"""The whole pipeline, stage by stage: preprocess? -> detect -> track -> clip -> classify ->
score -> explain?
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torchvision.models.detection import FasterRCNN

from common.errors import UsageError
from common.geometry import Box, ClipWindows
from common.models.bundle import WauveBundle
from common.pipeline.classify import classify_clips
from common.pipeline.clip import ClipPlan, crop_clips, plan_clips
from common.pipeline.config import PipelineConfig
from common.pipeline.detect import detect_lesions
from common.pipeline.explain import clip_cams
from common.pipeline.preprocess import preprocess_frames
from common.pipeline.score import score_video
from common.pipeline.track import Track, gt_tracks, link_tracks


@dataclass(frozen=True)
class ClipResult:
    """One classified clip.

    Attributes
    ----------
    plan : ClipPlan
        Its frames, boxes and crop region (x1y1x2y2 in video pixels).
    probability : float
        P(malignant) in [0, 1].
    cam : np.ndarray or None
        ``float32 [T, s, s]`` class activation map over the crop (``clip_cams``; in
        [-1, 1] signed or [0, 1] relu), when ``PipelineConfig.cams``.
    """

    plan: ClipPlan
    probability: float
    cam: np.ndarray | None = None

    @property
    def first_frame(self) -> int:
        return self.plan.frames[0]

    @property
    def last_frame(self) -> int:
        """Inclusive."""
        return self.plan.frames[-1]


@dataclass(frozen=True)
class VideoResult:
    """What the pipeline says about one video.

    Attributes
    ----------
    score : float or None
        Cancer-risk score in [0, 1], the mean of the clip probabilities; None when
        ``no_lesion_tracked``.
    category : str or None
        BI-RADS-aligned category ("3", "4A", "4B", "4C", "5") of the score.
    no_lesion_tracked : bool
        No track gave a clip (no detection, or no track ``clip_len`` frames long): there is
        nothing to score, which is not a benign verdict.
    tracks : list of Track
        Every track, including those too short for a clip.
    clips : list of ClipResult
        In track order, then frame order.
    n_frames : int
    frame_shape : tuple of int
        (H, W) of the video.
    config : PipelineConfig
    """

    score: float | None
    category: str | None
    no_lesion_tracked: bool
    tracks: list[Track]
    clips: list[ClipResult]
    n_frames: int
    frame_shape: tuple[int, int]
    config: PipelineConfig


def run_pipeline(
    video_frames: np.ndarray,
    bundle: WauveBundle,
    config: PipelineConfig,
    *,
    gt_boxes: Mapping[int, Box] | None = None,
) -> VideoResult:
    """Score one video with the WAUVE pipeline.

    Parameters
    ----------
    video_frames : np.ndarray
        ``uint8 [T, H, W]`` grayscale frames (``read_video``).
    bundle : WauveBundle
        Detector and classifier; each runs on the device its parameters are on, and both
        are put in eval mode.
    config : PipelineConfig
    gt_boxes : mapping of int to Box, optional
        ``{frame: (x1, y1, x2, y2)}`` in video pixels; required, and only used, when
        ``config.boxes_source == "gt"``.

    Returns
    -------
    VideoResult

    Raises
    ------
    UsageError
        Frames not ``uint8 [T, H, W]``, or ground-truth mode without ``gt_boxes``.
    """
    frames = np.asarray(video_frames)
    if frames.dtype != np.uint8 or frames.ndim != 3 or len(frames) == 0:
        raise UsageError(f"video frames must be uint8 [T, H, W], got {frames.dtype} {frames.shape}")
    if config.preprocess is not None:
        frames = preprocess_frames(frames, config.preprocess)
    preset = bundle.preset.classifier

    if config.boxes_source == "gt":
        if gt_boxes is None:
            raise UsageError("boxes_source 'gt' needs the video's ground-truth boxes")
        tracks = gt_tracks(gt_boxes, n_frames=len(frames))
    else:
        detections = detect_lesions(
            frames,
            bundle.detector,
            image_size=bundle.preset.detector.image_size,
            score_threshold=config.score_threshold,
            nms_iou=config.nms_iou,
            max_detections=config.max_detections,
            batch_size=config.detector_batch_size,
        )
        tracks = link_tracks(detections, link_iou=config.link_iou, max_gap=config.max_gap)

    plans = plan_clips(tracks, clip_len=preset.clip_len, min_track_frames=config.min_track_frames)
    clips = crop_clips(frames, plans, clip_len=preset.clip_len, clip_size=preset.clip_size)
    output = classify_clips(
        bundle.classifier,
        clips,
        batch_size=config.classifier_batch_size,
        keep_features=config.cams,
    )
    cams: list[np.ndarray | None] = [None] * len(plans)
    if output.features is not None:
        maps = clip_cams(
            output.features,
            bundle.classifier.fc,
            clip_len=preset.clip_len,
            clip_size=preset.clip_size,
            mode=config.cam_mode,
        )
        cams = list(maps.numpy())
    verdict = score_video(output.probabilities, thresholds=config.birads)
    return VideoResult(
        score=verdict.score,
        category=verdict.category,
        no_lesion_tracked=verdict.no_lesion_tracked,
        tracks=tracks,
        clips=[
            ClipResult(plan, float(p), cam)
            for plan, p, cam in zip(plans, output.probabilities, cams, strict=True)
        ],
        n_frames=len(frames),
        frame_shape=(frames.shape[1], frames.shape[2]),
        config=config,
    )


def detector_clip_windows(
    detector: FasterRCNN, *, image_size: int, clip_len: int, config: PipelineConfig
) -> ClipWindows:
    """The pipeline's detect -> track -> clip stages, as a source of training clips.

    For ``common.data.units.build_units(detector_clips=...)``: the returned function takes
    a video's frames (``uint8 [T, H, W]``, already preprocessed when training preprocesses)
    and gives each clip of the detector's tracks as ``(frame indices, boxes)``, the frames
    and boxes that ``run_pipeline`` would crop with the same detector and ``config``
    (``boxes_source`` is ignored).

    Parameters
    ----------
    detector : FasterRCNN
        Runs on the device its parameters are on and is left in eval mode; put it back in
        train mode before training it.
    image_size, clip_len : int
        The preset's ``detector.image_size`` and ``classifier.clip_len``.
    config : PipelineConfig
        Detection and tracking settings, as at inference.
    """

    def windows(frames: np.ndarray) -> list[tuple[tuple[int, ...], tuple[Box, ...]]]:
        detections = detect_lesions(
            frames,
            detector,
            image_size=image_size,
            score_threshold=config.score_threshold,
            nms_iou=config.nms_iou,
            max_detections=config.max_detections,
            batch_size=config.detector_batch_size,
        )
        tracks = link_tracks(detections, link_iou=config.link_iou, max_gap=config.max_gap)
        return [
            (plan.frames, plan.boxes)
            for plan in plan_clips(
                tracks, clip_len=clip_len, min_track_frames=config.min_track_frames
            )
        ]

    return windows
