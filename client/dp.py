"""Patient-level DP-SGD: the mechanism shared by both networks.

One step: Poisson-sample patients with rate q -> one gradient per sampled patient (over
all of that patient's data), stacked into ``p.grad_sample`` -> Opacus' ``DPOptimizer``
clips each patient's gradient to norm C, sums, adds N(0, (sigma C)^2) noise and divides
by the expected batch size q N -> plain SGD. How the per-patient gradients are computed
differs per network (``client.train``); the rest is here.

Randomness: with ``secure_rng`` the draws and the noise come from a CSPRNG
(``client.secure_rng``, the production setting); without it, from a seeded torch
generator, reproducible and predictable, for tests and benchmarks only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from client.secure_rng import ChaCha20Random
from common.errors import DataError, UsageError
from common.privacy.ledger import NoiseSource
from common.privacy.settings import DPSettings

PRIVACY_UNIT = "patient"
SECURE_NOISE: NoiseSource = "chacha20-csprng"
INSECURE_NOISE: NoiseSource = "torch-prng-insecure"

# Given the indices of the sampled units, return for every trained parameter p a
# FloatTensor[len(indices), *p.shape] (row i: unit indices[i]'s unclipped gradient), and
# each sampled unit's loss.
PerUnitGradients = Callable[[list[int]], tuple[list[torch.Tensor], list[float]]]


@dataclass(frozen=True, kw_only=True)
class MechanismRecord:
    """What one training call did, for the site's accountant and ledger.

    ``mean_loss`` (mean over the sampled patients of all steps; NaN if none was sampled)
    is not privatised: it is for the site's own monitoring.
    """

    model: str  # "detector" | "classifier"
    privacy_unit: str  # "patient"
    n_units: int
    dp: DPSettings  # sigma, C and q the steps ran with
    steps: int
    mean_loss: float
    noise_source: NoiseSource  # where the noise and the patient draws came from


class CSPRNGNoiseDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` with its noise drawn from ``rng``, a CSPRNG.

    Clipping, accumulation and scaling are Opacus'; only ``add_noise`` differs: the same
    construction as Opacus' ``secure_mode`` (``ChaCha20Random.gaussian_like``), with the
    normals from ``rng`` instead of a torch generator.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, rng: ChaCha20Random, **kwargs: Any
    ) -> None:
        super().__init__(optimizer, secure_mode=True, generator=None, **kwargs)
        self.rng = rng

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.rng.gaussian_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)


def poisson_sample(
    n_units: int, sample_rate: float, generator: torch.Generator | ChaCha20Random
) -> list[int]:
    """Indices of the units drawn, each independently with probability ``sample_rate``."""
    if isinstance(generator, ChaCha20Random):
        draws = generator.uniform(n_units)
    else:
        draws = torch.rand(n_units, generator=generator, device=generator.device)
    return torch.nonzero(draws < sample_rate).flatten().tolist()


def run_dp_sgd(
    model_name: str,
    params: Sequence[nn.Parameter],
    n_units: int,
    per_unit_gradients: PerUnitGradients,
    *,
    dp: DPSettings,
    steps: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
    secure_rng: bool,
) -> MechanismRecord:
    """Run ``steps`` noisy DP-SGD steps on ``params`` (plain SGD, no momentum).

    Every step adds noise, also one where Poisson sampling drew no patient. With
    ``secure_rng`` the samples and the noise come from a fresh ``ChaCha20Random`` (keyed
    from the OS) and ``generator`` is not used. Without it, the noise comes from a
    generator on ``device`` seeded from ``generator``, which also draws the samples, so one
    seed fixes (and predicts) the whole mechanism: for tests and benchmarks only.
    ``p.grad``, ``p.grad_sample`` and ``p.summed_grad`` are removed from ``params`` at the
    end.
    """
    if n_units < 1:
        raise DataError(f"{model_name}: no training units (patients) to train on")
    if steps < 0 or not lr > 0:
        raise UsageError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    params = list(params)
    settings: dict[str, Any] = {
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "expected_batch_size": dp.sample_rate * n_units,
        "loss_reduction": "mean",
    }
    sgd = torch.optim.SGD(params, lr=lr, momentum=0.0)
    draws: torch.Generator | ChaCha20Random
    optimizer: DPOptimizer
    if secure_rng:
        draws = ChaCha20Random()
        optimizer = CSPRNGNoiseDPOptimizer(sgd, rng=draws, **settings)
    else:
        draws = generator
        seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
        noise = torch.Generator(device=device).manual_seed(int(seed))
        optimizer = DPOptimizer(sgd, generator=noise, **settings)
    losses: list[float] = []
    try:
        for _ in range(steps):
            sampled = poisson_sample(n_units, dp.sample_rate, draws)
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
        dp=dp,
        steps=steps,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        noise_source=SECURE_NOISE if secure_rng else INSECURE_NOISE,
    )
