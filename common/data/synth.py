"""Synthetic freehand breast-ultrasound sweeps with BI-RADS-lexicon lesions.

A site dataset is generated in stages:

``sample_lesion, sample_anatomy, fake_identity -> render_sweep -> generate_site``

1. ``sample_lesion`` draws a patient's age, the lesion's size and its BI-RADS lexicon
   features, then the malignancy label from a documented logistic model of the features
   (``INTERCEPT``, ``LOG_ODDS``). A share of patients (``normal_fraction``) have no lesion.
2. ``sample_anatomy`` draws the patient's layers from the skin down (skin, subcutaneous
   fat, fibroglandular tissue, retromammary fat, pectoralis major); ``fake_identity`` the
   made-up name, ID and exam date that the scanner burns into the top of every frame.
3. ``render_sweep`` images one freehand sweep with the convolution model of fully developed
   speckle, in stages: plan the probe's path (image-plane direction, skew, speed, whether
   it passes over a rib), build the echogenicity volume (layers, lesion, rib), draw the
   speckle (``speckle_iq``), cast acoustic shadows and enhancement, then the scanner's
   processing (``focus_beam``: focal zone and spatial compounding; ``receive``:
   attenuation, electronic noise, time-gain compensation, envelope, log compression) and
   the burned-in header. The
   scatterer volume is fixed in the tissue and frames are slices of it ``step_mm`` apart,
   so the speckle slides with the probe: slow sweeps share most of it between frames,
   fast sweeps little (the slice-thickness PSF sets the scale).
4. ``generate_site`` writes ``videos/*.mp4``, ``manifest.csv``, ``boxes.csv`` and
   ``lesions.csv`` (the lexicon features and ``p_malignant`` behind each label, and each
   sweep's direction, skew, speed and rib).

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``(seed, site)``
by ``numpy.random.SeedSequence``, so the same arguments give the same bytes.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.fft
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from common.data.video import write_video
from common.errors import UsageError

Box = tuple[int, int, int, int]

# ------------------------------------------------------------------ lexicon and risk model

SHAPES = ("oval", "round", "irregular")
ORIENTATIONS = ("parallel", "not_parallel")
MARGINS = ("circumscribed", "indistinct", "angular", "microlobulated", "spiculated")
ECHO_PATTERNS = ("anechoic", "hypoechoic", "isoechoic", "complex", "heterogeneous")
POSTERIOR_FEATURES = ("none", "enhancement", "shadowing", "combined")

# Malignancy model: logit p = INTERCEPT + sum of LOG_ODDS[feature][category]. Reference
# categories (0.0) are the typical benign findings. Suspicious margins weigh most
# (spiculated > angular > microlobulated > indistinct), then irregular shape, shadowing and
# taller-than-wide orientation; an anechoic (simple cyst) pattern is strongly benign. With
# the feature distribution below, about a third of lesions are malignant and the AUC of
# p_malignant against the drawn label (the Bayes AUC) is about 0.88.
INTERCEPT = -2.3
LOG_ODDS: dict[str, dict[str, float]] = {
    "shape": {"oval": 0.0, "round": 0.35, "irregular": 1.25},
    "orientation": {"parallel": 0.0, "not_parallel": 1.1},
    "margin": {
        "circumscribed": 0.0,
        "indistinct": 0.9,
        "angular": 1.35,
        "microlobulated": 1.25,
        "spiculated": 2.0,
    },
    "echo": {
        "anechoic": -2.25,
        "hypoechoic": 0.25,
        "isoechoic": -0.45,
        "complex": 0.8,
        "heterogeneous": 0.7,
    },
    "posterior": {"none": 0.0, "enhancement": -0.55, "shadowing": 1.1, "combined": 0.55},
}

# How features are drawn: P(category) is proportional to exp(base + slope * u), where u is
# a latent aggressiveness, u ~ N(0.35 z_age + 0.35 z_size, 1). The shared u makes suspicious
# features occur together and correlate mildly with age and lesion size.
_FEATURE_PRIOR: dict[str, dict[str, tuple[float, float]]] = {
    "shape": {"oval": (1.0, -1.0), "round": (-0.6, 0.0), "irregular": (-0.4, 1.2)},
    "orientation": {"parallel": (1.0, -0.8), "not_parallel": (-1.0, 0.8)},
    "margin": {
        "circumscribed": (1.4, -1.2),
        "indistinct": (0.2, 0.3),
        "angular": (-0.8, 0.7),
        "microlobulated": (-0.9, 0.7),
        "spiculated": (-1.4, 1.3),
    },
    "echo": {
        "anechoic": (-0.6, -1.2),
        "hypoechoic": (1.2, 0.3),
        "isoechoic": (-0.3, -0.3),
        "complex": (-1.0, 0.5),
        "heterogeneous": (-0.6, 0.7),
    },
    "posterior": {
        "none": (1.0, 0.0),
        "enhancement": (0.0, -0.8),
        "shadowing": (-0.8, 1.0),
        "combined": (-1.4, 0.4),
    },
}
_AGE_MEAN, _AGE_SD = 52.0, 13.0  # years
_SIZE_MEDIAN_MM, _SIZE_LOG_SD = 12.0, 0.45  # longest diameter, log-normal

# BI-RADS assessment from the probability of malignancy: (upper bound of p, category).
_BIRADS_BOUNDS = ((0.02, "3"), (0.10, "4A"), (0.50, "4B"), (0.95, "4C"))


@dataclass(frozen=True)
class Lesion:
    """One patient's lesion: what a radiologist reports, and the truth behind the label.

    Attributes
    ----------
    age : int
        Patient's age in years.
    size_mm : float
        Longest diameter in mm (0.1 mm precision).
    shape, orientation, margin, echo, posterior : str
        BI-RADS ultrasound lexicon categories (see ``SHAPES`` ... ``POSTERIOR_FEATURES``).
    p_malignant : float
        Probability of malignancy from ``malignancy_probability``, rounded to 1e-6; the
        label and the BI-RADS category are derived from this rounded value.
    malignant : bool
        The label, drawn as Bernoulli(p_malignant).
    """

    age: int
    size_mm: float
    shape: str
    orientation: str
    margin: str
    echo: str
    posterior: str
    p_malignant: float
    malignant: bool

    @property
    def birads(self) -> str:
        """BI-RADS category ("3", "4A", "4B", "4C" or "5") of ``p_malignant``."""
        return birads_category(self.p_malignant)


def malignancy_probability(
    *, shape: str, orientation: str, margin: str, echo: str, posterior: str
) -> float:
    """Probability of malignancy of a lesion with these lexicon features (logistic model)."""
    logit = (
        INTERCEPT
        + LOG_ODDS["shape"][shape]
        + LOG_ODDS["orientation"][orientation]
        + LOG_ODDS["margin"][margin]
        + LOG_ODDS["echo"][echo]
        + LOG_ODDS["posterior"][posterior]
    )
    return 1.0 / (1.0 + math.exp(-logit))


def birads_category(p_malignant: float) -> str:
    """BI-RADS category for a probability of malignancy.

    3: p <= 2%, 4A: 2-10%, 4B: 10-50%, 4C: 50-95%, 5: p >= 95% (upper bounds inclusive
    except at 95%, which is category 5).
    """
    for bound, category in _BIRADS_BOUNDS[:-1]:
        if p_malignant <= bound:
            return category
    return "4C" if p_malignant < _BIRADS_BOUNDS[-1][0] else "5"


def sample_age(rng: np.random.Generator) -> int:
    """A patient's age in years: normal, mean 52, SD 13, within 22-88."""
    return round(float(np.clip(rng.normal(_AGE_MEAN, _AGE_SD), 22, 88)))


def sample_lesion(rng: np.random.Generator) -> Lesion:
    """Draw a patient's age, lesion size, lexicon features and malignancy label."""
    age = sample_age(rng)
    size_mm = float(np.clip(_SIZE_MEDIAN_MM * math.exp(_SIZE_LOG_SD * rng.normal()), 4.0, 30.0))
    z_age = (age - _AGE_MEAN) / _AGE_SD
    z_size = math.log(size_mm / _SIZE_MEDIAN_MM) / _SIZE_LOG_SD
    aggressiveness = 0.35 * z_age + 0.35 * z_size + rng.normal()
    features = {}
    for name, categories in _FEATURE_PRIOR.items():
        logits = np.array([base + slope * aggressiveness for base, slope in categories.values()])
        weights = np.exp(logits - logits.max())
        features[name] = list(categories)[rng.choice(len(categories), p=weights / weights.sum())]
    p = round(malignancy_probability(**features), 6)
    return Lesion(
        age=age,
        size_mm=round(size_mm, 1),
        p_malignant=p,
        malignant=bool(rng.random() < p),
        **features,
    )


