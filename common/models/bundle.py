"""The models a federation can train, each a bundle of networks exchanged as flat weight lists.

A bundle kind is chosen by the run config's ``model`` key:

* ``wauve`` (``WauveBundle``): WAUVE's lesion detector and video classifier;
* ``keyframe2d`` (``KeyFrameBundle``): the paper's comparator, a 2D ResNet-50 on key frames;
* ``detector`` (``DetectorBundle``): WAUVE's lesion detector alone, so that sites of still
  key frames train it too; its weights load into a WAUVE model's detector.

Everything that moves or stores weights (``get_weights``/``set_weights``, the model
registry, ``common.models.loading``) goes through ``ModelBundle.networks``, a name ->
network mapping in a fixed order. A network's name is also its prefix in
``weight_names``, its key in a saved ``weights.pt``, its site privacy section
(``[privacy.<name>]``) and the ``model`` of its privacy-ledger entries.

Every bundle kind is built with a ``trunk`` (``common.models.detector.TRUNKS``): GroupNorm
(the default) or frozen BatchNorm for ImageNet weights (``common.models.backbone``). The
model card names it, and the tensors differ, so a trunk's weights load only into the same
trunk.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN

from common.errors import UsageError
from common.models.detector import DEFAULT_TRUNK, TRUNKS, build_detector, check_trunk
from common.models.i3d import I3D, build_classifier
from common.models.keyframe import KeyFrameResNet, build_keyframe_model
from common.models.presets import Preset, get_preset

DEFAULT_MODEL = "wauve"
# SecAgg+ quantizes values in [-CLIPPING_RANGE, CLIPPING_RANGE]; anything outside would be
# silently clipped in the sum, so a site refuses to send it (it is the only one who can
# look: the server sees masked vectors only), and loaded weights must fit it.
CLIPPING_RANGE = 8.0


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _detector_card(detector: FasterRCNN, preset: Preset, trunk: str) -> dict[str, Any]:
    return {
        "detector": f"Faster R-CNN, ResNet-34 + FPN, {TRUNKS[trunk]}, 1 lesion class",
        "detector_params": _n_params(detector),
        "detector_image_size": preset.detector.image_size,
    }


class ModelBundle(ABC):
    """The networks of one model kind, built from one preset.

    Attributes
    ----------
    kind : str
        The run config's ``model`` value that selects this bundle.
    network_names : tuple of str
        The keys of ``networks``, known without building them.
    method : str
        What the model is, in words, for the model card.
    preset : Preset
    trunk : str
        How the ResNet trunks are normalised, one of ``TRUNKS``.
    """

    kind: ClassVar[str]
    method: ClassVar[str]
    network_names: ClassVar[tuple[str, ...]]
    preset: Preset
    trunk: str

    @classmethod
    @abstractmethod
    def build(cls, preset: Preset, *, trunk: str = DEFAULT_TRUNK) -> Self:
        """Untrained networks from the torch RNG as it stands (``build_bundle`` seeds it).

        Raises ``UsageError`` for a ``trunk`` not in ``TRUNKS``.
        """

    @property
    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Name -> network, in the order weights are exchanged and trained."""

    @abstractmethod
    def architecture(self) -> dict[str, Any]:
        """The architecture part of the model card: per network, what it is and its size."""

    def to(self, device: torch.device) -> Self:
        for network in self.networks.values():
            network.to(device)
        return self

    def eval(self) -> Self:
        for network in self.networks.values():
            network.eval()
        return self


@dataclass
class WauveBundle(ModelBundle):
    """WAUVE: Faster R-CNN lesion detector and I3D video classifier."""

    kind: ClassVar[str] = "wauve"
    method: ClassVar[str] = "WAUVE (Han et al., Cancer Imaging 2025)"
    network_names: ClassVar[tuple[str, ...]] = ("detector", "classifier")

    preset: Preset
    detector: FasterRCNN
    classifier: I3D
    trunk: str = DEFAULT_TRUNK

    @classmethod
    def build(cls, preset: Preset, *, trunk: str = DEFAULT_TRUNK) -> Self:
        return cls(
            preset=preset,
            detector=build_detector(preset.detector, trunk=trunk),
            classifier=build_classifier(preset.classifier, trunk=trunk),
            trunk=trunk,
        )

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"detector": self.detector, "classifier": self.classifier}

    def architecture(self) -> dict[str, Any]:
        return {
            "trunk": self.trunk,
            **_detector_card(self.detector, self.preset, self.trunk),
            "classifier": f"I3D inflated from ResNet-50, {TRUNKS[self.trunk]}, 1 malignancy logit",
            "classifier_params": _n_params(self.classifier),
            "clip_len": self.preset.classifier.clip_len,
            "clip_size": self.preset.classifier.clip_size,
        }


