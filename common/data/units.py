"""Training units: a site's videos cut into detector frames and classifier clips, per patient.

The privacy unit is the patient: DP-SGD samples, clips and noises whole units, so
everything here is grouped into one ``DetectorUnit`` and one ``ClassifierUnit`` per patient.

Frames, windows and crops are cut by ``common.geometry``, as at inference. Two options
bring training closer to inference still (``common.pipeline.run.run_pipeline``):
``preprocess`` applies the pipeline's optional preprocess stage to every frame before
anything is cut, and ``detector_clips`` with ``detector_track_fraction`` mixes clips of the
tracks a detector finds into the classifier's ground-truth clips.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from common.data.manifest import Problem
from common.data.video import read_video
from common.errors import DataError, UsageError
from common.geometry import (
    ClipWindows,
    Window,
    boxed_frames,
    consecutive_windows,
    crop_clip,
    detector_samples,
)
from common.models.presets import Preset
from common.pipeline.config import PreprocessConfig
from common.pipeline.preprocess import preprocess_frames

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData

SPLITS = ("train", "val", "test")


@dataclass
class DetectorUnit:
    """One patient's detector frames.

    Attributes
    ----------
    patient_id : str
    images : list of Tensor
        FloatTensor[3, S, S] in [0, 1], S = ``preset.detector.image_size``; the grayscale
        frame broadcast to 3 channels (a view: copy before writing in place).
    targets : list of dict
        Per image ``{"boxes": FloatTensor[N, 4] x1y1x2y2 in pixels of the S x S image,
        "labels": Int64Tensor[N]}``, all labels 1 (lesion); N = 0 for frames without one.
    """

    patient_id: str
    images: list[Tensor] = field(default_factory=list)
    targets: list[dict[str, Tensor]] = field(default_factory=list)


@dataclass
class ClassifierUnit:
    """One patient's lesion clips.

    Attributes
    ----------
    patient_id : str
    clips : Tensor
        FloatTensor[K, 3, T, s, s] in [0, 1], T = ``clip_len``, s = ``clip_size``; K may be
        0 when no video of the patient has ``clip_len`` consecutive boxed frames. Grayscale
        broadcast to 3 channels (a view: copy before writing in place).
    labels : Tensor
        FloatTensor[K]: 1.0 malignant, 0.0 benign (the video's label).
    """

    patient_id: str
    clips: Tensor
    labels: Tensor


@dataclass
class SiteUnits:
    """Both unit lists of one split, in the same patient order (sorted patient ids).

    ``skipped`` is what the units leave out: every ``Problem`` that ``load_site`` found
    (rows of any split) and then, per video of this split that could not be read or cut,
    ``Problem(file=<video path>, line=0, field="video", reason)``.
    """

    detector: list[DetectorUnit]
    classifier: list[ClassifierUnit]
    skipped: list[Problem] = field(default_factory=list)


def build_units(
    site: SiteData,
    preset: Preset,
    *,
    split: str = "train",
    frame_stride: int,
    max_frames_per_video: int,
    preprocess: PreprocessConfig | None = None,
    detector_clips: ClipWindows | None = None,
    detector_track_fraction: float = 0.0,
    clip_stride: int | None = None,
) -> SiteUnits:
    """Cut the videos of one split into per-patient detector frames and classifier clips.

    Parameters
    ----------
    site : SiteData
        The site's manifest rows and ground-truth boxes.
    preset : Preset
        Gives the detector image size and the classifier clip length and size.
    split : {"train", "val", "test"}
    frame_stride : int
        Detector frames are every ``frame_stride``-th frame, with or without a lesion.
    max_frames_per_video : int
        At most this many of those frames per video, evenly spaced.
    preprocess : PreprocessConfig, optional
        Speckle filter and contrast stretch (``preprocess_frames``) on every video before
        its detector frames and clips are cut; pass the same as inference's
        ``PipelineConfig.preprocess``. Default None: the frames as decoded.
    detector_clips : ClipWindows, optional
        Finds a video's tracks and cuts them into clip windows (the current global
        detector, ``common.pipeline.run.detector_clip_windows``); it sees the frames after
        ``preprocess``. Needed when ``detector_track_fraction`` > 0.
    detector_track_fraction : float
        f in [0, 1]: per video, the classifier gets an evenly spaced share f of the clips
        of the detector's tracks and the share 1 - f of its ground-truth clips (counts
        rounded half up), each labelled with the video's label. When the detector finds
        the lesion as often as the ground truth boxes it, f is the share of detector clips;
        f = 1 trains on detector tracks only, also on videos without a ground-truth box.
        Default 0: ground truth only, the WAUVE paper's training.
    clip_stride : int, optional
        Frames between the starts of consecutive ground-truth clips of a run. Default
        ``clip_len``: back-to-back clips, as in the WAUVE paper; smaller values overlap
        them (more clips of the same lesion, as public pretraining uses).

    Returns
    -------
    SiteUnits
        One detector and one classifier unit per patient of the split. Classifier clips
        are runs of ``clip_len`` consecutive boxed frames cropped around the union of
        their boxes (``common.geometry.crop_clip``); a run's remainder and runs shorter
        than ``clip_len`` are dropped, as in the WAUVE paper.

        A video that fails to decode (or whose boxes are empty once resized) is skipped
        and listed in ``skipped``, never fatal: a damaged file must not stop a site's
        round. A patient left with no readable video has no unit.
    """
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if frame_stride < 1 or max_frames_per_video < 1:
        raise UsageError(
            f"frame_stride and max_frames_per_video must be >= 1, "
            f"got {frame_stride} and {max_frames_per_video}"
        )
    if not 0.0 <= detector_track_fraction <= 1.0:
        raise UsageError(
            f"detector_track_fraction must be in [0, 1], got {detector_track_fraction}"
        )
    if detector_track_fraction > 0 and detector_clips is None:
        raise UsageError("detector_track_fraction > 0 needs detector_clips (a detector)")
    rows_by_patient: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in site.rows:
        if row.split == split:
            rows_by_patient[row.patient_id].append(row)

    cfg = preset.classifier
    detector_units, classifier_units = [], []
    skipped = list(site.problems)
    for patient_id in sorted(rows_by_patient):
        det = DetectorUnit(patient_id)
        clips: list[Tensor] = []
        labels: list[float] = []
        for row in rows_by_patient[patient_id]:
            try:
                frames = read_video(site.root / row.video)
                if preprocess is not None:
                    frames = preprocess_frames(frames, preprocess)
                boxes = site.boxes.get(row.video, {})
                picked = _detector_frames(len(frames), frame_stride, max_frames_per_video)
                images, targets = detector_samples(
                    frames, picked, boxes, preset.detector.image_size, where=row.video
                )
            except DataError as error:
                reason = str(error).replace(str(site.root / row.video), row.video)
                skipped.append(
                    Problem(row.video, 0, "video", reason.removeprefix(f"{row.video}: "))
                )
                continue
            det.images += images
            det.targets += targets
            boxed = boxed_frames(boxes, len(frames))
            windows: list[Window] = [
                (window, [boxes[f] for f in window])
                for window in consecutive_windows(boxed, cfg.clip_len, clip_stride)
            ]
            if detector_clips is not None and detector_track_fraction > 0:
                windows = mix_windows(
                    windows, detector_clips(frames), fraction=detector_track_fraction
                )
            for window, window_boxes in windows:
                clips.append(crop_clip(frames, window, window_boxes, cfg.clip_size))
                labels.append(1.0 if row.label == "malignant" else 0.0)
        if not det.images:
            continue
        detector_units.append(det)
        shape = (len(clips), 1, cfg.clip_len, cfg.clip_size, cfg.clip_size)
        stacked = torch.stack(clips) if clips else torch.zeros(shape)
        classifier_units.append(
            ClassifierUnit(
                patient_id,
                clips=stacked.expand(-1, 3, -1, -1, -1),
                labels=torch.tensor(labels, dtype=torch.float32),
            )
        )
    return SiteUnits(detector=detector_units, classifier=classifier_units, skipped=skipped)


def mix_windows(
    ground_truth: Sequence[Window], detected: Sequence[Window], *, fraction: float
) -> list[Window]:
    """The share ``1 - fraction`` of ``ground_truth`` then ``fraction`` of ``detected``.

    Each share is evenly spaced over its list (so it covers the whole sweep, not its
    start), its count ``n * share`` rounded half up.

    >>> gt = [([i], [(0.0, 0.0, 1.0, 1.0)]) for i in range(4)]
    >>> found = [([i], [(1.0, 1.0, 2.0, 2.0)]) for i in range(10, 12)]
    >>> [w[0][0] for w in mix_windows(gt, found, fraction=0.5)]
    [0, 3, 10]
    """
    n_detected = int(fraction * len(detected) + 0.5)
    n_ground_truth = len(ground_truth) - int(fraction * len(ground_truth) + 0.5)
    return [*_evenly_spaced(ground_truth, n_ground_truth), *_evenly_spaced(detected, n_detected)]


def _evenly_spaced(items: Sequence[Window], count: int) -> list[Window]:
    if count <= 0:
        return []
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def _detector_frames(n_frames: int, stride: int, cap: int) -> list[int]:
    strided = np.arange(0, n_frames, stride)
    if len(strided) > cap:
        strided = strided[np.linspace(0, len(strided) - 1, cap).round().astype(int)]
    return strided.tolist()
