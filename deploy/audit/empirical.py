"""A one-run empirical audit of the site's DP-SGD on a rehearsal site (Steinke et al. 2023).

The consortium runs it on synthetic data; it never touches a hospital's patients.

    canaries -> rehearsal training -> membership scores -> guesses -> bound

* **canaries**: m extra patients, each one random-noise image (grayscale in [0, 1]) with a
  random label, each put in the training data by an independent fair coin;
* **rehearsal training**: the real patients of a synthetic site plus the canaries that are
  in, trained with ``client.train.train_per_sample``, the sites' patient-level DP-SGD
  (Poisson sampling, per-patient clipping to C, Gaussian noise, ``client.dp.run_dp_sgd``),
  with the audited sigma, C and q;
* **scores** (white box: the auditor sees the model before and after): the model update is
  regressed, by least squares, on the gradient directions at the initial model of every
  patient that could be in the data (the real patients and all m canaries, in or out; all
  count-sketched to a few thousand coordinates). An included canary's coefficient is about
  lr / (q N) * min(|g|, C) per step that sampled it; an excluded one's is about 0. The
  learning rate is small (``REHEARSAL_LR``) so that the model stays where those directions
  hold; the privacy guarantee does not depend on it. With noise, the Gaussian noise projected
  on each direction swamps the coefficient, as DP says it must;
* **guesses**: "in" for the ``GUESS_FRACTION`` m highest scores, "out" for as many lowest
  (``common.privacy.empirical.guesses_per_side``), fixed in advance;
* **bound**: ``common.privacy.empirical.epsilon_lower_bound`` at the stated delta and
  confidence, next to the accountant's epsilon of exactly the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from client.dp import SECURE_NOISE
from client.train import train_keyframe
from common.data.keyframes import KeyFrameUnit, build_keyframe_units
from common.data.manifest import load_site
from common.data.units import SPLITS
from common.errors import DataError, PrivacyError, UsageError
from common.models.bundle import build_bundle
from common.models.presets import get_preset
from common.privacy.accountant import AccountantKind, SiteAccountant
from common.privacy.empirical import EmpiricalAudit, epsilon_lower_bound, guesses_per_side
from common.privacy.settings import DPSettings
from deploy.synth import generate_site

PRESET = "tiny"  # the rehearsal runs on CPU; the mechanism does not depend on the size
# Small, so that the model stays where its initial gradient directions hold and the
# update unmixes into them; epsilon does not depend on the learning rate.
REHEARSAL_LR = 1e-3
# Sketch coordinates: at least 4 per direction, so that the directions stay independent.
MIN_SKETCH = 4096
PROGRESS_UPDATES = 20  # training calls, at most, to report progress between
SYNTH_VENDOR = "vendor-a"
SYNTH_FRAMES = 8

# progress(stage, done, total)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class AuditPlan:
    """What to audit: the mechanism's privacy values, keyword-only, and the audit's size.

    Attributes
    ----------
    noise_multiplier, max_grad_norm, sample_rate : float
        sigma, C and q of the site's DP-SGD, privacy unit = patient; sigma = 0 turns the
        noise off (the power check: no finite epsilon is claimed).
    delta : float
        Delta of both the empirical bound and the claimed epsilon.
    accountant : {"rdp", "prv"}
        The accountant of the claimed epsilon (``SiteAccountant``).
    canaries : int
        m.
    steps : int
        DP-SGD steps of the rehearsal.
    confidence : float
        Of the lower bound, e.g. 0.95.
    seed : int
        Fixes canaries, coins, model, sampling and noise.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    accountant: AccountantKind
    canaries: int
    steps: int
    confidence: float
    seed: int

    def __post_init__(self) -> None:
        self.dp  # noqa: B018  # DPSettings names a bad sigma, C or q
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")
        if not 0 < self.confidence < 1:
            raise PrivacyError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.canaries < 2:
            raise UsageError(f"canaries must be >= 2, got {self.canaries}")
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.steps}")

    @property
    def dp(self) -> DPSettings:
        return DPSettings.allowing_noise_off(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
        )


