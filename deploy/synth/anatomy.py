"""The patient's body in one sweep: breast layers from the skin down, the ribs behind the
pectoralis, the echogenicity volume they make, and the ribs' acoustic shadow.

``sample_anatomy`` draws a patient's layer thicknesses; ``fit_layers`` and ``place_ribs``
lay them out in one sweep's field of view; ``tissue_amplitude`` fills the volume that
``render_sweep`` images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deploy.synth.lesion import AGE_MEAN, AGE_SD, FAT_ECHO, LesionGeometry
from deploy.synth.physics import smooth_field


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
    z_age = (age - AGE_MEAN) / AGE_SD
    return Anatomy(
        skin_mm=rng.uniform(1.4, 2.4),
        fat_mm=float(np.clip(8.0 * math.exp(0.15 * z_age + 0.35 * rng.normal()), 3.0, 18.0)),
        gland_mm=float(np.clip(12.0 * math.exp(-0.2 * z_age + 0.35 * rng.normal()), 4.0, 24.0)),
        retromammary_mm=rng.uniform(1.0, 3.0),
        muscle_mm=rng.uniform(4.0, 10.0),
        lobule_mm=rng.uniform(4.0, 8.0),
    )


# ------------------------------------------------------------------ one sweep's field of view


# Ribs: behind the pectoralis, 10-14 mm wide, 6-8 mm thick, 24-30 mm apart; the pleura
# lies under their back surfaces.
_CHEST_WALL_MM = 9.0


@dataclass(frozen=True)
class Layers:
    """Mean depths (mm) of one sweep's interfaces below the skin surface."""

    skin: float
    fat: float  # bottom of the subcutaneous fat
    gland: float  # bottom of the fibroglandular tissue
    muscle: float  # pectoral fascia
    chest: float  # back of the pectoralis, front of the ribs
    pleura: float
    lesion: float | None  # lesion centre


def fit_layers(
    anatomy: Anatomy,
    geometry: LesionGeometry | None,
    *,
    field_mm: float,
    rib: bool,
    rng: np.random.Generator,
) -> Layers:
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
    return Layers(
        skin=skin,
        fat=skin + fat,
        gland=skin + fat + gland,
        muscle=muscle,
        chest=chest,
        pleura=chest + _CHEST_WALL_MM,
        lesion=lesion,
    )


@dataclass(frozen=True)
class Ribs:
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


def place_ribs(
    layers: Layers,
    *,
    field_mm: float,
    centre_mm: tuple[float, float],
    rng: np.random.Generator,
) -> Ribs | None:
    """Ribs under the chest wall near ``centre_mm`` (z, x), or None where they lie too deep."""
    half_height = rng.uniform(3.0, 4.0)
    depth = layers.chest + 0.5 + half_height
    ribs = Ribs(
        azimuth=rng.uniform(0, math.pi),
        origin=(centre_mm[0], centre_mm[1] + rng.uniform(-8, 8)),
        pitch=rng.uniform(24.0, 30.0),
        half_width=rng.uniform(5.0, 7.0),
        half_height=half_height,
        depth=depth,
    )
    # The rib and a few mm of its shadow must be in view.
    return ribs if depth - half_height < field_mm - 5 else None


# ------------------------------------------------------------------ echogenicity


def tissue_amplitude(
    shape: tuple[int, int, int],
    spacing: float,
    step_mm: float,
    layers: Layers,
    anatomy: Anatomy,
    ribs: Ribs | None,
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
        wave = smooth_field((Z, 1, X), (scale_mm / step_mm, 1.0, scale_mm / spacing), rng)
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
    lobules = smooth_field(
        (Z, upper.stop, X), (sigma / step_mm, 0.45 * sigma / spacing, sigma / spacing), rng
    )
    septa = np.exp(-((lobules / 0.2) ** 2))
    islands = 1 / (1 + np.exp((1.1 - lobules) / 0.15))
    # Fibrous strands of the gland: the zero set of a field stretched along the skin.
    strands = smooth_field((Z, upper.stop, X), (3.0 / step_mm, 0.8 / spacing, 4.0 / spacing), rng)
    fibrous = np.exp(-((strands / 0.25) ** 2))
    amplitude[:, upper] = np.where(
        y[:, upper] < fat_end,
        FAT_ECHO + 3.0 * septa,
        1.0 + 3.0 * fibrous - (1.0 - FAT_ECHO) * islands,
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
        FAT_ECHO,
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
    texture = smooth_field(shape, (1.5 / step_mm, 0.4 / spacing, 2.0 / spacing), rng)
    amplitude *= np.exp(0.6 * texture - 0.18)
    return amplitude


def apply_rib_shadow(iq: np.ndarray, ribs: Ribs, *, spacing: float, step_mm: float) -> None:
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
