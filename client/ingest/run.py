"""One ``busfed site ingest`` run: plan every source file, process the new or changed ones,
keep the rest, and write the site dataset; the state file makes each run incremental.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from client import deid
from client.ingest import dicom
from client.ingest.convert import process
from client.ingest.export import (
    ANNOTATION_REQUIRED,
    Plan,
    Reject,
    Rejected,
    drop_split_leaks,
    is_dicom_source,
    label_folder,
    read_annotations,
    read_boxes,
    sources,
    validate_row,
)
from common.data.manifest import MANIFEST_COLUMNS, write_manifest
from common.errors import DataError, UsageError
from common.files import write_atomic

STATE_FILE = ".ingest-state.json"
# Each DICOM file's de-identification record (``client.ingest.dicom``), by output video.
DICOM_RECORDS = "dicom-deid.json"
# Bump when processing changes what a file turns into: every file is then redone.
INGEST_VERSION = 1


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
    dicom : int
        Videos in the manifest made from DICOM files (their records: ``DICOM_RECORDS``).
    """

    processed: list[Ingested] = field(default_factory=list)
    unchanged: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    removed: int = 0
    videos: int = 0
    masks: list[deid.TextMask] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dicom: int = 0


# ------------------------------------------------------------------ state


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings_fingerprint(secret: bytes, *, key_frames: bool, allow_burned_in: bool) -> str:
    settings = {
        "version": INGEST_VERSION,
        "key_frames": key_frames,
        "allow_burned_in": allow_burned_in,
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
    allow_burned_in: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Build or update the de-identified site dataset ``out`` from the export ``src``.

    Parameters
    ----------
    src : Path
        The export: videos anywhere below it, or (``key_frames``) images in label folders
        or anywhere with a label in ``annotations``.
    out : Path
        The site dataset folder; created, or one an earlier ingest wrote.
    secret : bytes
        The site's pseudonymisation key (``client.deid.load_secret``).
    annotations : Path or None
        Annotation CSV (see the module docstring); required for videos.
    boxes : Path or None
        Box CSV; None reads ``boxes.csv`` beside ``annotations`` if it exists.
    key_frames : bool
        Read ``src`` as key-frame images (see the module docstring), not videos.
    allow_burned_in : bool
        Take DICOM files that say BurnedInAnnotation YES and have no ultrasound region
        (``client.ingest.dicom``); otherwise they are rejected.
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
        read_annotations(annotations, ("file",) if key_frames else ANNOTATION_REQUIRED, early)
        if annotations is not None
        else {}
    )
    file_boxes = read_boxes(boxes, early) if boxes is not None else {}
    boxes_name = boxes.name if boxes is not None else "boxes.csv"
    files = sources(src, key_frames=key_frames)
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

    plans: list[Plan] = []
    derived = 0
    unlisted: list[str] = []
    for file in files:
        if file in early:
            continue
        record = rows.get(file)
        if record is None and not key_frames:
            early[file] = f"no row for this file in {annotations_name}"
            continue
        if record is None and annotations is not None and label_folder(file) is None:
            # The annotations say which loose images are the export (not masks, say).
            unlisted.append(file)
            continue
        where = f"{annotations_name} line {record[0]}" if record else file
        values = record[1] if record else None
        try:
            if is_dicom_source(src / file):
                values = _with_header_fields(src / file, values, where, key_frames=key_frames)
            fields, was_derived = validate_row(
                file, values, where, key_frames=key_frames, secret=secret
            )
        except Reject as exc:
            early[file] = str(exc)
            continue
        derived += was_derived
        key = deid.keyed_hash(secret, "file", file)[:32]
        plans.append(Plan(file, src / file, key, fields, file_boxes.get(file, []), where))
    plans = drop_split_leaks(plans, early)
    report.rejected += [Rejected(file, reason) for file, reason in early.items()]
    if unlisted:
        report.warnings.append(
            f"{len(unlisted)} image(s) under SRC are in no label folder and not in "
            f"{annotations_name}; left out (first: {unlisted[0]})"
        )
    if derived:
        report.warnings.append(
            f"{derived} image(s) have no patient_id and count as one patient each; if a "
            "patient has several images, give her id in --annotations (the privacy unit is "
            "the patient)"
        )

    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out)
    settings = _settings_fingerprint(secret, key_frames=key_frames, allow_burned_in=allow_burned_in)
    old_files: dict[str, Any] = state["files"]
    if state["settings"] != settings:
        # Nothing earlier is reusable, but its outputs stay tracked (to be replaced or
        # removed), also in the state an interrupted run leaves behind.
        old_files = {key: {**entry, "digest": ""} for key, entry in old_files.items()}
    new_files: dict[str, Any] = {}
    state = {"settings": settings, "files": new_files}
    manifest: list[tuple[Any, ...]] = []
    box_rows: list[tuple[Any, ...]] = []
    records: dict[str, Any] = {}
    for done, plan in enumerate(plans, start=1):
        entry = _refresh_entry(plan, old_files.get(plan.key), out)
        if "result" not in entry:
            try:
                entry["result"] = process(
                    plan,
                    out,
                    key_frames=key_frames,
                    boxes_name=boxes_name,
                    allow_burned_in=allow_burned_in,
                )
            except Reject as exc:
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
            if "dicom" in result:
                records[result["video"]] = result["dicom"]
            box_rows += [
                (result["video"], frame, *(f"{v:g}" for v in coords))
                for frame, *coords in result["boxes"]
            ]
        if progress is not None:
            progress(done, len(plans))

    report.removed = _remove_stale(out, old_files, new_files)
    _save_state(out, state)
    manifest.sort(key=lambda row: row[0])  # one row per video
    box_rows.sort(key=lambda row: (row[0], row[1]))
    write_manifest(out, manifest, box_rows)
    write_atomic(out / DICOM_RECORDS, json.dumps(records, indent=1, sort_keys=True))
    report.videos = len(manifest)
    report.dicom = len(records)
    report.rejected.sort(key=lambda r: r.file)
    return report


def _with_header_fields(
    path: Path, values: dict[str, str] | None, where: str, *, key_frames: bool
) -> dict[str, str]:
    """A DICOM file's annotation values, with a blank ``patient_id`` and ``vendor`` taken
    from its header (the patient id is pseudonymised by ``validate_row`` like any other).
    A key frame without either counts as its own patient, as an image does."""
    filled = dict(values or {})
    for name, value in dicom.header_fields(path).items():
        if not filled.get(name):
            filled[name] = value
    if not filled.get("patient_id") and not key_frames:
        raise Reject(
            f"{where}, field patient_id: empty, and so is the DICOM file's PatientID (0010,0020)"
        )
    return filled


def _mask(result: dict[str, Any]) -> deid.TextMask:
    return deid.TextMask(**result["mask"])


def _refresh_entry(plan: Plan, old: dict[str, Any] | None, out: Path) -> dict[str, Any]:
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
