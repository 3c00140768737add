"""BatchNorm frozen into a per-channel affine map, for trunks that start from ImageNet weights.

An ImageNet ResNet's BatchNorm layers cannot train under DP-SGD (batch statistics mix the
samples whose gradients Opacus keeps apart), so, as torchvision's detection models do with
``torchvision.ops.misc.FrozenBatchNorm2d``, they become fixed affine maps. Unlike
``FrozenBatchNorm2d``, ``FrozenAffine`` stores the map folded (``scale``, ``shift``) rather
than BatchNorm's four statistics: busfed exchanges every state-dict tensor through SecAgg+,
whose range is +-8, and an ImageNet ``running_var`` can exceed that while the folded scale
rarely does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dimension 1); nothing trains.

    ``scale`` and ``shift`` are buffers, not parameters: Opacus sees a module without
    parameters, the optimiser never moves them, and they travel in the state dict. Built,
    the layer is the identity (scale 1, shift 0); ``fold_batch_norm`` gives the buffers of
    an eval-mode BatchNorm.

    Input: FloatTensor[B, C, ...] (4-D for 2D networks, 5-D for I3D); output the same shape.

    Parameters
    ----------
    channels : int
        C.
    """

    scale: Tensor
    shift: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)

    def extra_repr(self) -> str:
        return str(self.channels)


def fold_batch_norm(
    *, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """``FrozenAffine``'s (scale, shift) for an eval-mode BatchNorm, each FloatTensor[C].

    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``:
    what ``FrozenBatchNorm2d.forward`` computes on every call, computed once, in float64.
    ``eps`` is torch's BatchNorm default.
    """
    scale = weight.double() * (running_var.double() + eps).rsqrt()
    return scale, bias.double() - running_mean.double() * scale