def rehearsal_site(
    out: Path, *, patients: int, seed: int, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write a synthetic site of ``patients`` patients into ``out`` (see ``generate_site``)."""
    generate_site(
        out, site="rehearsal", patients=patients, seed=seed, vendor=SYNTH_VENDOR,
        frames=SYNTH_FRAMES, progress=progress,
    )  # fmt: skip
    return out


def site_units(data: Path) -> list[KeyFrameUnit]:
    """Every patient of the site (all splits) with at least one key frame."""
    preset = get_preset(PRESET)
    site = load_site(data)
    units = [
        u
        for split in SPLITS
        for u in build_keyframe_units(site, preset, split=split).keyframe
        if len(u.images)
    ]
    if not units:
        raise DataError(f"{data}: no patient with a key frame to train on")
    return units


@dataclass(frozen=True)
class Canaries:
    """m canary patients: images FloatTensor[m, 1, 3, S, S], labels [m, 1], coins BoolTensor[m]."""

    images: Tensor
    labels: Tensor
    included: Tensor

    @property
    def units(self) -> list[KeyFrameUnit]:
        return [
            KeyFrameUnit(f"canary-{i:04d}", images=self.images[i], labels=self.labels[i])
            for i in range(len(self.included))
        ]


def make_canaries(m: int, image_size: int, generator: torch.Generator) -> Canaries:
    """Random-noise images with random labels; each in the data by a fair coin."""
    gray = torch.rand(m, 1, 1, image_size, image_size, generator=generator)
    labels = (torch.rand(m, 1, generator=generator) < 0.5).float()
    included = torch.rand(m, generator=generator) < 0.5
    return Canaries(gray.expand(-1, -1, 3, -1, -1).contiguous(), labels, included)


class CountSketch:
    """A fixed random linear map R^P -> R^D: coordinate j adds sign_j * x_j to bucket h(j).

    Linear, so the update (a sum of clipped gradients and noise) and the directions are
    sketched alike; D well above the number of directions keeps them independent.
    """

    def __init__(self, n_params: int, dim: int, generator: torch.Generator) -> None:
        self.dim = dim
        self.bucket = torch.randint(dim, (n_params,), generator=generator)
        self.sign = torch.randint(2, (n_params,), generator=generator).float() * 2 - 1

    def __call__(self, flat: Tensor) -> Tensor:
        """[B, P] -> [B, D]."""
        out = flat.new_zeros(flat.shape[0], self.dim)
        return out.index_add_(1, self.bucket, flat * self.sign)


def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def unit_directions(model: nn.Module, units: list[KeyFrameUnit], sketch: CountSketch) -> Tensor:
    """Each unit's sketched gradient direction at the current model: FloatTensor[n, D].

    A patient's gradient is that of its mean binary cross-entropy, as ``train_keyframe``
    computes it; its row is the sketch of g / |g| (|g| in the full parameter space).
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(values: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logit = functional_call(model, values, (x.unsqueeze(0),))
        return F.binary_cross_entropy_with_logits(logit, y.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    n_params = sum(p.numel() for p in params.values())
    rows = []
    # Whole units per pass, about 2^25 gradient entries at most (a unit never splits).
    for group in _groups(units, max(1, min(64, 2**25 // n_params))):
        sizes = torch.tensor([len(u.images) for u in group])
        owner = torch.repeat_interleave(torch.arange(len(group)), sizes)
        grads = per_sample(
            params, torch.cat([u.images for u in group]), torch.cat([u.labels for u in group])
        )
        flat = torch.cat([grads[n].flatten(1) for n in params], 1) / sizes[owner, None]
        unit_grads = flat.new_zeros(len(group), n_params).index_add_(0, owner, flat)
        norms = unit_grads.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rows.append(sketch(unit_grads) / norms)
    return torch.cat(rows)


def _groups(units: list[KeyFrameUnit], samples: int) -> list[list[KeyFrameUnit]]:
    """Consecutive runs of whole units with at most ``samples`` samples (or one unit)."""
    groups: list[list[KeyFrameUnit]] = [[]]
    count = 0
    for unit in units:
        if groups[-1] and count + len(unit.images) > samples:
            groups.append([])
            count = 0
        groups[-1].append(unit)
        count += len(unit.images)
    return groups


def membership_scores(
    update: Tensor, directions: Tensor, sketch: CountSketch, *, n_real: int
) -> Tensor:
    """The canaries' least-squares coefficients of ``update`` on ``directions``: [m].

    ``update`` is theta_before - theta_after (SGD steps against the gradient), flat;
    ``directions`` holds the real patients' rows first, then the m canaries'.
    """
    target = sketch(update.unsqueeze(0))[0]
    coefficients = torch.linalg.lstsq(directions.T, target.unsqueeze(1)).solution[:, 0]
    return coefficients[n_real:]


def count_correct(scores: Tensor, included: Tensor, *, k: int) -> int:
    """Correct guesses when the k highest scores are guessed in and the k lowest out."""
    order = torch.argsort(scores, descending=True)
    return int(included[order[:k]].sum()) + int((~included[order[len(order) - k :]]).sum())


def run_empirical_audit(
    plan: AuditPlan, *, data: Path, progress: Progress | None = None
) -> EmpiricalAudit:
    """Insert canaries into the site at ``data``, train, score, guess and bound epsilon.

    Parameters
    ----------
    plan : AuditPlan
    data : Path
        A site dataset (``busfed synth`` output): its patients of every split with a key
        frame are the real patients of the rehearsal.
    progress : callable, optional
        ``progress(stage, done, total)`` with stage "directions", "training", "scoring".

    Returns
    -------
    EmpiricalAudit
    """
    report = progress or (lambda stage, done, total: None)
    started = time.monotonic()
    rng = torch.Generator().manual_seed(plan.seed)
    model = build_bundle(PRESET, seed=plan.seed, model="keyframe2d").networks["keyframe"]
    real = site_units(data)
    canaries = make_canaries(plan.canaries, get_preset(PRESET).keyframe.image_size, rng)
    candidates = real + canaries.units
    before = _flat_params(model)
    sketch = CountSketch(len(before), max(MIN_SKETCH, 4 * len(candidates)), rng)

    report("directions", 0, 1)
    directions = unit_directions(model, candidates, sketch)
    report("directions", 1, 1)
    training = real + [u for u, inc in zip(canaries.units, canaries.included, strict=True) if inc]
    _train(model, training, plan, rng, report)
    report("scoring", 0, 1)
    scores = membership_scores(before - _flat_params(model), directions, sketch, n_real=len(real))
    k = guesses_per_side(plan.canaries)
    correct = count_correct(scores, canaries.included, k=k)
    bound = epsilon_lower_bound(
        m=plan.canaries, r=2 * k, v=correct, delta=plan.delta, confidence=plan.confidence
    )
    accountant = SiteAccountant(plan.accountant)
    accountant.record(plan.noise_multiplier, plan.sample_rate, plan.steps)
    claimed = accountant.epsilon(plan.delta)
    report("scoring", 1, 1)
    return EmpiricalAudit(
        model=f"keyframe ({PRESET} preset, {len(before)} parameters)",
        n_patients=len(real),
        canaries=plan.canaries,
        canaries_in=int(canaries.included.sum()),
        guesses_in=k,
        guesses_out=k,
        guesses=2 * k,
        correct=correct,
        delta=plan.delta,
        confidence=plan.confidence,
        epsilon_lower_bound=bound,
        epsilon_claimed=claimed if math.isfinite(claimed) else None,
        accountant=plan.accountant,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        learning_rate=REHEARSAL_LR,
        noise_source=SECURE_NOISE,
        seed=plan.seed,
        seconds=round(time.monotonic() - started, 1),
    )


def _train(
    model: nn.Module,
    units: list[KeyFrameUnit],
    plan: AuditPlan,
    generator: torch.Generator,
    report: Progress,
) -> None:
    """``plan.steps`` steps of the sites' key-frame DP-SGD, in a few calls for progress.

    Calls in a row are the same mechanism as one call: every step samples and adds noise.
    """
    per_call = math.ceil(plan.steps / PROGRESS_UPDATES)
    done = 0
    report("training", 0, plan.steps)
    while done < plan.steps:
        steps = min(per_call, plan.steps - done)
        train_keyframe(
            model,
            units,
            dp=plan.dp,
            steps=steps,
            lr=REHEARSAL_LR,
            device=torch.device("cpu"),
            generator=generator,
            # The sites' production randomness (a CSPRNG): the path that is audited.
            secure_rng=True,
        )
        done += steps
        report("training", done, plan.steps)
