"""Synthetic freehand breast-ultrasound sweeps with BI-RADS-lexicon lesions.

A site dataset is generated in three stages:

``sample_lesion -> render_sweep -> generate_site``

1. ``sample_lesion`` draws a patient's age, the lesion's size and its BI-RADS lexicon
   features, then the malignancy label from a documented logistic model of the features
   (``INTERCEPT``, ``LOG_ODDS``).
2. ``render_sweep`` images the lesion, an ellipsoid in layered breast tissue, with the
   convolution model of fully developed speckle: a complex Gaussian scatterer volume whose
   amplitude is the local echogenicity, convolved with a separable point-spread function
   (PSF), then depth attenuation, posterior acoustic features, electronic noise, envelope
   detection and log compression. The frames are consecutive elevation slices of that
   volume, so neighbouring frames share speckle through the PSF's slice thickness, and the
   lesion's cross-section appears, grows and disappears over the middle of the sweep.
3. ``generate_site`` writes ``videos/*.mp4``, ``manifest.csv``, ``boxes.csv`` and
   ``lesions.csv`` (the lexicon features and ``p_malignant`` behind each label).

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``(seed, site)``
by ``numpy.random.SeedSequence``, so the same arguments give the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
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


def sample_lesion(rng: np.random.Generator) -> Lesion:
    """Draw a patient's age, lesion size, lexicon features and malignancy label."""
    age = round(float(np.clip(rng.normal(_AGE_MEAN, _AGE_SD), 22, 88)))
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


@dataclass(frozen=True)
class VendorPreset:
    """Imaging characteristics of one scanner model, so that sites look different.

    Attributes
    ----------
    depth_mm : float
        Imaged depth, also the width of the square field of view (pixel spacing is
        ``depth_mm / size``).
    axial_sigma_mm, lateral_sigma_mm, elevation_sigma_mm : float
        Standard deviations of the Gaussian PSF along depth (pulse length), across the beam
        and across the image plane (slice thickness).
    center_mhz : float
        Transmit centre frequency, which modulates the axial PSF.
    dynamic_range_db : float
        Span of echo levels mapped onto 0..255 by log compression.
    gain_db : float
        Display level of glandular tissue (echo amplitude 1) below the top of the range.
    attenuation_db_per_cm : float
        Depth attenuation left after time-gain compensation (amplitude, round trip).
    noise_db : float
        Electronic noise amplitude relative to glandular tissue.
    smoothing_mm : float
        Speckle-reduction filter of the scanner's display (Gaussian sigma), 0 for none.
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


VENDORS: dict[str, VendorPreset] = {
    # High-frequency linear probe: fine speckle, wide dynamic range, shallow field.
    "vendor-a": VendorPreset(
        depth_mm=40.0,
        axial_sigma_mm=0.15,
        lateral_sigma_mm=0.30,
        elevation_sigma_mm=0.7,
        center_mhz=12.0,
        dynamic_range_db=60.0,
        gain_db=-26.0,
        attenuation_db_per_cm=3.0,
        noise_db=-45.0,
        smoothing_mm=0.0,
    ),
    # Older, lower-frequency probe: coarse speckle, more attenuation and noise, bright.
    "vendor-b": VendorPreset(
        depth_mm=50.0,
        axial_sigma_mm=0.30,
        lateral_sigma_mm=0.60,
        elevation_sigma_mm=1.0,
        center_mhz=7.5,
        dynamic_range_db=48.0,
        gain_db=-17.0,
        attenuation_db_per_cm=3.5,
        noise_db=-36.0,
        smoothing_mm=0.0,
    ),
    # Mid-range probe with display speckle reduction: smooth, low-contrast look.
    "vendor-c": VendorPreset(
        depth_mm=45.0,
        axial_sigma_mm=0.22,
        lateral_sigma_mm=0.45,
        elevation_sigma_mm=0.8,
        center_mhz=10.0,
        dynamic_range_db=66.0,
        gain_db=-30.0,
        attenuation_db_per_cm=2.5,
        noise_db=-42.0,
        smoothing_mm=0.35,
    ),
}

_SOUND_SPEED_MM_PER_US = 1.54


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
        lateral axes.
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


def speckle_iq(amplitude: np.ndarray, psf: Psf, rng: np.random.Generator) -> np.ndarray:
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

    Returns
    -------
    np.ndarray
        ``complex64 [Z, Y, X]``; where ``amplitude`` is constant ``A`` its modulus is
        Rayleigh distributed with mean power ``A**2``. The convolution is circular (FFT),
        so callers pad the volume by the kernels' half-lengths where the edges matter.
    """
    shape = amplitude.shape
    scatterers = np.empty(shape, dtype=np.complex64)
    scatterers.real = rng.standard_normal(shape, dtype=np.float32)
    scatterers.imag = rng.standard_normal(shape, dtype=np.float32)
    scatterers *= amplitude * np.float32(math.sqrt(0.5))
    spectrum = scipy.fft.fftn(scatterers, overwrite_x=True)
    for axis, kernel in enumerate((psf.elevation, psf.axial, psf.lateral)):
        response = scipy.fft.fft(_wrapped(kernel, shape[axis]))
        spectrum *= response.reshape([-1 if a == axis else 1 for a in range(3)])
    return scipy.fft.ifftn(spectrum, overwrite_x=True)


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
    """B-mode pixels: ``255 * clip(1 + (20 log10 envelope + gain) / range, 0, 1)`` as uint8."""
    level_db = 20 * np.log10(np.maximum(envelope, 1e-6))
    scaled = 1 + (level_db + vendor.gain_db) / vendor.dynamic_range_db
    return np.round(255 * np.clip(scaled, 0, 1)).astype(np.uint8)


