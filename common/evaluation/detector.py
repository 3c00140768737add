"""``busfed evaluate`` of a detector model: recall and AP at IoU 0.5 on a site's split, with
95% intervals from a patient-level bootstrap.

The frames are those the site's training and validation take (``build_units``): every
``FRAME_STRIDE``-th frame of a video, at most ``MAX_FRAMES_PER_VIDEO`` of them, with or
without a lesion (a frame without one counts its detections as false positives); a still
key frame is its own one frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from common.data.units import build_units
from common.evaluation.detection import bootstrap_detection_scores, detect, match_detections

if TYPE_CHECKING:
    from common.data.manifest import SiteData
    from common.models.bundle import DetectorBundle

IOU = 0.5
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
# The defaults of `busfed site init`, so evaluation sees frames as training did.
FRAME_STRIDE = 2
MAX_FRAMES_PER_VIDEO = 16


def evaluate_detector_site(
    bundle: DetectorBundle,
    site: SiteData,
    *,
    splits: Sequence[str],
    device: torch.device,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Recall and AP of the detector on ``splits`` of ``site``, for metrics.json.

    Returns
    -------
    dict
        ``info``, then ``iou``, ``recall`` and ``average_precision`` (null without a box),
        each with ``<name>_ci95`` ([low, high], patient-level percentile bootstrap of
        ``BOOTSTRAP_RESAMPLES`` resamples, seed ``BOOTSTRAP_SEED``), ``n_patients``,
        ``n_images``, ``n_boxes``, ``frame_stride``, ``max_frames_per_video`` and
        ``skipped`` (what could not be read, as ``file:line field: reason``).
    """
    images, truth, patients, skipped = [], [], [], []
    for split in splits:
        units = build_units(
            site, bundle.preset, split=split, frame_stride=FRAME_STRIDE,
            max_frames_per_video=MAX_FRAMES_PER_VIDEO,
        )  # fmt: skip
        for unit in units.detector:
            images += unit.images
            truth += [t["boxes"].numpy() for t in unit.targets]
            patients += [unit.patient_id] * len(unit.images)
        skipped += [f"{p.file}:{p.line} {p.field}: {p.reason}" for p in units.skipped]
    matches = match_detections(detect(bundle.detector, images, device=device), truth, iou=IOU)
    ci = bootstrap_detection_scores(
        matches, patients, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED
    )

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        **info,
        "iou": IOU,
        "recall": finite(ci.scores.recall),
        "recall_ci95": [finite(v) for v in ci.recall_ci],
        "average_precision": finite(ci.scores.average_precision),
        "average_precision_ci95": [finite(v) for v in ci.average_precision_ci],
        "bootstrap": {"unit": "patient", "resamples": ci.n_resamples, "seed": BOOTSTRAP_SEED},
        "n_patients": ci.n_patients,
        "n_images": ci.scores.n_images,
        "n_boxes": ci.scores.n_boxes,
        "frame_stride": FRAME_STRIDE,
        "max_frames_per_video": MAX_FRAMES_PER_VIDEO,
        "skipped": sorted(set(skipped)),
    }
