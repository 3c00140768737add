"""Key frames for the 2D comparator: its three readings of a sweep, and its per-patient units.

The WAUVE paper compares its video model with a 2D ResNet-50 read three ways:

* **one key frame** (``keyframe1``): a sweep's key frame, the annotated frame with the
  largest lesion box (area in pixels; the earliest on a tie);
* **two orthogonal key frames** (``keyframe2``): the sweep's key frame and the key frame of
  the same patient's other sweep whose direction differs most from it (the orthogonal
  view, radial then antiradial). Directions are read from the site's optional
  ``lesions.csv`` (columns ``video, sweep_direction_deg``, as ``busfed synth`` writes it).
  Without a direction for both, the partner is the patient's first other sweep with a key
  frame in manifest order. A patient with a single sweep (or a single annotated one) has
  no second view: ``keyframe2`` is then the one key frame, and ``n_views`` says 1;
* **all ROI frames** (``allframes``): every annotated frame of the sweep.

A site of still images (``busfed site ingest --key-frames``) stores each image as a
one-frame video, with its box on frame 0 if the export gave one: the image is its own key
frame and only ROI frame. A still image without a box (key-frame archives, BUSI, often
have none) is read whole: the radiologist chose the frame, and the image is the ROI. A
sweep without a box has no key frame (nothing says which frame, or where, to read).

Which frames, and their crops, come from ``common.geometry`` (``key_frame``, ``roi_frames``,
``crop_frames``), as at inference: a crop around a box uses the clip crop's margin, per
frame with its own box; a whole still image is resized. Either way the crop is square, the
preset's ``keyframe.image_size``.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from common.data.manifest import Problem
from common.data.units import SPLITS
from common.data.video import probe_video, read_video
from common.errors import DataError, UsageError
from common.geometry import crop_frames, key_frame
from common.models.presets import Preset

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData

KEYFRAME_MODES = ("keyframe1", "keyframe2", "allframes")
SWEEPS_FILE = "lesions.csv"
DIRECTION_COLUMN = "sweep_direction_deg"


# ------------------------------------------------------------------ which partner


def direction_difference(a: float, b: float) -> float:
    """Angle in degrees, in [0, 90], between two image-plane directions (lines, not arrows)."""
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def orthogonal_partner(
    video: str, candidates: Sequence[str], directions: Mapping[str, float]
) -> str | None:
    """The other sweep of ``candidates`` that makes the most orthogonal pair with ``video``.

    ``candidates`` are the patient's sweeps with a key frame, in manifest order (``video``
    may be among them). With directions for ``video`` and some others, the one at the
    largest angle wins (the earlier on a tie); otherwise the first other candidate.
    None when there is no other candidate.
    """
    others = [v for v in candidates if v != video]
    if not others:
        return None
    if video in directions:
        known = [v for v in others if v in directions]
        if known:
            angles = [direction_difference(directions[video], directions[v]) for v in known]
            return known[angles.index(max(angles))]  # the earlier sweep on a tie
    return others[0]


def read_sweep_directions(root: Path) -> dict[str, float]:
    """``{video: direction in degrees}`` from the site's optional ``lesions.csv``.

    A missing file, or one without the direction column, gives ``{}``; a blank or
    non-numeric direction leaves that video without one (the pair then falls back to
    manifest order, see the module docstring).

    Raises
    ------
    DataError
        The file exists but is not readable UTF-8 CSV.
    """
    path = Path(root) / SWEEPS_FILE
    if not path.is_file():
        return {}
    directions: dict[str, float] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [name.strip() for name in reader.fieldnames or []]
            if "video" not in fields or DIRECTION_COLUMN not in fields:
                return {}
            reader.fieldnames = fields
            for record in reader:
                try:
                    value = float((record.get(DIRECTION_COLUMN) or "").strip())
                except ValueError:
                    continue
                if math.isfinite(value):
                    directions[(record.get("video") or "").strip()] = value
    except (UnicodeDecodeError, csv.Error, OSError) as error:
        raise DataError(f"{path}: not a readable CSV file: {error}") from error
    return directions


@dataclass(frozen=True)
class ModeScores:
    """The comparator's three readings of one sweep; None where the sweep has no ROI.

    Attributes
    ----------
    keyframe1, keyframe2, allframes : float or None
        P(malignant) of the key frame; the mean over the key frame and the partner
        sweep's key frame; the mean over every ROI frame.
    key_frame : int or None
    partner : str or None
        The sweep that gave ``keyframe2``'s second view.
    n_views : int
        Key frames in ``keyframe2``: 2, 1 (no other annotated sweep), or 0 (no ROI).
    n_roi_frames : int
    """

    keyframe1: float | None
    keyframe2: float | None
    allframes: float | None
    key_frame: int | None
    partner: str | None
    n_views: int
    n_roi_frames: int


def mode_scores(
    rows: Sequence[ManifestRow],
    key_frames: Mapping[str, int | None],
    probabilities: Mapping[str, Mapping[int, float]],
    directions: Mapping[str, float],
) -> dict[str, ModeScores]:
    """Combine per-ROI-frame probabilities into the three modes, for each video of ``rows``.

    Parameters
    ----------
    rows : sequence of ManifestRow
        The videos to score, in manifest order; partners are sought among the same
        patient's videos in ``rows``.
    key_frames : mapping
        ``key_frames[video]``: its ``key_frame``, None (or absent) when it has none.
    probabilities : mapping
        ``probabilities[video][frame]``: P(malignant) of each ``roi_frames`` crop,
        the key frame's included.
    directions : mapping
        ``read_sweep_directions``.
    """
    key_of = {
        row.video: key
        for row in rows
        if (key := key_frames.get(row.video)) is not None and row.video in probabilities
    }
    result: dict[str, ModeScores] = {}
    for row in rows:
        if row.video not in key_of:
            result[row.video] = ModeScores(None, None, None, None, None, 0, 0)
            continue
        own, key = probabilities[row.video], key_of[row.video]
        same_patient = [
            r.video for r in rows if r.patient_id == row.patient_id and r.video in key_of
        ]
        partner = orthogonal_partner(row.video, same_patient, directions)
        views = [own[key]]
        if partner is not None:
            views.append(probabilities[partner][key_of[partner]])
        result[row.video] = ModeScores(
            keyframe1=own[key],
            keyframe2=float(np.mean(views)),
            allframes=float(np.mean(list(own.values()))),
            key_frame=key,
            partner=partner,
            n_views=len(views),
            n_roi_frames=len(own),
        )
    return result


# ------------------------------------------------------------------ units


def read_roi_video(site: SiteData, row: ManifestRow) -> np.ndarray | None:
    """A video's frames if it has a ROI (a lesion box, or it is a still image), else None.

    A sweep without a box is only probed, not decoded.

    Raises
    ------
    DataError
        The video cannot be read.
    """
    path = site.root / row.video
    if not site.boxes.get(row.video) and probe_video(path).frames != 1:
        return None
    return read_video(path)


@dataclass
class KeyFrameUnit:
    """One patient's key-frame crops: the privacy unit of the comparator's DP-SGD.

    Attributes
    ----------
    patient_id : str
    images : Tensor
        FloatTensor[K, 3, S, S] in [0, 1], S = ``preset.keyframe.image_size``: the key
        frame of each of the patient's sweeps (or images) that has a lesion box; K may be 0.
    labels : Tensor
        FloatTensor[K]: 1.0 malignant, 0.0 benign (the video's label).
    """

    patient_id: str
    images: Tensor
    labels: Tensor


@dataclass
class KeyFrameUnits:
    """The key-frame units of one split and what they leave out.

    ``skipped`` holds every ``Problem`` that ``load_site`` found and then, per video of the
    split that could not be read, ``Problem(file=<video path>, line=0, field="video",
    reason)``, as ``common.data.units.SiteUnits.skipped`` does.
    """

    keyframe: list[KeyFrameUnit]
    skipped: list[Problem] = field(default_factory=list)


def build_keyframe_units(site: SiteData, preset: Preset, *, split: str) -> KeyFrameUnits:
    """One unit per patient of ``split`` (sorted by patient id): the key frame of each video.

    The comparator trains on one key frame per sweep, as the paper's 2D model reads it; a
    site of still images has one per image. Sweeps without a box add nothing; a video that
    cannot be read is skipped and listed, never fatal.
    """
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rows_by_patient: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in site.rows:
        if row.split == split:
            rows_by_patient[row.patient_id].append(row)
    size = preset.keyframe.image_size
    units = []
    skipped = list(site.problems)
    for patient_id in sorted(rows_by_patient):
        images: list[Tensor] = []
        labels: list[float] = []
        for row in rows_by_patient[patient_id]:
            boxes = site.boxes.get(row.video, {})
            try:
                frames = read_roi_video(site, row)
            except DataError as error:
                reason = str(error).replace(str(site.root / row.video), row.video)
                skipped.append(
                    Problem(row.video, 0, "video", reason.removeprefix(f"{row.video}: "))
                )
                continue
            key = key_frame(boxes, len(frames)) if frames is not None else None
            if frames is None or key is None:
                continue
            images.append(crop_frames(frames, [key], boxes, size))
            labels.append(1.0 if row.label == "malignant" else 0.0)
        units.append(
            KeyFrameUnit(
                patient_id,
                images=torch.cat(images) if images else torch.zeros(0, 3, size, size),
                labels=torch.tensor(labels, dtype=torch.float32),
            )
        )
    return KeyFrameUnits(keyframe=units, skipped=skipped)
