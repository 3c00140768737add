"""Load and validate a site dataset: ``manifest.csv``, ``boxes.csv`` and the videos.

A site folder holds

- ``manifest.csv``: one row per video, columns ``video, patient_id, label, split`` and the
  optional ``birads, age, lesion_size_mm, vendor`` (extra columns are ignored);
- ``boxes.csv``: lesion boxes, columns ``video, frame, x1, y1, x2, y2``: 0-based frame
  index and pixel coordinates (pixel edges, so ``0 <= x1 < x2 <= width``);
- the videos, at the paths the manifest gives relative to the folder.

``load_site`` validates once, at the edge, with pydantic, and returns plain objects. It
never stops on a bad row: each one is skipped and recorded as a ``Problem`` naming the
file, the 1-based line (the header is line 1) and the field. Only a file that cannot be
read as a table at all raises ``DataError``. ``write_manifest`` writes the two tables, for
the synthetic generator and ``busfed site ingest`` alike.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.data.video import VideoInfo, probe_video
from common.errors import DataError
from common.files import atomic_path
from common.geometry import Box

MANIFEST = "manifest.csv"
BOXES = "boxes.csv"
REQUIRED_COLUMNS = ("video", "patient_id", "label", "split")
OPTIONAL_COLUMNS = ("birads", "age", "lesion_size_mm", "vendor")
MANIFEST_COLUMNS = ("video", "patient_id", "label", *OPTIONAL_COLUMNS, "split")  # as written
BOX_COLUMNS = ("video", "frame", "x1", "y1", "x2", "y2")
BIRADS_CATEGORIES = ("0", "1", "2", "3", "4", "4A", "4B", "4C", "5", "6")
NORMAL_BIRADS = "1"  # negative: a sweep or image of normal tissue, labelled benign

Split = Literal["train", "val", "test"]


def _normalise_video(value: str) -> str:
    """A video path as a relative POSIX path inside the site folder."""
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError("the path must be relative and stay inside the site folder")
    return path.as_posix()


class ManifestRow(BaseModel):
    """One video of the manifest, validated."""

    model_config = ConfigDict(frozen=True, str_strip_whitespace=True)

    video: str = Field(min_length=1)
    patient_id: str = Field(min_length=1)
    label: Literal["benign", "malignant"]
    birads: str | None = None
    age: int | None = Field(default=None, ge=0, le=120)  # years
    lesion_size_mm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    vendor: str | None = None
    split: Split

    @field_validator(*OPTIONAL_COLUMNS, mode="before")
    @classmethod
    def _blank_is_missing(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("video", mode="after")
    @classmethod
    def _inside_site(cls, value: str) -> str:
        return _normalise_video(value)

    @field_validator("birads", mode="after")
    @classmethod
    def _known_category(cls, value: str | None) -> str | None:
        if value is None:
            return None
        category = value.upper()
        if category not in BIRADS_CATEGORIES:
            raise ValueError(f"not a BI-RADS category ({', '.join(BIRADS_CATEGORIES)})")
        return category


class _BoxRow(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    video: str = Field(min_length=1)
    frame: int = Field(ge=0)
    x1: float = Field(allow_inf_nan=False)
    y1: float = Field(allow_inf_nan=False)
    x2: float = Field(allow_inf_nan=False)
    y2: float = Field(allow_inf_nan=False)

    @field_validator("video", mode="after")
    @classmethod
    def _inside_site(cls, value: str) -> str:
        return _normalise_video(value)


@dataclass(frozen=True)
class Problem:
    """A skipped row or file.

    Attributes
    ----------
    file : str
        File name relative to the site folder: ``manifest.csv``, ``boxes.csv``, or a
        video that ``build_units`` could not read (then ``line`` is 0).
    line : int
        1-based line of the row in that file (the header is line 1); 0 for the whole file.
    field : str
        The column at fault, or ``row`` for the row as a whole.
    reason : str
        What is wrong, in words.
    """

    file: str
    line: int
    field: str
    reason: str


@dataclass
class SiteData:
    """A validated site dataset.

    Attributes
    ----------
    root : Path
        The site folder.
    rows : list[ManifestRow]
        The valid manifest rows, in file order.
    boxes : dict[str, dict[int, tuple[float, float, float, float]]]
        ``boxes[video][frame] = (x1, y1, x2, y2)`` in pixels, for videos in ``rows`` only.
    problems : list[Problem]
        Every skipped row, ordered by file and line.
    videos : dict[str, VideoInfo]
        Frame count, size and rate of each video in ``rows``, when the videos were checked.
    """

    root: Path
    rows: list[ManifestRow]
    boxes: dict[str, dict[int, Box]]
    problems: list[Problem]
    videos: dict[str, VideoInfo] = field(default_factory=dict)

    def videos_of(self, split: Split) -> list[ManifestRow]:
        """The rows (one per video) of ``split``, in file order."""
        return [row for row in self.rows if row.split == split]

    def patients(self, split: Split | None = None) -> dict[str, list[ManifestRow]]:
        """Rows grouped by patient id, for one split or (None) all of them."""
        grouped: dict[str, list[ManifestRow]] = defaultdict(list)
        for row in self.rows:
            if split is None or row.split == split:
                grouped[row.patient_id].append(row)
        return dict(grouped)

    def path(self, row: ManifestRow) -> Path:
        """The video file of ``row``."""
        return self.root / row.video


def write_manifest(
    root: Path, rows: Iterable[Sequence[object]], boxes: Iterable[Sequence[object]]
) -> None:
    """Write a site folder's ``manifest.csv`` and ``boxes.csv`` (see ``write_csv``).

    Parameters
    ----------
    root : Path
        The site folder (it exists).
    rows : iterable of sequences
        One per video, values in ``MANIFEST_COLUMNS`` order; None or ``""`` for a missing
        optional value.
    boxes : iterable of sequences
        One per box, values in ``BOX_COLUMNS`` order.
    """
    write_csv(root / MANIFEST, MANIFEST_COLUMNS, rows)
    write_csv(root / BOXES, BOX_COLUMNS, boxes)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a table atomically: UTF-8, ``\\n`` line ends, quoting only where needed.

    Values are written as ``str`` gives them (None as an empty cell), so callers format
    numbers the way they want them read back.
    """
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def load_site(root: Path, *, check_videos: bool = True) -> SiteData:
    """Read and validate a site folder, skipping and recording every bad row.

    Parameters
    ----------
    root : Path
        The site folder.
    check_videos : bool
        Open every video once (``probe_video``) to check that it decodes, and use its frame
        count and size to check the boxes. Without it, only the files' existence is checked.

    Returns
    -------
    SiteData

    Raises
    ------
    DataError
        ``root`` is not a folder, the manifest is missing, or the manifest or boxes file is
        not a readable UTF-8 CSV with the required columns.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    problems: list[Problem] = []
    rows, videos, rejected = _load_manifest(root, problems, check_videos=check_videos)
    boxes = _load_boxes(root, rows, videos, rejected, problems)
    problems.sort(key=lambda p: (p.file != MANIFEST, p.file, p.line))
    return SiteData(root=root, rows=rows, boxes=boxes, problems=problems, videos=videos)


def _load_manifest(
    root: Path, problems: list[Problem], *, check_videos: bool
) -> tuple[list[ManifestRow], dict[str, VideoInfo], dict[str, int]]:
    """Valid rows, probed videos, and the line of each video whose row was rejected."""
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")

    def problem(line: int, column: str, reason: str) -> None:
        problems.append(Problem(MANIFEST, line, column, reason))

    parsed: list[tuple[int, ManifestRow]] = []
    first_line: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for line, record in _records(path, REQUIRED_COLUMNS, OPTIONAL_COLUMNS, problem):
        try:
            row = ManifestRow.model_validate(record)
        except ValidationError as error:
            for column, reason in _reasons(error):
                problem(line, column, reason)
            with suppress(ValueError):
                rejected.setdefault(_normalise_video(record["video"].strip()), line)
            continue
        if row.video in first_line:
            problem(line, "video", f"duplicate of the row on line {first_line[row.video]}")
            continue
        first_line[row.video] = line
        parsed.append((line, row))

    # A patient in two splits leaks between training and evaluation; which split is right
    # cannot be told, so every row of that patient is rejected.
    splits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line, row in parsed:
        splits[row.patient_id][row.split].append(line)
    leaking = {patient: seen for patient, seen in splits.items() if len(seen) > 1}

    rows: list[ManifestRow] = []
    videos: dict[str, VideoInfo] = {}
    for line, row in parsed:
        fault: tuple[str, str] | None
        if row.patient_id in leaking:
            where = ", ".join(
                f"{split} (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})"
                for split, lines in leaking[row.patient_id].items()
            )
            fault = ("split", f"patient {row.patient_id} is in more than one split: {where}")
        else:
            fault = _video_fault(root, row.video, videos, check_videos=check_videos)
        if fault is None:
            rows.append(row)
        else:
            problem(line, *fault)
            rejected[row.video] = line
    return rows, videos, rejected


def _video_fault(
    root: Path, video: str, videos: dict[str, VideoInfo], *, check_videos: bool
) -> tuple[str, str] | None:
    """Why a row's video cannot be used, or None; records what a probe found in ``videos``."""
    path = root / video
    if not path.is_file():
        return "video", f"file not found: {video}"
    if check_videos:
        try:
            videos[video] = probe_video(path)
        except DataError as error:
            return "video", str(error).replace(str(path), video, 1)
    return None


