"""De-identification at ingest: metadata, burned-in text and patient identifiers.

Three things can identify a patient in an exported ultrasound video, and each is handled
here or by how ingest writes its output:

1. **Container metadata** (title, comment, artist, creation time, the scanner's own
   tags). Ingest never copies a source file: it decodes the pixels and re-encodes them
   with ``common.data.video.write_video``, whose muxer runs in bit-exact mode and writes
   no tag at all. Output file names are keyed hashes, never the source name.
2. **Burned-in text**: the scanner header with name, ID and exam date, drawn into the
   pixels. ``find_text_bands`` detects it and ``mask_text`` blacks it out (below).
3. **Patient identifiers** in the annotations: ``pseudonymise`` replaces each with a keyed
   hash (HMAC-SHA256 with the site's secret), so one patient maps to one pseudonym at
   this site, and nobody without the secret (another site, the consortium) can link it
   back or across sites.

Burned-in text detection
------------------------
Scanners print patient data on a black band at the top (sometimes the bottom) of the
frame. A row of such a band is *text-like* when, in some frame,

- most of its pixels are black (``<= DARK_LEVEL``; at least ``MIN_DARK_FRACTION``),
- it has strokes: at least ``MIN_STROKE_PIXELS`` pixels at ``>= STROKE_RELATIVE`` of the
  row's maximum, which is at least ``MIN_TEXT_LEVEL``,
- and almost nothing in between (``<= MAX_MID_FRACTION``): rendered text is near-binary,
  tissue speckle is not.

From each edge, the band grows over text-like and black rows and stops after more than
``max_gap`` rows that are neither. Its first text-like row must lie within the top
``TOP_SEARCH`` or bottom ``BOTTOM_SEARCH`` of the frame, and it never passes the middle.
The rows from the edge to the last text-like row (plus a row of margin for codec
ringing) are blacked out in every frame. The band is found per
video, not per frame, so every frame of a video keeps the same image area.

Not detected: text over tissue (e.g. a body-marker label inside the image), text in the
middle of the frame, and text in an image that has no black band. Such labels are
usually positions (``LT AXILLA``), not identities; a site whose scanner prints identities
elsewhere must crop them in its export.
"""

from __future__ import annotations

import hashlib
import hmac
import stat
from dataclasses import dataclass
from math import ceil
from pathlib import Path

import numpy as np

from common.errors import UsageError

# ------------------------------------------------------------------ pseudonyms

PSEUDONYM_PREFIX = "pt-"
PSEUDONYM_HEX = 16  # 64 bits: collisions are negligible below a billion patients
MIN_SECRET_BYTES = 16


def load_secret(path: Path) -> bytes:
    """Read the site's pseudonymisation secret.

    The file's bytes, less surrounding whitespace, are the HMAC key; make one with
    ``(umask 077; python3 -c "import secrets; print(secrets.token_hex(32))" > FILE)``.

    Raises
    ------
    UsageError
        Missing, unreadable, shorter than ``MIN_SECRET_BYTES``, or readable by group or
        others (anyone who reads it can re-identify every pseudonym of the site).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes().strip()
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: secret file not found") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the secret file: {exc.strerror or exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"{path}: the secret is readable by group or others (mode {stat.filemode(mode)}); "
            f"run: chmod 600 {path}"
        )
    if len(secret) < MIN_SECRET_BYTES:
        raise UsageError(
            f"{path}: the secret has {len(secret)} bytes, at least {MIN_SECRET_BYTES} needed"
        )
    return secret


def keyed_hash(secret: bytes, purpose: str, value: str) -> str:
    """HMAC-SHA256 hex digest of ``value`` for one ``purpose`` (domain separation)."""
    message = f"busfed:{purpose}:".encode() + value.encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def pseudonymise(patient_id: str, secret: bytes) -> str:
    """The site's pseudonym of a patient identifier: ``pt-`` and 16 hex digits.

    Leading and trailing whitespace is ignored; case is kept (``A12`` and ``a12`` are two
    patients), as hospital identifiers are compared exactly.
    """
    return PSEUDONYM_PREFIX + keyed_hash(secret, "patient", patient_id.strip())[:PSEUDONYM_HEX]


def secret_fingerprint(secret: bytes) -> str:
    """A stable fingerprint of the secret that reveals nothing about it (for the state)."""
    return keyed_hash(secret, "fingerprint", "")[:16]


# ------------------------------------------------------------------ burned-in text

DARK_LEVEL = 24  # a black band after lossy compression stays at or below this
MIN_TEXT_LEVEL = 128  # text is drawn to be read; deep-field speckle reaches ~120
STROKE_RELATIVE = 0.6  # of the row's maximum: a stroke pixel
MIN_STROKE_PIXELS = 2
MIN_DARK_FRACTION = 0.4
MAX_MID_FRACTION = 0.1
BLANK_FRACTION = 0.98  # a row this black is part of a band, text or not
TOP_SEARCH = 0.35  # where a top band's first text row may be
BOTTOM_SEARCH = 0.15  # where a bottom band's last text row may be
_CHUNK = 32  # frames classified at once, to bound memory on long videos


@dataclass(frozen=True)
class TextMask:
    """Burned-in text found in a video, as rows to black out.

    Attributes
    ----------
    top_rows, bottom_rows : int
        Rows blacked out from the top and bottom edge (0: none).
    frames_with_text : int
        Frames in which text-like rows were seen inside those bands.
    frames : int
        Frames in the video.
    """

    top_rows: int
    bottom_rows: int
    frames_with_text: int
    frames: int

    @property
    def rows(self) -> int:
        """Rows blacked out in every frame."""
        return self.top_rows + self.bottom_rows


def _classify_rows(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(text, blank)`` boolean ``[T, R]`` for frames ``uint8 [T, R, W]``."""
    text = np.zeros(frames.shape[:2], dtype=bool)
    blank = np.zeros(frames.shape[:2], dtype=bool)
    for start in range(0, len(frames), _CHUNK):
        chunk = frames[start : start + _CHUNK]
        peak = chunk.max(axis=2, keepdims=True).astype(np.float32)
        stroke_level = np.maximum(MIN_TEXT_LEVEL, STROKE_RELATIVE * peak)
        dark = (chunk <= DARK_LEVEL).mean(axis=2)
        strokes = chunk >= stroke_level
        mid = ((chunk > DARK_LEVEL) & ~strokes).mean(axis=2)
        text[start : start + _CHUNK] = (
            (dark >= MIN_DARK_FRACTION)
            & (strokes.sum(axis=2) >= MIN_STROKE_PIXELS)
            & (mid <= MAX_MID_FRACTION)
        )
        blank[start : start + _CHUNK] = dark >= BLANK_FRACTION
    return text, blank


