"""The DP fine-tuning recipe's options (issue 11): which classifier parameters a site
trains (run config ``classifier-trains``) and augmentation multiplicity (``augment-views``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

import client.site as site_module
from client import train
from client.site import SiteClient
from client.train import augment, train_classifier
from common.data.units import ClassifierUnit
from common.errors import UsageError
from common.models.bundle import build_bundle, get_weights, weight_names
from common.models.trainable import TRAINS, train_only
from common.privacy.settings import DPSettings
from deploy.demo import DemoSettings, prepare_sites
from deploy.federation.runs import app_run_config
from deploy.launcher import APP_DIR
from tests.test_secure_rng import site_with

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("tiny", seed=0)


def _trained(network: torch.nn.Module) -> set[str]:
    return {name for name, p in network.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model", ["wauve", "keyframe2d"])
def test_each_choice_trains_its_parameters_and_fewer_than_all(model):
    networks = build_bundle("tiny", seed=0, model=model).networks
    network = networks["classifier" if model == "wauve" else "keyframe"]
    names = {name for name, _ in network.named_parameters()}
    counts = {choice: train_only(network, choice) for choice in TRAINS}

    assert counts["all"] == sum(p.numel() for p in network.parameters())
    assert counts["head"] < counts["norm"] < counts["last-stage"] < counts["all"]
    train_only(network, "head")
    assert _trained(network) == {"fc.weight", "fc.bias"}
    train_only(network, "last-stage")
    assert _trained(network) == {n for n in names if n.startswith(("layer4.", "fc."))}
    train_only(network, "norm")
    norms = {
        f"{module_name}.{name}"
        for module_name, module in network.named_modules()
        if isinstance(module, torch.nn.GroupNorm)
        for name, _ in module.named_parameters()
    }
    assert norms and _trained(network) == norms | {"fc.weight", "fc.bias"}
    train_only(network, "all")
    assert _trained(network) == names


def test_an_unknown_choice_names_the_known_ones(bundle):
    with pytest.raises(UsageError, match="known: all, last-stage, norm, head"):
        train_only(bundle.classifier, "trunk")


def test_the_app_declares_the_recipe_options_off_by_default():
    config = app_run_config(APP_DIR)
    assert (config["classifier-trains"], config["augment-views"]) == ("all", 1)


def test_head_only_dp_step_moves_the_head_alone_by_its_own_clipped_gradients(bundle):
    """Frozen parameters neither move nor count in a patient's clipped gradient norm."""
    model = copy.deepcopy(bundle.classifier).train()
    train_only(model, "head")
    c = bundle.preset.classifier
    g = torch.Generator().manual_seed(3)
    units = [
        ClassifierUnit(
            f"p{i}",
            clips=torch.rand(2, 3, c.clip_len, c.clip_size, c.clip_size, generator=g),
            labels=torch.full((2,), float(i % 2)),
        )
        for i in range(3)
    ]
    clip_norm, lr = 0.01, 1.0
    expected = torch.zeros(sum(p.numel() for p in model.fc.parameters()))
    for unit in units:
        reference = copy.deepcopy(model)
        F.binary_cross_entropy_with_logits(reference(unit.clips), unit.labels).backward()
        grad = torch.cat([p.grad.flatten() for p in reference.fc.parameters()])
        expected += grad * min(1.0, clip_norm / float(grad.norm()))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dp = DPSettings.allowing_noise_off(
        noise_multiplier=0.0, max_grad_norm=clip_norm, sample_rate=1.0
    )
    train_classifier(
        model, units, dp=dp, steps=1, lr=lr, device=CPU,
        generator=torch.Generator().manual_seed(0), secure_rng=False,
    )  # fmt: skip

    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == {"fc.weight", "fc.bias"}
    update = torch.cat(
        [(before[f"fc.{n}"] - p.detach()).flatten() for n, p in model.fc.named_parameters()]
    )
    # q = 1: the step is lr times the clipped sum over the patients / N.
    assert torch.allclose(update * len(units) / lr, expected, atol=1e-6)


def _units(bundle, n: int, clips: int = 2, seed: int = 3) -> list[ClassifierUnit]:
    c = bundle.preset.classifier
    g = torch.Generator().manual_seed(seed)
    return [
        ClassifierUnit(
            f"p{i}",
            clips=torch.rand(clips, 3, c.clip_len, c.clip_size, c.clip_size, generator=g),
            labels=torch.full((clips,), float(i % 2)),
        )
        for i in range(n)
    ]


