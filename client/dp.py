"""Patient-level DP-SGD: the mechanism shared by both networks.

One step: Poisson-sample patients with rate q -> one gradient per sampled patient (over
all of that patient's data), stacked into ``p.grad_sample`` -> Opacus' ``DPOptimizer``
clips each patient's gradient to norm C, sums, adds N(0, (sigma C)^2) noise and divides
by the expected batch size q N -> plain SGD. How the per-patient gradients are computed
differs per network (``client.train``); the rest is here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from common.errors import DataError, PrivacyError, UsageError

PRIVACY_UNIT = "patient"

# Given the indices of the sampled units, return for every trained parameter p a
# FloatTensor[len(indices), *p.shape] (row i: unit indices[i]'s unclipped gradient), and
# each sampled unit's loss.
PerUnitGradients = Callable[[list[int]], tuple[list[torch.Tensor], list[float]]]


@dataclass(frozen=True, kw_only=True)
class DPParams:
    """Privacy parameters of one network's DP-SGD, privacy unit = patient.

    Attributes
    ----------
    noise_multiplier : float
        sigma: noise std divided by ``max_grad_norm``; 0 only for tests (no privacy).
    max_grad_norm : float
        C: each patient's gradient is clipped to this L2 norm.
    sample_rate : float
        q: probability that a patient takes part in a step (Poisson sampling).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise PrivacyError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")


@dataclass(frozen=True, kw_only=True)
class MechanismRecord:
    """What one training call did, for the site's accountant and ledger.

    ``mean_loss`` (mean over the sampled patients of all steps; NaN if none was sampled)
    is not privatised: it is for the site's own monitoring.
    """

    model: str  # "detector" | "classifier"
    privacy_unit: str  # "patient"
    n_units: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    mean_loss: float


def poisson_sample(n_units: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """Indices of the units drawn, each independently with probability ``sample_rate``."""
    draws = torch.rand(n_units, generator=generator, device=generator.device)
    return torch.nonzero(draws < sample_rate).flatten().tolist()


def run_dp_sgd(
    model_name: str,
    params: Sequence[nn.Parameter],
    n_units: int,
    per_unit_gradients: PerUnitGradients,
    *,
    dp: DPParams,
    steps: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
) -> MechanismRecord:
    """Run ``steps`` noisy DP-SGD steps on ``params`` (plain SGD, no momentum).

    Every step adds noise, also one where Poisson sampling drew no patient. The noise
    comes from a generator on ``device`` seeded from ``generator``, which also draws the
    samples, so one seed fixes the whole mechanism. ``p.grad``, ``p.grad_sample`` and
    ``p.summed_grad`` are removed from ``params`` at the end.
    """
    if n_units < 1:
        raise DataError(f"{model_name}: no training units (patients) to train on")
    if steps < 0 or not lr > 0:
        raise UsageError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    params = list(params)
    seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=lr, momentum=0.0),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.sample_rate * n_units,
        loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(int(seed)),
    )
    losses: list[float] = []
    try:
        for _ in range(steps):
            sampled = poisson_sample(n_units, dp.sample_rate, generator)
            if sampled:
                grads, unit_losses = per_unit_gradients(sampled)
                losses += unit_losses
            else:
                # Opacus clips an empty batch to zero and still adds the noise.
                grads = [p.new_zeros((0, *p.shape)) for p in params]
            for p, grad in zip(params, grads, strict=True):
                p.grad_sample = grad  # type: ignore[attr-defined]  # DPOptimizer reads it
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for p in params:
            p.grad = None
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
    return MechanismRecord(
        model=model_name,
        privacy_unit=PRIVACY_UNIT,
        n_units=n_units,
        sample_rate=dp.sample_rate,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        steps=steps,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
    )