# ------------------------------------------------------------------ lesion geometry


@dataclass(frozen=True)
class _LesionGeometry:
    """A lesion's 3D shape and acoustics, fixed per patient; lengths in mm, angles in rad."""

    semi_axes_mm: tuple[float, float, float]  # lateral, depth, elevation
    tilt: float  # in-plane rotation of the long axis
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

    # BI-RADS grades echogenicity against subcutaneous fat (0.45 here, glandular tissue 1).
    echo_level, texture, cystic = {
        "anechoic": (0.02, 0.0, 0.0),
        "hypoechoic": (rng.uniform(0.12, 0.25), 0.15, 0.0),
        "isoechoic": (rng.uniform(0.42, 0.55), 0.1, 0.0),
        "complex": (rng.uniform(0.4, 0.6), 0.2, rng.uniform(0.35, 0.6)),
        "heterogeneous": (rng.uniform(0.25, 0.4), 0.7, 0.0),
    }[lesion.echo]
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


# ------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class Sweep:
    """One rendered sweep.

    Attributes
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]`` B-mode frames.
    boxes : dict[int, tuple[int, int, int, int]]
        Lesion box per frame where the lesion is visible (0-based frame index):
        ``(x1, y1, x2, y2)`` in pixels, pixel edges, so ``0 <= x1 < x2 <= W``.
    """

    frames: np.ndarray
    boxes: dict[int, Box]


