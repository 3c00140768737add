"""A loaded model version made ready for inference: put on a device and checked to be the
kind a command runs. Finding and downloading the version is ``deploy.registry``'s job
(``common/`` never opens a network connection).
"""

from __future__ import annotations

import torch

from common.errors import UsageError
from common.models.bundle import ModelBundle, WauveBundle


def to_device(bundle: ModelBundle, device: str) -> None:
    """Move every network to the torch device named ``device``; ``UsageError`` if it fails."""
    try:
        bundle.to(torch.device(device))
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"--device {device}: {error}") from None


def as_wauve(bundle: ModelBundle, command: str) -> WauveBundle:
    """The bundle as WAUVE's; ``UsageError`` naming ``command`` for another model kind."""
    if not isinstance(bundle, WauveBundle):
        raise UsageError(
            f"{command} runs the WAUVE video pipeline, and MODEL is a {bundle.kind} model "
            "(busfed evaluate scores a keyframe2d model on a site's annotated videos)"
        )
    return bundle
