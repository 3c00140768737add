"""Which classifier parameters a site trains (run config ``classifier-trains``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from client.train import train_classifier
from common.data.units import ClassifierUnit
from common.errors import UsageError
from common.models.bundle import build_bundle
from common.models.trainable import TRAINS, train_only
from common.privacy.settings import DPSettings
from deploy.federation.runs import app_run_config
from deploy.launcher import APP_DIR

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


def test_the_app_declares_the_choice_with_every_parameter_training_by_default():
    assert app_run_config(APP_DIR)["classifier-trains"] == "all"


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
