"""ImageNet ResNet weights from a torchvision file into frozen-bn trunks (common.models.backbone).

The reference is torchvision itself: its ``resnet34``/``resnet50`` with random weights and
non-trivial BatchNorm statistics, saved as torchvision publishes them
(``torch.save(model.state_dict())``), and run in eval mode beside busfed's networks.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from opacus import GradSampleModule
from torch import nn

from client.train import train_per_sample
from common.errors import DataError, UsageError
from common.models.backbone import NETWORK_ARCH, load_backbone_weights
from common.models.bundle import (
    DetectorBundle,
    KeyFrameBundle,
    ModelBundle,
    WauveBundle,
    build_bundle,
)
from common.models.frozen import FrozenAffine, fold_batch_norm
from common.models.i3d import build_classifier
from common.models.keyframe import KeyFrameResNet, build_keyframe_model
from common.models.loading import load_bundle_dir, save_bundle_dir
from common.models.presets import get_preset
from common.privacy.settings import DPSettings

CPU = torch.device("cpu")


def _imagenet_like(model: nn.Module, seed: int) -> nn.Module:
    """A torchvision ResNet in eval mode whose BatchNorms are far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                _set_batch_norm(m, g)
    return model.eval()


def _set_batch_norm(bn: nn.BatchNorm2d | nn.BatchNorm3d, g: torch.Generator) -> None:
    """Affine in [0.5, 1.5] and [-0.5, 0.5], running mean in [-0.5, 0.5], variance in [0.5, 4]."""
    c = bn.num_features
    assert bn.running_mean is not None and bn.running_var is not None
    bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
    bn.bias.copy_(torch.rand(c, generator=g) - 0.5)
    bn.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
    bn.running_var.copy_(torch.rand(c, generator=g) * 3.5 + 0.5)


def _keyframe(bundle: ModelBundle) -> KeyFrameResNet:
    assert isinstance(bundle, KeyFrameBundle)
    return bundle.keyframe


def _trunk(resnet: torchvision.models.ResNet) -> nn.Sequential:
    """torchvision's ResNet up to layer4: what ``features`` and the detector's body compute."""
    r = resnet
    return nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # Relative to the largest value: deep random networks spread their outputs widely.
    atol = 1e-4 * float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=atol)


def _torchvision_file(folder: Path, arch: str) -> tuple[torchvision.models.ResNet, Path]:
    """torchvision's ``arch`` with random weights, and its state dict saved as published."""
    seed = int(arch.removeprefix("resnet"))
    torch.manual_seed(seed)
    model = _imagenet_like(getattr(torchvision.models, arch)(weights=None), seed)
    path = folder / f"{arch}-test.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    return _torchvision_file(tmp_path_factory.mktemp("weights"), "resnet50")


@pytest.fixture(scope="module")
def resnet34(tmp_path_factory):
    return _torchvision_file(tmp_path_factory.mktemp("weights"), "resnet34")


@pytest.fixture(scope="module")
def keyframe(resnet50):
    """The paper preset's key-frame model, frozen-bn, loaded from the resnet50 file."""
    bundle = build_bundle("paper", seed=0, model="keyframe2d", trunk="frozen-bn")
    provenance = load_backbone_weights(bundle, resnet50[1])
    return bundle, provenance


@pytest.fixture(scope="module")
def wauve(resnet34, resnet50):
    """The paper preset's WAUVE model, frozen-bn: resnet34 into the detector, resnet50 into I3D."""
    bundle = WauveBundle.build(get_preset("paper"), trunk="frozen-bn")
    from_34 = load_backbone_weights(bundle, resnet34[1])
    from_50 = load_backbone_weights(bundle, resnet50[1])
    return bundle.eval(), from_34, from_50


