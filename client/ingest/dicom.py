"""DICOM ultrasound files in an export: decoding, grey levels, frame rate, and the
de-identification of DICOM PS3.15 Annex E (Basic Application Level Confidentiality
Profile with the Clean Pixel Data Option).

**What leaves the file.** Only pixels: ``client.ingest.convert`` re-encodes them as a
metadata-free H.264 video, as for any other source. No attribute of the header is written
anywhere, so every attribute of Table E.1-1 gets the profile's strictest action, X
(remove), and so do private attributes, overlays (60xx), curves and icon images. That is
why no tag-rule library (pydicom/deid, dicognito) is used: they rewrite a header that
busfed would then throw away, and carrying one would only add a place where a value could
leak. Three attributes are read and turned into something that is not PHI: PatientID (a
keyed pseudonym, ``client.deid.pseudonymise``; only when the annotation row leaves
``patient_id`` blank), Manufacturer (the manifest's ``vendor`` when the row leaves it
blank; a device attribute the profile keeps) and the frame timing.

**Clean Pixel Data.** Scanners burn names, dates and settings into the pixels around the
image. The scanner's own geometry says where the image is: SequenceOfUltrasoundRegions
(0018,6011). Every pixel outside its 2D tissue regions (RegionSpatialFormat 1,
RegionDataType 1) is set to black, in every frame; the frame keeps its size, so box
coordinates stay those of the source. A region that does not fit the image means the
header does not describe these pixels: the file is rejected. Without tissue regions, the
header-band detector of ``client.deid`` (which runs on every file) is all there is; a
file that says BurnedInAnnotation (0028,0301) YES and has no regions is then rejected
unless the site allows it (``allow_burned_in``). Colour-flow and Doppler regions, and
colour pixels inside the tissue region (an overlay the grey conversion would hide), are
named in the file's record.

**The record** (``deid_record``) says which rules applied and which regions were kept. It
holds no value from the header except the SOP class, transfer syntax and manufacturer.

**Decoding** is pydicom's, with python-gdcm for the compressed transfer syntaxes (JPEG
baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE); GDCM is BSD-licensed, while
the pylibjpeg-libjpeg plugin is GPL-3.0. MONOCHROME1/2, RGB, YBR_* and PALETTE COLOR
become the 8-bit grey level the models read (ITU-R BT.601 luma for colour).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.ingest.export import Reject, is_dicom

if TYPE_CHECKING:
    from pydicom import Dataset

PROFILE = (
    "DICOM PS3.15 Annex E: Basic Application Level Confidentiality Profile, Clean Pixel Data Option"
)
# RegionSpatialFormat 1 (2D) and RegionDataType 1 (tissue): the B-mode image.
SPATIAL_2D, DATA_TISSUE = 1, 1
# RegionDataType (PS3.3 C.8.5.5.1.2) of the regions the record names: the overlays and
# traces a scanner draws beside or over the tissue image.
REGION_TYPES = {
    2: "colour flow", 3: "PW spectral Doppler", 4: "CW spectral Doppler",
    5: "Doppler mean trace", 6: "Doppler mode trace", 7: "Doppler max trace",
    8: "volume trace", 10: "ECG trace", 11: "pulse trace", 12: "phonocardiogram trace",
    13: "grey bar", 14: "colour bar", 15: "integrated backscatter", 16: "area trace",
    17: "d(area)/dt", 18: "other physiological input",
}  # fmt: skip
# A pixel whose channels differ by more than this is colour (an overlay), not grey.
COLOUR_SPREAD = 64
COLOUR_NAMED = 0.01  # named in the record above 1% of the tissue region's pixels
DEFAULT_FPS = 10


def _read(path: Path, *, pixels: bool) -> Dataset:
    """The dataset; ``Reject`` if it is not a DICOM file or not an ultrasound one."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not is_dicom(path):
        raise Reject("not a DICOM file (no DICM preamble)")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise Reject(f"unreadable DICOM header: {exc}") from exc
    modality = str(ds.get("Modality", "") or "")
    if modality != "US":
        raise Reject(f"modality {modality or '(none)'} is not ultrasound (US)")
    return ds


def header_fields(path: Path) -> dict[str, str]:
    """The manifest fields the header can fill: ``patient_id`` (PatientID, 0010,0020; to
    be pseudonymised) and ``vendor`` (Manufacturer, 0008,0070); blank where absent."""
    ds = _read(path, pixels=False)
    return {
        "patient_id": str(ds.get("PatientID", "") or "").strip(),
        "vendor": str(ds.get("Manufacturer", "") or "").strip(),
    }


@dataclass(frozen=True)
class Region:
    """One SequenceOfUltrasoundRegions item: its kind and its pixel box (inclusive)."""

    spatial_format: int
    data_type: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1

    @property
    def tissue(self) -> bool:
        return self.spatial_format == SPATIAL_2D and self.data_type == DATA_TISSUE

    @property
    def name(self) -> str:
        if self.tissue:
            return "tissue"
        return REGION_TYPES.get(self.data_type, f"data type {self.data_type}")


def regions(ds: Dataset) -> list[Region]:
    found = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        box = tuple(
            int(item.get(name, -1))
            for name in (
                "RegionLocationMinX0", "RegionLocationMinY0",
                "RegionLocationMaxX1", "RegionLocationMaxY1",
            )
        )  # fmt: skip
        found.append(
            Region(
                int(item.get("RegionSpatialFormat", 0) or 0),
                int(item.get("RegionDataType", 0) or 0),
                box,  # type: ignore[arg-type]
            )
        )
    return found


