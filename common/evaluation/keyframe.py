"""``busfed evaluate`` of the 2D key-frame comparator: the paper's three readings per video.

For each video, the model reads every annotated lesion ROI (it has no detector: boxes are
the site's; a still image without a box is read whole) and
``common.data.keyframes.mode_scores`` gives

- ``score_keyframe1``: the key frame (largest box);
- ``score_keyframe2``: the mean over the key frame and the key frame of the patient's most
  orthogonal other sweep (the key frame alone when there is none; ``n_keyframe2_views``
  says which);
- ``score_allframes``: the mean over every ROI frame.

``scores.csv`` has one row per video, in manifest order, like WAUVE's; with a WAUVE
``scores.csv`` of the same videos, its ``score`` is copied in as ``score_wauve``, so that
``busfed metrics scores.csv --score score_wauve --score score_keyframe1 ...`` runs DeLong's
test between them on the same videos.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.data.keyframes import KEYFRAME_MODES, ModeScores, mode_scores, read_sweep_directions
from common.errors import DataError
from common.evaluation.discrimination import with_and_without_fallback
from common.evaluation.scoring import (
    Progress,
    VideoEvaluation,
    manifest_columns,
    run_summary,
    score_videos,
)
from common.pipeline.config import PreprocessConfig

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData
    from common.models.bundle import KeyFrameBundle

SCORE_COLUMNS = (
    "video", "patient_id", "label", *(f"score_{mode}" for mode in KEYFRAME_MODES),
    "key_frame", "n_keyframe2_views", "keyframe2_partner", "n_roi_frames", "no_roi",
    "vendor", "birads", "age", "lesion_size_mm",
)  # fmt: skip
WAUVE_COLUMN = "score_wauve"
BATCH_SIZE = 32
NO_ROI_HANDLING = (
    "video_level excludes sweeps without an annotated lesion box (the comparator reads "
    "annotated ROIs, so there is nothing to score); with_fallback gives them score 0.0"
)
KEYFRAME2_HANDLING = (
    "keyframe2 averages a video's key frame with that of the same patient's sweep whose "
    "direction (lesions.csv) differs most, else her first other annotated sweep; with no "
    "other annotated sweep it is the key frame alone (n_keyframe2_views = 1)"
)


def evaluate_keyframe_videos(
    bundle: KeyFrameBundle,
    site: SiteData,
    rows: Sequence[ManifestRow],
    *,
    threshold: float,
    preprocess: PreprocessConfig | None,
    wauve: Mapping[str, str] | None,
    info: dict[str, Any],
    progress: Progress | None = None,
) -> VideoEvaluation:
    """Score ``rows`` in the three modes.

    ``threshold`` is the operating point for sensitivity and specificity; ``wauve``
    (``read_wauve_scores``) adds ``score_wauve``; ``info`` (model, data, split) opens
    metrics.json.
    """
    from common.data.keyframes import read_roi_video
    from common.geometry import key_frame
    from common.pipeline.keyframe import roi_probabilities
    from common.pipeline.preprocess import preprocess_frames

    size = bundle.preset.keyframe.image_size

    def read_probabilities(
        row: ManifestRow, frames: np.ndarray | None
    ) -> tuple[int | None, dict[int, float]]:
        """The key frame and each ROI frame's P(malignant); none without a ROI."""
        if frames is None:
            return None, {}
        if preprocess is not None:
            frames = preprocess_frames(frames, preprocess)
        boxes = site.boxes.get(row.video, {})
        return key_frame(boxes, len(frames)), roi_probabilities(
            frames, boxes, bundle.keyframe, image_size=size, batch_size=BATCH_SIZE
        )

    scored, failures = score_videos(
        rows, lambda row: read_roi_video(site, row), read_probabilities, progress=progress
    )
    scored_rows = [row for row, _ in scored]
    modes = mode_scores(
        scored_rows,
        {row.video: key for row, (key, _) in scored},
        {row.video: probabilities for row, (_, probabilities) in scored},
        read_sweep_directions(site.root),
    )
    records = [keyframe_record(row, modes[row.video], wauve) for row in scored_rows]
    metrics = {
        **info,
        **keyframe_metrics(records, threshold=threshold),
        **run_summary(site, rows, failures),
    }
    columns = (*SCORE_COLUMNS, WAUVE_COLUMN) if wauve is not None else SCORE_COLUMNS
    return VideoEvaluation(columns, records, metrics, failures)


def keyframe_record(
    row: ManifestRow, scores: ModeScores, wauve: Mapping[str, str] | None
) -> dict[str, Any]:
    """One line of the comparator's scores.csv."""
    record: dict[str, Any] = {
        "video": row.video,
        "patient_id": row.patient_id,
        "label": row.label,
        **{f"score_{mode}": getattr(scores, mode) for mode in KEYFRAME_MODES},
        "key_frame": scores.key_frame,
        "n_keyframe2_views": scores.n_views,
        "keyframe2_partner": scores.partner,
        "n_roi_frames": scores.n_roi_frames,
        "no_roi": scores.key_frame is None,
        **manifest_columns(row),
    }
    if wauve is not None:
        record[WAUVE_COLUMN] = wauve.get(row.video) or None
    return record


def keyframe_metrics(records: list[dict[str, Any]], *, threshold: float) -> dict[str, Any]:
    """Per mode, discrimination over the videos with a ROI and with the 0.0 fallback."""
    with_roi = [r for r in records if not r["no_roi"]]
    return {
        "boxes_source": "gt",
        "n_scored": len(records),
        "n_no_roi": len(records) - len(with_roi),
        "no_roi_videos": [r["video"] for r in records if r["no_roi"]],
        "no_roi_handling": NO_ROI_HANDLING,
        "n_single_view": sum(r["n_keyframe2_views"] == 1 for r in with_roi),
        "keyframe2_handling": KEYFRAME2_HANDLING,
        "modes": {
            mode: with_and_without_fallback(
                records, column=f"score_{mode}", unscored="no_roi", threshold=threshold
            )
            for mode in KEYFRAME_MODES
        },
    }


def read_wauve_scores(path: Path) -> dict[str, str]:
    """``{video: score}`` from a WAUVE ``scores.csv`` (blank where no lesion was tracked)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not {"video", "score"} <= set(reader.fieldnames or []):
                raise DataError(f"{path}: not a WAUVE scores.csv (needs video and score columns)")
            return {row["video"]: row["score"] for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable scores.csv: {error}") from None
