"""``busfed site ingest``: turn a hospital's export into a de-identified site dataset.

Two kinds of export are read:

**Videos** (``SRC/**/*.avi|mp4|mov|mkv``, any codec PyAV decodes, e.g. MJPEG AVI) with

- an annotation CSV (``--annotations``), one row per video file, columns
  ``file, patient_id, label`` and the optional ``birads, age, lesion_size_mm, vendor,
  split``: ``file`` is the video's path relative to ``SRC`` (``/`` separators),
  ``patient_id`` the hospital's identifier (it never reaches the output), ``label``
  ``benign`` or ``malignant``, ``split`` ``train``, ``val`` or ``test`` (blank: drawn from
  the patient's pseudonym, 70/15/15, so all of a patient's videos share it); other
  columns are ignored;
- a box CSV (``--boxes``; by default ``boxes.csv`` beside the annotations, if present),
  columns ``file, frame, x1, y1, x2, y2``: 0-based frame index and pixel edges in the
  source video's frames (``0 <= x1 < x2 <= width``). Videos without boxes are kept.

**Key frames** (``--key-frames``): still images sorted by label, as BUSI is laid out:
``SRC/benign/*``, ``SRC/malignant/*`` and ``SRC/normal/*`` (PNG, JPEG, BMP or TIFF; a
``normal`` image becomes ``benign`` with BI-RADS ``1``, as for a normal sweep). Each image
becomes a one-frame video, which ``load_site`` reads like any other (the 2D key-frame
model's input; the video classifier needs 8 frames and skips them). The annotation CSV is
optional here: a row may give the patient, BI-RADS, age, size, vendor and split of an
image (``file`` as ``benign/x.png``; a ``label``, if given, must match the folder). An
image without a ``patient_id`` counts as its own patient, which overstates the number
of patients if one woman has several images: the summary warns, since the privacy unit
is the patient.

The output ``--out`` is a site dataset (``common.data.manifest``): ``manifest.csv``,
``boxes.csv`` and ``videos/<hash>.mp4`` (H.264, metadata-free, burned-in text masked,
odd sizes padded with black at the bottom and right). Patient ids are pseudonyms
(``client.deid``), ages above 89 are written as 90 (HIPAA Safe Harbor), and no source file
name appears in it. Source files are only read.

Each run is incremental: ``--out/.ingest-state.json`` keeps, per source file (keyed by a
keyed hash of its path), a SHA-256 of its content, its annotation and boxes and the
settings; a file whose digest is unchanged and whose output exists is not processed again.
Changing the secret or the de-identification settings redoes every file; outputs of
files that left the export (or whose annotation became invalid) are deleted.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from client import deid
from common.data.manifest import BOX_COLUMNS, BOXES, MANIFEST, OPTIONAL_COLUMNS, ManifestRow
from common.data.video import probe_video, read_video, write_video
from common.errors import DataError, UsageError
from common.files import atomic_path, write_atomic

VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mov", ".mkv"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# Key-frame folder -> (label, BI-RADS category when the annotations give none).
KEY_FRAME_FOLDERS: dict[str, tuple[str, str | None]] = {
    "benign": ("benign", None),
    "malignant": ("malignant", None),
    "normal": ("benign", "1"),
}
ANNOTATION_REQUIRED = ("file", "patient_id", "label")
ANNOTATION_OPTIONAL = ("birads", "age", "lesion_size_mm", "vendor", "split")
BOX_FILE_COLUMNS = ("file", "frame", "x1", "y1", "x2", "y2")
MANIFEST_COLUMNS = ("video", "patient_id", "label", *OPTIONAL_COLUMNS, "split")
STATE_FILE = ".ingest-state.json"
# Bump when processing changes what a file turns into: every file is then redone.
INGEST_VERSION = 1
DEFAULT_FPS = 10  # where a container does not state its rate
MAX_AGE = 90  # HIPAA Safe Harbor: ages over 89 are one category
SPLIT_SHARES = (("train", 0.70), ("val", 0.85), ("test", 1.0))  # cumulative

FileBox = tuple[int, float, float, float, float]  # frame, x1, y1, x2, y2


@dataclass(frozen=True)
class Rejected:
    """A source file left out of the dataset, with why (``file`` relative to SRC)."""

    file: str
    reason: str


@dataclass(frozen=True)
class Ingested:
    """A source file written to the dataset this run."""

    file: str
    video: str
    mask: deid.TextMask


@dataclass
class IngestReport:
    """What one ``ingest`` run did.

    Attributes
    ----------
    processed : list[Ingested]
        Files decoded, de-identified and written this run.
    unchanged : int
        Files kept from an earlier run: neither they, their annotation nor the settings
        changed (unchanged rejected files are counted in ``rejected`` only).
    rejected : list[Rejected]
        Every file left out, with the reason (also those rejected on an earlier run).
    removed : int
        Outputs deleted because their source left the export or became invalid.
    videos : int
        Videos in the written manifest.
    masks : list[TextMask]
        The burned-in text masked in each of those videos (this run or an earlier one).
    warnings : list[str]
        Things to look at that did not reject a file.
    """

    processed: list[Ingested] = field(default_factory=list)
    unchanged: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    removed: int = 0
    videos: int = 0
    masks: list[deid.TextMask] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Reject(Exception):
    """A file cannot be ingested; the message is the reason."""


@dataclass
class _Plan:
    """A source file with its validated manifest fields and boxes, before processing."""

    file: str
    path: Path
    key: str
    row: dict[str, Any]
    boxes: list[tuple[int, FileBox]]  # (line in the box file, box)


# ------------------------------------------------------------------ reading the export


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


def _read_annotations(
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
                f"annotated twice in {path.name} (lines {rows[file][0]} and {line}); keep one row"
            )
            continue
        rows[file] = (line, record)
    return rows


def _read_boxes(path: Path, rejected: dict[str, str]) -> dict[str, list[tuple[int, FileBox]]]:
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


def _sources(src: Path, *, key_frames: bool) -> tuple[list[str], list[Rejected]]:
    """Source files relative to ``src``, sorted; in key-frame mode, misplaced images."""
    if not key_frames:
        files = [
            p.relative_to(src).as_posix()
            for p in src.rglob("*")
            if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
        ]
        return sorted(files), []
    files, misplaced = [], []
    for p in src.rglob("*"):
        if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            continue
        file = p.relative_to(src).as_posix()
        if file.split("/", 1)[0] in KEY_FRAME_FOLDERS and "/" in file:
            files.append(file)
        else:
            misplaced.append(
                Rejected(file, f"not in a label folder ({', '.join(KEY_FRAME_FOLDERS)}) under SRC")
            )
    return sorted(files), sorted(misplaced, key=lambda r: r.file)


def _derived_split(pseudonym: str) -> str:
    """Train/val/test drawn from the pseudonym, so a patient's files share one split."""
    u = int(hashlib.sha256(pseudonym.encode()).hexdigest()[:8], 16) / 16**8
    return next(split for split, bound in SPLIT_SHARES if u < bound)


