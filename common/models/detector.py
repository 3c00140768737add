"""Per-frame lesion detector: Faster R-CNN with a ResNet-34 + FPN backbone.

Also home of what the three networks' ResNet trunks share: the width-scaled ResNet and
the trunk's normalisation (``TRUNKS``):

* ``groupnorm``: GroupNorm, trained from a random start (DP-SGD cannot use BatchNorm);
* ``frozen-bn``: BatchNorm frozen into fixed affine maps (``FrozenAffine``), as
  torchvision's detection models freeze ImageNet BatchNorm; meant for trunks that start
  from ImageNet weights (``common.models.backbone``). Without them it is the identity and
  the trunk is not normalised at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from common.errors import UsageError
from common.models.frozen import FrozenAffine
from common.models.presets import DetectorPreset

NormLayer = Callable[[int], nn.Module]

DEFAULT_TRUNK = "groupnorm"
TRUNKS: dict[str, str] = {"groupnorm": "GroupNorm", "frozen-bn": "frozen BatchNorm"}

NUM_CLASSES = 2  # background + lesion


def group_norm(num_groups: int) -> NormLayer:
    """Return a ``norm_layer(channels)`` factory making GroupNorm layers.

    A layer gets ``gcd(num_groups, channels)`` groups, so one setting serves the narrow
    stem and the wide last stage.
    """
    return partial(_group_norm, num_groups)


def _group_norm(num_groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(num_groups, channels), channels)


def check_trunk(trunk: str) -> str:
    """Return ``trunk`` if it is one of ``TRUNKS``; raise ``UsageError`` listing them."""
    if trunk not in TRUNKS:
        known = ", ".join(TRUNKS)
        raise UsageError(f"unknown trunk {trunk!r}; known trunks: {known}")
    return trunk


def trunk_norm(trunk: str, num_groups: int) -> NormLayer:
    """The ``norm_layer(channels)`` of a ``trunk`` (one of ``TRUNKS``).

    ``num_groups`` is the preset's GroupNorm setting; ``frozen-bn`` ignores it.
    """
    if check_trunk(trunk) == "frozen-bn":
        return FrozenAffine
    return group_norm(num_groups)


class ScaledResNet(ResNet):
    """torchvision's ResNet with a base-width knob.

    torchvision hard-codes the stage widths 64, 128, 256, 512 in ``ResNet.__init__``, and
    its only width argument (``width_per_group``) widens the inside of a Bottleneck and is
    refused by BasicBlock. So this mirrors ``ResNet.__init__`` with ``planes = width * 2**i``
    and reuses torchvision's blocks, ``_make_layer`` and ``forward``: at ``width=64`` the
    module tree and every parameter shape are those of torchvision's resnet34 / resnet50.

    Parameters
    ----------
    block : type of BasicBlock or Bottleneck
        Residual block (a subclass may change its forward, not its parameters).
    layers : sequence of int
        Blocks per stage.
    width : int
        Stem channels.
    norm_layer : callable
        ``norm_layer(channels)`` (``trunk_norm``): GroupNorm or ``FrozenAffine``, as DP-SGD
        cannot use BatchNorm.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        *,
        width: int,
        norm_layer: NormLayer,
    ) -> None:
        # ResNet.__init__ would first build the 64-wide network; set up what
        # _make_layer reads instead.
        nn.Module.__init__(self)
        self._norm_layer = norm_layer
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # torchvision's "not widened"; BasicBlock accepts nothing else
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        # Not in place: Opacus' backward hooks reject modules whose output is overwritten.
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, 1000)
        init_resnet_weights(self)


def init_resnet_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation, for 2D and inflated 3D convolutions."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def build_detector(preset: DetectorPreset, *, trunk: str = DEFAULT_TRUNK) -> FasterRCNN:
    """Build an untrained Faster R-CNN ResNet-34 + FPN lesion detector.

    The backbone's BatchNorm layers are GroupNorm (``trunk="groupnorm"``: DP-SGD cannot use
    BatchNorm, and without pretrained weights torchvision's FrozenBatchNorm normalises
    nothing) or ``FrozenAffine`` (``"frozen-bn"``, for ImageNet weights loaded with
    ``common.models.backbone.load_backbone_weights``). The FPN, RPN and box heads have no
    normalisation, as in torchvision. Every parameter trains (``FrozenAffine`` has none).

    Parameters
    ----------
    preset : DetectorPreset
        Architecture knobs; ``preset.image_size`` is both ``min_size`` and ``max_size``.
    trunk : str
        One of ``TRUNKS``; ``UsageError`` otherwise.

    Returns
    -------
    torchvision.models.detection.FasterRCNN
        Two classes, 0 background and 1 lesion. Input: a list of FloatTensor[3, H, W]
        in [0, 1] (grayscale frames repeated to 3 channels). In train mode it also takes
        ``targets``, a list of ``{"boxes": FloatTensor[N, 4] x1y1x2y2 in pixels,
        "labels": Int64Tensor[N]}`` (N may be 0), and returns the loss dict
        ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``.
        In eval mode it returns one dict per image: ``boxes`` FloatTensor[N, 4] x1y1x2y2
        in input pixels, ``scores`` FloatTensor[N], ``labels`` Int64Tensor[N].
    """
    w = preset.width
    body = ScaledResNet(
        BasicBlock, preset.layers, width=w, norm_layer=trunk_norm(trunk, preset.num_groups)
    )
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[w, w * 2, w * 4, w * 8],
        out_channels=preset.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in preset.anchor_sizes),
        aspect_ratios=((0.5, 1.0, 2.0),) * len(preset.anchor_sizes),
    )
    box_head = TwoMLPHead(preset.fpn_channels * 7 * 7, preset.representation_size)
    return FasterRCNN(
        backbone,
        num_classes=None,
        # transform parameters
        min_size=preset.image_size,
        max_size=preset.image_size,
        # RPN parameters
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=preset.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=preset.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=preset.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=preset.rpn_post_nms_top_n_test,
        # Box parameters
        box_head=box_head,
        box_predictor=FastRCNNPredictor(preset.representation_size, NUM_CLASSES),
        box_batch_size_per_image=preset.box_batch_size_per_image,
    )
