"""``busfed evaluate`` of a WAUVE model: the video pipeline's risk score for each video.

Boxes come from the detector, or with ``boxes_source="gt"`` from the site's annotations (to
measure the classifier alone). A video where no lesion is tracked has no score; the
discrimination excludes it from ``video_level`` and gives it the fallback score in
``with_fallback`` (see ``discrimination``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.evaluation.discrimination import (
    FALLBACK_SCORE,
    biopsy_threshold,
    with_and_without_fallback,
)
from common.evaluation.scoring import (
    Progress,
    VideoEvaluation,
    manifest_columns,
    run_summary,
    score_videos,
)
from common.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData
    from common.models.bundle import WauveBundle
    from common.pipeline.run import VideoResult

SCORE_COLUMNS = (
    "video", "patient_id", "label", "score", "category", "n_tracks", "n_clips",
    "no_lesion_tracked", "vendor", "birads", "age", "lesion_size_mm",
)  # fmt: skip


def evaluate_wauve_videos(
    bundle: WauveBundle,
    site: SiteData,
    rows: Sequence[ManifestRow],
    *,
    config: PipelineConfig,
    info: dict[str, Any],
    progress: Progress | None = None,
) -> VideoEvaluation:
    """Score ``rows`` with the pipeline; ``info`` (model, data, split) goes into metrics.json."""
    from common.data.video import read_video
    from common.pipeline.run import run_pipeline

    scored, failures = score_videos(
        rows,
        lambda row: read_video(site.path(row)),
        lambda row, frames: run_pipeline(
            frames, bundle, config, gt_boxes=site.boxes.get(row.video, {})
        ),
        progress=progress,
    )
    records = [score_row(row, result) for row, result in scored]
    metrics = {
        **video_metrics(records, config),
        **info,
        "pipeline": config.to_dict(),
        **run_summary(site, rows, failures),
    }
    return VideoEvaluation(SCORE_COLUMNS, records, metrics, failures)


def score_row(row: ManifestRow, result: VideoResult) -> dict[str, Any]:
    """One line of scores.csv."""
    return {
        "video": row.video,
        "patient_id": row.patient_id,
        "label": row.label,
        "score": result.score,
        "category": result.category,
        "n_tracks": len(result.tracks),
        "n_clips": len(result.clips),
        "no_lesion_tracked": result.no_lesion_tracked,
        **manifest_columns(row),
    }


def video_metrics(records: list[dict[str, Any]], config: PipelineConfig) -> dict[str, Any]:
    """Video-level discrimination; videos without a tracked lesion are excluded, and counted."""
    untracked = [r["video"] for r in records if r["no_lesion_tracked"]]
    return {
        "n_scored": len(records),
        "n_no_lesion_tracked": len(untracked),
        "no_lesion_tracked_videos": untracked,
        "no_lesion_tracked_handling": (
            "video_level excludes videos without a tracked lesion (they have no score); "
            f"with_fallback gives them score {FALLBACK_SCORE} (nothing suspicious found) "
            "and keeps every scored video"
        ),
        **with_and_without_fallback(
            records,
            column="score",
            unscored="no_lesion_tracked",
            threshold=biopsy_threshold(config.birads),
        ),
    }
