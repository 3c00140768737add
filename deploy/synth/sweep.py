"""Rendering one freehand sweep: plan the probe's path, build the echogenicity volume
(layers, lesion, rib), draw the speckle, cast acoustic shadows and enhancement, then the
scanner's processing and the burned-in header; and find the lesion's box in each frame.

The scatterer volume is fixed in the tissue and frames are slices of it ``step_mm`` apart,
so the speckle slides with the probe: slow sweeps share most of it between frames, fast
sweeps little (the slice-thickness PSF sets the scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft

from common.errors import UsageError
from deploy.synth.anatomy import (
    Anatomy,
    apply_rib_shadow,
    fit_layers,
    place_ribs,
    sample_anatomy,
    tissue_amplitude,
)
from deploy.synth.lesion import Lesion, LesionGeometry, lesion_geometry
from deploy.synth.physics import MAX_DEFOCUS, Psf, focus_beam, receive, smooth_field, speckle_iq
from deploy.synth.scanner import PatientIdentity, VendorPreset, fake_identity, header_band

Box = tuple[int, int, int, int]

# ------------------------------------------------------------------ the probe's path

# Freehand speed, log-uniform (2.5-16 mm/s at 10 frames/s); with a lesion it is held
# where the lesion fills 35-70% of the sweep, so that some frames at each end miss it.
_STEP_MM = (0.25, 1.6)
_COVERAGE = (0.35, 0.7)
_MAX_SKEW_DEG = 12.0
_RIB_SWEEP_FRACTION = 0.3


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
    geometry: LesionGeometry | None,
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
    check_frames(frames, size)
    geometry = None
    if lesion is not None:
        geometry = lesion_geometry(lesion, geometry_rng if geometry_rng is not None else rng)
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
    layers = fit_layers(anatomy, geometry, field_mm=vendor.depth_mm, rib=path.rib, rng=rng)
    psf = Psf.of(vendor, spacing_mm=spacing, step_mm=path.step_mm)

    # Volume: frames padded along the sweep, rows padded below, columns padded on both sides
    # for the probe's drift and the focus blur, and widened by the skew's slide; the pads
    # absorb the FFTs' circular wrap.
    slide = np.arange(frames) * path.step_mm * math.tan(math.radians(path.skew_deg)) / spacing
    slide -= slide.min()
    z_pad = len(psf.elevation) // 2 + 1
    y_pad = len(psf.axial) // 2 + 1
    x_margin = max(2, size // 32)
    x_pad = x_margin + math.ceil(3 * MAX_DEFOCUS * vendor.lateral_sigma_mm / spacing) + 1
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
        ribs = place_ribs(layers, field_mm=vendor.depth_mm, centre_mm=mid, rng=rng)
        path = replace(path, rib=ribs is not None)
    amplitude = tissue_amplitude(shape, spacing, path.step_mm, layers, anatomy, ribs, rng)

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
        apply_rib_shadow(iq, ribs, spacing=spacing, step_mm=path.step_mm)

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


def check_frames(frames: int, size: int) -> None:
    if frames < 8 or size < 32 or size % 2:
        raise UsageError(f"need frames >= 8 and an even size >= 32, got {frames} and {size}")


# ------------------------------------------------------------------ the lesion in the volume


def _lesion_membership(
    geometry: LesionGeometry,
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
    geometry: LesionGeometry,
    shape: tuple[int, int, int],
    spacing: float,
    step_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Echogenicity inside the lesion over its region, ``float32``."""
    blob = smooth_field(shape, (1.0 / step_mm, 1.0 / spacing, 1.0 / spacing), rng)
    # Log-normal with mean echo_level.
    texture = geometry.echo_texture
    interior = geometry.echo_level * np.exp(texture * blob - texture**2 / 2)
    if geometry.cystic_fraction > 0:
        fluid = blob > np.quantile(blob, 1 - geometry.cystic_fraction)
        interior[fluid] = 0.02
    return interior.astype(np.float32)


def _apply_posterior(
    iq: np.ndarray,
    geometry: LesionGeometry,
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
