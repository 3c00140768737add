"""Model contracts: shapes, train vs eval outputs, torchvision equivalence, weight exchange."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from opacus.validators import ModuleValidator
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from common.errors import UsageError
from common.models.bundle import build_bundle, get_weights, set_weights, weight_names
from common.models.detector import ScaledResNet, build_detector, group_norm
from common.models.i3d import OutOfPlaceBottleneck, build_classifier
from common.models.presets import PRESETS, get_preset

TINY = get_preset("tiny")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("tiny", seed=0)


@pytest.mark.parametrize(
    ("block", "reference"),
    [(BasicBlock, torchvision.models.resnet34), (Bottleneck, torchvision.models.resnet50)],
)
def test_width_64_is_torchvision_resnet(block, reference):
    norm = group_norm(32)
    ours = ScaledResNet(block, (3, 4, 6, 3), width=64, norm_layer=norm)
    assert _shapes(ours) == _shapes(reference(weights=None, norm_layer=norm))
    # GroupNorm and BatchNorm have the same parameters: the published counts hold.
    assert _n_params(ours) == _n_params(reference(weights=None))


def test_paper_detector_is_torchvision_r34_fpn():
    ours = build_detector(get_preset("paper").detector)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet34", weights=None, trainable_layers=5, norm_layer=group_norm(32)
    )
    assert _shapes(ours) == _shapes(FasterRCNN(backbone, num_classes=2))


def test_detector_train_returns_losses_eval_returns_boxes(bundle):
    detector = bundle.detector
    size = TINY.detector.image_size
    images = [torch.rand(3, size, size), torch.rand(3, size, size)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = detector.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out = detector.eval()(images)
    assert len(out) == 2
    for det in out:
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert bool((det["boxes"][:, 2:] >= det["boxes"][:, :2]).all())


def test_detector_has_no_batchnorm_and_all_layers_train(bundle):
    detector = bundle.detector
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    assert not any(isinstance(m, norms) for m in detector.modules())
    assert all(p.requires_grad for p in detector.parameters())
    # Per-sample gradients of the detector come from micro-batches, not Opacus' hooks, so
    # only the backbone (convolutions and norms) is a meaningful validator input.
    assert ModuleValidator.validate(detector.backbone.train(), strict=True) == []


def test_classifier_shapes_and_opacus_compatibility(bundle):
    classifier = bundle.classifier.train()  # the validator wants training mode
    c = TINY.classifier
    clips = torch.rand(2, 3, c.clip_len, c.clip_size, c.clip_size)
    features = classifier.features(clips)
    assert features.shape == (
        2, classifier.feature_channels, c.clip_len // 2, c.clip_size // 32, c.clip_size // 32
    )  # fmt: skip
    logits = classifier(clips)
    assert logits.shape == (2,)
    torch.testing.assert_close(classifier.head(features), logits)
    assert ModuleValidator.validate(classifier, strict=True) == []
    blocks = [m for m in classifier.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(isinstance(b, OutOfPlaceBottleneck) for b in blocks)
    assert not any(getattr(m, "inplace", False) for m in classifier.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in classifier.modules())


def test_classifier_inflation_kernels(bundle):
    classifier = bundle.classifier
    assert classifier.stem[0].kernel_size == (5, 7, 7)
    assert [b.conv1.kernel_size[0] for b in classifier.layer3] == [3, 1, 3, 1, 3, 1]
    assert all(b.conv2.kernel_size == (1, 3, 3) for b in classifier.layer3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_stay_in_range(name):
    # Guards the presets: tiny must stay small for CPU tests, paper is the WAUVE size.
    preset = get_preset(name)
    det = _n_params(build_detector(preset.detector))
    cls = _n_params(build_classifier(preset.classifier))
    if name == "tiny":
        assert 3e5 < det < 1.5e6 and 3e5 < cls < 1.5e6
    else:
        assert det == 38_391_641 and cls == 28_241_729


def test_bundle_is_deterministic_and_weights_round_trip():
    a, b = build_bundle("tiny", seed=0), build_bundle("tiny", seed=1)
    again = build_bundle("tiny", seed=0)
    assert all(
        np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(again), strict=True)
    )
    assert not all(
        np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(b), strict=True)
    )
    weights = get_weights(a)
    assert all(w.dtype == np.float32 for w in weights)
    set_weights(b, weights)
    assert all(np.array_equal(x, y) for x, y in zip(weights, get_weights(b), strict=True))
    names = weight_names(a)
    assert len(names) == len(weights)
    assert names[0].startswith("detector.") and names[-1].startswith("classifier.")
    assert names == [n for n in names if n.startswith("detector.")] + [
        n for n in names if n.startswith("classifier.")
    ]


def test_set_weights_names_the_first_mismatch(bundle):
    weights = get_weights(bundle)
    names = weight_names(bundle)
    i = len(weights) // 2
    weights[i] = np.zeros((*weights[i].shape, 2), dtype=np.float32)
    before = get_weights(bundle)
    with pytest.raises(UsageError, match=names[i]):
        set_weights(bundle, weights)
    # Nothing was loaded.
    assert all(np.array_equal(x, y) for x, y in zip(before, get_weights(bundle), strict=True))
    with pytest.raises(UsageError, match="expected"):
        set_weights(bundle, weights[:-1])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UsageError, match="paper, tiny"):
        get_preset("huge")
