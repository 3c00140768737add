"""Patient-level DP-SGD: one step against per-patient gradients computed without Opacus."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from client.dp import poisson_sample
from client.secure_rng import ChaCha20Random
from client.train import train_classifier, train_detector
from common.data.units import ClassifierUnit, DetectorUnit
from common.errors import PrivacyError
from common.models.detector import build_detector
from common.models.i3d import build_classifier
from common.models.presets import get_preset
from common.privacy.settings import NOISE_OFF, DPSettings

CPU = torch.device("cpu")
TINY = get_preset("tiny")


def _detector_units(n_patients: int, frames: int) -> list[DetectorUnit]:
    g = torch.Generator().manual_seed(1)
    size = TINY.detector.image_size
    units = []
    for i in range(n_patients):
        unit = DetectorUnit(f"p{i}")
        for f in range(frames):
            unit.images.append(torch.rand(1, size, size, generator=g).expand(3, -1, -1))
            # Every other frame has no lesion: empty targets must work too.
            boxes = (
                torch.tensor([[20.0 + 10 * i, 30.0, 70.0 + 5 * i, 90.0]])
                if f % 2 == 0
                else torch.zeros(0, 4)
            )
            unit.targets.append(
                {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
            )
        units.append(unit)
    return units


def _classifier_units(clips_per_patient: list[int]) -> list[ClassifierUnit]:
    g = torch.Generator().manual_seed(2)
    c = TINY.classifier
    return [
        ClassifierUnit(
            f"p{i}",
            clips=torch.rand(k, 3, c.clip_len, c.clip_size, c.clip_size, generator=g),
            labels=torch.full((k,), float(i % 2)),
        )
        for i, k in enumerate(clips_per_patient)
    ]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _clip(g: torch.Tensor, c: float) -> torch.Tensor:
    return g * min(1.0, c / float(g.norm()))


def _detector_patient_grads(model, units) -> list[torch.Tensor]:
    """Each patient's gradient by a plain backward over all of its frames."""
    grads = []
    for unit in units:
        model.zero_grad(set_to_none=True)
        sum(model(unit.images, unit.targets).values()).backward()
        grads.append(_flat_grad(model))
    return grads


def _classifier_patient_grads(model, units) -> list[torch.Tensor]:
    """Each patient's gradient of its mean clip loss by a plain backward."""
    grads = []
    for unit in units:
        model.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(unit.clips), unit.labels).backward()
        grads.append(_flat_grad(model))
    return grads


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_detector(TINY.detector).train()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return build_classifier(TINY.classifier).train()


@pytest.mark.parametrize("secure_rng", [False, True])
def test_detector_step_is_clipped_sum_over_patients(detector, secure_rng):
    units = _detector_units(3, frames=2)
    reference = copy.deepcopy(detector)
    # Faster R-CNN samples anchors and RoIs with the global RNG: same seed, same samples.
    torch.manual_seed(7)
    grads = _detector_patient_grads(reference, units)
    norms = sorted(float(g.norm()) for g in grads)
    c = norms[1]  # the largest gradient is clipped, the smallest is not
    model = copy.deepcopy(detector)
    before = _flat(model)
    torch.manual_seed(7)
    dp = DPSettings.allowing_noise_off(noise_multiplier=0.0, max_grad_norm=c, sample_rate=1.0)
    record = train_detector(
        model, units, dp=dp, steps=1, lr=1.0, device=CPU,
        generator=torch.Generator().manual_seed(0), secure_rng=secure_rng,
    )  # fmt: skip
    expected = -sum(_clip(g, c) for g in grads) / (1.0 * len(units))
    torch.testing.assert_close(_flat(model) - before, expected, atol=1e-5, rtol=1e-4)
    assert (record.model, record.privacy_unit, record.n_units, record.steps) == (
        "detector",
        "patient",
        3,
        1,
    )
    assert math.isfinite(record.mean_loss)


@pytest.mark.parametrize("secure_rng", [False, True])
def test_classifier_patient_with_many_clips_counts_once(classifier, secure_rng):
    units = _classifier_units([1, 2, 3])
    grads = _classifier_patient_grads(copy.deepcopy(classifier), units)
    c = sorted(float(g.norm()) for g in grads)[1]
    model = copy.deepcopy(classifier)
    before = _flat(model)
    dp = DPSettings.allowing_noise_off(noise_multiplier=0.0, max_grad_norm=c, sample_rate=1.0)
    generator = torch.Generator().manual_seed(0)
    # Four clips per pass: the third patient's clips straddle two passes.
    record = train_classifier(
        model, units, dp=dp, steps=1, lr=1.0, device=CPU, generator=generator,
        secure_rng=secure_rng, clips_per_pass=4,
    )  # fmt: skip
    expected = -sum(_clip(g, c) for g in grads) / (1.0 * len(units))
    torch.testing.assert_close(_flat(model) - before, expected, atol=1e-5, rtol=1e-4)
    assert record.n_units == 3