@dataclass
class KeyFrameBundle(ModelBundle):
    """The comparator: a 2D ResNet-50 on lesion crops of key frames."""

    kind: ClassVar[str] = "keyframe2d"
    method: ClassVar[str] = "2D ResNet-50 on key frames, the comparator of WAUVE (Han et al. 2025)"
    network_names: ClassVar[tuple[str, ...]] = ("keyframe",)

    preset: Preset
    keyframe: KeyFrameResNet
    trunk: str = DEFAULT_TRUNK

    @classmethod
    def build(cls, preset: Preset, *, trunk: str = DEFAULT_TRUNK) -> Self:
        keyframe = build_keyframe_model(preset.keyframe, trunk=trunk)
        return cls(preset=preset, keyframe=keyframe, trunk=trunk)

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"keyframe": self.keyframe}

    def architecture(self) -> dict[str, Any]:
        return {
            "trunk": self.trunk,
            "keyframe": f"ResNet-50, {TRUNKS[self.trunk]}, 1 malignancy logit, "
            "on lesion crops of key frames",
            "keyframe_params": _n_params(self.keyframe),
            "keyframe_image_size": self.preset.keyframe.image_size,
        }


@dataclass
class DetectorBundle(ModelBundle):
    """WAUVE's lesion detector alone, trained on annotated frames and still key frames.

    The network is named ``detector`` as in ``WauveBundle``: the same tensors under the
    same names, so ``networks["detector"]``'s state dict loads into a WAUVE model's detector
    (and back), and a site trains it under its ``[privacy.detector]`` section.
    """

    kind: ClassVar[str] = "detector"
    method: ClassVar[str] = "WAUVE's lesion detector alone (Han et al., Cancer Imaging 2025)"
    network_names: ClassVar[tuple[str, ...]] = ("detector",)

    preset: Preset
    detector: FasterRCNN
    trunk: str = DEFAULT_TRUNK

    @classmethod
    def build(cls, preset: Preset, *, trunk: str = DEFAULT_TRUNK) -> Self:
        return cls(
            preset=preset, detector=build_detector(preset.detector, trunk=trunk), trunk=trunk
        )

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"detector": self.detector}

    def architecture(self) -> dict[str, Any]:
        return {"trunk": self.trunk, **_detector_card(self.detector, self.preset, self.trunk)}


MODELS: dict[str, type[ModelBundle]] = {
    b.kind: b for b in (WauveBundle, KeyFrameBundle, DetectorBundle)
}


def bundle_class(model: str) -> type[ModelBundle]:
    """The bundle kind called ``model``; raise ``UsageError`` listing the known ones."""
    try:
        return MODELS[model]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UsageError(f"unknown model {model!r}; known models: {known}") from None


def build_bundle(
    preset_name: str, *, seed: int, model: str = DEFAULT_MODEL, trunk: str = DEFAULT_TRUNK
) -> ModelBundle:
    """Build the untrained networks of ``model``; the same ``seed`` gives the same weights.

    Every site and the server build the initial model themselves, so the initial weights
    must not depend on the process' random state. The global torch RNG is reseeded.
    ``trunk`` is one of ``TRUNKS``; an unknown model, preset or trunk is a ``UsageError``
    listing the known ones.
    """
    cls = bundle_class(model)
    preset = get_preset(preset_name)
    check_trunk(trunk)
    torch.manual_seed(seed)
    return cls.build(preset, trunk=trunk)


def fingerprint(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over every array's shape and float32 bytes: the identity of a global model.

    float32 because that is what the site's models hold: SecAgg+ hands the server float64
    aggregates, which the sites load as float32, while a model resumed from the registry is
    sent as float32. Both are the same model and must match.
    """
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _named_tensors(bundle: ModelBundle) -> list[tuple[str, torch.Tensor]]:
    # state_dict order is the module registration order: fixed by the architecture.
    return [
        (f"{prefix}.{name}", tensor)
        for prefix, model in bundle.networks.items()
        for name, tensor in model.state_dict().items()
    ]


def weight_names(bundle: ModelBundle) -> list[str]:
    """Names of the arrays of ``get_weights``, prefixed with their network's name."""
    return [name for name, _ in _named_tensors(bundle)]


def get_weights(bundle: ModelBundle) -> list[np.ndarray]:
    """Copy every state_dict tensor out as float32, network by network."""
    return [
        tensor.detach().to("cpu", torch.float32).numpy().copy()
        for _, tensor in _named_tensors(bundle)
    ]


def set_weights(bundle: ModelBundle, arrays: list[np.ndarray]) -> None:
    """Load arrays in ``get_weights`` order into the networks, in place.

    Raises
    ------
    UsageError
        If the number of arrays differs (a sign of another model kind), or naming the first
        tensor whose shape differs. Nothing is loaded then.
    """
    named = _named_tensors(bundle)
    if len(arrays) != len(named):
        raise UsageError(
            f"expected {len(named)} weight arrays for model {bundle.kind!r}, got {len(arrays)}"
        )
    for (name, tensor), array in zip(named, arrays, strict=True):
        if tuple(array.shape) != tuple(tensor.shape):
            raise UsageError(
                f"weight {name}: expected shape {tuple(tensor.shape)}, got {tuple(array.shape)}"
            )
    with torch.no_grad():
        for (_, tensor), array in zip(named, arrays, strict=True):
            tensor.copy_(torch.from_numpy(np.asarray(array)))
