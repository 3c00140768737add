"""``busfed evaluate`` for the 2D key-frame comparator: the paper's three readings per video.

For each video of the split, the model reads every annotated lesion ROI (it has no
detector: boxes are the site's; a still image without a box is read whole) and
``common.data.keyframes.mode_scores`` gives

- ``score_keyframe1``: the key frame (largest box);
- ``score_keyframe2``: the mean over the key frame and the key frame of the patient's most
  orthogonal other sweep (the key frame alone when there is none; ``n_keyframe2_views``
  says which);
- ``score_allframes``: the mean over every ROI frame.

``scores.csv`` has one row per video, in manifest order, like WAUVE's; with
``--wauve-scores`` WAUVE's ``score`` of the same videos is copied in as ``score_wauve``,
so that ``busfed metrics scores.csv --score score_wauve --score score_keyframe1 ...`` runs
DeLong's test between them on the same videos.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.data.keyframes import KEYFRAME_MODES, mode_scores, read_sweep_directions
from common.errors import DataError
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


def evaluate_key_frames(
    bundle: KeyFrameBundle,
    site: SiteData,
    rows: Sequence[ManifestRow],
    *,
    out: Path,
    threshold: float,
    preprocess: PreprocessConfig | None,
    wauve_scores: Path | None,
    info: dict[str, Any],
    console: Console,
) -> str:
    """Score ``rows`` in the three modes; write scores.csv, metrics.json and roc.png to ``out``.

    ``threshold`` is the operating point for sensitivity and specificity; ``info`` is
    merged into metrics.json. Returns a one-line summary.

    Raises
    ------
    DataError
        ``wauve_scores`` is unreadable or lacks the ``video`` or ``score`` column.
    """
    from common.data.keyframes import read_roi_video
    from common.geometry import key_frame
    from common.pipeline.keyframe import roi_probabilities
    from common.pipeline.preprocess import preprocess_frames

    wauve = _read_wauve_scores(wauve_scores) if wauve_scores is not None else None
    size = bundle.preset.keyframe.image_size
    probabilities: dict[str, dict[int, float]] = {}
    key_frames: dict[str, int | None] = {}
    failures: list[dict[str, str]] = []
    with Progress(
        TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=len(rows))
        for row in rows:
            progress.update(task, description=row.video)
            boxes = site.boxes.get(row.video, {})
            try:
                frames = read_roi_video(site, row)
            except DataError as error:
                # One unreadable video must not end an evaluation; it is listed.
                failures.append({"video": row.video, "error": str(error)})
                progress.advance(task)
                continue
            probabilities[row.video] = {}
            if frames is not None:
                if preprocess is not None:
                    frames = preprocess_frames(frames, preprocess)
                key_frames[row.video] = key_frame(boxes, len(frames))
                probabilities[row.video] = roi_probabilities(
                    frames, boxes, bundle.keyframe, image_size=size, batch_size=BATCH_SIZE
                )
            progress.advance(task)

    failed = {f["video"] for f in failures}
    scored_rows = [row for row in rows if row.video not in failed]
    modes = mode_scores(scored_rows, key_frames, probabilities, read_sweep_directions(site.root))
    records = [_record(row, modes[row.video], wauve) for row in scored_rows]

    out.mkdir(parents=True, exist_ok=True)
    columns = (*SCORE_COLUMNS, WAUVE_COLUMN) if wauve is not None else SCORE_COLUMNS
    with (out / "scores.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
    metrics = {
        **info,
        **keyframe_metrics(records, threshold=threshold),
        "n_videos": len(rows),
        "n_failed": len(failures),
        "failed": failures,
        "skipped_rows": [asdict(problem) for problem in site.problems],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    _plot_rocs(out / "roc.png", records, metrics)
    aucs = ", ".join(
        f"{mode} {_fmt(metrics['modes'][mode]['video_level']['auc'])}" for mode in KEYFRAME_MODES
    )
    return (
        f"{len(records)} videos scored ({metrics['n_no_roi']} without a lesion box, "
        f"{len(failures)} unreadable); AUC {aucs} -> {out}"
    )


def _fmt(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.3f}"


def _record(row: ManifestRow, scores: Any, wauve: dict[str, str] | None) -> dict[str, Any]:
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
        "vendor": row.vendor,
        "birads": row.birads,
        "age": row.age,
        "lesion_size_mm": row.lesion_size_mm,
    }
    if wauve is not None:
        record[WAUVE_COLUMN] = wauve.get(row.video) or None
    return record


def keyframe_metrics(records: list[dict[str, Any]], *, threshold: float) -> dict[str, Any]:
    """Per mode, discrimination over the videos with a ROI and with the 0.0 fallback."""
    from deploy.predict_cli import FALLBACK_SCORE, _discrimination

    with_roi = [r for r in records if not r["no_roi"]]
    labels = np.array([r["label"] == "malignant" for r in with_roi], dtype=bool)
    all_labels = np.array([r["label"] == "malignant" for r in records], dtype=bool)
    modes = {}
    for mode in KEYFRAME_MODES:
        column = f"score_{mode}"
        scores = np.array([r[column] for r in with_roi], dtype=float)
        fallback = np.array(
            [FALLBACK_SCORE if r["no_roi"] else r[column] for r in records], dtype=float
        )
        modes[mode] = {
            "video_level": _discrimination(labels, scores, threshold=threshold),
            "with_fallback": {
                "fallback_score": FALLBACK_SCORE,
                **_discrimination(all_labels, fallback, threshold=threshold),
            },
        }
    return {
        "boxes_source": "gt",
        "n_scored": len(records),
        "n_no_roi": len(records) - len(with_roi),
        "no_roi_videos": [r["video"] for r in records if r["no_roi"]],
        "no_roi_handling": NO_ROI_HANDLING,
        "n_single_view": sum(r["n_keyframe2_views"] == 1 for r in with_roi),
        "keyframe2_handling": KEYFRAME2_HANDLING,
        "modes": modes,
    }


def _read_wauve_scores(path: Path) -> dict[str, str]:
    """``{video: score}`` from a WAUVE ``scores.csv`` (blank where no lesion was tracked)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not {"video", "score"} <= set(reader.fieldnames or []):
                raise DataError(f"{path}: not a WAUVE scores.csv (needs video and score columns)")
            return {row["video"]: row["score"] for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable scores.csv: {error}") from None


def _plot_rocs(path: Path, records: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    from common.metrics import roc_curve
    from deploy.plots import RocLine, write_roc_png

    with_roi = [r for r in records if not r["no_roi"]]
    labels = np.array([r["label"] == "malignant" for r in with_roi], dtype=bool)
    lines = [
        RocLine(
            label=f"{mode}: AUC {block['auc']:.3f}",
            curve=roc_curve(
                labels, np.array([r[f"score_{mode}"] for r in with_roi], dtype=float), direction="<"
            ),
        )
        for mode in KEYFRAME_MODES
        if (block := metrics["modes"][mode]["video_level"])["auc"] is not None
    ]
    title = f"2D key-frame model, {len(with_roi)} videos ({metrics['n_no_roi']} without ROI)"
    write_roc_png(path, lines, title=title)
