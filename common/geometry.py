"""Lesion geometry shared by training and inference: boxes, clip windows, crop regions, crops.

Training (``common.data.units``, ``common.data.keyframes``) and the inference pipeline
(``common.pipeline``) both cut their inputs here, so a model sees at inference exactly the
pixels it was trained on: the detector's resized frames, the classifier's square clip
crops, the comparator's key-frame crops.

Conventions: frames are ``uint8 [T, H, W]`` grayscale (``read_video``); a ``Box`` is
``(x1, y1, x2, y2)`` in pixels of the video frame unless a function says otherwise; box
mappings are ``{frame index: Box}``, at most one lesion per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from common.errors import DataError

Box = tuple[float, float, float, float]
# A clip window: clip_len consecutive frame indices and the lesion's box in each.
Window = tuple[Sequence[int], Sequence[Box]]
# Given a video's frames (uint8 [T, H, W]), the clip windows of a detector's tracks, as
# ``common.pipeline.run.detector_clip_windows`` makes them.
ClipWindows = Callable[[np.ndarray], Sequence[Window]]

# Context around the lesion in a classifier crop: this fraction of the box's longer side
# is added on each side before the crop is made square.
CLIP_MARGIN = 0.15


# ------------------------------------------------------------------ frames and windows


def boxed_frames(boxes: Mapping[int, Box], n_frames: int) -> list[int]:
    """The frames with a box, in order; boxes at or past ``n_frames`` are ignored."""
    return sorted(f for f in boxes if f < n_frames)


def consecutive_runs(frames: Iterable[int]) -> list[list[int]]:
    """Split sorted frame indices into runs of consecutive frames.

    >>> consecutive_runs([0, 1, 2, 5, 6, 9])
    [[0, 1, 2], [5, 6], [9]]
    """
    runs: list[list[int]] = []
    for f in frames:
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs


def consecutive_windows(
    frames: Iterable[int], length: int, stride: int | None = None
) -> list[list[int]]:
    """Split sorted frame indices into runs of consecutive frames, then into windows.

    Each run gives windows of ``length`` frames starting every ``stride`` frames from its
    start (default ``length``: back to back); the remainder, and runs shorter than
    ``length``, are dropped.

    >>> consecutive_windows([0, 1, 2, 3, 4, 6, 7, 8, 9], 2)
    [[0, 1], [2, 3], [6, 7], [8, 9]]
    >>> consecutive_windows([0, 1, 2, 3, 4], 3, stride=1)
    [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    """
    step = stride or length
    if step < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return [
        run[i : i + length]
        for run in consecutive_runs(frames)
        for i in range(0, len(run) - length + 1, step)
    ]


def box_area(box: Box) -> float:
    """Area of an x1y1x2y2 box, in square pixels."""
    return (box[2] - box[0]) * (box[3] - box[1])


def key_frame(boxes: Mapping[int, Box], n_frames: int) -> int | None:
    """The annotated frame with the largest box area (earliest on a tie).

    A still image (``n_frames == 1``) without a box is its own key frame (0); a sweep
    without a box has none (None). Boxes past the last frame are ignored.
    """
    inside = [f for f in boxes if f < n_frames]
    if inside:
        return min(inside, key=lambda f: (-box_area(boxes[f]), f))
    return 0 if n_frames == 1 else None


def roi_frames(boxes: Mapping[int, Box], n_frames: int) -> list[int]:
    """Every annotated frame, in order; ``[0]`` for a still image without a box."""
    inside = boxed_frames(boxes, n_frames)
    return inside if inside or n_frames != 1 else [0]


# ------------------------------------------------------------------ detector input


def detector_samples(
    frames: np.ndarray, picked: Sequence[int], boxes: Mapping[int, Box], size: int, *, where: str
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Resize the picked frames to ``size`` x ``size`` and rescale their boxes.

    Frames are ``uint8 [T, H, W]``; each picked frame becomes FloatTensor[3, size, size]
    in [0, 1] (bilinear, antialiased), with a target ``{"boxes": FloatTensor[N, 4]
    x1y1x2y2 in pixels of the resized image, "labels": Int64Tensor[N]}``, all labels 1
    (lesion), N = 0 for a frame without a box. Inference resizes through this too, with no
    boxes, so both see the same pixels; ``boxes_to_video`` maps its boxes back.

    Raises
    ------
    DataError
        A box is empty once resized and clipped to the image (named by ``where``).
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


def boxes_to_video(boxes: np.ndarray, *, image_size: int, height: int, width: int) -> np.ndarray:
    """Map boxes from the detector's ``image_size`` square input back to video pixels.

    ``boxes`` is ``float32 [N, 4]`` x1y1x2y2 in pixels of ``detector_samples``' image;
    returns ``float32 [N, 4]`` in pixels of the ``height`` x ``width`` frame, clipped to it.
    """
    to_video = np.array(
        [width / image_size, height / image_size, width / image_size, height / image_size],
        dtype=np.float32,
    )
    limits = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes * to_video, 0, limits).astype(np.float32)


# ------------------------------------------------------------------ crops


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


def crop_frames(
    frames: np.ndarray, picked: Sequence[int], boxes: Mapping[int, Box], size: int
) -> Tensor:
    """Lesion crops of the picked frames, each around its own box with the clip margin.

    Each crop is ``crop_clip`` of the one frame with its own box. A picked frame without a
    box (a still image archived without one) is taken whole, resized to ``size`` x ``size``
    (bilinear, antialiased). Returns FloatTensor[K, 3, size, size] in [0, 1], the grayscale
    crop broadcast to 3 channels (a view: copy before writing in place).
    """
    if not picked:
        return torch.zeros(0, 3, size, size)
    crops = torch.cat([_crop(frames, f, boxes.get(f), size) for f in picked])
    return crops.expand(-1, 3, -1, -1)


def _crop(frames: np.ndarray, f: int, box: Box | None, size: int) -> Tensor:
    """FloatTensor[1, 1, size, size]: the crop around ``box``, or the whole frame."""
    if box is not None:
        return crop_clip(frames, [f], [box], size)
    frame = torch.from_numpy(frames[f : f + 1]).unsqueeze(1).float().div_(255)
    return F.interpolate(frame, size=(size, size), mode="bilinear", antialias=True).clamp_(0, 1)
