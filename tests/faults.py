"""Damage a synthetic site's data folder the way real exports go wrong (test helper)."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.data.manifest import BOXES, MANIFEST


@dataclass(frozen=True)
class Damage:
    """What ``damage_site`` broke, relative to the site folder.

    Attributes
    ----------
    train_video, val_video : str
        Videos truncated to half their bytes (their patients keep another video).
    bad_label_line : int
        1-based manifest line whose label is now outside the schema.
    cut_box_line : int
        1-based line of ``boxes.csv`` cut mid-row (the file's last line, 3 fields left).
    """

    train_video: str
    val_video: str
    bad_label_line: int
    cut_box_line: int


def damage_site(root: Path) -> Damage:
    """Truncate a train and a val video, put a label outside the schema and cut
    ``boxes.csv`` mid-row. Patients with two videos are picked, so every patient keeps
    one usable video and the site can still train and validate."""
    with (root / MANIFEST).open(newline="") as f:
        rows = list(csv.DictReader(f))
    videos_of = Counter(row["patient_id"] for row in rows)
    twice = [
        (line, row) for line, row in enumerate(rows, start=2) if videos_of[row["patient_id"]] > 1
    ]
    train = [(line, row) for line, row in twice if row["split"] == "train"]
    val = [row for _, row in twice if row["split"] == "val"]
    if len(train) < 3 or not val or train[0][1]["patient_id"] == train[-1][1]["patient_id"]:
        raise ValueError(f"{root}: need two train patients and a val patient with two videos")

    train_video, val_video = train[0][1]["video"], val[0]["video"]
    for video in (train_video, val_video):
        data = (root / video).read_bytes()
        (root / video).write_bytes(data[: len(data) // 2])  # the MP4's index is at its end

    bad_line, bad_row = train[-1]  # another patient's video, so its sibling still trains
    lines = (root / MANIFEST).read_text().splitlines(keepends=True)
    lines[bad_line - 1] = lines[bad_line - 1].replace(f",{bad_row['label']},", ",suspicious,", 1)
    (root / MANIFEST).write_text("".join(lines))

    box_lines = (root / BOXES).read_text().splitlines(keepends=True)
    last = box_lines[-1]
    box_lines[-1] = ",".join(last.split(",")[:3])  # e.g. "videos/x.mp4,13,3", no newline
    (root / BOXES).write_text("".join(box_lines))
    return Damage(train_video, val_video, bad_line, len(box_lines))
