"""``busfed evaluate``'s work: a site's videos scored by the model kind the bundle holds.

A key-frame bundle (the 2D comparator) reads the annotated ROIs (``keyframe``); any other
bundle must be WAUVE's, which runs the video pipeline (``wauve``). Either way the result is
a ``VideoEvaluation`` that writes the same two files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from common.evaluation.discrimination import biopsy_threshold
from common.evaluation.keyframe import evaluate_keyframe_videos
from common.evaluation.loading import as_wauve
from common.evaluation.scoring import Progress, VideoEvaluation
from common.evaluation.wauve import evaluate_wauve_videos
from common.models.bundle import KeyFrameBundle, ModelBundle
from common.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData


def evaluate_videos(
    bundle: ModelBundle,
    site: SiteData,
    rows: Sequence[ManifestRow],
    *,
    config: PipelineConfig,
    wauve: Mapping[str, str] | None,
    info: dict[str, Any],
    progress: Progress | None = None,
) -> VideoEvaluation:
    """Score ``rows`` of ``site`` and measure discrimination against their labels.

    Parameters
    ----------
    config : PipelineConfig
        WAUVE's pipeline; a key-frame model uses only its biopsy threshold and preprocessing.
    wauve : mapping, optional
        Key-frame model only: ``read_wauve_scores`` of a WAUVE evaluation of the same
        videos, copied in as ``score_wauve``.
    info : dict
        Model, data and split, written into metrics.json.
    progress : callable, optional
        Called with the number of videos done and the video's name, before and after each.

    Raises
    ------
    UsageError
        The bundle is of neither kind.
    """
    if isinstance(bundle, KeyFrameBundle):
        return evaluate_keyframe_videos(
            bundle, site, rows, threshold=biopsy_threshold(config.birads),
            preprocess=config.preprocess, wauve=wauve, info=info,
            progress=progress,
        )  # fmt: skip
    if wauve is not None:
        raise ValueError("WAUVE scores are copied into a key-frame model's evaluation only")
    return evaluate_wauve_videos(
        as_wauve(bundle, "busfed evaluate"), site, rows, config=config, info=info,
        progress=progress,
    )  # fmt: skip
