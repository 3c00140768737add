"""Ultrasound physics: speckle from the convolution model of fully developed speckle, and
the scanner's processing of the echoes (transmit focus, spatial compounding, attenuation,
electronic noise, time-gain compensation, envelope, log compression).

Arrays are volumes ``[Z, Y, X]`` (frames along the sweep, depth, lateral) or stacks of
frames ``[T, Y, X]``; row 0 lies at the skin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from deploy.synth.scanner import VendorPreset

_SOUND_SPEED_MM_PER_US = 1.54
MAX_DEFOCUS = 2.5  # widest beam, relative to its width at the focus
_DISPLAY_BLUR_PX = 0.6  # least display smoothing (scan conversion), in pixels

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
        ``MAX_DEFOCUS`` times); rows near the focus are brighter by up to
        ``focal_gain_db``. Look ``k`` steers the beam: its PSF is modulated to another part
        of the lateral spectrum, so it sees the same tissue through decorrelated speckle.
        The convolution is circular across columns, so callers pad them.
    """
    depth = (np.arange(iq.shape[1]) + 0.5) * spacing_mm
    offset = (depth - vendor.focus_fraction * vendor.depth_mm) / vendor.focal_length_mm
    width = np.minimum(np.sqrt(1 + offset**2), MAX_DEFOCUS)
    sharpness = ((MAX_DEFOCUS - width) / (MAX_DEFOCUS - 1))[:, None]
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
            for factor in (1.0, MAX_DEFOCUS)
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


# ------------------------------------------------------------------ random fields


def smooth_field(
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