def _validate_row(
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
    _Reject
        Naming the annotation file, line and field.
    """
    raw = {k: (record or {}).get(k, "") for k in ("patient_id", "label", *ANNOTATION_OPTIONAL)}
    derived_patient = False
    if key_frames:
        label, birads = KEY_FRAME_FOLDERS[file.split("/", 1)[0]]
        if raw["label"] and raw["label"] != label:
            raise _Reject(
                f"{where}, field label: {raw['label']!r} disagrees with the folder "
                f"({file.split('/', 1)[0]} = {label})"
            )
        raw["label"] = label
        raw["birads"] = raw["birads"] or (birads or "")
        if not raw["patient_id"]:
            raw["patient_id"], derived_patient = f"file:{file}", True
    if not raw["patient_id"]:
        raise _Reject(f"{where}, field patient_id: empty")
    pseudonym = deid.pseudonymise(raw["patient_id"], secret)
    raw["split"] = raw["split"] or _derived_split(pseudonym)
    try:
        row = ManifestRow.model_validate({**raw, "video": "pending", "patient_id": pseudonym})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        column = str(error["loc"][0]) if error["loc"] else "row"
        message = error["msg"].removeprefix("Value error, ")
        raise _Reject(f"{where}, field {column}: {message} (got {raw.get(column)!r})") from exc
    fields = row.model_dump(exclude={"video"})
    if fields["age"] is not None:
        fields["age"] = min(fields["age"], MAX_AGE)
    return fields, derived_patient


# ------------------------------------------------------------------ processing one file


def _load_frames(path: Path, *, key_frame: bool) -> tuple[np.ndarray, int]:
    """``(uint8 [T, H, W], fps)`` of a source file; ``_Reject`` if it cannot be read."""
    if key_frame:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("L"))[None], 1
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise _Reject(f"unreadable image: {exc}") from exc
    try:
        frames = read_video(path)
        fps = probe_video(path).fps
    except DataError as exc:
        raise _Reject(f"unreadable video: {str(exc).replace(str(path) + ': ', '')}") from exc
    return frames, max(1, round(fps)) if fps else DEFAULT_FPS


def _check_boxes(
    boxes: list[tuple[int, FileBox]], frames: np.ndarray, boxes_name: str
) -> list[FileBox]:
    """The boxes of a file, checked against its frames; ``_Reject`` names the first bad one."""
    count, height, width = frames.shape
    seen: dict[int, int] = {}
    checked: list[FileBox] = []
    for line, (frame, x1, y1, x2, y2) in boxes:
        where = f"{boxes_name} line {line}"
        if not 0 <= frame < count:
            raise _Reject(f"{where}, field frame: {frame} is outside the video (0..{count - 1})")
        if frame in seen:
            raise _Reject(
                f"{where}, field frame: a second box for frame {frame} (line {seen[frame]})"
            )
        for column, value, limit in (
            ("x1", x1, width), ("y1", y1, height), ("x2", x2, width), ("y2", y2, height),
        ):  # fmt: skip
            if not 0 <= value <= limit:
                raise _Reject(
                    f"{where}, field {column}: box outside the frame ({column} = {value:g}, "
                    f"frame is {width} x {height})"
                )
        if x1 >= x2 or y1 >= y2:
            raise _Reject(f"{where}: empty box (need x1 < x2 and y1 < y2)")
        seen[frame] = line
        checked.append((frame, x1, y1, x2, y2))
    return sorted(checked)


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad with black rows/columns at the bottom/right to even sizes (yuv420p needs them)."""
    _, height, width = frames.shape
    if height % 2 == 0 and width % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2)))


