"""Which of a classifier's parameters a site's DP-SGD trains: a fine-tuning recipe choice.

DP-SGD adds noise of the same scale to every trained coordinate, while the clipped signal
is shared among them: training fewer parameters from a pretrained start puts less noise
in the update (Tramèr & Boneh 2021; De et al. 2022). The choices, for the I3D video
classifier and the 2D key-frame ResNet alike (both name their last stage ``layer4`` and
their head ``fc``):

* ``all``: every parameter (the WAUVE paper's training);
* ``last-stage``: the last residual stage and the head;
* ``norm``: the normalisation layers' scales and shifts (GroupNorm) and the head;
* ``head``: the linear head alone, on the frozen trunk's features.

Frozen parameters keep the global model's values: the site sends them unchanged, so
FedAvg leaves them as they were. The privacy accounting does not depend on the choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

TRAINS = ("all", "last-stage", "norm", "head")
HEAD = "fc."
LAST_STAGE = "layer4."


def check_trains(choice: str) -> str:
    """``choice`` if it is one of ``TRAINS``, else a ``UsageError`` naming them."""
    if choice not in TRAINS:
        raise UsageError(f"unknown classifier-trains {choice!r}; known: {', '.join(TRAINS)}")
    return choice


def train_only(network: nn.Module, choice: str) -> int:
    """Let only ``choice``'s parameters of ``network`` train (``requires_grad``).

    Returns the number of trained parameters (scalars). Every parameter outside the choice
    gets ``requires_grad = False``; every one inside it ``True``.
    """
    from torch import nn  # here: the federation CLI checks the choice without torch

    check_trains(choice)
    norm_names = {
        f"{module_name}.{name}"
        for module_name, module in network.named_modules()
        if isinstance(module, nn.GroupNorm | nn.BatchNorm2d | nn.BatchNorm3d | nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    trained = 0
    for name, parameter in network.named_parameters():
        trains = (
            choice == "all"
            or name.startswith(HEAD)
            or (choice == "last-stage" and name.startswith(LAST_STAGE))
            or (choice == "norm" and name in norm_names)
        )
        parameter.requires_grad_(trains)
        trained += parameter.numel() if trains else 0
    if trained == 0:
        raise UsageError(f"classifier-trains {choice!r}: {type(network).__name__} has no head")
    return trained