def _load_boxes(
    root: Path,
    rows: list[ManifestRow],
    videos: dict[str, VideoInfo],
    rejected: dict[str, int],
    problems: list[Problem],
) -> dict[str, dict[int, Box]]:
    """Boxes of the valid videos; checks against frame counts and sizes where probed."""
    path = root / BOXES
    if not path.is_file():
        problems.append(Problem(BOXES, 0, "file", "not found: the videos have no lesion boxes"))
        return {}

    def problem(line: int, column: str, reason: str) -> None:
        problems.append(Problem(BOXES, line, column, reason))

    known = {row.video for row in rows}
    boxes: dict[str, dict[int, Box]] = {}
    box_line: dict[tuple[str, int], int] = {}
    orphans: dict[str, list[int]] = defaultdict(list)  # box lines of unusable videos
    for line, record in _records(path, BOX_COLUMNS, (), problem):
        try:
            box = _BoxRow.model_validate(record)
        except ValidationError as error:
            for column, reason in _reasons(error):
                problem(line, column, reason)
            continue
        if box.video not in known:
            orphans[box.video].append(line)
            continue
        if box.x1 >= box.x2:
            problem(line, "x1", f"x1 ({box.x1:g}) must be less than x2 ({box.x2:g})")
            continue
        if box.y1 >= box.y2:
            problem(line, "y1", f"y1 ({box.y1:g}) must be less than y2 ({box.y2:g})")
            continue
        info = videos.get(box.video)
        if info is not None:
            if box.frame >= info.frames:
                problem(
                    line,
                    "frame",
                    f"frame {box.frame} is past the video's end ({info.frames} frames, 0-based)",
                )
                continue
            outside = _outside(box, info)
            if outside is not None:
                problem(line, *outside)
                continue
        key = (box.video, box.frame)
        if key in box_line:
            problem(line, "frame", f"a second box for this frame (first on line {box_line[key]})")
            continue
        box_line[key] = line
        boxes.setdefault(box.video, {})[box.frame] = (box.x1, box.y1, box.x2, box.y2)

    # One problem per unusable video, not one per box: the cause is the video's row.
    for video, lines in orphans.items():
        if video in rejected:
            cause = f"its manifest row (line {rejected[video]}) was rejected"
        else:
            cause = f"{video} is not in the manifest"
        problem(lines[0], "video", f"{_count_lines(lines)} skipped: {cause}")
    return boxes