def _fps(ds: Dataset, frames: int) -> int:
    """Frames per second from FrameTime (ms), CineRate, RecommendedDisplayFrameRate or
    FrameTimeVector; ``DEFAULT_FPS`` for a cine that states none, 1 for a still."""
    if frames == 1:
        return 1
    rate: float | None = None
    if ds.get("FrameTime"):
        rate = 1000.0 / float(ds.FrameTime)
    elif ds.get("CineRate"):
        rate = float(ds.CineRate)
    elif ds.get("RecommendedDisplayFrameRate"):
        rate = float(ds.RecommendedDisplayFrameRate)
    elif ds.get("FrameTimeVector"):
        times = [float(t) for t in ds.FrameTimeVector[1:]]
        rate = 1000.0 / (sum(times) / len(times)) if times and sum(times) > 0 else None
    if rate is None or not np.isfinite(rate) or rate <= 0:
        return DEFAULT_FPS
    return max(1, round(rate))


def _rgb_and_depth(ds: Dataset, pixels: np.ndarray, frames: int) -> tuple[np.ndarray, int]:
    """``[T, H, W, C]`` (C = 1 or 3) and the bits of its values."""
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.PhotometricInterpretation)
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":
        entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        # Many files say 16 bits and hold 8-bit entries (Philips' big-endian one reads so):
        # the whole table's largest entry, not the descriptor, gives the depth.
        table = apply_color_lut(np.arange(first, first + (entries or 65536)), ds)
        bits = 8 if int(table.max()) <= 255 else bits
        pixels = apply_color_lut(pixels, ds)
    if frames == 1:
        pixels = pixels[None]
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if photometric == "MONOCHROME1":  # 0 is white
        pixels = (2**bits - 1) - pixels.astype(np.int64)
    return pixels, bits


def _grey8(pixels: np.ndarray, bits: int) -> np.ndarray:
    values = pixels.astype(np.float32)
    if values.shape[-1] == 3:
        values = values @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        values = values[..., 0]
    scaled = values * (255.0 / (2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load(path: Path, *, allow_burned_in: bool) -> tuple[np.ndarray, int, dict[str, Any]]:
    """``(uint8 [T, H, W], fps, record)``: the frames with everything outside the tissue
    regions black, and the file's de-identification record.

    Raises
    ------
    Reject
        Not DICOM, not ultrasound, a transfer syntax or pixel data that does not decode,
        regions that do not fit the image, or burned-in annotation without regions.
    """
    ds = _read(path, pixels=True)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    syntax_name = getattr(syntax, "name", str(syntax))
    if "PixelData" not in ds:
        raise Reject(f"no pixel data ({syntax_name})")
    try:
        decoded = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds; each is a file it cannot decode
        raise Reject(f"pixel data does not decode ({syntax_name}): {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rgb, bits = _rgb_and_depth(ds, decoded, frames)
    _, height, width, _ = rgb.shape
    found = regions(ds)
    tissue = [r for r in found if r.tissue]
    for region in tissue:
        x0, y0, x1, y1 = region.box
        # Some scanners (Philips) give the right and bottom edges as the image's width
        # and height, one past the last pixel: that much is read as the edge.
        if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
            raise Reject(
                f"ultrasound region ({x0}, {y0})-({x1}, {y1}) does not fit the "
                f"{width} x {height} image: the header does not describe these pixels"
            )
    burned = str(ds.get("BurnedInAnnotation", "") or "").upper() or "absent"
    if not tissue and burned == "YES" and not allow_burned_in:
        raise Reject(
            "BurnedInAnnotation (0028,0301) is YES and the file has no ultrasound tissue "
            "region to keep; allow it with --allow-burned-in (the header-band detector "
            "then masks what it finds)"
        )
    keep = np.zeros((height, width), bool)
    for region in tissue:
        x0, y0, x1, y1 = region.box
        keep[y0 : y1 + 1, x0 : x1 + 1] = True
    overlays = [
        f"{r.name} region ({r.box[0]}, {r.box[1]})-({r.box[2]}, {r.box[3]})"
        for r in found
        if not r.tissue and r.data_type in REGION_TYPES
    ]
    if rgb.shape[-1] == 3:
        inside = rgb[:, keep] if tissue else rgb.reshape(frames, -1, 3)
        spread = inside.max(axis=-1).astype(np.int64) - inside.min(axis=-1)
        share = float((spread > COLOUR_SPREAD * (2**bits - 1) / 255).mean()) if spread.size else 0.0
        if share > COLOUR_NAMED:
            overlays.append(
                f"colour pixels (a colour-flow or Doppler overlay) in {share:.1%} of the "
                f"{'tissue region' if tissue else 'image'}, kept as grey"
            )
    grey = _grey8(rgb, bits)
    if tissue:
        grey[:, ~keep] = 0
    record = {
        "profile": PROFILE,
        "header": "not written: every attribute removed (action X), private ones, "
        "overlays, curves and icon images included",
        "sop_class": getattr(ds.get("SOPClassUID"), "name", ""),
        "transfer_syntax": syntax_name,
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "frames": frames,
        "burned_in_annotation": burned,
        "clean_pixels": (
            "ultrasound regions: outside of them set to black" if tissue
            else "no ultrasound region: header-band detector only"
        ),
        "regions_kept": [list(r.box) for r in tissue],
        "blacked_out_fraction": round(1.0 - float(keep.mean()), 4) if tissue else 0.0,
        "overlays": overlays,
    }  # fmt: skip
    return grey, _fps(ds, frames), record