def _band_rows(
    text: np.ndarray, blank: np.ndarray, *, start_within: int, max_gap: int, margin: int
) -> int:
    """Rows from the edge (index 0) that hold a text band; 0 when there is no text.

    ``text`` and ``blank`` are ``[T, R]``, ordered from the edge inwards; the band's
    first text-like row must be one of the first ``start_within``.
    """
    text_row = [bool(v) for v in np.any(text, axis=0)]
    band_row = [t or bool(b) for t, b in zip(text_row, np.all(blank, axis=0), strict=True)]
    last_text, gap = -1, 0
    for y in range(len(text_row)):
        if text_row[y]:
            if last_text < 0 and y >= start_within:
                break
            last_text, gap = y, 0
        elif not band_row[y]:
            gap += 1
            if gap > max_gap:
                break
    return 0 if last_text < 0 else min(len(text_row), last_text + 1 + margin)


def find_text_bands(frames: np.ndarray) -> TextMask:
    """Find burned-in text bands at the top and bottom of a grayscale video.

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]``, T >= 1.

    Returns
    -------
    TextMask
        Rows to black out from each edge; see the module docstring for the test.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W], got {frames.dtype} {frames.shape}")
    height = frames.shape[1]
    half = height // 2
    gaps = {"max_gap": max(4, round(0.04 * height)), "margin": max(1, round(0.01 * height))}

    top_text, top_blank = _classify_rows(frames[:, :half])
    top = _band_rows(top_text, top_blank, start_within=ceil(TOP_SEARCH * height), **gaps)
    # The bottom band, read from the edge upwards, stops where the top one ends.
    bottom_text, bottom_blank = _classify_rows(frames[:, max(top, half) :][:, ::-1])
    bottom = _band_rows(
        bottom_text, bottom_blank, start_within=ceil(BOTTOM_SEARCH * height), **gaps
    )

    seen = np.zeros(len(frames), dtype=bool)
    if top:
        seen |= top_text[:, :top].any(axis=1)
    if bottom:
        seen |= bottom_text[:, :bottom].any(axis=1)
    return TextMask(
        top_rows=top, bottom_rows=bottom, frames_with_text=int(seen.sum()), frames=len(frames)
    )


def mask_text(frames: np.ndarray) -> tuple[np.ndarray, TextMask]:
    """Black out burned-in text bands; returns a masked copy and what was masked.

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]``; not modified.

    Returns
    -------
    (np.ndarray, TextMask)
        ``uint8 [T, H, W]`` with the band rows set to 0 in every frame, and the bands.
    """
    found = find_text_bands(frames)
    masked = np.array(frames, copy=True)
    if found.top_rows:
        masked[:, : found.top_rows] = 0
    if found.bottom_rows:
        masked[:, masked.shape[1] - found.bottom_rows :] = 0
    return masked, found