def render_sweep(
    lesion: Lesion,
    vendor: VendorPreset,
    *,
    frames: int,
    size: int,
    rng: np.random.Generator,
    geometry_rng: np.random.Generator | None = None,
) -> Sweep:
    """Image a freehand sweep across ``lesion`` with ``vendor``'s scanner.

    Parameters
    ----------
    lesion : Lesion
        Features to render.
    vendor : VendorPreset
        Scanner characteristics.
    frames : int
        Number of frames T (>= 8, so the first and last frames miss the lesion).
    size : int
        Frame height and width in pixels (even, >= 32); the field of view is
        ``vendor.depth_mm`` square.
    rng : np.random.Generator
        Draws this sweep: speed, position, probe drift, tissue and speckle.
    geometry_rng : np.random.Generator, optional
        Draws the lesion's concrete shape; pass generators in the same state to sweep the
        same lesion twice. Defaults to ``rng``.

    Returns
    -------
    Sweep
        Frames and per-frame lesion boxes.
    """
    _check_frames(frames, size)
    geometry = _lesion_geometry(lesion, geometry_rng if geometry_rng is not None else rng)
    spacing = vendor.depth_mm / size  # mm per pixel

    # The lesion spans 40-60% of the sweep and sits near its middle, leaving at least 15%
    # of the frames at each end without it.
    lateral_mm, depth_mm, elevation_mm = geometry.semi_axes_mm
    covered = rng.uniform(0.4, 0.6)
    step_mm = 2 * elevation_mm / covered / frames
    shift = rng.uniform(-1, 1) * ((1 - covered) / 2 - 0.15) * frames
    psf = Psf.of(vendor, spacing_mm=spacing, step_mm=step_mm)

    # Volume: frames padded along the sweep, rows padded below, columns padded on both sides
    # for the probe's lateral drift; the pads absorb the FFT's circular wrap.
    z_pad = len(psf.elevation) // 2 + 1
    y_pad = len(psf.axial) // 2 + 1
    x_margin = max(2, size // 32)
    x_pad = max(x_margin, len(psf.lateral) // 2 + 1)
    # FFT-friendly lengths; the extra samples go at the far ends, past the frame.
    shape = tuple(
        scipy.fft.next_fast_len(n) for n in (frames + 2 * z_pad, size + y_pad, size + 2 * x_pad)
    )
    radius_px = geometry.max_radius * max(lateral_mm, depth_mm) / spacing
    centre_depth_mm = rng.uniform(
        min(4 + depth_mm, 0.5 * vendor.depth_mm),
        max(4 + depth_mm, 0.8 * vendor.depth_mm - depth_mm),
    )
    centre = (
        z_pad + (frames - 1) / 2 + shift,
        centre_depth_mm / spacing,
        x_pad + size / 2 + rng.uniform(-0.25, 0.25) * max(0.0, size - 2 * radius_px),
    )

    amplitude = _tissue_amplitude(
        shape,
        spacing,
        step_mm,
        lesion_depth_mm=(centre_depth_mm - depth_mm, centre_depth_mm + depth_mm),
        rng=rng,
    )
    region, membership, lateral_coord = _lesion_membership(
        geometry, shape, centre, spacing=spacing, step_mm=step_mm
    )
    interior = _lesion_interior(geometry, membership.shape, spacing, step_mm, rng)
    amplitude[region] += membership * (interior - amplitude[region])

    iq = speckle_iq(amplitude, psf, rng)
    _apply_posterior(iq, geometry, region, membership, lateral_coord, spacing=spacing)
    depth_cm = (np.arange(shape[1], dtype=np.float32) + 0.5) * spacing / 10
    iq *= (10 ** (-vendor.attenuation_db_per_cm * depth_cm / 20))[None, :, None]

    drift = _probe_drift(frames, x_margin, rng)
    noise = np.float32(10 ** (vendor.noise_db / 20) * math.sqrt(0.5))
    images = np.empty((frames, size, size), dtype=np.uint8)
    boxes: dict[int, Box] = {}
    for t in range(frames):
        left = x_pad + drift[t]
        plane = iq[z_pad + t, :size, left : left + size]
        plane = plane + noise * (
            rng.standard_normal(plane.shape, dtype=np.float32)
            + 1j * rng.standard_normal(plane.shape, dtype=np.float32)
        )
        envelope = np.abs(plane)
        if vendor.smoothing_mm > 0:
            envelope = ndimage.gaussian_filter(envelope, vendor.smoothing_mm / spacing)
        images[t] = log_compress(envelope, vendor)
        box = _frame_box(region, membership, z=z_pad + t, left=left, size=size)
        if box is not None:
            boxes[t] = box
    return Sweep(frames=images, boxes=boxes)


def _check_frames(frames: int, size: int) -> None:
    if frames < 8 or size < 32 or size % 2:
        raise UsageError(f"need frames >= 8 and an even size >= 32, got {frames} and {size}")


def _tissue_amplitude(
    shape: tuple[int, int, int],
    spacing: float,
    step_mm: float,
    *,
    lesion_depth_mm: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Echogenicity of layered breast tissue, ``float32 [Z, Y, X]`` (glandular = 1).

    From the skin down: skin line, subcutaneous fat crossed by Cooper's ligaments,
    fibroglandular tissue (which holds the lesion), retromammary fat, pectoral muscle.
    Interfaces undulate across the image and along the sweep.
    """
    Z, Y, X = shape
    z = np.arange(Z, dtype=np.float32)[:, None, None] * step_mm
    y = (np.arange(Y, dtype=np.float32)[None, :, None] + 0.5) * spacing
    x = np.arange(X, dtype=np.float32)[None, None, :] * spacing
    top, bottom = lesion_depth_mm

    def interface(mean_mm: float, swing_mm: float) -> np.ndarray:
        wavelengths = rng.uniform(8, 30, 3)
        phases = rng.uniform(0, 2 * math.pi, 3)
        tilts = rng.normal(0, 0.1, 3)
        wave = sum(
            np.sin(2 * math.pi * (x + tilt * z) / wavelength + phase)
            for wavelength, phase, tilt in zip(wavelengths, phases, tilts, strict=True)
        )
        return mean_mm + swing_mm * wave / math.sqrt(3)

    skin = 1.5
    fat_end = interface(min(rng.uniform(4, 8), max(2.5, top - 1.5)), 1.0)
    gland_end = interface(max(bottom + rng.uniform(3, 8), 0.6 * Y * spacing), 1.5)
    muscle_start = gland_end + rng.uniform(2, 4)

    amplitude = np.ones(shape, dtype=np.float32)  # fibroglandular tissue
    # Each layer is computed over the rows it can reach only.
    fat_rows = slice(0, min(Y, math.ceil(float(fat_end.max()) / spacing) + 1))
    angle, period = rng.uniform(-0.6, 0.6), rng.uniform(3, 6)
    phase = x * math.sin(angle) + y[:, fat_rows] * math.cos(angle) + 0.05 * z
    ligament = np.maximum(np.cos(2 * math.pi * phase / period), 0)
    for _ in range(4):  # cos**16: thin bright lines
        ligament *= ligament
    amplitude[:, fat_rows] = np.where(y[:, fat_rows] < fat_end, 0.45 + 1.2 * ligament, 1.0)

    deep_rows = slice(max(0, math.floor(float(gland_end.min()) / spacing)), Y)
    deep = y[:, deep_rows]
    striation = np.cos(2 * math.pi * deep / rng.uniform(1.2, 2.0) + 0.3 * np.sin(x / 4 + 0.1 * z))
    muscle = 0.55 * (1 + 0.7 * striation**2)
    amplitude[:, deep_rows] = np.where(
        deep < gland_end,
        amplitude[:, deep_rows],
        np.where(deep < muscle_start, 0.45, muscle),
    )
    amplitude[:, y[0, :, 0] < skin] = 1.8
    # Tissue structure: log-normal texture elongated along the skin (about 2.5 mm laterally,
    # 0.35 mm in depth, 1.5 mm along the sweep), which gives the streaky look of breast tissue.
    texture = _smooth_field(shape, (1.5 / step_mm, 0.35 / spacing, 2.5 / spacing), rng)
    amplitude *= np.exp(0.55 * texture - 0.15)
    return amplitude


def _smooth_field(
    shape: tuple[int, ...], sigma: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """Gaussian random field with unit variance and Gaussian correlation of ``sigma`` samples."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    spectrum = scipy.fft.rfftn(noise)
    for axis, s in enumerate(sigma):
        freq = (
            scipy.fft.rfftfreq(shape[axis])
            if axis == len(shape) - 1
            else scipy.fft.fftfreq(shape[axis])
        )
        gain = np.exp(-2 * (math.pi * s * freq) ** 2).astype(np.float32)
        spectrum *= gain.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    field = scipy.fft.irfftn(spectrum, s=shape)
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def _lesion_membership(
    geometry: _LesionGeometry,
    shape: tuple[int, int, int],
    centre: tuple[float, float, float],
    *,
    spacing: float,
    step_mm: float,
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Soft indicator (0..1) of the lesion within its bounding region of the volume.

    Returns the region (slices into the volume), the membership ``float32`` over it, and
    the lateral coordinate in units of the lateral semi-axis (for the combined posterior
    pattern).
    """
    lateral, depth, elevation = (
        geometry.semi_axes_mm[0] / spacing,
        geometry.semi_axes_mm[1] / spacing,
        geometry.semi_axes_mm[2] / step_mm,
    )
    reach = (geometry.max_radius + 4 * geometry.edge) * max(lateral, depth) + 2
    bounds = (elevation + 1, reach, reach)
    z, y, x = (
        slice(max(0, math.floor(c - b)), min(n, math.ceil(c + b) + 1))
        for c, b, n in zip(centre, bounds, shape, strict=True)
    )
    region = (z, y, x)
    dz, dy, dx = (
        np.arange(r.start, r.stop, dtype=np.float32) - c
        for r, c in zip(region, centre, strict=True)
    )
    dz, dy, dx = dz[:, None, None], dy[None, :, None], dx[None, None, :]
    cos, sin = math.cos(geometry.tilt), math.sin(geometry.tilt)
    u = (dx * cos + dy * sin) / lateral
    v = (-dx * sin + dy * cos) / depth
    w = dz / elevation
    radius = geometry.radius(np.arctan2(v, u), w)
    distance = np.sqrt((u**2 + v**2) / np.maximum(radius, 0.05) ** 2 + w**2)
    # A sharp margin still gets half a pixel of anti-aliasing.
    edge = max(geometry.edge, 0.5 / min(lateral, depth))
    membership = 1 / (1 + np.exp(np.clip((distance - 1) / edge, -30, 30)))
    return region, membership.astype(np.float32), np.broadcast_to(u, membership.shape)


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
    # The central half of the lesion's width casts posterior_ratio, the sides the edge ratio.
    central = 1 / (1 + np.exp((np.abs(lateral_coord) - 0.5) / 0.08))
    log_ratio = (
        central * math.log(geometry.posterior_ratio)
        + (1 - central) * math.log(geometry.posterior_edge_ratio)
    ) / np.float32(thickness_px)
    log_gain = np.cumsum(log_ratio * membership, axis=1)
    z, y, x = region
    iq[z, y, x] *= np.exp(log_gain * (1 - membership))
    iq[z, y.stop :, x] *= np.exp(log_gain[:, -1:, :])


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
) -> Box | None:
    """The lesion's box in one frame, or None where fewer than 4 pixels show it."""
    if not region[0].start <= z < region[0].stop:
        return None
    inside = membership[z - region[0].start] > 0.5
    rows = np.arange(region[1].start, region[1].stop)
    cols = np.arange(region[2].start, region[2].stop) - left
    keep_rows, keep_cols = rows < size, (cols >= 0) & (cols < size)
    inside = inside[np.ix_(keep_rows, keep_cols)]
    if inside.sum() < 4:
        return None
    ys = rows[keep_rows][inside.any(axis=1)]
    xs = cols[keep_cols][inside.any(axis=0)]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ------------------------------------------------------------------ site


@dataclass(frozen=True)
class SiteSummary:
    """What ``generate_site`` wrote; ``n_malignant`` counts patients."""

    site: str
    n_patients: int
    n_videos: int
    n_malignant: int
    vendor: str


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
LESION_COLUMNS = ("video", "shape", "orientation", "margin", "echo", "posterior", "p_malignant")


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
        Number of patients (>= 1); each has one lesion and 1 or 2 sweeps of it. Patients
        are split about 70/15/15 into train/val/test (at least one each from 3 patients).
    seed : int
        Non-negative seed; the same arguments give byte-identical files.
    vendor : str
        A key of ``VENDORS``.
    frames, size, fps : int
        Frames per video, frame height and width in pixels, frame rate.
    progress : callable, optional
        Called as ``progress(done, total)`` after each video is written.

    Returns
    -------
    SiteSummary

    Raises
    ------
    UsageError
        Unknown vendor, a bad count or size, or a non-empty ``out``.
    """
    preset = vendor_preset(vendor)
    if patients < 1 or seed < 0 or fps < 1:
        raise UsageError(
            f"need patients >= 1, seed >= 0 and fps >= 1, got {patients}, {seed}, {fps}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder")
    _check_frames(frames, size)

    # Python's hash() is salted per process; a digest of the name is stable.
    site_key = int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "little")
    streams = np.random.SeedSequence([seed, site_key]).spawn(patients + 1)
    splits = _assign_splits(patients, np.random.default_rng(streams[-1]))

    plans = []
    for index, stream in enumerate(streams[:-1]):
        lesion_seq, geometry_seq, *sweep_seqs = stream.spawn(4)
        lesion_rng = np.random.default_rng(lesion_seq)
        lesion = sample_lesion(lesion_rng)
        n_videos = 1 + int(lesion_rng.random() < 0.5)
        plans.append((f"{site}-p{index:04d}", lesion, geometry_seq, sweep_seqs[:n_videos]))
    total = sum(len(plan[3]) for plan in plans)

    (out / "videos").mkdir(parents=True, exist_ok=True)
    manifest: list[tuple] = []
    box_rows: list[tuple] = []
    lesion_rows: list[tuple] = []
    done = 0
    for (patient, lesion, geometry_seq, sweep_seqs), split in zip(plans, splits, strict=True):
        for k, sweep_seq in enumerate(sweep_seqs, start=1):
            video = f"videos/{patient}-v{k}.mp4"
            sweep = render_sweep(
                lesion,
                preset,
                frames=frames,
                size=size,
                rng=np.random.default_rng(sweep_seq),
                geometry_rng=np.random.default_rng(geometry_seq),
            )
            write_video(out / video, sweep.frames, fps=fps)
            manifest.append(
                (
                    video,
                    patient,
                    "malignant" if lesion.malignant else "benign",
                    lesion.birads,
                    lesion.age,
                    f"{lesion.size_mm:.1f}",
                    vendor,
                    split,
                )
            )
            box_rows.extend((video, t, *box) for t, box in sorted(sweep.boxes.items()))
            lesion_rows.append(
                (
                    video,
                    lesion.shape,
                    lesion.orientation,
                    lesion.margin,
                    lesion.echo,
                    lesion.posterior,
                    f"{lesion.p_malignant:.6f}",
                )
            )
            done += 1
            if progress is not None:
                progress(done, total)

    _write_csv(out / "manifest.csv", MANIFEST_COLUMNS, manifest)
    _write_csv(out / "boxes.csv", BOX_COLUMNS, box_rows)
    _write_csv(out / "lesions.csv", LESION_COLUMNS, lesion_rows)
    return SiteSummary(
        site=site,
        n_patients=patients,
        n_videos=total,
        n_malignant=sum(plan[1].malignant for plan in plans),
        vendor=vendor,
    )


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
