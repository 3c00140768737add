"""The lesion model: BI-RADS ultrasound lexicon features, the malignancy risk model behind
each label, and the concrete 3D shape and acoustics a lesion's features turn into.

``sample_lesion`` draws a patient's age, the lesion's size and its lexicon features, then
the malignancy label from a documented logistic model of the features (``INTERCEPT``,
``LOG_ODDS``); ``lesion_geometry`` turns the features into a shape, margin, echo texture
and posterior pattern for ``render_sweep``. A lesion's BI-RADS category comes from its
probability of malignancy by the bounds a prediction uses (``common.pipeline.score``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.pipeline.score import categorise

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
AGE_MEAN, AGE_SD = 52.0, 13.0  # years
_SIZE_MEDIAN_MM, _SIZE_LOG_SD = 12.0, 0.45  # longest diameter, log-normal
FAT_ECHO = 0.3  # echo amplitude of fat, relative to glandular tissue


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
        return categorise(self.p_malignant)


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


def sample_age(rng: np.random.Generator) -> int:
    """A patient's age in years: normal, mean 52, SD 13, within 22-88."""
    return round(float(np.clip(rng.normal(AGE_MEAN, AGE_SD), 22, 88)))


def sample_lesion(rng: np.random.Generator) -> Lesion:
    """Draw a patient's age, lesion size, lexicon features and malignancy label."""
    age = sample_age(rng)
    size_mm = float(np.clip(_SIZE_MEDIAN_MM * math.exp(_SIZE_LOG_SD * rng.normal()), 4.0, 30.0))
    z_age = (age - AGE_MEAN) / AGE_SD
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


# ------------------------------------------------------------------ lesion geometry


@dataclass(frozen=True)
class LesionGeometry:
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


def lesion_geometry(lesion: Lesion, rng: np.random.Generator) -> LesionGeometry:
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

    # BI-RADS grades echogenicity against subcutaneous fat (FAT_ECHO; glandular tissue 1).
    relative, texture, cystic = {
        "anechoic": (0.02 / FAT_ECHO, 0.0, 0.0),
        "hypoechoic": (rng.uniform(0.27, 0.55), 0.15, 0.0),
        "isoechoic": (rng.uniform(0.93, 1.22), 0.1, 0.0),
        "complex": (rng.uniform(0.9, 1.33), 0.2, rng.uniform(0.35, 0.6)),
        "heterogeneous": (rng.uniform(0.55, 0.9), 0.7, 0.0),
    }[lesion.echo]
    echo_level = relative * FAT_ECHO
    enhance, shadow = rng.uniform(1.6, 2.2), rng.uniform(0.15, 0.3)
    posterior_ratio, edge_ratio = {
        "none": (1.0, 1.0),
        "enhancement": (enhance, enhance),
        "shadowing": (shadow, shadow),
        "combined": (shadow, enhance),
    }[lesion.posterior]
    return LesionGeometry(
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