@pytest.mark.parametrize("secure_rng", [False, True])
def test_classifier_step_divides_by_expected_batch_size(classifier, secure_rng):
    """With q < 1 the update is the clipped sum over the drawn patients / (q N).

    Seeds 0-3 draw a proper subset; secure draws go on until one does (each draw: 3/4).
    """
    units = _classifier_units([2, 1, 2])
    q, c, lr = 0.5, 0.05, 1.0
    clipped = [_clip(g, c) for g in _classifier_patient_grads(copy.deepcopy(classifier), units)]
    subsets = [
        s for r in range(len(units) + 1) for s in itertools.combinations(range(len(units)), r)
    ]
    drawn: set[tuple[int, ...]] = set()
    for seed in range(4 if not secure_rng else 40):
        if secure_rng and any(0 < len(s) < len(units) for s in drawn):
            break
        model = copy.deepcopy(classifier)
        before = _flat(model)
        dp = DPSettings.allowing_noise_off(noise_multiplier=0.0, max_grad_norm=c, sample_rate=q)
        generator = torch.Generator().manual_seed(seed)
        train_classifier(
            model, units, dp=dp, steps=1, lr=lr, device=CPU, generator=generator,
            secure_rng=secure_rng,
        )  # fmt: skip
        update = (_flat(model) - before) * (-q * len(units) / lr)
        errors = {
            s: float((update - sum((clipped[i] for i in s), torch.zeros_like(update))).abs().max())
            for s in subsets
        }
        best = min(errors, key=lambda s: errors[s])
        assert errors[best] < 1e-5, errors
        drawn.add(best)
    assert any(0 < len(s) < len(units) for s in drawn), drawn


@pytest.mark.parametrize("secure_rng", [False, True])
def test_noise_std_is_sigma_c_over_expected_batch(classifier, secure_rng):
    units = _classifier_units([1, 1, 2, 1])
    sigma, c, q, lr = 0.7, 0.1, 1.0, 0.5
    runs = []
    for noise in (0.0, sigma):
        model = copy.deepcopy(classifier)
        dp = DPSettings.allowing_noise_off(noise_multiplier=noise, max_grad_norm=c, sample_rate=q)
        train_classifier(
            model,
            units,
            dp=dp,
            steps=1,
            lr=lr,
            device=CPU,
            generator=torch.Generator().manual_seed(3),
            secure_rng=secure_rng,
        )
        runs.append(_flat(model))
    diff = runs[1] - runs[0]
    expected_std = lr * sigma * c / (q * len(units))
    assert float(diff.std()) == pytest.approx(expected_std, rel=0.03)
    assert abs(float(diff.mean())) < 0.01 * expected_std


@pytest.mark.parametrize("secure_rng", [False, True])
def test_empty_draw_still_adds_noise(detector, secure_rng):
    units = _detector_units(2, frames=1)
    for noise, changed in ((0.0, False), (1.0, True)):
        model = copy.deepcopy(detector)
        before = _flat(model)
        dp = DPSettings.allowing_noise_off(
            noise_multiplier=noise, max_grad_norm=1.0, sample_rate=1e-9
        )
        record = train_detector(
            model,
            units,
            dp=dp,
            steps=1,
            lr=1e-12,
            device=CPU,
            generator=torch.Generator().manual_seed(0),
            secure_rng=secure_rng,
        )
        after = _flat(model)
        assert math.isnan(record.mean_loss)
        assert torch.isfinite(after).all()
        assert bool((after != before).any()) is changed


@pytest.mark.parametrize("secure_rng", [False, True])
def test_poisson_sampling_mean_is_q_n(secure_rng):
    generator = ChaCha20Random() if secure_rng else torch.Generator().manual_seed(0)
    n, q, draws = 40, 0.25, 4000
    counts = torch.zeros(n)
    sizes = []
    for _ in range(draws):
        sampled = poisson_sample(n, q, generator)
        counts[sampled] += 1
        sizes.append(len(sampled))
    # 5 and 5.8 standard errors: a secure draw fails with probability < 1e-6
    assert sum(sizes) / draws == pytest.approx(q * n, abs=0.2)  # standard error 0.04
    assert float((counts / draws - q).abs().max()) < 0.04  # each patient: standard error 0.007


def test_training_leaves_no_opacus_traces(classifier):
    model = copy.deepcopy(classifier)
    keys = list(model.state_dict())
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
    train_classifier(
        model,
        _classifier_units([1, 2]),
        dp=dp,
        steps=2,
        lr=0.1,
        device=CPU,
        generator=torch.Generator(),
        secure_rng=True,
    )
    assert list(model.state_dict()) == keys
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not hasattr(module, "activations")
    for p in model.parameters():
        assert p.grad is None
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")


def test_dp_settings_are_keyword_only_and_checked_by_one_rule():
    with pytest.raises(TypeError):
        DPSettings(1.0, 1.0, 0.1)  # type: ignore[misc]
    for bad in (
        {"noise_multiplier": -1.0, "max_grad_norm": 1.0, "sample_rate": 0.1},
        {"noise_multiplier": math.inf, "max_grad_norm": 1.0, "sample_rate": 0.1},
        {"noise_multiplier": 1.0, "max_grad_norm": 0.0, "sample_rate": 0.1},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 1.5},
    ):
        field = next(k for k, v in bad.items() if v != 1.0)
        with pytest.raises(ValidationError, match=field):
            DPSettings(**bad)
        with pytest.raises(PrivacyError, match=field):
            DPSettings.allowing_noise_off(**bad)
    # sigma = 0 (the noise off) only where asked for by name.
    with pytest.raises(ValidationError, match="noise_multiplier"):
        DPSettings(noise_multiplier=NOISE_OFF, max_grad_norm=1.0, sample_rate=0.1)
    off = DPSettings.allowing_noise_off(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.1)
    assert off.noise_multiplier == NOISE_OFF
