"""The pipeline's settings: frozen, keyword-only dataclasses with documented defaults.

Import-light on purpose (no torch), so that a CLI can build and show them cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from common.errors import UsageError
from common.pipeline.score import BiradsThresholds

BoxesSource = Literal["detector", "gt"]
CamMode = Literal["signed", "relu"]


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """What ``preprocess_frames`` does.

    Attributes
    ----------
    speckle_filter : {"lee", "median", "none"}
        ``lee``: Lee's local linear minimum-mean-square-error filter (see ``lee_filter``);
        ``median``: a per-frame median filter; ``none``: skip.
    window : int
        Odd side in pixels of the filter's square window.
    contrast : bool
        Stretch the video's ``low_percentile``..``high_percentile`` grey levels to 0..255.
        Percentiles are taken over the whole video, not per frame, so brightness does not
        flicker from frame to frame.
    low_percentile, high_percentile : float
        In [0, 100], low < high.
    """

    speckle_filter: Literal["lee", "median", "none"] = "lee"
    window: int = 5
    contrast: bool = True
    low_percentile: float = 1.0
    high_percentile: float = 99.0

    def __post_init__(self) -> None:
        if self.speckle_filter not in ("lee", "median", "none"):
            raise UsageError(
                f"preprocess.speckle_filter must be lee, median or none, "
                f"got {self.speckle_filter!r}"
            )
        if self.window < 1 or self.window % 2 == 0:
            raise UsageError(f"preprocess.window must be an odd number >= 1, got {self.window}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise UsageError(
                "preprocess.low_percentile and high_percentile must satisfy "
                f"0 <= low < high <= 100, got {self.low_percentile} and {self.high_percentile}"
            )


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How ``run_pipeline`` turns a video into a risk score.

    Attributes
    ----------
    boxes_source : {"detector", "gt"}
        Where lesion boxes come from: the Faster R-CNN (deployment), or the video's
        ground-truth boxes (oracle mode, to evaluate the classifier apart from the
        detector; the WAUVE classifier is trained on ground-truth tracks).
    score_threshold : float
        Detector: keep boxes scoring above this. Default 0.5, an even-odds lesion.
    nms_iou : float
        Detector: non-maximum suppression IoU. Default 0.5, torchvision's.
    max_detections : int
        Detector: at most this many boxes per frame, the best. Default 5: a sweep rarely
        shows more lesions, and it bounds the tracker's work when a weak detector fires
        everywhere (torchvision keeps 100).
    detector_batch_size : int
        Frames per detector forward pass. Default 8.
    link_iou : float
        Tracker: smallest IoU of a track's last box and a new box to link them.
        Default 0.3: consecutive frames of a freehand sweep overlap far more, and a box
        that jumps below it is another lesion (or a false positive).
    max_gap : int
        Tracker: missed frames a track survives (boxes interpolated across). Default 2.
    min_track_frames : int
        Clips: a track shorter than ``clip_len`` but at least this many frames long gives
        one clip of its frames evenly resampled (some repeated). Default 3: with a
        detector that misses a frame in three, the WAUVE paper's rule (0: such tracks are
        dropped) left 42 of 61 held-out synthetic videos without a score and the AUC at
        0.50; keeping tracks of 3 frames or more scored 34 and gave 0.77 (0.62-0.92)
        (``busfed demo``'s held-out site, tiny preset pretrained on 150 synthetic patients).
    classifier_batch_size : int
        Clips per classifier forward pass. Default 4.
    birads : BiradsThresholds
        Category bounds of the risk score (ACR BI-RADS likelihoods by default).
    cams : bool
        Compute class activation maps for every clip. Default False (costs memory).
    cam_mode : {"signed", "relu"}
        See ``clip_cams``. Default ``signed`` (red malignant, blue benign).
    preprocess : PreprocessConfig or None
        Speckle reduction and contrast normalisation before detection. Default None (off),
        because training does not preprocess.
    """

    boxes_source: BoxesSource = "detector"
    # detect
    score_threshold: float = 0.5
    nms_iou: float = 0.5
    max_detections: int = 5
    detector_batch_size: int = 8
    # track
    link_iou: float = 0.3
    max_gap: int = 2
    min_track_frames: int = 3
    # classify and score
    classifier_batch_size: int = 4
    birads: BiradsThresholds = field(default_factory=BiradsThresholds)
    # explain
    cams: bool = False
    cam_mode: CamMode = "signed"
    # preprocess
    preprocess: PreprocessConfig | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.boxes_source not in ("detector", "gt"):
            problems.append(f"boxes_source must be detector or gt, got {self.boxes_source!r}")
        if not 0.0 <= self.score_threshold < 1.0:
            problems.append(f"score_threshold must be in [0, 1), got {self.score_threshold}")
        for name in ("nms_iou", "link_iou"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                problems.append(f"{name} must be in (0, 1], got {value}")
        if self.max_gap < 0:
            problems.append(f"max_gap must be >= 0, got {self.max_gap}")
        if self.min_track_frames < 0:
            problems.append(f"min_track_frames must be >= 0, got {self.min_track_frames}")
        for name in ("max_detections", "detector_batch_size", "classifier_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cam_mode not in ("signed", "relu"):
            problems.append(f"cam_mode must be signed or relu, got {self.cam_mode!r}")
        if problems:
            raise UsageError("pipeline config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON-ready values (for a report)."""
        return asdict(self)