def _save(tmp_path: Path, state: object, name: str = "resnet50-bad.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


# --- what is loaded ------------------------------------------------------------------------


def test_keyframe_features_are_torchvision_resnet50s(keyframe, resnet50):
    bundle, provenance = keyframe
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _keyframe(bundle).eval().features(x)
        ref = _trunk(resnet50[0])(x)
    _assert_close(ours, ref)
    # 53 convolutions and 53 BatchNorms of 4 tensors; fc and num_batches_tracked stay out.
    assert provenance.tensors == {"keyframe": 53 + 53 * 4}
    assert provenance.arch == "resnet50"
    assert provenance.file == "resnet50-test.pth"
    assert provenance.sha256 == hashlib.sha256(resnet50[1].read_bytes()).hexdigest()
    assert provenance.card()["backbone_sha256"] == provenance.sha256


def test_the_head_keeps_its_initialisation(keyframe):
    fresh = _keyframe(build_bundle("paper", seed=0, model="keyframe2d", trunk="frozen-bn"))
    loaded = _keyframe(keyframe[0])
    # One logit, not torchvision's 1000 classes: fc was not loaded.
    assert torch.equal(loaded.fc.weight, fresh.fc.weight)
    assert torch.equal(loaded.fc.bias, fresh.fc.bias)
    assert not torch.equal(loaded.conv1.weight, fresh.conv1.weight)


def test_detector_body_is_torchvision_resnet34(wauve, resnet34):
    bundle, from_34, from_50 = wauve
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = bundle.detector.backbone.body(x)["3"]
        ref = _trunk(resnet34[0])(x)
    _assert_close(ours, ref)
    # 36 convolutions and 36 BatchNorms; each network took only its own architecture.
    assert from_34.tensors == {"detector": 36 + 36 * 4}
    assert from_50.tensors == {"classifier": 53 + 53 * 4}


def test_i3d_on_identical_frames_is_the_2d_network(wauve, resnet50):
    """Inflation divides by T: a clip of one repeated frame gets the 2D response.

    Only time steps whose temporal window lies inside the clip: the zero padding at the
    clip's ends removes frames from the sum there.
    """
    i3d, tv = wauve[0].classifier, resnet50[0]
    g = torch.Generator().manual_seed(2)
    frame = torch.rand(1, 3, 32, 32, generator=g)
    clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1)
    with torch.no_grad():
        stem = i3d.stem[:3](clip)  # conv 5x7x7 (padding 2 in time), frozen norm, ReLU
        ref = tv.relu(tv.bn1(tv.conv1(frame)))
        for t in range(2, 6):
            _assert_close(stem[:, :, t], ref)
        # A bottleneck whose conv1 is 3x1x1 (padding 1 in time), with its downsample.
        assert i3d.layer1[0].conv1.kernel_size[0] == 3
        features = torch.rand(1, 64, 8, 8, generator=g)
        block = i3d.layer1[0](features.unsqueeze(2).expand(-1, -1, 5, -1, -1))
        ref = tv.layer1[0](features)
        for t in range(1, 4):
            _assert_close(block[:, :, t], ref)


def test_state_dict_wrappers_are_accepted(tmp_path, resnet50):
    path = _save(tmp_path, {"model": resnet50[0].state_dict(), "epoch": 90})
    bundle = build_bundle("paper", seed=0, model="keyframe2d", trunk="frozen-bn")
    assert load_backbone_weights(bundle, path).tensors == {"keyframe": 265}


# --- what is refused -----------------------------------------------------------------------


def test_a_resnet50_file_is_refused_by_the_detector(wauve, resnet50):
    detector_alone = DetectorBundle(
        preset=get_preset("paper"), detector=wauve[0].detector, trunk="frozen-bn"
    )
    with pytest.raises(DataError, match=r"resnet50-test\.pth: the file is a resnet50, but "
                       r"detector needs resnet34"):  # fmt: skip
        load_backbone_weights(detector_alone, resnet50[1])
    # Named explicitly, a network of another architecture is refused too.
    with pytest.raises(DataError, match="detector needs resnet34, classifier needs resnet50"):
        load_backbone_weights(wauve[0], resnet50[1], networks=["detector", "classifier"])
    with pytest.raises(UsageError, match="no network keyframe"):
        load_backbone_weights(wauve[0], resnet50[1], networks=["keyframe"])


def test_a_groupnorm_trunk_is_refused(resnet50):
    bundle = build_bundle("tiny", seed=0, model="keyframe2d")
    with pytest.raises(
        DataError, match=r"resnet50-test\.pth: .*build the model with trunk 'frozen-bn'"
    ):
        load_backbone_weights(bundle, resnet50[1])


def test_a_narrow_preset_is_refused_naming_the_first_key(resnet50):
    bundle = build_bundle("tiny", seed=0, model="keyframe2d", trunk="frozen-bn")
    with pytest.raises(
        DataError,
        match=r"resnet50-test.pth: conv1.weight has shape \(64, 3, 7, 7\), but "
        r"keyframe.conv1.weight needs \(8, 3, 7, 7\).*width-64",
    ):
        load_backbone_weights(bundle, resnet50[1])


