"""Scanner presets: how each vendor's machine images (PSF, frequency, gain, TGC, focus,
compounding) and the patient data it burns into the top rows of every frame.

``VENDORS`` holds three presets, so that synthetic sites look different; ``header_band``
draws a preset's text band for a made-up patient from ``fake_identity``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.errors import UsageError

# PIL's default bitmap font: 6 x 11 pixel cells. Headers are laid out on a band 128 pixels
# wide (21 characters a line) and scaled with the frame, so they look alike at every size.
_FONT_LINE_PX = 11
_HEADER_WIDTH_PX = 128


@dataclass(frozen=True)
class HeaderStyle:
    """How a scanner burns patient and exam data into the top rows of its frames.

    Attributes
    ----------
    lines : tuple[str, ...]
        ``str.format`` templates, one per text line, over ``first``, ``last``, ``pid``,
        ``date`` (a ``datetime.date``), ``probe``, ``mhz``, ``depth_mm``, ``depth_cm`` and
        ``gain`` (a 0-100 display value).
    align : {"left", "right"}
        Where the lines sit on the band.
    level : int
        Gray level of the text on the black band.
    """

    lines: tuple[str, ...]
    align: Literal["left", "right"]
    level: int


@dataclass(frozen=True)
class VendorPreset:
    """Imaging characteristics of one scanner model, so that sites look different.

    Attributes
    ----------
    depth_mm : float
        Imaged depth below the header band; pixel spacing is
        ``depth_mm / (size - header_rows(size))`` along both axes.
    axial_sigma_mm, lateral_sigma_mm, elevation_sigma_mm : float
        Standard deviations of the Gaussian PSF along depth (pulse length), across the beam
        at the focal depth and across the image plane (slice thickness).
    center_mhz : float
        Transmit centre frequency, which modulates the axial PSF.
    dynamic_range_db : float
        Span of echo levels mapped onto 0..255 by log compression.
    gain_db : float
        Display level of glandular tissue (echo amplitude 1) below the top of the range,
        once time-gain compensation has made up for the attenuation.
    attenuation_db_per_cm : float
        Round-trip attenuation of breast tissue at ``center_mhz``.
    noise_db : float
        Electronic noise amplitude relative to glandular tissue at the skin; added before
        the time-gain compensation, which amplifies it with depth.
    smoothing_mm : float
        Speckle-reduction filter of the scanner's display (Gaussian sigma), 0 for none.
    gray_gamma : float
        Gray map after log compression: a power above 1 darkens the mid-grays and leaves
        strong reflectors bright.
    probe : str
        Probe name printed in the header.
    tgc_db : tuple[float, ...]
        Time-gain compensation: slider gains at equally spaced depths from the skin to
        ``depth_mm``, interpolated linearly in between. Each vendor compensates the
        attenuation in its own imperfect way.
    focus_fraction : float
        Transmit focal depth as a fraction of ``depth_mm``.
    focal_length_mm : float
        Depth of field: the beam is ``sqrt(2)`` times wider this far from the focus
        (it widens at most ``MAX_DEFOCUS`` times).
    focal_gain_db : float
        Extra brightness at the focal depth, a Gaussian band of ``focal_length_mm`` sigma.
    compound_looks : int
        Spatial compounding: beams steered this many ways, their envelopes averaged,
        which lowers the speckle's contrast but not the tissue's (1 for none).
    header : HeaderStyle
        The burned-in text band.
    """

    depth_mm: float
    axial_sigma_mm: float
    lateral_sigma_mm: float
    elevation_sigma_mm: float
    center_mhz: float
    dynamic_range_db: float
    gain_db: float
    attenuation_db_per_cm: float
    noise_db: float
    smoothing_mm: float
    gray_gamma: float
    probe: str
    tgc_db: tuple[float, ...]
    focus_fraction: float
    focal_length_mm: float
    focal_gain_db: float
    compound_looks: int
    header: HeaderStyle

    def header_rows(self, size: int) -> int:
        """Rows at the top of a ``size``-pixel frame taken by the header band."""
        rows = _FONT_LINE_PX * len(self.header.lines) + 3
        scale = size // _HEADER_WIDTH_PX
        return rows * scale if scale >= 1 else round(rows * size / _HEADER_WIDTH_PX)


VENDORS: dict[str, VendorPreset] = {
    # High-frequency linear probe with spatial compounding: fine, smooth speckle, wide
    # dynamic range, shallow field; its TGC holds back the near field a little.
    "vendor-a": VendorPreset(
        depth_mm=40.0,
        axial_sigma_mm=0.15,
        lateral_sigma_mm=0.30,
        elevation_sigma_mm=0.7,
        center_mhz=12.0,
        dynamic_range_db=60.0,
        gain_db=-30.0,
        attenuation_db_per_cm=7.0,
        noise_db=-52.0,
        smoothing_mm=0.1,
        gray_gamma=1.4,
        probe="14L5",
        tgc_db=(-2.0, 3.0, 7.0, 10.5, 14.0, 17.5, 21.0, 24.5, 28.0),
        focus_fraction=0.4,
        focal_length_mm=8.0,
        focal_gain_db=3.0,
        compound_looks=3,
        header=HeaderStyle(
            lines=("{last}^{first} {date:%d.%m.%y}", "{pid} {probe} D{depth_cm:.1f} G{gain}"),
            align="left",
            level=255,
        ),
    ),
    # Older, lower-frequency probe without compounding: coarse, grainy speckle, more noise;
    # its TGC falls short in the deep field, which darkens.
    "vendor-b": VendorPreset(
        depth_mm=50.0,
        axial_sigma_mm=0.30,
        lateral_sigma_mm=0.60,
        elevation_sigma_mm=1.0,
        center_mhz=7.5,
        dynamic_range_db=50.0,
        gain_db=-24.0,
        attenuation_db_per_cm=5.0,
        noise_db=-42.0,
        smoothing_mm=0.25,
        gray_gamma=1.3,
        probe="7L4",
        tgc_db=(0.0, 3.0, 6.0, 9.0, 12.0, 14.0, 16.0, 18.0, 20.0),
        focus_fraction=0.5,
        focal_length_mm=12.0,
        focal_gain_db=4.0,
        compound_looks=1,
        header=HeaderStyle(
            lines=(
                "PAT {last}, {first}",
                "ID {pid} {date:%Y/%m/%d}",
                "{probe} {mhz:.1f}MHz {depth_cm:.1f}cm G{gain}",
            ),
            align="left",
            level=210,
        ),
    ),
    # Mid-range probe with compounding and display speckle reduction: smooth, low-contrast
    # look.
    "vendor-c": VendorPreset(
        depth_mm=45.0,
        axial_sigma_mm=0.22,
        lateral_sigma_mm=0.45,
        elevation_sigma_mm=0.8,
        center_mhz=10.0,
        dynamic_range_db=66.0,
        gain_db=-34.0,
        attenuation_db_per_cm=6.0,
        noise_db=-48.0,
        smoothing_mm=0.25,
        gray_gamma=1.6,
        probe="10L",
        tgc_db=(1.0, 4.5, 8.0, 11.5, 14.5, 17.0, 20.5, 24.0, 28.0),
        focus_fraction=0.45,
        focal_length_mm=10.0,
        focal_gain_db=2.5,
        compound_looks=2,
        header=HeaderStyle(
            lines=("{first} {last} {pid}", "{date:%d-%m-%y} {probe} D{depth_mm:.0f} G{gain}"),
            align="right",
            level=235,
        ),
    ),
}


def vendor_preset(name: str) -> VendorPreset:
    """The preset called ``name``; ``UsageError`` listing the known ones otherwise."""
    try:
        return VENDORS[name]
    except KeyError:
        raise UsageError(
            f"unknown vendor {name!r}; known vendors: {', '.join(sorted(VENDORS))}"
        ) from None


# ------------------------------------------------------------------ patient identity and header


_FIRST_NAMES = (
    "ANNA", "CLARA", "ELENA", "EMMA", "EVA", "HANNA", "IRIS", "JULIA",
    "LENA", "LUISA", "MARIA", "MIA", "NINA", "ROSA", "SARA", "ZOE",
)  # fmt: skip
_LAST_NAMES = (
    "BERG", "COSTA", "DUBOIS", "HUBER", "JANSEN", "JONES", "KELLER", "MEYER",
    "MORENO", "NILSEN", "NOVAK", "PETROV", "ROSSI", "SILVA", "SMITH", "WEBER",
)  # fmt: skip


@dataclass(frozen=True)
class PatientIdentity:
    """A made-up patient as a scanner prints her; drawn from the seed, never a real person.

    Attributes
    ----------
    first, last : str
        Upper-case given and family name (at most 5 and 6 letters).
    patient_id : str
        Seven-digit medical record number.
    exam_date : datetime.date
        Day of the examination, 2019-2023.
    """

    first: str
    last: str
    patient_id: str
    exam_date: dt.date


def fake_identity(rng: np.random.Generator) -> PatientIdentity:
    """Draw a fake name, ID and exam date."""
    return PatientIdentity(
        first=_FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))],
        last=_LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))],
        patient_id=f"{int(rng.integers(1_000_000, 10_000_000))}",
        exam_date=dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(5 * 365))),
    )


def header_band(vendor: VendorPreset, identity: PatientIdentity, *, size: int) -> np.ndarray:
    """The text band a scanner burns into the top of each frame.

    Parameters
    ----------
    vendor : VendorPreset
        Layout (``vendor.header``), probe and settings printed.
    identity : PatientIdentity
        Whose name, ID and date are printed.
    size : int
        Frame width in pixels.

    Returns
    -------
    np.ndarray
        ``uint8 [vendor.header_rows(size), size]``: text at ``vendor.header.level`` on black,
        in PIL's default bitmap font laid out on a 128-pixel-wide band and scaled to
        ``size`` with nearest-neighbour sampling.
    """
    style = vendor.header
    scale = max(1, size // _HEADER_WIDTH_PX)
    width = size // scale if size >= _HEADER_WIDTH_PX else _HEADER_WIDTH_PX
    band = Image.new("L", (width, _FONT_LINE_PX * len(style.lines) + 3))
    draw = ImageDraw.Draw(band)
    font = ImageFont.load_default_imagefont()
    fields = {
        "first": identity.first,
        "last": identity.last,
        "pid": identity.patient_id,
        "date": identity.exam_date,
        "probe": vendor.probe,
        "mhz": vendor.center_mhz,
        "depth_mm": vendor.depth_mm,
        "depth_cm": vendor.depth_mm / 10,
        "gain": round(100 + 2 * vendor.gain_db),
    }
    for i, template in enumerate(style.lines):
        text = template.format(**fields)
        x = 2 if style.align == "left" else width - 2 - round(font.getlength(text))
        draw.text((x, 2 + i * _FONT_LINE_PX), text, fill=style.level, font=font)
    rows = vendor.header_rows(size)
    return np.asarray(band.resize((size, rows), Image.Resampling.NEAREST))
