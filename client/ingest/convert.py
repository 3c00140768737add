"""Processing one source file: decode it (DICOM with ``client.ingest.dicom``), check its
boxes against its frames, mask the burned-in text (``client.deid``) and re-encode it as a
metadata-free H.264 video.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from client import deid
from client.ingest import dicom
from client.ingest.export import FileBox, Plan, Reject, is_dicom_source
from common.data.video import probe_video, read_video, write_video
from common.errors import DataError
from common.files import atomic_path

DEFAULT_FPS = 10  # where a container does not state its rate


def _load_frames(
    path: Path, *, key_frame: bool, allow_burned_in: bool
) -> tuple[np.ndarray, int, dict[str, Any] | None]:
    """``(uint8 [T, H, W], fps, DICOM de-identification record or None)`` of a source
    file; ``Reject`` if it cannot be read."""
    if is_dicom_source(path):
        frames, fps, record = dicom.load(path, allow_burned_in=allow_burned_in)
        if key_frame and len(frames) > 1:
            raise Reject(
                f"a cine loop ({len(frames)} frames) among key frames; ingest it without "
                "--key-frames"
            )
        return frames, fps, record
    if key_frame:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("L"))[None], 1, None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise Reject(f"unreadable image: {exc}") from exc
    try:
        frames = read_video(path)
        rate = probe_video(path).fps
    except DataError as exc:
        raise Reject(f"unreadable video: {str(exc).replace(str(path) + ': ', '')}") from exc
    return frames, max(1, round(rate)) if rate else DEFAULT_FPS, None


def _check_boxes(
    boxes: list[tuple[int, FileBox]], frames: np.ndarray, boxes_name: str
) -> list[FileBox]:
    """The boxes of a file, checked against its frames; ``Reject`` names the first bad one."""
    count, height, width = frames.shape
    seen: dict[int, int] = {}
    checked: list[FileBox] = []
    for line, (frame, x1, y1, x2, y2) in boxes:
        where = f"{boxes_name} line {line}"
        if not 0 <= frame < count:
            raise Reject(f"{where}, field frame: {frame} is outside the video (0..{count - 1})")
        if frame in seen:
            raise Reject(
                f"{where}, field frame: a second box for frame {frame} (line {seen[frame]})"
            )
        for column, value, limit in (
            ("x1", x1, width), ("y1", y1, height), ("x2", x2, width), ("y2", y2, height),
        ):  # fmt: skip
            if not 0 <= value <= limit:
                raise Reject(
                    f"{where}, field {column}: box outside the frame ({column} = {value:g}, "
                    f"frame is {width} x {height})"
                )
        if x1 >= x2 or y1 >= y2:
            raise Reject(f"{where}: empty box (need x1 < x2 and y1 < y2)")
        seen[frame] = line
        checked.append((frame, x1, y1, x2, y2))
    return sorted(checked)


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad with black rows/columns at the bottom/right to even sizes (yuv420p needs them)."""
    _, height, width = frames.shape
    if height % 2 == 0 and width % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2)))


def process(
    plan: Plan, out: Path, *, key_frames: bool, boxes_name: str, allow_burned_in: bool
) -> dict[str, Any]:
    """Decode, check, mask and re-encode one file; the state record of its output (with a
    DICOM file's de-identification record under ``dicom``)."""
    frames, fps, record = _load_frames(
        plan.path, key_frame=key_frames, allow_burned_in=allow_burned_in
    )
    boxes = _check_boxes(plan.boxes, frames, boxes_name)
    masked, found = deid.mask_text(frames)
    video = f"videos/{plan.key[:24]}.mp4"
    target = out / video
    target.parent.mkdir(parents=True, exist_ok=True)
    # The mp4 muxer is chosen explicitly, so the temporary name's suffix does not matter.
    with atomic_path(target) as tmp:
        write_video(tmp, _even(masked), fps=fps)
    result = {"video": video, "boxes": [list(b) for b in boxes], "mask": asdict(found)}
    if record is not None:
        result["dicom"] = record
    return result