def test_a_missing_tensor_is_named_and_nothing_is_loaded(tmp_path, keyframe, resnet50):
    bundle = keyframe[0]
    state = resnet50[0].state_dict()
    del state["layer3.2.bn2.running_var"]
    before = {k: v.clone() for k, v in _keyframe(bundle).state_dict().items() if "layer1" in k}
    with pytest.raises(
        DataError, match=r"resnet50-bad\.pth: layer3\.2\.bn2\.running_var is missing"
    ):
        load_backbone_weights(bundle, _save(tmp_path, state))
    for key, value in before.items():
        assert torch.equal(_keyframe(bundle).state_dict()[key], value), key


def test_a_deeper_resnet_is_refused(tmp_path, keyframe, resnet50):
    state = resnet50[0].state_dict()
    state["layer3.6.conv1.weight"] = torch.zeros(256, 1024, 1, 1)  # as in ResNet-101
    with pytest.raises(DataError, match=r"1 tensors busfed's resnet50 trunk has no place for, "
                       r"first layer3\.6\.conv1\.weight"):  # fmt: skip
        load_backbone_weights(keyframe[0], _save(tmp_path, state))


def test_a_value_outside_secaggs_range_is_refused(tmp_path, keyframe, resnet50):
    state = resnet50[0].state_dict()
    state["layer2.1.bn3.weight"][5] = 40.0  # scale 40 / sqrt(var + eps) > 8 for var <= 4
    with pytest.raises(DataError, match=r"keyframe.layer2.1.bn3.scale would reach \d+\.?\d*, "
                       r"outside SecAgg\+'s range \+-8.0"):  # fmt: skip
        load_backbone_weights(keyframe[0], _save(tmp_path, state))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a torch file", "not a readable weights file"),
        ([1, 2, 3], "expected a torchvision ResNet state dict, got list"),
        ({"conv1.weight": torch.zeros(1)}, "not a torchvision ResNet-34/50 state dict"),
    ],
)
def test_an_unreadable_file_is_named(tmp_path, content, message):
    path = tmp_path / "resnet-odd.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    bundle = build_bundle("tiny", seed=0, model="keyframe2d", trunk="frozen-bn")
    with pytest.raises(DataError, match=f"resnet-odd.pth: {message}"):
        load_backbone_weights(bundle, path)


def test_an_unknown_trunk_is_a_usage_error():
    with pytest.raises(
        UsageError, match="unknown trunk 'batchnorm'; known trunks: groupnorm, frozen-bn"
    ):
        build_bundle("tiny", seed=0, model="keyframe2d", trunk="batchnorm")


# --- the trunk choice ----------------------------------------------------------------------


def test_groupnorm_default_is_unchanged():
    """Keys and values of the default trunk as before the trunk choice existed.

    Computed on main at b4c3cf2, before this change: for
    ``build_bundle("tiny", seed=0, model="keyframe2d").networks["keyframe"].state_dict()``,
    the number of keys, the sha256 of the keys joined by newlines, and the float64 sum of
    every tensor's absolute values.
    """
    bundle = build_bundle("tiny", seed=0, model="keyframe2d")
    state = bundle.networks["keyframe"].state_dict()
    keys = "\n".join(state).encode()
    assert len(state) == 161
    assert hashlib.sha256(keys).hexdigest() == (
        "ffdf42b2cdf61bc763a4a37ca0eb9640dbab791d933dbf28162fef5b1f58b98c"
    )
    total = sum(float(t.double().abs().sum()) for t in state.values())
    assert total == pytest.approx(34995.354003963395, rel=1e-12)
    assert bundle.trunk == "groupnorm"
    assert "GroupNorm" in bundle.architecture()["keyframe"]


def test_frozen_bn_trunk_has_only_frozen_buffers():
    bundle = build_bundle("tiny", seed=0, model="wauve", trunk="frozen-bn")
    card = bundle.architecture()
    assert card["trunk"] == "frozen-bn"
    assert "frozen BatchNorm" in card["detector"] and "frozen BatchNorm" in card["classifier"]
    for network in bundle.networks.values():
        assert not any(isinstance(m, nn.GroupNorm | nn.BatchNorm2d) for m in network.modules())
        frozen = [m for m in network.modules() if isinstance(m, FrozenAffine)]
        assert frozen and all(not list(m.parameters()) for m in frozen)
        # Built, each is the identity.
        assert all(bool((m.scale == 1).all() and (m.shift == 0).all()) for m in frozen)
    assert NETWORK_ARCH == {
        "detector": "resnet34",
        "classifier": "resnet50",
        "keyframe": "resnet50",
    }


