"""ImageNet ResNet weights from a local torchvision file into a bundle's frozen-bn trunks.

Nothing is downloaded at run time. A hospital's IT fetches torchvision's published file once,
on a machine that may reach the internet, and copies it to the site:

* ResNet-34 (the detector's body): ``https://download.pytorch.org/models/resnet34-b627a593.pth``
  (``IMAGENET1K_V1``);
* ResNet-50 (the I3D classifier, inflated, and the key-frame model):
  ``resnet50-0676ba61.pth`` (``IMAGENET1K_V1``) or ``resnet50-11ad3fa6.pth``
  (``IMAGENET1K_V2``), same address.

torchvision's file names end in the first 8 hex digits of the file's SHA-256, so IT checks
the copy with ``sha256sum resnet50-0676ba61.pth``: the digest must start with ``0676ba61``.
``load_backbone_weights`` records the full SHA-256 in the ``BackboneProvenance`` it returns,
for the model card. The file is ``torch.save(model.state_dict())`` with torchvision's key
names; it is read with ``weights_only=True``, so it cannot run code.

What is loaded, per network (``NETWORK_ARCH``):

* ``detector``: ResNet-34 into ``backbone.body`` (``conv1``, ``bn1``, ``layer1``..``layer4``);
* ``keyframe``: ResNet-50 under the same names;
* ``classifier``: ResNet-50 inflated as in I3D: a 2D kernel [O, I, kh, kw] is repeated over
  the Conv3d's T time steps and divided by T, so a clip of identical frames gives the 2D
  network's response; ``conv1``/``bn1`` go to ``stem.0``/``stem.1``.

A BatchNorm's ``weight``, ``bias``, ``running_mean`` and ``running_var`` are folded into its
``FrozenAffine`` (``num_batches_tracked`` is ignored). ``fc`` is not loaded (busfed's heads
have one logit) and the FPN, RPN and box heads keep their initialisation. torchvision's
ResNets are 64 wide: only width-64 presets (``paper``) fit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.errors import DataError, UsageError
from common.models.bundle import CLIPPING_RANGE, ModelBundle
from common.models.frozen import FrozenAffine, fold_batch_norm
from common.models.loading import read_torch_dict

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class _TrunkSite:
    """Where a network keeps its ResNet trunk and how its names differ from torchvision's."""

    arch: str
    prefix: str  # of the trunk's keys in the network's state dict
    renames: dict[str, str]  # the network's module name -> torchvision's


_SITES: dict[str, _TrunkSite] = {
    "detector": _TrunkSite("resnet34", "backbone.body.", {}),
    "classifier": _TrunkSite("resnet50", "", {"stem.0": "conv1", "stem.1": "bn1"}),
    "keyframe": _TrunkSite("resnet50", "", {}),
}
# The torchvision ResNet each network's trunk is.
NETWORK_ARCH: dict[str, str] = {name: site.arch for name, site in _SITES.items()}


@dataclass(frozen=True)
class BackboneProvenance:
    """Which ImageNet file a bundle's trunks came from.

    Attributes
    ----------
    file : str
        The file's name (not its folder: that is the site's business).
    sha256 : str
        Hex SHA-256 of the file's bytes; torchvision's file name carries its first 8 digits.
    arch : str
        ``resnet34`` or ``resnet50``.
    tensors : dict of str to int
        Per loaded network, in the bundle's order: how many of the file's tensors went in.
    """

    file: str
    sha256: str
    arch: str
    tensors: dict[str, int]

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    def card(self) -> dict[str, str]:
        """Model-card fields (flat strings, as MLflow tags are)."""
        return {
            "backbone_file": self.file,
            "backbone_sha256": self.sha256,
            "backbone_arch": self.arch,
            "backbone_networks": ",".join(self.networks),
        }


def load_backbone_weights(
    bundle: ModelBundle, path: Path, networks: Sequence[str] | None = None
) -> BackboneProvenance:
    """Load a torchvision ImageNet ResNet file into the trunks of ``bundle``, in place.

    Parameters
    ----------
    bundle : ModelBundle
        Built with ``trunk="frozen-bn"`` and a width-64 preset.
    path : Path
        ``torch.save(resnet.state_dict())`` of torchvision's ``resnet34`` or ``resnet50``, or
        a dict holding one under ``state_dict`` or ``model``. BasicBlocks (``layer1.0.conv2``
        without ``layer1.0.conv3``) make it ResNet-34, Bottlenecks ResNet-50; the depth is
        then checked tensor by tensor.
    networks : sequence of str, optional
        The networks to load; each must need the file's architecture. By default every
        network of the bundle that does (a WAUVE bundle takes a ResNet-34 file into its
        detector and a ResNet-50 file into its classifier, one call each).

    Returns
    -------
    BackboneProvenance

    Raises
    ------
    DataError
        Naming the file: the bundle's trunk is not frozen-bn; the file is unreadable, not a
        dict or not a torchvision ResNet; no chosen network needs its architecture; a trunk
        tensor is missing, not a float tensor or of another shape (another width), or the
        file holds trunk tensors the network has no place for (a deeper ResNet); a value
        after loading is outside SecAgg+'s +-``CLIPPING_RANGE`` or not finite. Nothing is
        loaded then.
    UsageError
        ``networks`` names a network the bundle does not have.
    """
    path = Path(path)
    if bundle.trunk != "frozen-bn":
        raise DataError(
            f"{path}: ImageNet weights load only into frozen BatchNorm trunks; build the "
            f"model with trunk 'frozen-bn' (this {bundle.kind} model's trunk is {bundle.trunk!r})"
        )
    state = _state_dict(path)
    arch = _architecture(path, state)
    targets = _targets(bundle, path, arch, networks)
    loads = {name: _mapped(path, state, arch, bundle.networks[name], name) for name in targets}
    # All checked before anything is copied: a refused file leaves the bundle as it was.
    for name, (values, _) in loads.items():
        _check_range(path, name, bundle.networks[name], values)
    with torch.no_grad():
        for name, (values, _) in loads.items():
            current = bundle.networks[name].state_dict()
            for key, value in values.items():
                current[key].copy_(value)
    with path.open("rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return BackboneProvenance(
        file=path.name,
        sha256=sha256,
        arch=arch,
        tensors={name: used for name, (_, used) in loads.items()},
    )