def _process(plan: _Plan, out: Path, *, key_frames: bool, boxes_name: str) -> dict[str, Any]:
    """Decode, check, mask and re-encode one file; the state record of its output."""
    frames, fps = _load_frames(plan.path, key_frame=key_frames)
    boxes = _check_boxes(plan.boxes, frames, boxes_name)
    masked, found = deid.mask_text(frames)
    video = f"videos/{plan.key[:24]}.mp4"
    target = out / video
    target.parent.mkdir(parents=True, exist_ok=True)
    # The mp4 muxer is chosen explicitly, so the temporary name's suffix does not matter.
    with atomic_path(target) as tmp:
        write_video(tmp, _even(masked), fps=fps)
    return {
        "video": video,
        "boxes": [list(b) for b in boxes],
        "mask": asdict(found),
    }


# ------------------------------------------------------------------ state


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings_fingerprint(secret: bytes, *, key_frames: bool) -> str:
    settings = {
        "version": INGEST_VERSION,
        "key_frames": key_frames,
        "secret": deid.secret_fingerprint(secret),
        "deid": [
            deid.DARK_LEVEL, deid.MIN_TEXT_LEVEL, deid.STROKE_RELATIVE, deid.MIN_STROKE_PIXELS,
            deid.MIN_DARK_FRACTION, deid.MAX_MID_FRACTION, deid.BLANK_FRACTION,
            deid.TOP_SEARCH, deid.BOTTOM_SEARCH,
        ],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.exists():
        return {"settings": "", "files": {}}
    try:
        state = json.loads(path.read_text())
        state["files"] = dict(state["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: unreadable ingest state ({exc}); delete the folder's contents to "
            "ingest from scratch"
        ) from exc
    return state


def _save_state(out: Path, state: dict[str, Any]) -> None:
    """Write atomically: an interrupted run resumes from the last file it finished."""
    write_atomic(out / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ------------------------------------------------------------------ the run


def _check_folders(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise UsageError(f"{src}: SRC is not a folder")
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise UsageError(
            f"--out {out} and SRC {src} overlap; write the site dataset to a folder of its own"
        )
    if out.exists() and any(out.iterdir()) and not (out / STATE_FILE).exists():
        raise UsageError(
            f"{out}: not empty and not written by `busfed site ingest` (no {STATE_FILE}); "
            "choose a new folder"
        )


def ingest(
    src: Path,
    out: Path,
    *,
    secret: bytes,
    annotations: Path | None,
    boxes: Path | None,
    key_frames: bool,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Build or update the de-identified site dataset ``out`` from the export ``src``.

    Parameters
    ----------
    src : Path
        The export: videos anywhere below it, or (``key_frames``) label folders of images.
    out : Path
        The site dataset folder; created, or one an earlier ingest wrote.
    secret : bytes
        The site's pseudonymisation key (``client.deid.load_secret``).
    annotations : Path or None
        Annotation CSV (see the module docstring); required for videos.
    boxes : Path or None
        Box CSV; None reads ``boxes.csv`` beside ``annotations`` if it exists.
    key_frames : bool
        Read ``src`` as label folders of key-frame images.
    progress : callable, optional
        ``progress(done, total)`` after each file is looked at.

    Returns
    -------
    IngestReport

    Raises
    ------
    UsageError
        Bad folders or options.
    DataError
        The annotation or box CSV, or the state file, cannot be read.
    """
    _check_folders(src, out)
    if annotations is None and not key_frames:
        raise UsageError("--annotations is required for videos (optional with --key-frames)")
    if boxes is None and annotations is not None and (annotations.parent / "boxes.csv").is_file():
        boxes = annotations.parent / "boxes.csv"
    report = IngestReport()
    early: dict[str, str] = {}  # file -> reason, found before any file is opened
    rows = (
        _read_annotations(annotations, ("file",) if key_frames else ANNOTATION_REQUIRED, early)
        if annotations is not None
        else {}
    )
    file_boxes = _read_boxes(boxes, early) if boxes is not None else {}
    boxes_name = boxes.name if boxes is not None else "boxes.csv"
    files, misplaced = _sources(src, key_frames=key_frames)
    report.rejected += misplaced
    present = set(files)
    annotations_name = annotations.name if annotations is not None else "annotations"
    for file, (line, _) in rows.items():
        if file not in present and file not in early:
            early[file] = f"listed in {annotations_name} line {line}, but not found in SRC"
    orphans = sorted(set(file_boxes) - present)
    if orphans:
        report.warnings.append(
            f"{boxes_name}: boxes for {len(orphans)} file(s) not in SRC were ignored "
            f"(first: {orphans[0]})"
        )

    plans: list[_Plan] = []
    derived = 0
    for file in files:
        if file in early:
            continue
        record = rows.get(file)
        if record is None and not key_frames:
            early[file] = f"no row for this file in {annotations_name}"
            continue
        where = f"{annotations_name} line {record[0]}" if record else file
        try:
            fields, was_derived = _validate_row(
                file, record[1] if record else None, where, key_frames=key_frames, secret=secret
            )
        except _Reject as exc:
            early[file] = str(exc)
            continue
        derived += was_derived
        key = deid.keyed_hash(secret, "file", file)[:32]
        plans.append(_Plan(file, src / file, key, fields, file_boxes.get(file, [])))
    plans = _drop_split_leaks(plans, early)
    report.rejected += [Rejected(file, reason) for file, reason in early.items()]
    if derived:
        report.warnings.append(
            f"{derived} image(s) have no patient_id and count as one patient each; if a "
            "patient has several images, give her id in --annotations (the privacy unit is "
            "the patient)"
        )

    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out)
    settings = _settings_fingerprint(secret, key_frames=key_frames)
    old_files: dict[str, Any] = state["files"]
    if state["settings"] != settings:
        # Nothing earlier is reusable, but its outputs stay tracked (to be replaced or
        # removed), also in the state an interrupted run leaves behind.
        old_files = {key: {**entry, "digest": ""} for key, entry in old_files.items()}
    new_files: dict[str, Any] = {}
    state = {"settings": settings, "files": new_files}
    manifest: list[tuple[Any, ...]] = []
    box_rows: list[tuple[Any, ...]] = []
    for done, plan in enumerate(plans, start=1):
        entry = _refresh_entry(plan, old_files.get(plan.key), out)
        if "result" not in entry:
            try:
                entry["result"] = _process(plan, out, key_frames=key_frames, boxes_name=boxes_name)
            except _Reject as exc:
                entry["result"] = {"rejected": str(exc)}
            new_files[plan.key] = entry
            _save_state(out, {**state, "files": {**old_files, **new_files}})
            if "video" in entry["result"]:
                report.processed.append(
                    Ingested(plan.file, entry["result"]["video"], _mask(entry["result"]))
                )
        else:
            new_files[plan.key] = entry
            report.unchanged += "video" in entry["result"]
        result = entry["result"]
        if "rejected" in result:
            report.rejected.append(Rejected(plan.file, result["rejected"]))
        else:
            manifest.append((result["video"], *(plan.row[c] for c in MANIFEST_COLUMNS[1:])))
            report.masks.append(_mask(result))
            box_rows += [
                (result["video"], frame, *(f"{v:g}" for v in coords))
                for frame, *coords in result["boxes"]
            ]
        if progress is not None:
            progress(done, len(plans))

    report.removed = _remove_stale(out, old_files, new_files)
    _save_state(out, state)
    _write_csv(out / MANIFEST, MANIFEST_COLUMNS, sorted(_blank(row) for row in manifest))
    _write_csv(out / BOXES, BOX_COLUMNS, sorted(box_rows, key=lambda r: (r[0], r[1])))
    report.videos = len(manifest)
    report.rejected.sort(key=lambda r: r.file)
    return report


def _blank(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple("" if value is None else value for value in row)


def _mask(result: dict[str, Any]) -> deid.TextMask:
    return deid.TextMask(**result["mask"])


def _refresh_entry(plan: _Plan, old: dict[str, Any] | None, out: Path) -> dict[str, Any]:
    """The file's state entry; with ``result`` only if the old result still holds.

    The content hash is reused while size and modification time are unchanged (as rsync
    does), so an unchanged export is not read again.
    """
    stat = plan.path.stat()
    signature = [stat.st_size, stat.st_mtime_ns]
    if old is not None and old.get("stat") == signature:
        content = old["content"]
    else:
        content = _file_sha256(plan.path)
    # Line numbers stay out: a row added above must not redo every file below it.
    boxes = [box for _, box in plan.boxes]
    digest = hashlib.sha256(json.dumps([content, plan.row, boxes], sort_keys=True).encode())
    entry: dict[str, Any] = {"stat": signature, "content": content, "digest": digest.hexdigest()}
    if old is not None and old.get("digest") == entry["digest"]:
        result = old.get("result", {})
        if "rejected" in result or (out / result.get("video", "\0")).is_file():
            entry["result"] = result
    return entry


def _remove_stale(out: Path, old: dict[str, Any], new: dict[str, Any]) -> int:
    """Delete outputs no current entry points to; returns how many."""
    kept = {e["result"].get("video") for e in new.values()}
    removed = 0
    for entry in old.values():
        video = entry.get("result", {}).get("video")
        # Only names this module writes are ever deleted.
        if video and video not in kept and PurePosixPath(video).parent.as_posix() == "videos":
            path = out / video
            if path.is_file():
                path.unlink()
                removed += 1
    return removed


def _drop_split_leaks(plans: list[_Plan], rejected: dict[str, str]) -> list[_Plan]:
    """Reject every file of a patient found in more than one split (a train/test leak)."""
    splits: dict[str, set[str]] = defaultdict(set)
    for plan in plans:
        splits[plan.row["patient_id"]].add(plan.row["split"])
    kept = []
    for plan in plans:
        seen = splits[plan.row["patient_id"]]
        if len(seen) > 1:
            rejected[plan.file] = (
                f"field split: this patient's files are in more than one split "
                f"({', '.join(sorted(seen))}); give them one"
            )
        else:
            kept.append(plan)
    return kept
