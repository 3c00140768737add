"""The WAUVE paper's comparator: a 2D ResNet-50 on lesion crops of key frames, one logit.

It is torchvision's ResNet-50 (``ScaledResNet`` at width 64 has torchvision's module tree
and parameter shapes) with GroupNorm or frozen BatchNorm instead of BatchNorm (the
trunk, ``common.models.detector.TRUNKS``), out-of-place bottlenecks (for
Opacus' hooks) and a one-logit head. It is also the model of sites that archive only
static key frames.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from common.models.detector import DEFAULT_TRUNK, ScaledResNet, trunk_norm
from common.models.i3d import OutOfPlaceBottleneck
from common.models.presets import KeyFramePreset


class KeyFrameResNet(ScaledResNet):
    """2D ResNet-50 producing one malignancy logit per lesion crop.

    Input: FloatTensor[B, 3, S, S] in [0, 1] (grayscale repeated to 3 channels;
    S = ``image_size``). Train and eval behave the same (GroupNorm or frozen BatchNorm, no
    dropout): ``forward`` returns logits FloatTensor[B]; ``sigmoid`` gives P(malignant).

    Parameters
    ----------
    preset : KeyFramePreset
    trunk : str
        One of ``common.models.detector.TRUNKS``.
    """

    def __init__(self, preset: KeyFramePreset, *, trunk: str = DEFAULT_TRUNK) -> None:
        super().__init__(
            OutOfPlaceBottleneck,
            preset.layers,
            width=preset.width,
            norm_layer=trunk_norm(trunk, preset.num_groups),
        )
        self.fc = nn.Linear(preset.width * 8 * Bottleneck.expansion, 1)

    @property
    def feature_channels(self) -> int:
        """C of ``features``; also the input width of ``fc``."""
        return self.fc.in_features

    def features(self, x: Tensor) -> Tensor:
        """Last convolutional feature map, FloatTensor[B, C, S/32, S/32]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, features: Tensor) -> Tensor:
        """Global average pool and linear layer: [B, C, H', W'] -> logits FloatTensor[B]."""
        return self.fc(torch.flatten(self.avgpool(features), 1)).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_keyframe_model(preset: KeyFramePreset, *, trunk: str = DEFAULT_TRUNK) -> KeyFrameResNet:
    """Build an untrained key-frame ResNet-50 (see ``KeyFrameResNet`` for the contract)."""
    return KeyFrameResNet(preset, trunk=trunk)