def _count_lines(lines: list[int]) -> str:
    """``'1 box row (line 7)'``, ``'9 box rows (lines 2-10)'`` or a short list of lines."""
    if len(lines) == 1:
        return f"1 box row (line {lines[0]})"
    if lines[-1] - lines[0] == len(lines) - 1:
        where = f"{lines[0]}-{lines[-1]}"
    else:
        where = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
    return f"{len(lines)} box rows (lines {where})"


def _outside(box: _BoxRow, info: VideoInfo) -> tuple[str, str] | None:
    """The first coordinate outside the frame, with the reason, or None."""
    for column, value, limit, axis in (
        ("x1", box.x1, info.width, "width"),
        ("y1", box.y1, info.height, "height"),
        ("x2", box.x2, info.width, "width"),
        ("y2", box.y2, info.height, "height"),
    ):
        if not 0 <= value <= limit:
            return column, f"{column} = {value:g} is outside the frame (0..{limit} {axis})"
    return None


def _records(
    path: Path,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    problem: Callable[[int, str, str], None],
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line, {column: value})`` for each data row of a CSV file.

    Only the ``required`` and ``optional`` columns are kept. Blank lines are skipped; a row
    with the wrong number of fields is reported through ``problem`` and skipped; a CSV
    syntax error is reported and ends the file.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise DataError(f"{path}: empty file, no header")
            missing = [name for name in required if name not in header]
            if missing:
                raise DataError(f"{path}: missing required column(s): {', '.join(missing)}")
            duplicated = sorted({name for name in header if header.count(name) > 1})
            if duplicated:
                raise DataError(f"{path}: duplicated column(s): {', '.join(duplicated)}")
            columns = [(i, name) for i, name in enumerate(header) if name in required + optional]
            end = reader.line_num
            while True:
                start = end + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as error:
                    problem(
                        reader.line_num, "row", f"unreadable CSV, rest of file skipped: {error}"
                    )
                    return
                end = reader.line_num
                if not fields or not any(value.strip() for value in fields):
                    continue
                if len(fields) != len(header):
                    problem(start, "row", f"{len(fields)} fields, the header has {len(header)}")
                    continue
                yield start, {name: fields[i] for i, name in columns}
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error


def _reasons(error: ValidationError) -> Iterator[tuple[str, str]]:
    """``(field, reason)`` for each error pydantic found in one row."""
    for item in error.errors(include_url=False):
        column = str(item["loc"][0]) if item["loc"] else "row"
        value = item.get("input")
        if value == "":
            yield column, "empty"
        else:
            yield column, f"{item['msg'].removeprefix('Value error, ')} (got {value!r})"
