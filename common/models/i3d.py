"""Video classifier: I3D inflated from torchvision's ResNet-50, with one logit.

Its trunk is normalised by GroupNorm or frozen BatchNorm (``common.models.detector.TRUNKS``).

Inflation follows the I3D ResNet-50 of Wang et al., "Non-local Neural Networks" (2018),
kept simple: the stem becomes 5x7x7, the first 1x1 convolution of every other bottleneck
(blocks 0, 2, 4 of each stage) becomes 3x1x1, every other convolution gets a temporal
kernel of 1, and a 3x1x1 max pool after the first stage halves time. All temporal strides
of convolutions are 1, so an 8-frame clip leaves the network with 4 time steps.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from common.models.detector import DEFAULT_TRUNK, ScaledResNet, init_resnet_weights, trunk_norm
from common.models.presets import ClassifierPreset

STEM_TIME_KERNEL = 5
BLOCK_TIME_KERNEL = 3


class OutOfPlaceBottleneck(Bottleneck):
    """torchvision's Bottleneck without in-place operations.

    Its ``out += identity`` and ``ReLU(inplace=True)`` overwrite tensors that Opacus'
    backward hooks hold on to, which breaks per-sample gradients.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _inflate(conv: nn.Conv2d, time_kernel: int) -> nn.Conv3d:
    """A Conv3d with ``conv``'s spatial geometry, the given temporal kernel and stride 1."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = cast(tuple[int, int], conv.padding)  # torchvision's ResNet pads numerically
    return nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=(time_kernel, kh, kw),
        stride=(1, sh, sw),
        padding=(time_kernel // 2, ph, pw),
        dilation=(1, dh, dw),
        groups=conv.groups,
        bias=conv.bias is not None,
    )


def _inflate_stage(stage: nn.Sequential) -> nn.Sequential:
    """Inflate every Conv2d of a stage; ``conv1`` of blocks 0, 2, 4... gets time kernel 3."""
    for i, block in enumerate(stage):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d):
                    inflated = parent is block and name == "conv1" and i % 2 == 0
                    setattr(parent, name, _inflate(child, BLOCK_TIME_KERNEL if inflated else 1))
    return stage


class I3D(nn.Module):
    """I3D ResNet-50 producing one malignancy logit per clip.

    Input: FloatTensor[B, 3, T, H, W] in [0, 1] (grayscale repeated to 3 channels;
    T = clip_len, H = W = clip_size). Train and eval behave the same (GroupNorm or frozen
    BatchNorm, no dropout): ``forward`` returns logits FloatTensor[B]; ``sigmoid`` gives
    P(malignant). The stem is ``stem.0`` (convolution) and ``stem.1`` (normalisation); the
    stages keep torchvision's names (``layer1.0.conv1``, ...).

    Parameters
    ----------
    preset : ClassifierPreset
    trunk : str
        One of ``common.models.detector.TRUNKS``.
    """

    def __init__(self, preset: ClassifierPreset, *, trunk: str = DEFAULT_TRUNK) -> None:
        super().__init__()
        resnet = ScaledResNet(
            OutOfPlaceBottleneck,
            preset.layers,
            width=preset.width,
            norm_layer=trunk_norm(trunk, preset.num_groups),
        )
        self.stem = nn.Sequential(
            _inflate(resnet.conv1, STEM_TIME_KERNEL),
            resnet.bn1,
            nn.ReLU(),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.layer1 = _inflate_stage(resnet.layer1)
        self.time_pool = nn.MaxPool3d(kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
        self.layer2 = _inflate_stage(resnet.layer2)
        self.layer3 = _inflate_stage(resnet.layer3)
        self.layer4 = _inflate_stage(resnet.layer4)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(preset.width * 8 * Bottleneck.expansion, 1)
        init_resnet_weights(self)

    @property
    def feature_channels(self) -> int:
        """C of ``features``; also the input width of ``fc``."""
        return self.fc.in_features

    def features(self, x: Tensor) -> Tensor:
        """Last convolutional feature map, FloatTensor[B, C, T/2, H/32, W/32].

        With ``fc.weight`` this gives class activation maps.
        """
        x = self.layer1(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.time_pool(x))))

    def head(self, features: Tensor) -> Tensor:
        """Global average pool and linear layer: [B, C, T', H', W'] -> logits FloatTensor[B]."""
        return self.fc(torch.flatten(self.pool(features), 1)).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_classifier(preset: ClassifierPreset, *, trunk: str = DEFAULT_TRUNK) -> I3D:
    """Build an untrained I3D ResNet-50 video classifier (see ``I3D`` for the contract)."""
    return I3D(preset, trunk=trunk)
