"""Site configuration: what a hospital owns (its data, its device, its privacy budget).

Validated once, where it enters (a TOML file); inside, plain pydantic objects are passed.
Privacy values have no defaults on purpose: a site states its epsilon budget, delta, clip
norms and noise multipliers, or the config is refused.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError, validation_problems
from common.privacy.settings import DPSettings

# The networks a site may train, each with its own [privacy.<name>] section.
NETWORKS = ("detector", "classifier", "keyframe")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SitePrivacy(_Strict):
    privacy_unit: Literal["patient"] = "patient"
    epsilon_budget: float = Field(gt=0, description="the site's total epsilon at `delta`")
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "prv"]
    require_secure_aggregation: bool
    # Defaults to the safe side: a config written before the setting existed gets it, and
    # only a line in the file saying `false` turns it off (logged whenever the site trains).
    secure_rng: bool = Field(
        default=True,
        description="draw DP noise and patient samples from a CSPRNG (ChaCha20, keyed by the "
        "OS); false only for tests and benchmarks: a seeded torch generator, predictable",
    )
    detector: DPSettings
    classifier: DPSettings
    # Only a site that trains the 2D key-frame comparator needs it; no default either way.
    keyframe: DPSettings | None = None

    def of(self, network: str) -> DPSettings:
        """The DP-SGD settings of ``network`` (``detector``, ``classifier``, ``keyframe``).

        Raises
        ------
        ConfigError
            The site config has no ``[privacy.<network>]`` section: the site has not stated
            how to train that network, so it must not.
        """
        settings = getattr(self, network, None) if network in NETWORKS else None
        if not isinstance(settings, DPSettings):
            raise ConfigError(
                f"the site config has no [privacy.{network}] section (noise_multiplier, "
                f"max_grad_norm, sample_rate): the site does not train the {network} network"
            )
        return settings


class SiteTraining(_Strict):
    frame_stride: int = Field(ge=1, description="train the detector on every n-th frame")
    max_frames_per_video: int = Field(ge=1)
    max_local_steps: int = Field(ge=1, description="the most DP steps per model per round")
    # Not a privacy value: the unit stays the patient whichever boxes cut the clips. It
    # costs a detector pass over every training video per round, so the site decides it.
    detector_track_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of classifier training clips cut from the tracks the current "
        "global detector finds on the training videos (labelled with the video's label); "
        "the rest from ground-truth boxes. 0: ground truth only, as in the WAUVE paper",
    )


class SiteIdentity(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    data: Path = Field(description="the site dataset folder (manifest.csv, boxes.csv, videos)")
    state: Path = Field(description="where the site keeps its accountant and privacy ledger")
    keys: Path = Field(
        default=Path("keys"),
        description="the site's SuperNode key and privacy-ledger signing key (private)",
    )
    device: str = Field(description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    threads: int = Field(ge=1, description="CPU threads for training")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class SiteConfig(_Strict):
    site: SiteIdentity
    privacy: SitePrivacy
    training: SiteTraining


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate a site config; relative paths are taken from the file's folder.

    Raises
    ------
    ConfigError
        Naming the file and every bad field.
    """
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: site config not found") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file: {exc}") from exc
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: {problem}" for problem in validation_problems(exc, whole="file")]
        raise ConfigError("invalid site config:\n" + "\n".join(lines)) from exc
    base = path.parent
    site = config.site.model_copy(
        update={
            "data": base / config.site.data,
            "state": base / config.site.state,
            "keys": base / config.site.keys,
        }
    )
    return config.model_copy(update={"site": site})


def render_site_config(config: SiteConfig) -> str:
    """The config as commented TOML, the form `busfed site init` and the demo write."""
    s, p, t = config.site, config.privacy, config.training

    def model(name: str, m: DPSettings) -> str:
        return (
            f"[privacy.{name}]\n"
            f"noise_multiplier = {m.noise_multiplier}  # sigma: noise std over clip norm\n"
            f"max_grad_norm = {m.max_grad_norm}  # C: each patient's gradient is clipped to this\n"
            f"sample_rate = {m.sample_rate}  # q: Poisson rate of patients per step\n"
        )

    return (
        "# busfed site config: owned by the hospital, never by the consortium.\n\n"
        "[site]\n"
        f'name = "{s.name}"\n'
        f'data = "{s.data}"  # site dataset: manifest.csv, boxes.csv, videos/\n'
        f'state = "{s.state}"  # privacy accountant and ledger live here; back it up\n'
        f'keys = "{s.keys}"  # node key and ledger signing key: never leave the site\n'
        f'device = "{s.device}"  # auto | cpu | cuda | cuda:N\n'
        f"threads = {s.threads}  # CPU threads for training\n\n"
        "[privacy]\n"
        f'privacy_unit = "{p.privacy_unit}"  # one patient = one unit, all frames and clips\n'
        f"epsilon_budget = {p.epsilon_budget}  # total epsilon at delta over every round\n"
        f"delta = {p.delta}\n"
        f'accountant = "{p.accountant}"  # rdp | prv\n'
        f"require_secure_aggregation = {str(p.require_secure_aggregation).lower()}"
        "  # refuse to train for a server without SecAgg+\n"
        f"secure_rng = {str(p.secure_rng).lower()}"
        "  # noise and patient draws from a CSPRNG; false: predictable, tests only\n\n"
        + model("detector", p.detector)
        + "\n"
        + model("classifier", p.classifier)
        + ("\n" + model("keyframe", p.keyframe) if p.keyframe is not None else "")
        + "\n[training]\n"
        f"frame_stride = {t.frame_stride}  # detector trains on every n-th frame\n"
        f"max_frames_per_video = {t.max_frames_per_video}\n"
        f"max_local_steps = {t.max_local_steps}  # the most DP steps per model per round\n"
        f"detector_track_fraction = {t.detector_track_fraction}"
        "  # share of classifier clips from the global detector's tracks (0: ground truth)\n"
    )