def _step(model, units, *, views: int, clip_norm: float = 0.05) -> torch.Tensor:
    """The parameters' change after one noiseless DP-SGD step over every patient."""
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    dp = DPSettings.allowing_noise_off(
        noise_multiplier=0.0, max_grad_norm=clip_norm, sample_rate=1.0
    )
    train_classifier(
        model, units, dp=dp, steps=1, lr=1.0, device=CPU,
        generator=torch.Generator().manual_seed(0), secure_rng=False, views=views,
    )  # fmt: skip
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def test_views_of_an_unchanged_sample_weigh_as_the_sample_once(bundle, monkeypatch):
    """K copies each weighted 1/K: with augmentation the identity, 3 views = 1 view."""
    units = _units(bundle, 3)
    one = _step(copy.deepcopy(bundle.classifier).train(), units, views=1)
    monkeypatch.setattr(train, "augment", lambda samples, generator: samples.clone())

    three = _step(copy.deepcopy(bundle.classifier).train(), units, views=3)

    assert torch.allclose(one, three, atol=1e-6)


def test_augmented_views_change_the_step_but_a_patient_still_counts_at_most_c(bundle):
    units = _units(bundle, 3)
    clip_norm = 0.05
    one = _step(copy.deepcopy(bundle.classifier).train(), units, views=1, clip_norm=clip_norm)
    four = _step(copy.deepcopy(bundle.classifier).train(), units, views=4, clip_norm=clip_norm)

    assert not torch.allclose(one, four, atol=1e-6)
    # q = 1, lr = 1: the step is the sum of 3 clipped patient gradients / 3.
    assert float(four.norm()) <= clip_norm * (1 + 1e-5)


def test_augment_flips_about_half_and_scales_intensity_within_0_1():
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(400, 3, 2, 8, 8, generator=g)

    out = augment(samples, torch.Generator().manual_seed(1))

    assert out.shape == samples.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, augment(samples, torch.Generator().manual_seed(1)))

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    # The gain keeps a sample's pattern: it correlates with the original or its mirror.
    flipped = [
        correlation(o, s.flip(-1)) > correlation(o, s) for o, s in zip(out, samples, strict=True)
    ]
    assert 150 < sum(flipped) < 250


def test_views_below_one_are_refused(bundle):
    with pytest.raises(UsageError, match="views must be >= 1"):
        _step(copy.deepcopy(bundle.classifier).train(), _units(bundle, 2), views=0)


def test_a_site_trains_the_head_alone_on_augmented_views_as_the_run_config_says(
    tmp_path, monkeypatch
):
    """classifier-trains and augment-views reach the site's DP-SGD; the detector trains as
    before, and the classifier's frozen trunk goes back to the server unchanged."""

    seen: dict[str, dict[str, object]] = {}
    for name, trainer in list(site_module.TRAINERS.items()):

        def spy(network, *args, _name=name, _trainer=trainer, **kwargs):
            seen[_name] = {"views": kwargs.get("views"), "trained": _trained(network)}
            return _trainer(network, *args, **kwargs)

        monkeypatch.setitem(site_module.TRAINERS, name, spy)
    config_path = prepare_sites(
        tmp_path, DemoSettings(sites=1, patients=4, frames=16, size=64), Console(quiet=True)
    )[0]
    run_config = {
        "preset": "tiny", "local-steps": 1, "learning-rate": 0.05,
        "classifier-trains": "head", "augment-views": 2,
    }  # fmt: skip
    client = SiteClient(site_with(config_path, secure_rng=False), run_config)
    start = build_bundle("tiny", seed=0)
    weights, _, _ = client.fit(get_weights(start), {"round": 1, "run_id": "r1"})

    assert seen["classifier"] == {"views": 2, "trained": {"fc.weight", "fc.bias"}}
    assert seen["detector"]["views"] is None and len(seen["detector"]["trained"]) > 10
    changed = {
        name
        for name, new, old in zip(weight_names(start), weights, get_weights(start), strict=True)
        if name.startswith("classifier.") and (new != old).any()
    }
    assert changed == {"classifier.fc.weight", "classifier.fc.bias"}