# ------------------------------------------------------------------ scanners

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
        (it widens at most ``_MAX_DEFOCUS`` times).
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

_SOUND_SPEED_MM_PER_US = 1.54
_MAX_DEFOCUS = 2.5  # widest beam, relative to its width at the focus
_FAT_ECHO = 0.3  # echo amplitude of fat, relative to glandular tissue
_DISPLAY_BLUR_PX = 0.6  # least display smoothing (scan conversion), in pixels


def vendor_preset(name: str) -> VendorPreset:
    """The preset called ``name``; ``UsageError`` listing the known ones otherwise."""
    try:
        return VENDORS[name]
    except KeyError:
        raise UsageError(
            f"unknown vendor {name!r}; known vendors: {', '.join(sorted(VENDORS))}"
        ) from None


# ------------------------------------------------------------------ speckle


@dataclass(frozen=True)
class Psf:
    """Separable PSF sampled on the volume grid, each kernel of unit energy.

    Attributes
    ----------
    elevation, axial, lateral : np.ndarray
        ``complex64 [K]`` kernels (odd K, centred) along the frame (sweep), depth and
        lateral axes; the lateral one is the beam at its focus (see ``focus_beam``).
    """

    elevation: np.ndarray
    axial: np.ndarray
    lateral: np.ndarray

    @classmethod
    def of(cls, vendor: VendorPreset, *, spacing_mm: float, step_mm: float) -> Psf:
        """The vendor's PSF for pixels of ``spacing_mm`` and frames ``step_mm`` apart."""
        # Round-trip wavenumber: echoes from depth z return with phase 2 k z.
        wavenumber = 4 * math.pi * vendor.center_mhz / _SOUND_SPEED_MM_PER_US
        return cls(
            elevation=_gaussian_kernel(vendor.elevation_sigma_mm / step_mm),
            axial=_gaussian_kernel(vendor.axial_sigma_mm / spacing_mm, wavenumber * spacing_mm),
            lateral=_gaussian_kernel(vendor.lateral_sigma_mm / spacing_mm),
        )


def _gaussian_kernel(sigma: float, radians_per_sample: float = 0.0) -> np.ndarray:
    """Unit-energy Gaussian of ``sigma`` samples, optionally modulated (analytic pulse)."""
    half = max(1, math.ceil(3 * sigma))
    n = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (n / max(sigma, 1e-3)) ** 2) * np.exp(1j * radians_per_sample * n)
    return (kernel / np.linalg.norm(kernel)).astype(np.complex64)


def speckle_iq(
    amplitude: np.ndarray, psf: Psf, rng: np.random.Generator, *, lateral: bool = True
) -> np.ndarray:
    """Complex echo signal (IQ) of a scatterer volume: ``(amplitude * n) conv psf``.

    Parameters
    ----------
    amplitude : np.ndarray
        ``float32 [Z, Y, X]`` echogenicity (root mean square scattering amplitude); 1 is
        glandular tissue.
    psf : Psf
        Kernels for the Z (elevation), Y (depth) and X (lateral) axes.
    rng : np.random.Generator
        Source of the circular complex Gaussian scatterers ``n`` (unit power).
    lateral : bool
        Convolve along X too; ``render_sweep`` leaves that to ``focus_beam``, which
        focuses and compounds.

    Returns
    -------
    np.ndarray
        ``complex64 [Z, Y, X]``; where ``amplitude`` is constant ``A`` its modulus is
        Rayleigh distributed with mean power ``A**2``. The convolution is circular (FFT),
        so callers pad the volume by the kernels' half-lengths where the edges matter.
    """
    shape = amplitude.shape
    scatterers = _complex_normal(shape, rng)
    scatterers *= amplitude * np.float32(math.sqrt(0.5))
    axes = (0, 1, 2) if lateral else (0, 1)
    spectrum = scipy.fft.fftn(scatterers, axes=axes, overwrite_x=True)
    for axis, kernel in zip(axes, (psf.elevation, psf.axial, psf.lateral), strict=False):
        response = scipy.fft.fft(_wrapped(kernel, shape[axis]))
        spectrum *= response.reshape([-1 if a == axis else 1 for a in range(3)])
    return scipy.fft.ifftn(spectrum, axes=axes, overwrite_x=True)


