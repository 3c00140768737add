"""The pair of models a site trains and the federation exchanges, as flat weight lists."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN

from common.errors import UsageError
from common.models.detector import build_detector
from common.models.i3d import I3D, build_classifier
from common.models.presets import Preset, get_preset


@dataclass
class ModelBundle:
    """Detector and classifier built from one preset."""

    preset: Preset
    detector: FasterRCNN
    classifier: I3D


def build_bundle(preset_name: str, *, seed: int) -> ModelBundle:
    """Build both untrained models; the same ``seed`` gives the same weights everywhere.

    Every site and the server build the initial model themselves, so the initial weights
    must not depend on the process' random state. The global torch RNG is reseeded.
    """
    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    detector = build_detector(preset.detector)
    classifier = build_classifier(preset.classifier)
    return ModelBundle(preset=preset, detector=detector, classifier=classifier)


def _named_tensors(bundle: ModelBundle) -> list[tuple[str, torch.Tensor]]:
    # state_dict order is the module registration order: fixed by the architecture.
    models: list[tuple[str, nn.Module]] = [
        ("detector", bundle.detector),
        ("classifier", bundle.classifier),
    ]
    return [
        (f"{prefix}.{name}", tensor)
        for prefix, model in models
        for name, tensor in model.state_dict().items()
    ]


def weight_names(bundle: ModelBundle) -> list[str]:
    """Names of the arrays of ``get_weights``, prefixed ``detector.`` or ``classifier.``."""
    return [name for name, _ in _named_tensors(bundle)]


def get_weights(bundle: ModelBundle) -> list[np.ndarray]:
    """Copy every state_dict tensor out as float32: the detector's, then the classifier's."""
    return [
        tensor.detach().to("cpu", torch.float32).numpy().copy()
        for _, tensor in _named_tensors(bundle)
    ]


def set_weights(bundle: ModelBundle, arrays: list[np.ndarray]) -> None:
    """Load arrays in ``get_weights`` order into the models, in place.

    Raises
    ------
    UsageError
        If the number of arrays differs, or naming the first tensor whose shape differs.
        Nothing is loaded then.
    """
    named = _named_tensors(bundle)
    if len(arrays) != len(named):
        raise UsageError(f"expected {len(named)} weight arrays, got {len(arrays)}")
    for (name, tensor), array in zip(named, arrays, strict=True):
        if tuple(array.shape) != tuple(tensor.shape):
            raise UsageError(
                f"weight {name}: expected shape {tuple(tensor.shape)}, got {tuple(array.shape)}"
            )
    with torch.no_grad():
        for (_, tensor), array in zip(named, arrays, strict=True):
            tensor.copy_(torch.from_numpy(np.asarray(array)))