def test_frozen_affine_is_eval_batch_norm_in_4d_and_5d():
    g = torch.Generator().manual_seed(3)
    bn = nn.BatchNorm3d(6).eval()
    with torch.no_grad():
        _set_batch_norm(bn, g)
    frozen = FrozenAffine(6)
    assert bn.running_mean is not None and bn.running_var is not None
    scale, shift = fold_batch_norm(
        weight=bn.weight, bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var
    )
    frozen.scale.copy_(scale)
    frozen.shift.copy_(shift)
    x = torch.randn(2, 6, 3, 4, 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), bn(x))
        torch.testing.assert_close(frozen(x[:, :, 0]), bn(x)[:, :, 0])


def _randomise_frozen(network: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, FrozenAffine):
                m.scale.copy_(torch.rand(m.channels, generator=g) * 0.5 + 0.5)
                m.shift.copy_((torch.rand(m.channels, generator=g) - 0.5) * 0.1)


def test_frozen_bn_round_trip_keeps_trunk_and_outputs(tmp_path):
    bundle = build_bundle("tiny", seed=0, model="keyframe2d", trunk="frozen-bn")
    _randomise_frozen(_keyframe(bundle), 4)
    save_bundle_dir(bundle, tmp_path / "v1", {"preset": "tiny", "round": 3})
    loaded, card = load_bundle_dir(tmp_path / "v1")
    assert isinstance(loaded, KeyFrameBundle)
    assert loaded.trunk == card["trunk"] == "frozen-bn"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(_keyframe(loaded)(x), _keyframe(bundle.eval())(x))


def test_a_card_without_trunk_is_groupnorm_and_an_unknown_one_is_refused(tmp_path):
    bundle = build_bundle("tiny", seed=0, model="keyframe2d")
    save_bundle_dir(bundle, tmp_path / "v1", {"preset": "tiny", "round": 0})
    card_file = tmp_path / "v1" / "model.json"
    card = json.loads(card_file.read_text())
    del card["trunk"]
    card_file.write_text(json.dumps(card))
    assert load_bundle_dir(tmp_path / "v1")[0].trunk == "groupnorm"
    card_file.write_text(json.dumps({**card, "trunk": "batchnorm"}))
    with pytest.raises(DataError, match=r"v1/model.json: unknown trunk 'batchnorm'"):
        load_bundle_dir(tmp_path / "v1")


# --- DP-SGD stays valid --------------------------------------------------------------------


def test_per_sample_gradients_of_a_frozen_bn_network_are_each_samples_own():
    """No batch statistics: Opacus' per-sample gradient is the sample's gradient alone."""
    model = _keyframe(build_bundle("tiny", seed=0, model="keyframe2d", trunk="frozen-bn"))
    _randomise_frozen(model, 6)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    with warnings.catch_warnings():
        # As in train_per_sample: the stem's input needs no gradient.
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        wrapped(x).sum().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}  # type: ignore[attr-defined]
    wrapped.to_standard_module()
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1]).sum().backward()
        for name in ("conv1.weight", "layer4.2.conv3.weight", "fc.weight"):
            param = dict(model.named_parameters())[name]
            torch.testing.assert_close(per_sample[name][i], param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["keyframe", "classifier"])
def test_a_dp_sgd_step_trains_parameters_and_leaves_frozen_buffers(name):
    preset = get_preset("tiny")
    model: nn.Module
    shape: tuple[int, ...]
    if name == "keyframe":
        model, shape = build_keyframe_model(preset.keyframe, trunk="frozen-bn"), (3, 32, 32)
    else:
        model, shape = build_classifier(preset.classifier, trunk="frozen-bn"), (3, 8, 32, 32)
    _randomise_frozen(model, 8)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(9)
    units = [(torch.rand(1, *shape, generator=g), torch.tensor([y])) for y in (0.0, 1.0)]
    record = train_per_sample(
        name, model, units,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0),
        steps=1, lr=0.1, device=CPU, generator=torch.Generator().manual_seed(0),
        secure_rng=False, samples_per_pass=4,
    )  # fmt: skip
    assert math.isfinite(record.mean_loss)
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    moved = [k for k, v in model.named_parameters() if not torch.equal(v, params[k])]
    assert "conv1.weight" in moved or "stem.0.weight" in moved
    assert len(moved) == len(params)