def _state_dict(path: Path) -> dict[str, Any]:
    state = read_torch_dict(path, "a torchvision ResNet state dict")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            return dict(state[wrapper])
    return state


def _architecture(path: Path, state: dict[str, Any]) -> str:
    if "layer1.0.conv3.weight" in state:
        return "resnet50"
    if "layer1.0.conv2.weight" in state:
        return "resnet34"
    raise DataError(
        f"{path}: not a torchvision ResNet-34/50 state dict (no layer1.0.conv2.weight; "
        f"first keys: {', '.join(map(str, list(state)[:3])) or 'none'})"
    )


def _targets(
    bundle: ModelBundle, path: Path, arch: str, networks: Sequence[str] | None
) -> list[str]:
    if networks is not None:
        unknown = [n for n in networks if n not in bundle.networks]
        if unknown:
            raise UsageError(
                f"the {bundle.kind} model has no network {', '.join(unknown)}; "
                f"its networks: {', '.join(bundle.networks)}"
            )
    chosen = list(bundle.networks) if networks is None else list(networks)
    matching = [n for n in chosen if NETWORK_ARCH[n] == arch]
    if not matching or (networks is not None and len(matching) < len(chosen)):
        needs = ", ".join(f"{n} needs {NETWORK_ARCH[n]}" for n in chosen)
        raise DataError(f"{path}: the file is a {arch}, but {needs}")
    return matching


def _mapped(
    path: Path, state: dict[str, Any], arch: str, network: nn.Module, name: str
) -> tuple[dict[str, Tensor], int]:
    """The network's state-dict key -> new value, for every convolution and norm of its
    trunk, and how many of the file's tensors they come from."""
    site = _SITES[name]
    trunk = network.get_submodule(site.prefix.rstrip(".")) if site.prefix else network
    values: dict[str, Tensor] = {}
    used: set[str] = set()

    def tensor(key: str, like: Tensor, ours: str) -> Tensor:
        value = state.get(key)
        if not isinstance(value, Tensor):
            missing = "not a tensor" if key in state else "missing"
            raise DataError(f"{path}: {key} is {missing} (a torchvision {arch} has it)")
        if not value.is_floating_point():
            raise DataError(f"{path}: {key} is {value.dtype}, not a float tensor")
        used.add(key)
        if _shape_2d(like) != tuple(value.shape):
            raise DataError(
                f"{path}: {key} has shape {tuple(value.shape)}, but {name}.{ours} needs "
                f"{tuple(like.shape)}: torchvision's ResNets are 64 wide and fit only "
                f"width-64 presets (paper)"
            )
        return value.detach()

    for module_name, module in trunk.named_modules():
        ours = site.prefix + module_name
        theirs = site.renames.get(module_name, module_name)
        if isinstance(module, nn.Conv2d | nn.Conv3d):
            kernel = tensor(f"{theirs}.weight", module.weight, f"{ours}.weight")
            if isinstance(module, nn.Conv3d):
                t = module.weight.shape[2]
                kernel = kernel.unsqueeze(2).expand(-1, -1, t, -1, -1) / t
            values[f"{ours}.weight"] = kernel
        elif isinstance(module, FrozenAffine):
            weight, bias, mean, var = (
                tensor(f"{theirs}.{t}", module.scale, f"{ours}.scale") for t in BN_TENSORS
            )
            values[f"{ours}.scale"], values[f"{ours}.shift"] = fold_batch_norm(
                weight=weight, bias=bias, running_mean=mean, running_var=var
            )
    unused = [
        key
        for key in state
        if key not in used and not key.startswith("fc.") and not key.endswith("num_batches_tracked")
    ]
    if unused:
        raise DataError(
            f"{path}: {len(unused)} tensors busfed's {arch} trunk has no place for, first "
            f"{unused[0]} (a deeper ResNet?)"
        )
    return values, len(used)


def _check_range(path: Path, name: str, network: nn.Module, values: dict[str, Tensor]) -> None:
    """Every value the network would exchange, as the float32 it travels as, fits SecAgg+."""
    for key, tensor in network.state_dict().items():
        value = values.get(key, tensor).to(torch.float32)
        if not value.numel():
            continue
        low, high = torch.aminmax(value)
        peak = max(-float(low), float(high))
        if not peak <= CLIPPING_RANGE:  # also catches NaN
            raise DataError(
                f"{path}: after loading, {name}.{key} would reach {peak:.4g}, outside "
                f"SecAgg+'s range +-{CLIPPING_RANGE}; the federation could not exchange it"
            )


def _shape_2d(like: Tensor) -> tuple[int, ...]:
    """The torchvision shape a tensor comes from: an inflated kernel loses its time axis."""
    shape = tuple(like.shape)
    return shape[:2] + shape[3:] if len(shape) == 5 else shape
