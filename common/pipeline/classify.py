"""Stage 4, classify: the I3D's malignancy probability for each clip (or the key-frame
model's for each lesion crop)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit
from torch import Tensor

from common.models.i3d import I3D
from common.models.keyframe import KeyFrameResNet


@dataclass(frozen=True)
class ClassifierOutput:
    """The classifier's answer for K clips.

    Attributes
    ----------
    probabilities : np.ndarray
        ``float64 [K]``, P(malignant) = sigmoid(logit), in [0, 1].
    logits : np.ndarray
        ``float64 [K]``.
    features : Tensor or None
        The last feature map, FloatTensor[K, C, T', H', W'] on the CPU, when asked for
        (the input of class activation maps); None when not asked for or K = 0.
    """

    probabilities: np.ndarray
    logits: np.ndarray
    features: Tensor | None


@torch.no_grad()
def classify_clips(
    classifier: I3D | KeyFrameResNet, clips: Tensor, *, batch_size: int, keep_features: bool
) -> ClassifierOutput:
    """Score clips, ``batch_size`` per forward pass.

    Parameters
    ----------
    classifier : I3D or KeyFrameResNet
        Put in eval mode; runs on the device its parameters are on.
    clips : Tensor
        FloatTensor[K, 3, T, s, s] in [0, 1] (``crop_clips``), or FloatTensor[K, 3, S, S]
        lesion crops for a ``KeyFrameResNet``; K may be 0.
    batch_size : int
    keep_features : bool
        Return the feature maps too (memory: K x C x T' x H' x W' floats).
    """
    classifier.eval()
    device = next(classifier.parameters()).device
    logits: list[Tensor] = []
    features: list[Tensor] = []
    for start in range(0, len(clips), batch_size):
        maps = classifier.features(clips[start : start + batch_size].to(device))
        logits.append(classifier.head(maps).float().cpu())
        if keep_features:
            features.append(maps.float().cpu())
    z = torch.cat(logits).double().numpy() if logits else np.zeros(0)
    return ClassifierOutput(
        probabilities=expit(z), logits=z, features=torch.cat(features) if features else None
    )
