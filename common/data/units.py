"""Training units: a site's videos cut into detector frames and classifier clips, per patient.

The privacy unit is the patient: DP-SGD samples, clips and noises whole units, so
everything here is grouped into one ``DetectorUnit`` and one ``ClassifierUnit`` per patient.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from common.data.video import read_video
from common.errors import DataError, UsageError
from common.models.presets import Preset

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData

SPLITS = ("train", "val", "test")
# Context around the lesion in a classifier crop: this fraction of the box's longer side
# is added on each side before the crop is made square.
CLIP_MARGIN = 0.15

Box = tuple[float, float, float, float]


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
    """Both unit lists of one split, in the same patient order (sorted patient ids)."""

    detector: list[DetectorUnit]
    classifier: list[ClassifierUnit]


def build_units(
    site: SiteData,
    preset: Preset,
    *,
    split: str = "train",
    frame_stride: int,
    max_frames_per_video: int,
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

    Returns
    -------
    SiteUnits
        One detector and one classifier unit per patient of the split. Classifier clips
        are runs of ``clip_len`` consecutive boxed frames cropped around the union of
        their boxes (plus ``CLIP_MARGIN``, made square); a run's remainder and runs
        shorter than ``clip_len`` are dropped, as in the WAUVE paper.
    """
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if frame_stride < 1 or max_frames_per_video < 1:
        raise UsageError(
            f"frame_stride and max_frames_per_video must be >= 1, "
            f"got {frame_stride} and {max_frames_per_video}"
        )
    rows_by_patient: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in site.rows:
        if row.split == split:
            rows_by_patient[row.patient_id].append(row)

    cfg = preset.classifier
    detector_units, classifier_units = [], []
    for patient_id in sorted(rows_by_patient):
        det = DetectorUnit(patient_id)
        clips: list[Tensor] = []
        labels: list[float] = []
        for row in rows_by_patient[patient_id]:
            frames = read_video(site.root / row.video)
            boxes = site.boxes.get(row.video, {})
            picked = _detector_frames(len(frames), frame_stride, max_frames_per_video)
            images, targets = detector_samples(
                frames, picked, boxes, preset.detector.image_size, where=row.video
            )
            det.images += images
            det.targets += targets
            boxed = [f for f in sorted(boxes) if f < len(frames)]
            for window in consecutive_windows(boxed, cfg.clip_len):
                clips.append(crop_clip(frames, window, [boxes[f] for f in window], cfg.clip_size))
                labels.append(1.0 if row.label == "malignant" else 0.0)
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
    return SiteUnits(detector=detector_units, classifier=classifier_units)


def consecutive_windows(frames: Iterable[int], length: int) -> list[list[int]]:
    """Split sorted frame indices into runs of consecutive frames, then into windows.

    Each run gives ``len(run) // length`` back-to-back windows from its start; the
    remainder, and runs shorter than ``length``, are dropped.

    >>> consecutive_windows([0, 1, 2, 3, 4, 6, 7, 8, 9], 2)
    [[0, 1], [2, 3], [6, 7], [8, 9]]
    """
    runs: list[list[int]] = []
    for f in frames:
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    return [run[i : i + length] for run in runs for i in range(0, len(run) - length + 1, length)]


def _detector_frames(n_frames: int, stride: int, cap: int) -> list[int]:
    strided = np.arange(0, n_frames, stride)
    if len(strided) > cap:
        strided = strided[np.linspace(0, len(strided) - 1, cap).round().astype(int)]
    return strided.tolist()


def detector_samples(
    frames: np.ndarray, picked: Sequence[int], boxes: dict[int, Box], size: int, *, where: str
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Resize the picked frames to ``size`` x ``size`` and rescale their boxes.

    Frames are ``uint8 [T, H, W]``; each picked frame becomes FloatTensor[3, size, size]
    in [0, 1] (bilinear, antialiased), with a target as in ``DetectorUnit.targets``.
    Inference resizes through this too, with no boxes, so both see the same pixels.
    """
    _, height, width = frames.shape
    batch = torch.from_numpy(frames[picked]).unsqueeze(1).float().div_(255)
    resized = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
    resized = resized.clamp_(0, 1)
    scale = torch.tensor([size / width, size / height, size / width, size / height])
    images, targets = [], []
    for image, f in zip(resized, picked, strict=True):
        frame_boxes = [boxes[f]] if f in boxes else []
        box = torch.tensor(frame_boxes, dtype=torch.float32).reshape(-1, 4) * scale
        box = box.clamp(0, size)
        if bool(((box[:, 2] <= box[:, 0]) | (box[:, 3] <= box[:, 1])).any()):
            raise DataError(f"{where}: frame {f}: box {boxes[f]} is empty inside the frame")
        images.append(image.expand(3, -1, -1))
        targets.append({"boxes": box, "labels": torch.ones(len(box), dtype=torch.int64)})
    return images, targets


def clip_region(boxes: Sequence[Box]) -> Box:
    """The square crop region of a clip: the boxes' union plus ``CLIP_MARGIN``, centred.

    Boxes and region are x1y1x2y2 in video pixels; the region may reach outside the frame.
    """
    x1 = min(b[0] for b in boxes)
    y1 = min(b[1] for b in boxes)
    x2 = max(b[2] for b in boxes)
    y2 = max(b[3] for b in boxes)
    half = max(x2 - x1, y2 - y1) * (0.5 + CLIP_MARGIN)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return (cx - half, cy - half, cx + half, cy + half)


def crop_clip(frames: np.ndarray, window: Sequence[int], boxes: Sequence[Box], size: int) -> Tensor:
    """Crop one square region, ``clip_region(boxes)``, from every frame of a window.

    Returns FloatTensor[1, T, size, size] in [0, 1]; parts of the crop outside the frame
    are black.
    """
    region = torch.tensor(clip_region(boxes), dtype=torch.float32)
    clip = torch.from_numpy(frames[list(window)]).unsqueeze(1).float().div_(255)
    rois = torch.cat(
        [torch.arange(len(window)).unsqueeze(1).float(), region.expand(len(window), 4)], 1
    )
    # roi_align averages several samples per output pixel (antialiasing) and reads zeros
    # outside the frame.
    crops = roi_align(clip, rois, output_size=size, aligned=True)
    return crops.clamp_(0, 1).permute(1, 0, 2, 3)
