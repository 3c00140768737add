"""Save and load a model version: the folder ``server.tracking.Tracker.register_round`` logs.

The folder holds ``weights.pt`` (``torch.save({network name: state_dict})``, the names of
the bundle's ``networks``) and ``model.json`` (the model card: at least ``preset`` and
``round``; ``model`` names the bundle kind, and a card without it is from before there was a
choice: ``wauve``; ``trunk`` names the trunk's normalisation, and a card without it is
``groupnorm``).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from common.errors import DataError, UsageError
from common.models.bundle import DEFAULT_MODEL, ModelBundle, bundle_class
from common.models.detector import DEFAULT_TRUNK
from common.models.presets import get_preset

WEIGHTS = "weights.pt"
CARD = "model.json"
REQUIRED_CARD_FIELDS = ("preset", "round")


def save_bundle_dir(bundle: ModelBundle, path: Path, card: dict[str, Any]) -> None:
    """Write ``bundle``'s weights and ``card`` (which must give ``preset`` and ``round``).

    ``model`` and ``trunk`` are set to the bundle's, so the folder loads back as the same
    model.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({name: net.state_dict() for name, net in bundle.networks.items()}, path / WEIGHTS)
    (path / CARD).write_text(
        json.dumps({**card, "model": bundle.kind, "trunk": bundle.trunk}, indent=2)
    )


def load_bundle_dir(path: Path) -> tuple[ModelBundle, dict[str, Any]]:
    """Build the card's preset and load the saved weights into it, on the CPU, in eval mode.

    Parameters
    ----------
    path : Path
        A model version folder.

    Returns
    -------
    tuple of ModelBundle and dict
        The models and the model card as saved.

    Raises
    ------
    DataError
        The folder or a file is missing, unreadable or malformed, the card names an unknown
        preset, model or trunk, or the weights do not fit them; the message names the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: model folder not found")
    card = _read_card(path / CARD)
    try:
        preset = get_preset(str(card["preset"]))
        cls = bundle_class(str(card.get("model", DEFAULT_MODEL)))
        # Built directly, not with build_bundle: that reseeds the global RNG, and the
        # initial weights are overwritten anyway.
        bundle = cls.build(preset, trunk=str(card.get("trunk", DEFAULT_TRUNK)))
    except UsageError as error:
        raise DataError(f"{path / CARD}: {error}") from None
    weights = path / WEIGHTS
    state = read_torch_dict(weights, "a dict of state dicts")
    for name, network in bundle.networks.items():
        if name not in state:
            raise DataError(f"{weights}: no {name!r} state dict (model {cls.kind!r})")
        try:
            network.load_state_dict(state[name])
        except RuntimeError as error:
            raise DataError(
                f"{weights}: the {name} weights do not fit preset {preset.name!r}: {error}"
            ) from None
        network.eval()
    return bundle, card


def _read_card(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: model card not found")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable JSON model card: {error}") from None
    if not isinstance(card, dict):
        raise DataError(f"{path}: the model card is not a JSON object")
    missing = [name for name in REQUIRED_CARD_FIELDS if name not in card]
    if missing:
        raise DataError(f"{path}: the model card lacks {', '.join(missing)}")
    return card


def read_torch_dict(path: Path, what: str) -> dict[str, Any]:
    """A ``torch.save``d dict of tensors (or of dicts of them), read on the CPU, no code run.

    Raises ``DataError`` naming ``path`` if it is missing, unreadable or not a dict
    (``what`` says what was expected).
    """
    if not path.is_file():
        raise DataError(f"{path}: weights not found")
    try:
        # weights_only: a model file from elsewhere must not run code when loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise DataError(f"{path}: not a readable weights file: {error}") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected {what}, got {type(state).__name__}")
    return state
