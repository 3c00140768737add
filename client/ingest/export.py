"""Reading a hospital's export: the annotation and box CSVs, the source files under SRC,
and each file's output manifest fields (validated, pseudonymised), before any file is
opened. The formats are described in ``client.ingest``.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from client import deid
from common.data.manifest import NORMAL_BIRADS, ManifestRow
from common.errors import DataError

VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mov", ".mkv"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# DICOM files are found by their preamble whatever their name; a file with one of these
# suffixes and no preamble is taken too, and rejected as not DICOM.
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
DICOM_PREAMBLE_END = 132  # 128 bytes of preamble, then "DICM"
# Key-frame folder -> (label, BI-RADS category when the annotations give none).
KEY_FRAME_FOLDERS: dict[str, tuple[str, str | None]] = {
    "benign": ("benign", None),
    "malignant": ("malignant", None),
    "normal": ("benign", NORMAL_BIRADS),
}
ANNOTATION_REQUIRED = ("file", "patient_id", "label")
ANNOTATION_OPTIONAL = ("birads", "age", "lesion_size_mm", "vendor", "split")
BOX_FILE_COLUMNS = ("file", "frame", "x1", "y1", "x2", "y2")
MAX_AGE = 90  # HIPAA Safe Harbor: ages over 89 are one category
SPLIT_SHARES = (("train", 0.70), ("val", 0.85), ("test", 1.0))  # cumulative

FileBox = tuple[int, float, float, float, float]  # frame, x1, y1, x2, y2


@dataclass(frozen=True)
class Rejected:
    """A source file left out of the dataset, with why (``file`` relative to SRC)."""

    file: str
    reason: str


class Reject(Exception):
    """A file cannot be ingested; the message is the reason."""


@dataclass
class Plan:
    """A source file with its validated manifest fields and boxes, before processing."""

    file: str
    path: Path
    key: str
    row: dict[str, Any]
    boxes: list[tuple[int, FileBox]]  # (line in the box file, box)
    where: str  # its annotation row ("annotations.csv line 7"), or the file without one


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line, {column: value})`` per data row; the header is line 1.

    Raises
    ------
    DataError
        The file is missing, not UTF-8, or lacks a required column.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in required if name not in header]
            if missing:
                raise DataError(f"{path}: missing required column(s): {', '.join(missing)}")
            reader.fieldnames = header
            for record in reader:
                if not any(isinstance(v, str) and v.strip() for v in record.values()):
                    continue
                yield reader.line_num, {k: (v or "").strip() for k, v in record.items() if k}
    except FileNotFoundError as exc:
        raise DataError(f"{path}: not found") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: unreadable CSV: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _relative(value: str) -> str:
    """A ``file`` cell as a relative POSIX path; ``ValueError`` if it leaves SRC."""
    path = PurePosixPath(value.replace("\\", "/"))
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a path relative to SRC, inside it")
    return path.as_posix()


def read_annotations(
    path: Path, required: tuple[str, ...], rejected: dict[str, str]
) -> dict[str, tuple[int, dict[str, str]]]:
    """``{file: (line, record)}``; duplicated or unusable rows go to ``rejected``."""
    rows: dict[str, tuple[int, dict[str, str]]] = {}
    for line, record in _csv_rows(path, required):
        try:
            file = _relative(record.get("file", ""))
        except ValueError as exc:
            rejected[f"{path.name} line {line}"] = f"{path.name} line {line}, field file: {exc}"
            continue
        if file in rows:
            rejected[file] = (
                f"{path.name} line {line}, field file: annotated twice (lines {rows[file][0]} "
                f"and {line}); keep one row"
            )
            continue
        rows[file] = (line, record)
    return rows


def read_boxes(path: Path, rejected: dict[str, str]) -> dict[str, list[tuple[int, FileBox]]]:
    """``{file: [(line, box)]}``; a malformed row rejects its file."""
    boxes: dict[str, list[tuple[int, FileBox]]] = defaultdict(list)
    for line, record in _csv_rows(path, BOX_FILE_COLUMNS):
        try:
            file = _relative(record["file"])
        except ValueError as exc:
            rejected[f"{path.name} line {line}"] = f"{path.name} line {line}, field file: {exc}"
            continue
        try:
            frame = int(record["frame"])
            coords = [float(record[c]) for c in ("x1", "y1", "x2", "y2")]
        except ValueError:
            bad = next(c for c in BOX_FILE_COLUMNS[1:] if not _is_number(record[c], c))
            rejected.setdefault(
                file, f"{path.name} line {line}, field {bad}: not a number ({record[bad]!r})"
            )
            continue
        boxes[file].append((line, (frame, *coords)))  # type: ignore[arg-type]
    return dict(boxes)


def _is_number(value: str, column: str) -> bool:
    try:
        int(value) if column == "frame" else float(value)
    except ValueError:
        return False
    return True


def is_dicom(path: Path) -> bool:
    """Whether the file starts with the DICOM preamble (128 bytes, then ``DICM``)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(DICOM_PREAMBLE_END)
    except OSError:
        return False
    return len(head) == DICOM_PREAMBLE_END and head[128:] == b"DICM"


