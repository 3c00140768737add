"""Scoring a site's videos one by one, and what ``busfed evaluate`` writes for any model kind.

``score_videos`` is the one loop both model kinds use: a video that cannot be read is listed
with its error and the evaluation goes on; an error while scoring a read video is not caught.
``VideoEvaluation.write`` writes ``scores.csv`` (one row per scored video, in manifest order,
blank where a value is None) and ``metrics.json`` (strict JSON: no NaN).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from common.errors import DataError

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow, SiteData

Frames = TypeVar("Frames")
Score = TypeVar("Score")
# Called before and after each video with the number of videos done and the video's name.
Progress = Callable[[int, str], None]


@dataclass(frozen=True)
class VideoEvaluation:
    """A model's scores of a site's videos and their discrimination.

    Attributes
    ----------
    columns : tuple of str
        The columns of scores.csv.
    records : list of dict
        One row of scores.csv per scored video, in manifest order.
    metrics : dict
        The content of metrics.json.
    failures : list of dict
        ``video`` and ``error`` of each video that could not be read.
    """

    columns: tuple[str, ...]
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    failures: list[dict[str, str]]

    def write(self, out: Path) -> None:
        """Write ``out/scores.csv`` and ``out/metrics.json``, making ``out`` if needed."""
        out.mkdir(parents=True, exist_ok=True)
        with (out / "scores.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, self.columns, lineterminator="\n")
            writer.writeheader()
            for record in self.records:
                writer.writerow({k: "" if v is None else v for k, v in record.items()})
        text = json.dumps(self.metrics, indent=2, allow_nan=False) + "\n"
        (out / "metrics.json").write_text(text)


def score_videos(
    rows: Sequence[ManifestRow],
    read: Callable[[ManifestRow], Frames],
    score: Callable[[ManifestRow, Frames], Score],
    *,
    progress: Progress | None = None,
) -> tuple[list[tuple[ManifestRow, Score]], list[dict[str, str]]]:
    """``score(row, read(row))`` for each row, in order.

    Returns
    -------
    tuple of list and list
        ``(row, score)`` of each video read, and ``{"video", "error"}`` of each video whose
        ``read`` raised ``DataError``.
    """
    scored: list[tuple[ManifestRow, Score]] = []
    failures: list[dict[str, str]] = []
    for done, row in enumerate(rows):
        if progress is not None:
            progress(done, row.video)
        try:
            frames = read(row)
        except DataError as error:
            # One unreadable video must not end an evaluation; it is listed.
            failures.append({"video": row.video, "error": str(error)})
        else:
            scored.append((row, score(row, frames)))
        if progress is not None:
            progress(done + 1, row.video)
    return scored, failures


def run_summary(
    site: SiteData, rows: Sequence[ManifestRow], failures: list[dict[str, str]]
) -> dict[str, Any]:
    """The videos asked for, those that could not be read, and the manifest rows skipped."""
    return {
        "n_videos": len(rows),
        "n_failed": len(failures),
        "failed": failures,
        "skipped_rows": [asdict(problem) for problem in site.problems],
    }


def manifest_columns(row: ManifestRow) -> dict[str, Any]:
    """The manifest's descriptive columns of a scores-file row (``birads`` is the radiologist's)."""
    return {
        "vendor": row.vendor,
        "birads": row.birads,
        "age": row.age,
        "lesion_size_mm": row.lesion_size_mm,
    }
