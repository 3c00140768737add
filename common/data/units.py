"""Training units: a site's videos cut into detector frames and classifier clips, per patient.

The privacy unit is the patient: DP-SGD samples, clips and noises whole units, so
everything here is grouped into one ``DetectorUnit`` and one ``ClassifierUnit`` per patient.

Two options bring training closer to inference (``common.pipeline.run.run_pipeline``):
``preprocess`` applies the pipeline's optional preprocess stage to every frame before
anything is cut, and ``detector_clips`` with ``detector_track_fraction`` mixes clips of the
tracks a detector finds into the classifier's ground-truth clips.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from common.data.manifest import Problem
from common.data.video import read_video
from common.errors import DataError, UsageError
from common.models.presets import Preset
from common.pipeline.config import PreprocessConfig
from common.pipeline.preprocess import preprocess_frames

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData

SPLITS = ("train", "val", "test")
# Context around the lesion in a classifier crop: this fraction of the box's longer side
# is added on each side before the crop is made square.
CLIP_MARGIN = 0.15

Box = tuple[float, float, float, float]
# A clip window: clip_len consecutive frame indices and the lesion's box in each.
_Window = tuple[Sequence[int], Sequence[Box]]
# Given a video's frames (uint8 [T, H, W]), the clip windows of a detector's tracks, as
# ``common.pipeline.run.detector_clip_windows`` makes them.
ClipWindows = Callable[[np.ndarray], Sequence[_Window]]


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

    Returns
    -------
    SiteUnits
        One detector and one classifier unit per patient of the split. Classifier clips
        are runs of ``clip_len`` consecutive boxed frames cropped around the union of
        their boxes (plus ``CLIP_MARGIN``, made square); a run's remainder and runs
        shorter than ``clip_len`` are dropped, as in the WAUVE paper.

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
            boxed = [f for f in sorted(boxes) if f < len(frames)]
            windows: list[_Window] = [
                (window, [boxes[f] for f in window])
                for window in consecutive_windows(boxed, cfg.clip_len)
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
    ground_truth: Sequence[_Window], detected: Sequence[_Window], *, fraction: float
) -> list[_Window]:
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


def _evenly_spaced(items: Sequence[_Window], count: int) -> list[_Window]:
    if count <= 0:
        return []
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


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