def is_dicom_source(path: Path) -> bool:
    """A source to read as DICOM: named so, or starting with the DICOM preamble."""
    return path.suffix.lower() in DICOM_SUFFIXES or is_dicom(path)


def sources(src: Path, *, key_frames: bool) -> list[str]:
    """Source files anywhere under ``src``, relative, sorted: videos, or (``key_frames``)
    images, and DICOM files in either case."""
    suffixes = IMAGE_SUFFIXES if key_frames else VIDEO_SUFFIXES
    return sorted(
        p.relative_to(src).as_posix()
        for p in src.rglob("*")
        if p.is_file() and (p.suffix.lower() in suffixes or is_dicom_source(p))
    )


def label_folder(file: str) -> str | None:
    """The key-frame label folder (``benign``, ``malignant``, ``normal``) a file is in, if any."""
    folder, _, rest = file.partition("/")
    return folder if rest and folder in KEY_FRAME_FOLDERS else None


def _derived_split(pseudonym: str) -> str:
    """Train/val/test drawn from the pseudonym, so a patient's files share one split."""
    u = int(hashlib.sha256(pseudonym.encode()).hexdigest()[:8], 16) / 16**8
    return next(split for split, bound in SPLIT_SHARES if u < bound)


def validate_row(
    file: str,
    record: dict[str, str] | None,
    where: str,
    *,
    key_frames: bool,
    secret: bytes,
) -> tuple[dict[str, Any], bool]:
    """The output manifest fields of one file, and whether its patient id was derived.

    Raises
    ------
    Reject
        Naming the annotation file, line and field.
    """
    raw = {k: (record or {}).get(k, "") for k in ("patient_id", "label", *ANNOTATION_OPTIONAL)}
    derived_patient = False
    if key_frames:
        # A row's "normal" reads as the folder does: benign, BI-RADS 1 unless given.
        given = KEY_FRAME_FOLDERS.get(raw["label"], (raw["label"], None))
        folder = label_folder(file)
        if folder is not None:
            label, birads = KEY_FRAME_FOLDERS[folder]
            if raw["label"] and given[0] != label:
                raise Reject(
                    f"{where}, field label: {raw['label']!r} disagrees with the folder "
                    f"({folder} = {label})"
                )
        elif raw["label"]:
            label, birads = given  # an unknown label is refused by the schema below
        else:
            raise Reject(
                f"{where}, field label: empty, and the image is not in a label folder "
                f"({', '.join(KEY_FRAME_FOLDERS)}) under SRC"
            )
        raw["label"] = label
        raw["birads"] = raw["birads"] or (birads or "")
        if not raw["patient_id"]:
            raw["patient_id"], derived_patient = f"file:{file}", True
    if not raw["patient_id"]:
        raise Reject(f"{where}, field patient_id: empty")
    pseudonym = deid.pseudonymise(raw["patient_id"], secret)
    raw["split"] = raw["split"] or _derived_split(pseudonym)
    try:
        row = ManifestRow.model_validate({**raw, "video": "pending", "patient_id": pseudonym})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        column = str(error["loc"][0]) if error["loc"] else "row"
        message = error["msg"].removeprefix("Value error, ")
        raise Reject(f"{where}, field {column}: {message} (got {raw.get(column)!r})") from exc
    fields = row.model_dump(exclude={"video"})
    if fields["age"] is not None:
        fields["age"] = min(fields["age"], MAX_AGE)
    return fields, derived_patient


def drop_split_leaks(plans: list[Plan], rejected: dict[str, str]) -> list[Plan]:
    """Reject every file of a patient found in more than one split (a train/test leak)."""
    splits: dict[str, set[str]] = defaultdict(set)
    for plan in plans:
        splits[plan.row["patient_id"]].add(plan.row["split"])
    kept = []
    for plan in plans:
        seen = splits[plan.row["patient_id"]]
        if len(seen) > 1:
            rejected[plan.file] = (
                f"{plan.where}, field split: this patient's files are in more than one "
                f"split ({', '.join(sorted(seen))}); give them one"
            )
        else:
            kept.append(plan)
    return kept