def _complex_normal(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``complex64`` array whose real and imaginary parts are standard normal."""
    return rng.standard_normal((*shape, 2), dtype=np.float32).view(np.complex64)[..., 0]


def speckle_envelope(amplitude: np.ndarray, psf: Psf, rng: np.random.Generator) -> np.ndarray:
    """Envelope ``|speckle_iq(...)|`` before log compression: ``float32 [Z, Y, X]``."""
    return np.abs(speckle_iq(amplitude, psf, rng))


def _wrapped(kernel: np.ndarray, length: int) -> np.ndarray:
    """The kernel wrapped onto ``length`` samples, centre at 0, for circular convolution."""
    half = len(kernel) // 2
    wrapped = np.zeros(length, dtype=np.complex64)
    np.add.at(wrapped, np.arange(-half, half + 1) % length, kernel)
    return wrapped


def log_compress(envelope: np.ndarray, vendor: VendorPreset) -> np.ndarray:
    """B-mode pixels: ``255 * clip(1 + (20 log10 envelope + gain) / range, 0, 1) ** gamma``.

    The power is the scanner's gray map (``vendor.gray_gamma``); the result is uint8.
    """
    level_db = 20 * np.log10(np.maximum(envelope, 1e-6))
    scaled = np.clip(1 + (level_db + vendor.gain_db) / vendor.dynamic_range_db, 0, 1)
    return np.round(255 * scaled**vendor.gray_gamma).astype(np.uint8)


# ------------------------------------------------------------------ scanner processing


def tgc_gain_db(vendor: VendorPreset, depth_mm: np.ndarray) -> np.ndarray:
    """Time-gain compensation at ``depth_mm`` below the skin: the vendor's slider curve."""
    sliders = np.linspace(0, vendor.depth_mm, len(vendor.tgc_db))
    return np.interp(depth_mm, sliders, vendor.tgc_db)


def focus_beam(iq: np.ndarray, vendor: VendorPreset, *, spacing_mm: float) -> np.ndarray:
    """Form the lateral beam: transmit focus and spatial compounding.

    Parameters
    ----------
    iq : np.ndarray
        ``complex64 [T, Y, X]`` echoes convolved along elevation and depth only
        (``speckle_iq(..., lateral=False)``); row 0 lies at the skin, rows and columns are
        ``spacing_mm`` apart.
    vendor : VendorPreset
        Beam width, focal depth, depth of field, focal gain and compounding looks.
    spacing_mm : float
        Pixel spacing.

    Returns
    -------
    np.ndarray
        ``complex64 [K, T, Y, X]``, one image per compounding look (``K =
        vendor.compound_looks``). Each row blends the beam at its focus with the widest
        beam, so that the beam, and with it the lateral speckle size, widens as
        ``sqrt(1 + (distance / focal_length_mm)**2)`` away from the focal depth (at most
        ``_MAX_DEFOCUS`` times); rows near the focus are brighter by up to
        ``focal_gain_db``. Look ``k`` steers the beam: its PSF is modulated to another part
        of the lateral spectrum, so it sees the same tissue through decorrelated speckle.
        The convolution is circular across columns, so callers pad them.
    """
    depth = (np.arange(iq.shape[1]) + 0.5) * spacing_mm
    offset = (depth - vendor.focus_fraction * vendor.depth_mm) / vendor.focal_length_mm
    width = np.minimum(np.sqrt(1 + offset**2), _MAX_DEFOCUS)
    sharpness = ((_MAX_DEFOCUS - width) / (_MAX_DEFOCUS - 1))[:, None]
    gain = 10 ** (vendor.focal_gain_db * np.exp(-0.5 * offset**2) / 20)[:, None]
    sigma = vendor.lateral_sigma_mm / spacing_mm
    columns = iq.shape[2]
    spectrum = scipy.fft.fft(iq, axis=2)
    looks = np.empty((vendor.compound_looks, *iq.shape), dtype=np.complex64)
    for k in range(vendor.compound_looks):
        # Steering spreads the looks evenly over the lateral band (wrapped).
        steer = 2 * math.pi * k / vendor.compound_looks
        focal, widest = (
            scipy.fft.fft(_wrapped(_gaussian_kernel(sigma * factor, steer), columns))
            for factor in (1.0, _MAX_DEFOCUS)
        )
        # One lateral response per row: the blend of the two beams, and the focal gain.
        response = (gain * (sharpness * focal + (1 - sharpness) * widest)).astype(np.complex64)
        looks[k] = scipy.fft.ifft(spectrum * response, axis=2, overwrite_x=True)
    return looks


def receive(
    looks: np.ndarray,
    vendor: VendorPreset,
    *,
    spacing_mm: float,
    rng: np.random.Generator,
    tgc: bool = True,
) -> np.ndarray:
    """The receive chain: attenuation, electronic noise, TGC, compounding, display.

    Parameters
    ----------
    looks : np.ndarray
        ``complex64 [K, T, Y, X]`` echoes of each compounding look (``focus_beam``) as they
        leave the tissue, row 0 at the skin.
    vendor : VendorPreset
        Attenuation, noise, TGC curve, display filter and log compression.
    spacing_mm : float
        Pixel spacing.
    rng : np.random.Generator
        Source of the electronic noise (one draw, shared by the looks).
    tgc : bool
        Apply the vendor's time-gain compensation; without it the image darkens with
        depth by ``attenuation_db_per_cm``.

    Returns
    -------
    np.ndarray
        ``uint8 [T, Y, X]`` B-mode frames: the looks' envelopes averaged, smoothed and
        log-compressed.
    """
    depth = (np.arange(looks.shape[2]) + 0.5) * spacing_mm
    tgc_db = tgc_gain_db(vendor, depth) if tgc else np.zeros_like(depth)
    # echo = (looks * attenuation + noise) * tgc, in one pass over the looks.
    signal_gain = 10 ** ((tgc_db - vendor.attenuation_db_per_cm * depth / 10) / 20)
    noise_gain = 10 ** ((tgc_db + vendor.noise_db) / 20) * math.sqrt(0.5)
    noise = _complex_normal(looks.shape[1:], rng) * noise_gain.astype(np.float32)[:, None]
    echo: np.ndarray = looks * signal_gain.astype(np.float32)[:, None]
    echo += noise
    # Scan conversion interpolates at least over a fraction of a pixel, which keeps
    # undersampled speckle from showing as one-pixel cracks.
    sigma = max(vendor.smoothing_mm / spacing_mm, _DISPLAY_BLUR_PX)
    envelope = ndimage.gaussian_filter(np.abs(echo).mean(axis=0), (0, sigma, sigma))
    return log_compress(envelope, vendor)


# ------------------------------------------------------------------ lesion geometry


@dataclass(frozen=True)
class _LesionGeometry:
    """A lesion's 3D shape and acoustics, fixed per patient; lengths in mm, angles in rad."""

    semi_axes_mm: tuple[float, float, float]  # lateral (long), depth, elevation
    tilt: float  # rotation of the long axis out of the horizontal, towards depth
    azimuth: float  # horizontal angle of the long axis from the radial line (nipple)
    harmonics: np.ndarray  # [K, 3]: order, relative amplitude, phase
    spikes: np.ndarray  # [S, 2]: angle, relative length
    polygon: tuple[int, float] | None  # vertex count and phase of angular corners
    lobules: tuple[int, float, float] | None  # count, relative depth, phase
    twist: float  # phase drift of the boundary pattern from one face to the other
    edge: float  # width of the soft boundary, relative to the radius
    echo_level: float  # amplitude of the lesion's interior relative to glandular tissue
    echo_texture: float  # log-normal heterogeneity of the interior
    cystic_fraction: float  # share of the interior that is fluid (complex pattern)
    posterior_ratio: float  # amplitude ratio below the lesion, full thickness
    posterior_edge_ratio: float  # the same at the lateral edges (combined pattern)

    def radius(self, theta: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Boundary radius (1 = ellipse) at polar angle ``theta`` and elevation ``w``."""
        theta = theta + self.twist * w
        radius = np.ones(np.broadcast_shapes(theta.shape, w.shape), dtype=np.float32)
        for order, amplitude, phase in self.harmonics:
            radius += amplitude * np.cos(order * theta + phase)
        if self.polygon is not None:
            vertices, phase = self.polygon
            sector = 2 * math.pi / vertices
            local = np.mod(theta - phase, sector) - sector / 2
            radius *= math.cos(sector / 2) / np.cos(local) / _mean_polygon_radius(vertices)
        if self.lobules is not None:
            count, depth, phase = self.lobules
            radius += depth * (np.abs(np.sin(0.5 * count * theta + phase)) - 2 / math.pi)
        for angle, length in self.spikes:
            offset = np.mod(theta - angle + math.pi, 2 * math.pi) - math.pi
            radius += length * np.exp(-0.5 * (offset / 0.05) ** 2)
        return radius

    def half_extents(self, theta: float) -> tuple[float, float]:
        """Half-widths (mm) of the lesion, spicules included, along the sweep and across
        the image; ``theta`` is the angle of the long axis from the image's lateral axis."""
        lateral, _, elevation = self.semi_axes_mm
        lateral *= self.max_radius
        along_sweep = math.hypot(lateral * math.sin(theta), elevation * math.cos(theta))
        across = math.hypot(lateral * math.cos(theta), elevation * math.sin(theta))
        return along_sweep, across

    @property
    def max_radius(self) -> float:
        """An upper bound of ``radius``."""
        bound = 1 + float(np.abs(self.harmonics[:, 1]).sum()) if len(self.harmonics) else 1.0
        if self.polygon is not None:
            bound /= _mean_polygon_radius(self.polygon[0])
        if self.lobules is not None:
            bound += self.lobules[1]
        return bound + (float(self.spikes[:, 1].max()) if len(self.spikes) else 0.0)


def _mean_polygon_radius(vertices: int) -> float:
    """Mean over angle of a regular polygon's radius (circumradius 1)."""
    half = math.pi / vertices
    return math.cos(half) * math.atanh(math.sin(half)) / half


def _lesion_geometry(lesion: Lesion, rng: np.random.Generator) -> _LesionGeometry:
    """Turn the lexicon features into a concrete shape, margin and acoustics."""
    aspect = {
        "oval": rng.uniform(1.4, 2.0),
        "round": rng.uniform(1.0, 1.15),
        "irregular": rng.uniform(1.1, 1.6),
    }[lesion.shape]
    long_semi = lesion.size_mm / 2
    if lesion.orientation == "parallel":  # wider than tall
        lateral, depth = long_semi, long_semi / aspect
    else:  # taller than wide
        lateral, depth = long_semi / max(aspect, 1.15), long_semi
    elevation = lateral * rng.uniform(0.7, 1.0)

    if lesion.shape == "irregular":
        orders = np.arange(2, 6)
        harmonics = np.column_stack(
            [orders, rng.uniform(0.05, 0.12, 4), rng.uniform(0, 2 * math.pi, 4)]
        )
    else:
        harmonics = np.array([[2.0, rng.uniform(0.0, 0.03), rng.uniform(0, 2 * math.pi)]])
    margin = lesion.margin
    n_spikes = int(rng.integers(8, 15)) if margin == "spiculated" else 0
    spikes = np.column_stack(
        [rng.uniform(0, 2 * math.pi, n_spikes), rng.uniform(0.3, 0.8, n_spikes)]
    ).reshape(-1, 2)
    polygon = (
        (int(rng.integers(4, 7)), rng.uniform(0, 2 * math.pi)) if margin == "angular" else None
    )
    lobules = (
        (int(rng.integers(10, 17)), rng.uniform(0.08, 0.14), rng.uniform(0, 2 * math.pi))
        if margin == "microlobulated"
        else None
    )

    # BI-RADS grades echogenicity against subcutaneous fat (_FAT_ECHO; glandular tissue 1).
    relative, texture, cystic = {
        "anechoic": (0.02 / _FAT_ECHO, 0.0, 0.0),
        "hypoechoic": (rng.uniform(0.27, 0.55), 0.15, 0.0),
        "isoechoic": (rng.uniform(0.93, 1.22), 0.1, 0.0),
        "complex": (rng.uniform(0.9, 1.33), 0.2, rng.uniform(0.35, 0.6)),
        "heterogeneous": (rng.uniform(0.55, 0.9), 0.7, 0.0),
    }[lesion.echo]
    echo_level = relative * _FAT_ECHO
    enhance, shadow = rng.uniform(1.6, 2.2), rng.uniform(0.15, 0.3)
    posterior_ratio, edge_ratio = {
        "none": (1.0, 1.0),
        "enhancement": (enhance, enhance),
        "shadowing": (shadow, shadow),
        "combined": (shadow, enhance),
    }[lesion.posterior]
    return _LesionGeometry(
        semi_axes_mm=(lateral, depth, elevation),
        tilt=rng.normal(0, 0.12),
        # Masses tend to lie along the ducts, which run radially towards the nipple.
        azimuth=rng.normal(0, 0.35),
        harmonics=harmonics,
        spikes=spikes,
        polygon=polygon,
        lobules=lobules,
        twist=rng.normal(0, 0.4),
        edge=rng.uniform(0.1, 0.16) if margin == "indistinct" else 0.0,
        echo_level=echo_level,
        echo_texture=texture,
        cystic_fraction=cystic,
        posterior_ratio=posterior_ratio,
        posterior_edge_ratio=edge_ratio,
    )


# ------------------------------------------------------------------ anatomy and identity


@dataclass(frozen=True)
class Anatomy:
    """A patient's breast from the skin down: layer thicknesses in mm.

    Attributes
    ----------
    skin_mm : float
        Skin (epidermis and dermis).
    fat_mm : float
        Subcutaneous fat, hypoechoic lobules between Cooper's ligaments.
    gland_mm : float
        Fibroglandular tissue; thinner in older patients (involution). A lesion widens it
        where it has to.
    retromammary_mm : float
        Fat between the gland and the pectoral fascia.
    muscle_mm : float
        Pectoralis major.
    lobule_mm : float
        Typical width of a fat lobule.
    """

    skin_mm: float
    fat_mm: float
    gland_mm: float
    retromammary_mm: float
    muscle_mm: float
    lobule_mm: float


def sample_anatomy(rng: np.random.Generator, *, age: int) -> Anatomy:
    """Draw a patient's layer thicknesses; the gland thins and fat thickens with age."""
    z_age = (age - _AGE_MEAN) / _AGE_SD
    return Anatomy(
        skin_mm=rng.uniform(1.4, 2.4),
        fat_mm=float(np.clip(8.0 * math.exp(0.15 * z_age + 0.35 * rng.normal()), 3.0, 18.0)),
        gland_mm=float(np.clip(12.0 * math.exp(-0.2 * z_age + 0.35 * rng.normal()), 4.0, 24.0)),
        retromammary_mm=rng.uniform(1.0, 3.0),
        muscle_mm=rng.uniform(4.0, 10.0),
        lobule_mm=rng.uniform(4.0, 8.0),
    )


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


# ------------------------------------------------------------------ the probe's path

# Freehand speed, log-uniform (2.5-16 mm/s at 10 frames/s); with a lesion it is held
# where the lesion fills 35-70% of the sweep, so that some frames at each end miss it.
_STEP_MM = (0.25, 1.6)
_COVERAGE = (0.35, 0.7)
_MAX_SKEW_DEG = 12.0
_RIB_SWEEP_FRACTION = 0.3
# Ribs: behind the pectoralis, 10-14 mm wide, 6-8 mm thick, 24-30 mm apart; the pleura
# lies under their back surfaces.
_CHEST_WALL_MM = 9.0


@dataclass(frozen=True)
class SweepPath:
    """How the probe crossed the breast in one video.

    Attributes
    ----------
    direction_deg : float
        Azimuth of the image plane from the radial line through the lesion (or the
        breast's centre), in [0, 180): 0 is a radial view, 90 an antiradial one. The probe
        travels across its image plane.
    skew_deg : float
        Angle between the travel and the image plane's normal: the anatomy slides across
        the image by ``step_mm * tan(skew)`` per frame.
    step_mm : float
        Travel per frame; the speed is ``step_mm * fps`` mm/s. Consecutive frames share
        speckle through the slice thickness, less the faster the sweep.
    rib : bool
        Whether a rib and its acoustic shadow are in view.
    """

    direction_deg: float
    skew_deg: float
    step_mm: float
    rib: bool


def _plan_path(
    geometry: _LesionGeometry | None,
    frames: int,
    rng: np.random.Generator,
    *,
    direction_deg: float | None,
    skew_deg: float | None,
    step_mm: float | None,
    rib: bool | None,
) -> SweepPath:
    """Draw what the caller left open of a sweep's path."""
    if direction_deg is None:
        direction_deg = rng.uniform(0, 180)
    if skew_deg is None:
        skew_deg = rng.uniform(-_MAX_SKEW_DEG, _MAX_SKEW_DEG)
    if step_mm is None:
        step_mm = math.exp(rng.uniform(*np.log(_STEP_MM)))
        if geometry is not None:
            theta = geometry.azimuth - math.radians(direction_deg)
            extent = 2 * geometry.half_extents(theta)[0]
            lowest, highest = (extent / (c * frames) for c in reversed(_COVERAGE))
            step_mm = min(max(step_mm, lowest), highest)
    if rib is None:
        rib = bool(rng.random() < _RIB_SWEEP_FRACTION)
    return SweepPath(
        direction_deg=float(direction_deg) % 180,
        skew_deg=float(skew_deg),
        step_mm=float(step_mm),
        rib=rib,
    )


@dataclass(frozen=True)
class _Layers:
    """Mean depths (mm) of one sweep's interfaces below the skin surface."""

    skin: float
    fat: float  # bottom of the subcutaneous fat
    gland: float  # bottom of the fibroglandular tissue
    muscle: float  # pectoral fascia
    chest: float  # back of the pectoralis, front of the ribs
    pleura: float
    lesion: float | None  # lesion centre


def _fit_layers(
    anatomy: Anatomy,
    geometry: _LesionGeometry | None,
    *,
    field_mm: float,
    rib: bool,
    rng: np.random.Generator,
) -> _Layers:
    """Place the patient's layers, the lesion and the chest wall in one sweep's field."""
    skin, fat, gland = anatomy.skin_mm, anatomy.fat_mm, anatomy.gland_mm
    if rib:
        # Ribs show where the breast is thin, towards its edges: fat and gland shrink so
        # that the chest wall lies at 40-65% of the field.
        room = rng.uniform(0.4, 0.65) * field_mm - skin - anatomy.retromammary_mm
        scale = float(np.clip((room - anatomy.muscle_mm) / (fat + gland), 0.25, 1.0))
        fat, gland = fat * scale, gland * scale
    fat = max(fat, 1.5)
    lesion = None
    if geometry is not None:
        # The lesion lies in the gland, 2 mm from its borders, with its bottom in the top
        # 85% of the field: the gland widens and the fat gives way as needed.
        half = 1.1 * geometry.semi_axes_mm[1]
        gland = max(gland, 2 * half + 4)
        fat = min(fat, max(1.5, 0.85 * field_mm - 2 * half - 2 - skin))
        top = skin + fat + 2 + half
        lesion = rng.uniform(
            top, max(top, min(skin + fat + gland - 2 - half, 0.85 * field_mm - half))
        )
    muscle = skin + fat + gland + anatomy.retromammary_mm
    chest = muscle + anatomy.muscle_mm
    return _Layers(
        skin=skin,
        fat=skin + fat,
        gland=skin + fat + gland,
        muscle=muscle,
        chest=chest,
        pleura=chest + _CHEST_WALL_MM,
        lesion=lesion,
    )


@dataclass(frozen=True)
class _Ribs:
    """Parallel ribs behind the pectoralis; lengths in mm on the volume's (z, x) axes."""

    azimuth: float  # angle of the rib axes from the image's lateral axis (rad)
    origin: tuple[float, float]  # (z, x) of a point on one rib's axis
    pitch: float  # distance between neighbouring rib axes
    half_width: float
    half_height: float
    depth: float  # depth of the rib axes

    def surface(self, z: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Depth of the nearest rib's front surface and its footprint (0..1) over (z, x)."""
        across = (x - self.origin[1]) * math.sin(self.azimuth) - (z - self.origin[0]) * math.cos(
            self.azimuth
        )
        distance = np.abs(across - self.pitch * np.round(across / self.pitch))
        bulge = np.sqrt(np.clip(1 - (distance / self.half_width) ** 2, 0, 1))
        footprint = 1 / (1 + np.exp((distance - self.half_width) / 0.4))
        return self.depth - self.half_height * bulge, footprint


def _place_ribs(
    layers: _Layers,
    *,
    field_mm: float,
    centre_mm: tuple[float, float],
    rng: np.random.Generator,
) -> _Ribs | None:
    """Ribs under the chest wall near ``centre_mm`` (z, x), or None where they lie too deep."""
    half_height = rng.uniform(3.0, 4.0)
    depth = layers.chest + 0.5 + half_height
    ribs = _Ribs(
        azimuth=rng.uniform(0, math.pi),
        origin=(centre_mm[0], centre_mm[1] + rng.uniform(-8, 8)),
        pitch=rng.uniform(24.0, 30.0),
        half_width=rng.uniform(5.0, 7.0),
        half_height=half_height,
        depth=depth,
    )
    # The rib and a few mm of its shadow must be in view.
    return ribs if depth - half_height < field_mm - 5 else None


# ------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class Sweep:
    """One rendered sweep.

    Attributes
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]`` B-mode frames; the top ``header_rows`` rows hold the burned-in
        header, the image lies below.
    boxes : dict[int, tuple[int, int, int, int]]
        Lesion box per frame where the lesion is visible (0-based frame index):
        ``(x1, y1, x2, y2)`` in pixels, pixel edges, so ``0 <= x1 < x2 <= W`` and
        ``header_rows <= y1 < y2 <= H``. Empty for a sweep of normal tissue.
    path : SweepPath
        How the probe moved.
    header_rows : int
        Height of the header band.
    """

    frames: np.ndarray
    boxes: dict[int, Box]
    path: SweepPath
    header_rows: int


def render_sweep(
    lesion: Lesion | None,
    vendor: VendorPreset,
    *,
    frames: int,
    size: int,
    rng: np.random.Generator,
    geometry_rng: np.random.Generator | None = None,
    # The patient; drawn from rng where not given.
    anatomy: Anatomy | None = None,
    identity: PatientIdentity | None = None,
    # The probe's path; drawn from rng where not given.
    direction_deg: float | None = None,
    skew_deg: float | None = None,
    step_mm: float | None = None,
    rib: bool | None = None,
    # The scanner's processing.
    tgc: bool = True,
) -> Sweep:
    """Image a freehand sweep across ``lesion`` (or normal tissue) with ``vendor``'s scanner.

    Parameters
    ----------
    lesion : Lesion or None
        Features to render; None sweeps normal tissue.
    vendor : VendorPreset
        Scanner characteristics.
    frames : int
        Number of frames T (>= 8). With a drawn ``step_mm``, the lesion fills 35-70% of the
        sweep near its middle and the first and last frames miss it.
    size : int
        Frame height and width in pixels (even, >= 32).
    rng : np.random.Generator
        Draws this sweep: what is left open below, tissue, ribs and speckle.
    geometry_rng : np.random.Generator, optional
        Draws the lesion's concrete shape; pass generators in the same state to sweep the
        same lesion twice. Defaults to ``rng``.
    anatomy : Anatomy, optional
        The patient's layers; ``sample_anatomy`` at the lesion's age (or 50) if None.
    identity : PatientIdentity, optional
        Whose data the header shows; ``fake_identity`` if None.
    direction_deg, skew_deg, step_mm : float, optional
        The path (see ``SweepPath``); drawn if None. An explicit ``step_mm`` is used as
        is, however much of the sweep the lesion then fills.
    rib : bool, optional
        Ask for a rib in view (True) or none (False); drawn (30%) if None. A rib that
        would lie too deep, behind a large lesion, is left out: ``Sweep.path.rib`` says.
    tgc : bool
        Apply the vendor's time-gain compensation.

    Returns
    -------
    Sweep
        Frames, per-frame lesion boxes, the path and the header height.
    """
    _check_frames(frames, size)
    geometry = None
    if lesion is not None:
        geometry = _lesion_geometry(lesion, geometry_rng if geometry_rng is not None else rng)
    if anatomy is None:
        anatomy = sample_anatomy(rng, age=lesion.age if lesion is not None else 50)
    if identity is None:
        identity = fake_identity(rng)
    path = _plan_path(
        geometry,
        frames,
        rng,
        direction_deg=direction_deg,
        skew_deg=skew_deg,
        step_mm=step_mm,
        rib=rib,
    )
    top = vendor.header_rows(size)
    rows = size - top
    spacing = vendor.depth_mm / rows  # mm per pixel
    layers = _fit_layers(anatomy, geometry, field_mm=vendor.depth_mm, rib=path.rib, rng=rng)
    psf = Psf.of(vendor, spacing_mm=spacing, step_mm=path.step_mm)

    # Volume: frames padded along the sweep, rows padded below, columns padded on both sides
    # for the probe's drift and the focus blur, and widened by the skew's slide; the pads
    # absorb the FFTs' circular wrap.
    slide = np.arange(frames) * path.step_mm * math.tan(math.radians(path.skew_deg)) / spacing
    slide -= slide.min()
    z_pad = len(psf.elevation) // 2 + 1
    y_pad = len(psf.axial) // 2 + 1
    x_margin = max(2, size // 32)
    x_pad = x_margin + math.ceil(3 * _MAX_DEFOCUS * vendor.lateral_sigma_mm / spacing) + 1
    # FFT-friendly lengths; the extra samples go at the far ends, past the frame.
    shape = tuple(
        scipy.fft.next_fast_len(n)
        for n in (
            frames + 2 * z_pad,
            rows + y_pad,
            size + 2 * x_pad + math.ceil(slide[-1] + slide[0]),
        )
    )
    left = x_pad + np.round(slide).astype(int) + _probe_drift(frames, x_margin, rng)

    ribs = None
    if path.rib:
        mid = (z_pad + frames / 2) * path.step_mm, (x_pad + slide.mean() + size / 2) * spacing
        ribs = _place_ribs(layers, field_mm=vendor.depth_mm, centre_mm=mid, rng=rng)
        path = replace(path, rib=ribs is not None)
    amplitude = _tissue_amplitude(shape, spacing, path.step_mm, layers, anatomy, ribs, rng)

    lesion_parts = None
    if geometry is not None and layers.lesion is not None:
        theta = geometry.azimuth - math.radians(path.direction_deg)
        along, across = geometry.half_extents(theta)
        covered = min(1.0, 2 * along / (frames * path.step_mm))
        # Near the middle of the sweep, so that the middle frame shows the lesion.
        shift = rng.uniform(-1, 1) * max(0.0, min((1 - covered) / 2 - 0.15, covered / 4)) * frames
        t_centre = (frames - 1) / 2 + shift
        radius_px = across / spacing
        centre = (
            z_pad + t_centre,
            layers.lesion / spacing - 0.5,
            x_pad
            + float(np.interp(t_centre, np.arange(frames), slide))
            + size / 2
            + rng.uniform(-0.25, 0.25) * max(0.0, size - 2 * radius_px),
        )
        region, membership, lateral_coord = _lesion_membership(
            geometry, shape, centre, spacing=spacing, step_mm=path.step_mm, theta=theta
        )
        interior = _lesion_interior(geometry, membership.shape, spacing, path.step_mm, rng)
        amplitude[region] += membership * (interior - amplitude[region])
        lesion_parts = region, membership, lateral_coord

    iq = speckle_iq(amplitude, psf, rng, lateral=False)
    del amplitude
    if lesion_parts is not None and geometry is not None:
        _apply_posterior(iq, geometry, *lesion_parts, spacing=spacing)
    if ribs is not None:
        _apply_rib_shadow(iq, ribs, spacing=spacing, step_mm=path.step_mm)

    looks = focus_beam(iq[z_pad : z_pad + frames, :rows], vendor, spacing_mm=spacing)
    planes = np.stack([looks[:, t, :, left[t] : left[t] + size] for t in range(frames)], axis=1)
    images = np.empty((frames, size, size), dtype=np.uint8)
    images[:, :top] = header_band(vendor, identity, size=size)
    images[:, top:] = receive(planes, vendor, spacing_mm=spacing, rng=rng, tgc=tgc)

    boxes: dict[int, Box] = {}
    if lesion_parts is not None:
        region, membership, _ = lesion_parts
        for t in range(frames):
            box = _frame_box(
                region, membership, z=z_pad + t, left=int(left[t]), size=size, rows=rows
            )
            if box is not None:
                x1, y1, x2, y2 = box
                boxes[t] = x1, y1 + top, x2, y2 + top
    return Sweep(frames=images, boxes=boxes, path=path, header_rows=top)


def _check_frames(frames: int, size: int) -> None:
    if frames < 8 or size < 32 or size % 2:
        raise UsageError(f"need frames >= 8 and an even size >= 32, got {frames} and {size}")


def _tissue_amplitude(
    shape: tuple[int, int, int],
    spacing: float,
    step_mm: float,
    layers: _Layers,
    anatomy: Anatomy,
    ribs: _Ribs | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Echogenicity of layered breast tissue, ``float32 [Z, Y, X]`` (glandular = 1).

    From the skin down: skin (bright entry line, dermis, fascia), subcutaneous fat
    (hypoechoic lobules framed by bright Cooper's ligaments), fibroglandular tissue
    (bright, streaky, with islands of fat), retromammary fat, the pectoralis (fascia lines
    and striated fibres), intercostal muscle, ribs (a bright front surface) and the pleura.
    Interfaces undulate across the image and along the sweep.
    """
    Z, Y, X = shape
    z = np.arange(Z, dtype=np.float32)[:, None, None] * step_mm
    y = (np.arange(Y, dtype=np.float32)[None, :, None] + 0.5) * spacing
    x = np.arange(X, dtype=np.float32)[None, None, :] * spacing

    def interface(mean_mm: float, swing_mm: float, scale_mm: float) -> np.ndarray:
        """Depth of an undulating interface over (z, x): ``[Z, 1, X]``."""
        wave = _smooth_field((Z, 1, X), (scale_mm / step_mm, 1.0, scale_mm / spacing), rng)
        return mean_mm + np.float32(swing_mm) * wave

    def rows(shallowest: float, deepest: float) -> slice:
        return slice(
            min(Y, max(0, math.floor(shallowest / spacing) - 1)),
            min(Y, math.ceil(deepest / spacing) + 1),
        )

    fat_end = interface(layers.fat, 1.0, 3.0)
    gland_end = interface(layers.gland, 1.2, 5.0)
    muscle_top = gland_end + np.float32(layers.muscle - layers.gland)
    chest = np.maximum(interface(layers.chest, 0.5, 8.0), muscle_top + 2)
    pleura = chest + np.float32(layers.pleura - layers.chest)

    amplitude = np.ones(shape, dtype=np.float32)  # fibroglandular tissue
    # Fat lobules: the zero set of a smooth random field draws closed, curved septa about
    # pi sigma apart (flattened along depth); high values mark fat islands in the gland.
    upper = rows(0, float(gland_end.max()))
    sigma = anatomy.lobule_mm / math.pi
    lobules = _smooth_field(
        (Z, upper.stop, X), (sigma / step_mm, 0.45 * sigma / spacing, sigma / spacing), rng
    )
    septa = np.exp(-((lobules / 0.2) ** 2))
    islands = 1 / (1 + np.exp((1.1 - lobules) / 0.15))
    # Fibrous strands of the gland: the zero set of a field stretched along the skin.
    strands = _smooth_field((Z, upper.stop, X), (3.0 / step_mm, 0.8 / spacing, 4.0 / spacing), rng)
    fibrous = np.exp(-((strands / 0.25) ** 2))
    amplitude[:, upper] = np.where(
        y[:, upper] < fat_end,
        _FAT_ECHO + 3.0 * septa,
        1.0 + 3.0 * fibrous - (1.0 - _FAT_ECHO) * islands,
    )

    deep = rows(float(gland_end.min()), Y * spacing)
    yd = y[:, deep]
    angle, period = rng.uniform(-0.15, 0.15), rng.uniform(1.2, 2.0)
    phase = (yd + angle * x) / period + 0.05 * np.sin(x / 3 + z / 4)
    fibres = np.cos(math.pi * phase) ** 2
    fibres *= fibres  # squared twice: cos**8, thin bright lines
    fibres *= fibres
    fascia = np.minimum(np.abs(yd - muscle_top), np.abs(yd - chest)) < 0.3
    layer = [
        yd < gland_end,
        yd < muscle_top,
        fascia,
        yd < chest,
        yd < pleura,
        yd < pleura + 0.6,
    ]
    value: list[np.ndarray | float] = [
        amplitude[:, deep],
        _FAT_ECHO,
        2.2,
        0.35 + 1.3 * fibres,
        0.3 + 0.8 * fibres,
        3.0,
    ]
    amplitude[:, deep] = np.select(layer, value, 0.2)  # below the pleura: air

    if ribs is not None:
        front, footprint = ribs.surface(z, x)
        bone = rows(float(front.min()), ribs.depth + ribs.half_height)
        below = y[:, bone] - front
        cortex = (below >= 0) & (below < 1.0) & (footprint > 0.5)
        amplitude[:, bone] = np.where(cortex, 6.0, amplitude[:, bone])

    skin = rows(0, layers.skin)
    ys = y[:, skin]
    amplitude[:, skin] = np.select(
        [ys < 0.4, ys < layers.skin - 0.3, ys < layers.skin],
        [5.0, 1.6, 2.5],
        amplitude[:, skin],
    )
    # Tissue structure: log-normal texture elongated along the skin (about 2 mm laterally,
    # 0.4 mm in depth, 1.5 mm along the sweep), which gives the streaky look of breast tissue.
    texture = _smooth_field(shape, (1.5 / step_mm, 0.4 / spacing, 2.0 / spacing), rng)
    amplitude *= np.exp(0.6 * texture - 0.18)
    return amplitude


def _smooth_field(
    shape: tuple[int, ...], sigma: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """Gaussian random field with unit variance and Gaussian correlation of ``sigma`` samples.

    White noise smoothed by a Gaussian filter, drawn directly as its spectrum and only
    where the filter passes anything, which skips most of the draws and a forward FFT.
    """
    gains, support = [], []
    for axis, s in enumerate(sigma):
        last = axis == len(shape) - 1
        freq = scipy.fft.rfftfreq(shape[axis]) if last else scipy.fft.fftfreq(shape[axis])
        gain = np.exp(-2 * (math.pi * s * freq) ** 2).astype(np.float32)
        keep = np.flatnonzero(gain > 1e-4)
        gains.append(gain[keep].reshape([-1 if a == axis else 1 for a in range(len(shape))]))
        support.append(keep)
    coefficients = _complex_normal(tuple(len(keep) for keep in support), rng)
    for gain in gains:
        coefficients *= gain
    spectrum = np.zeros((*shape[:-1], shape[-1] // 2 + 1), dtype=np.complex64)
    spectrum[np.ix_(*support)] = coefficients
    field = scipy.fft.irfftn(spectrum, s=shape, overwrite_x=True)
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def _lesion_membership(
    geometry: _LesionGeometry,
    shape: tuple[int, int, int],
    centre: tuple[float, float, float],
    *,
    spacing: float,
    step_mm: float,
    theta: float,
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Soft indicator (0..1) of the lesion within its bounding region of the volume.

    ``centre`` is in volume samples (z, y, x); ``theta`` is the angle of the lesion's long
    axis from the image's lateral axis. Returns the region (slices into the volume), the
    membership ``float32`` over it, and the lateral coordinate in the image in units of the
    lesion's half-width there (for the combined posterior pattern).
    """
    lateral, depth, elevation = geometry.semi_axes_mm
    # A box around the lesion in its own frame (long axis, depth, elevation), turned by theta.
    reach = (geometry.max_radius + 4 * geometry.edge) * max(lateral, depth)
    thick = elevation * (1 + 4 * geometry.edge)
    cos_t, sin_t = abs(math.cos(theta)), abs(math.sin(theta))
    bounds = (
        (reach * sin_t + thick * cos_t) / step_mm + 1,
        reach / spacing + 2,
        (reach * cos_t + thick * sin_t) / spacing + 2,
    )
    z, y, x = (
        slice(max(0, math.floor(c - b)), min(n, math.ceil(c + b) + 1))
        for c, b, n in zip(centre, bounds, shape, strict=True)
    )
    region = (z, y, x)
    dz, dy, dx = (
        (np.arange(r.start, r.stop, dtype=np.float32) - c) * scale
        for r, c, scale in zip(region, centre, (step_mm, spacing, spacing), strict=True)
    )
    dz, dy, dx = dz[:, None, None], dy[None, :, None], dx[None, None, :]
    # Into the lesion's frame: turn about the vertical by theta, then tilt in depth.
    along = dx * math.cos(theta) + dz * math.sin(theta)
    w = (dz * math.cos(theta) - dx * math.sin(theta)) / elevation
    cos, sin = math.cos(geometry.tilt), math.sin(geometry.tilt)
    u = (along * cos + dy * sin) / lateral
    v = (-along * sin + dy * cos) / depth
    radius = geometry.radius(np.arctan2(v, u), w)
    distance = np.sqrt((u**2 + v**2) / np.maximum(radius, 0.05) ** 2 + w**2)
    # A sharp margin still gets half a pixel of anti-aliasing.
    edge = max(geometry.edge, 0.5 * spacing / min(lateral, depth))
    membership = 1 / (1 + np.exp(np.clip((distance - 1) / edge, -30, 30)))
    across = dx / np.float32(math.hypot(lateral * math.cos(theta), elevation * math.sin(theta)))
    return region, membership.astype(np.float32), np.broadcast_to(across, membership.shape)


def _lesion_interior(
    geometry: _LesionGeometry,
    shape: tuple[int, int, int],
    spacing: float,
    step_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Echogenicity inside the lesion over its region, ``float32``."""
    blob = _smooth_field(shape, (1.0 / step_mm, 1.0 / spacing, 1.0 / spacing), rng)
    # Log-normal with mean echo_level.
    texture = geometry.echo_texture
    interior = geometry.echo_level * np.exp(texture * blob - texture**2 / 2)
    if geometry.cystic_fraction > 0:
        fluid = blob > np.quantile(blob, 1 - geometry.cystic_fraction)
        interior[fluid] = 0.02
    return interior.astype(np.float32)


def _apply_posterior(
    iq: np.ndarray,
    geometry: _LesionGeometry,
    region: tuple[slice, slice, slice],
    membership: np.ndarray,
    lateral_coord: np.ndarray,
    *,
    spacing: float,
) -> None:
    """Brighten or darken, in place, the columns below the lesion (posterior features).

    Each row of lesion a beam crosses multiplies the echoes below by the same factor, so a
    column through the full lesion thickness ends up scaled by the posterior ratio. The
    lesion's own echoes keep their level, so the lesion stays as visible as without it.
    """
    if geometry.posterior_ratio == geometry.posterior_edge_ratio == 1.0:
        return
    thickness_px = 2 * geometry.semi_axes_mm[1] / spacing
    # The central half of the lesion's width in the image casts posterior_ratio, the sides
    # the edge ratio.
    central = 1 / (1 + np.exp((np.abs(lateral_coord) - 0.5) / 0.08))
    log_ratio = (
        central * math.log(geometry.posterior_ratio)
        + (1 - central) * math.log(geometry.posterior_edge_ratio)
    ) / np.float32(thickness_px)
    log_gain = np.cumsum(log_ratio * membership, axis=1)
    z, y, x = region
    iq[z, y, x] *= np.exp(log_gain * (1 - membership))
    iq[z, y.stop :, x] *= np.exp(log_gain[:, -1:, :])


def _apply_rib_shadow(iq: np.ndarray, ribs: _Ribs, *, spacing: float, step_mm: float) -> None:
    """Darken, in place, everything behind the ribs' front surfaces (acoustic shadow).

    Bone reflects and absorbs nearly all the sound, so echoes from below the cortex keep
    4% of their amplitude; the shadow's sides are as soft as the footprint's edge.
    """
    Z, Y, X = iq.shape
    z = np.arange(Z, dtype=np.float32)[:, None, None] * step_mm
    x = np.arange(X, dtype=np.float32)[None, None, :] * spacing
    front, footprint = ribs.surface(z, x)
    first = min(Y, max(0, math.floor(float(front.min()) / spacing)))
    y = (np.arange(first, Y, dtype=np.float32)[None, :, None] + 0.5) * spacing
    behind = 1 / (1 + np.exp(np.clip((front + 1.0 - y) / 0.25, -30, 30)))
    iq[:, first:] *= (1 - 0.96 * footprint * behind).astype(np.float32)


def _probe_drift(frames: int, margin: int, rng: np.random.Generator) -> np.ndarray:
    """Lateral hand drift per frame in whole pixels, within ``[-margin, margin]``."""
    walk = np.cumsum(rng.normal(0, 0.35, frames))
    return np.clip(np.round(walk - walk.mean()), -margin, margin).astype(int)


def _frame_box(
    region: tuple[slice, slice, slice],
    membership: np.ndarray,
    *,
    z: int,
    left: int,
    size: int,
    rows: int,
) -> Box | None:
    """The lesion's box in one image of ``rows`` x ``size``, or None under 4 pixels."""
    if not region[0].start <= z < region[0].stop:
        return None
    inside = membership[z - region[0].start] > 0.5
    ys = np.arange(region[1].start, region[1].stop)
    xs = np.arange(region[2].start, region[2].stop) - left
    keep_rows, keep_cols = ys < rows, (xs >= 0) & (xs < size)
    inside = inside[np.ix_(keep_rows, keep_cols)]
    if inside.sum() < 4:
        return None
    ys = ys[keep_rows][inside.any(axis=1)]
    xs = xs[keep_cols][inside.any(axis=0)]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ------------------------------------------------------------------ site


@dataclass(frozen=True)
class SiteSummary:
    """What ``generate_site`` wrote; ``n_malignant`` and ``n_normal`` count patients."""

    site: str
    n_patients: int
    n_videos: int
    n_malignant: int
    vendor: str
    n_normal: int


MANIFEST_COLUMNS = (
    "video",
    "patient_id",
    "label",
    "birads",
    "age",
    "lesion_size_mm",
    "vendor",
    "split",
)
BOX_COLUMNS = ("video", "frame", "x1", "y1", "x2", "y2")
LESION_COLUMNS = (
    "video",
    "shape",
    "orientation",
    "margin",
    "echo",
    "posterior",
    "p_malignant",
    "sweep_direction_deg",
    "sweep_skew_deg",
    "sweep_speed_mm_s",
    "rib",
)
NORMAL_BIRADS = "1"  # negative: a sweep of normal tissue


@dataclass(frozen=True)
class _Patient:
    """Everything drawn once per patient; each sweep draws the rest from its own stream."""

    patient_id: str
    age: int
    lesion: Lesion | None
    anatomy: Anatomy
    identity: PatientIdentity
    geometry_seq: np.random.SeedSequence
    sweeps: list[tuple[float, np.random.SeedSequence]]  # image-plane direction, stream


def generate_site(
    out: Path,
    *,
    site: str,
    patients: int,
    seed: int,
    vendor: str,
    frames: int = 32,
    size: int = 128,
    fps: int = 10,
    progress: Callable[[int, int], None] | None = None,
    normal_fraction: float = 0.15,
    min_per_class: int = 0,
) -> SiteSummary:
    """Write a synthetic site dataset into ``out``.

    Parameters
    ----------
    out : Path
        Folder to create; it must not exist or be empty. Receives ``videos/<id>.mp4``
        (``<id>`` is ``<site>-p<NNNN>-v<k>``), ``manifest.csv``, ``boxes.csv`` and
        ``lesions.csv``.
    site : str
        Site name; prefixes patient ids and, with ``seed``, seeds every draw.
    patients : int
        Number of patients (>= 1); each has 1 or 2 sweeps, the second in the orthogonal
        view (radial, then antiradial). Patients are split about 70/15/15 into
        train/val/test (at least one each from 3 patients).
    seed : int
        Non-negative seed; the same arguments give byte-identical files.
    vendor : str
        A key of ``VENDORS``.
    frames, size, fps : int
        Frames per video, frame height and width in pixels, frame rate.
    progress : callable, optional
        Called as ``progress(done, total)`` after each video is written.
    normal_fraction : float
        Share of patients, in expectation, with no lesion: their sweeps show normal tissue,
        have no boxes, and are labelled ``benign`` with BI-RADS ``1``; their rows of
        ``lesions.csv`` leave the lesion columns empty, as ``manifest.csv`` leaves
        ``lesion_size_mm``.
    min_per_class : int
        At least this many malignant and this many benign patients (0: whatever the draws
        give; 16 patients gave no malignant one at some seeds); with 1 or more, the
        validation split also holds a patient of each class, so a site's validation AUC is
        defined. Patients are redrawn, in a seeded order, until it holds.

    Returns
    -------
    SiteSummary

    Raises
    ------
    UsageError
        Unknown vendor, a bad count, size or fraction, or a non-empty ``out``.
    """
    preset = vendor_preset(vendor)
    if patients < 1 or seed < 0 or fps < 1 or not 0 <= normal_fraction <= 1:
        raise UsageError(
            f"need patients >= 1, seed >= 0, fps >= 1 and 0 <= normal_fraction <= 1, "
            f"got {patients}, {seed}, {fps} and {normal_fraction}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder")
    if min_per_class < 0 or 2 * min_per_class > patients:
        raise UsageError(f"need 0 <= 2 * min_per_class <= patients, got {min_per_class}")
    _check_frames(frames, size)

    # Python's hash() is salted per process; a digest of the name is stable.
    site_key = int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "little")
    streams = np.random.SeedSequence([seed, site_key]).spawn(patients + 1)
    splits = _assign_splits(patients, np.random.default_rng(streams[-1]))
    plans = [
        _plan_patient(f"{site}-p{index:04d}", stream, normal_fraction)
        for index, stream in enumerate(streams[:-1])
    ]
    if min_per_class:
        redraws = np.random.SeedSequence([seed, site_key, 1])
        plans = _balance_classes(plans, min_per_class, redraws, normal_fraction)
        splits = _val_holds_both(splits, [_is_malignant(p) for p in plans])
    total = sum(len(plan.sweeps) for plan in plans)

    (out / "videos").mkdir(parents=True, exist_ok=True)
    manifest: list[tuple] = []
    box_rows: list[tuple] = []
    lesion_rows: list[tuple] = []
    for plan, split in zip(plans, splits, strict=True):
        lesion = plan.lesion
        for k, (direction, sweep_seq) in enumerate(plan.sweeps, start=1):
            video = f"videos/{plan.patient_id}-v{k}.mp4"
            sweep = render_sweep(
                lesion,
                preset,
                frames=frames,
                size=size,
                rng=np.random.default_rng(sweep_seq),
                geometry_rng=np.random.default_rng(plan.geometry_seq),
                anatomy=plan.anatomy,
                identity=plan.identity,
                direction_deg=direction,
            )
            write_video(out / video, sweep.frames, fps=fps)
            manifest.append(
                (
                    video,
                    plan.patient_id,
                    "malignant" if lesion is not None and lesion.malignant else "benign",
                    lesion.birads if lesion is not None else NORMAL_BIRADS,
                    plan.age,
                    f"{lesion.size_mm:.1f}" if lesion is not None else "",
                    vendor,
                    split,
                )
            )
            box_rows.extend((video, t, *box) for t, box in sorted(sweep.boxes.items()))
            features = (
                (
                    lesion.shape,
                    lesion.orientation,
                    lesion.margin,
                    lesion.echo,
                    lesion.posterior,
                    f"{lesion.p_malignant:.6f}",
                )
                if lesion is not None
                else ("",) * 6
            )
            path = sweep.path
            lesion_rows.append(
                (
                    video,
                    *features,
                    f"{path.direction_deg:.1f}",
                    f"{path.skew_deg:.1f}",
                    f"{path.step_mm * fps:.2f}",
                    int(path.rib),
                )
            )
            if progress is not None:
                progress(len(manifest), total)

    _write_csv(out / "manifest.csv", MANIFEST_COLUMNS, manifest)
    _write_csv(out / "boxes.csv", BOX_COLUMNS, box_rows)
    _write_csv(out / "lesions.csv", LESION_COLUMNS, lesion_rows)
    return SiteSummary(
        site=site,
        n_patients=patients,
        n_videos=total,
        n_malignant=sum(p.lesion is not None and p.lesion.malignant for p in plans),
        vendor=vendor,
        n_normal=sum(p.lesion is None for p in plans),
    )


def _plan_patient(
    patient_id: str, stream: np.random.SeedSequence, normal_fraction: float
) -> _Patient:
    """Draw a patient: lesion or none, anatomy, identity, and the directions of her sweeps."""
    patient_seq, geometry_seq, anatomy_seq, identity_seq, *sweep_seqs = stream.spawn(6)
    rng = np.random.default_rng(patient_seq)
    lesion = None if rng.random() < normal_fraction else sample_lesion(rng)
    age = lesion.age if lesion is not None else sample_age(rng)
    n_sweeps = 1 + int(rng.random() < 0.5)
    # A second sweep takes the orthogonal view, as in the clinic (radial then antiradial,
    # or transverse then sagittal), held within a few degrees.
    first = rng.uniform(0, 180)
    directions = [first + 90 * k + rng.normal(0, 5) for k in range(n_sweeps)]
    return _Patient(
        patient_id=patient_id,
        age=age,
        lesion=lesion,
        anatomy=sample_anatomy(np.random.default_rng(anatomy_seq), age=age),
        identity=fake_identity(np.random.default_rng(identity_seq)),
        geometry_seq=geometry_seq,
        sweeps=list(zip(directions, sweep_seqs[:n_sweeps], strict=True)),
    )


def _is_malignant(plan: _Patient) -> bool:
    return plan.lesion is not None and plan.lesion.malignant


def _balance_classes(
    plans: list[_Patient], need: int, redraws: np.random.SeedSequence, normal_fraction: float
) -> list[_Patient]:
    """Redraw patients of the larger class, from the last one back, until each class has
    ``need`` patients; each redraw takes the next stream of ``redraws``."""
    plans = list(plans)
    for wanted in (True, False):
        for index in reversed(range(len(plans))):
            if sum(_is_malignant(p) == wanted for p in plans) >= need:
                break
            if _is_malignant(plans[index]) == wanted:
                continue
            for _ in range(10_000):  # about one draw in three is malignant
                (stream,) = redraws.spawn(1)
                plan = _plan_patient(plans[index].patient_id, stream, normal_fraction)
                if _is_malignant(plan) == wanted:
                    plans[index] = plan
                    break
    return plans


def _val_holds_both(splits: list[str], malignant: list[bool]) -> list[str]:
    """Swap a training patient into validation for any class validation lacks."""
    splits = list(splits)
    for wanted in (True, False):
        val = [i for i, s in enumerate(splits) if s == "val"]
        if not val or any(malignant[i] == wanted for i in val):
            continue
        train = [i for i, s in enumerate(splits) if s == "train" and malignant[i] == wanted]
        if train:
            # The validation patient swapped out is of the other class; keep one of it.
            splits[train[0]], splits[val[-1]] = "val", "train"
    return splits


def _assign_splits(patients: int, rng: np.random.Generator) -> list[str]:
    """Patient-level train/val/test split, about 70/15/15, shuffled."""
    n_val = n_test = max(1, round(0.15 * patients)) if patients >= 3 else 0
    splits = ["val"] * n_val + ["test"] * n_test
    splits += ["train"] * (patients - len(splits))
    return [splits[i] for i in rng.permutation(patients)]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
