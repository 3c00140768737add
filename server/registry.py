"""Where a command finds a model version: a local folder or the MLflow registry.

MODEL is a local model version folder (``weights.pt`` + ``model.json``, as
``server.tracking.Tracker.register_round`` logs it) or an MLflow URI ``models:/NAME/VERSION``
(also ``models:/NAME@ALIAS`` and ``runs:/RUN_ID/PATH``), downloaded from the registry at the
given tracking URI. MLflow is imported only for a URI, so a folder loads without it. This
lives in ``server/`` (which the ServerApp bundle carries: a campaign may start from a
registered version) because it may open a network connection, which ``common/`` never does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common.errors import TrackingError, UsageError
from common.models.bundle import ModelBundle
from common.models.loading import load_bundle_dir

MLFLOW_SCHEMES = ("models:/", "runs:/")


def load_model(model: str, *, tracking_uri: str | None) -> tuple[ModelBundle, dict[str, Any]]:
    """Load MODEL from a folder or the MLflow registry.

    Returns
    -------
    tuple of ModelBundle and dict
        The models (CPU, eval mode) and where they came from: ``source`` (the folder or
        URI), ``name`` and ``version`` for a ``models:/NAME/VERSION`` URI, and ``card``
        (the saved model.json).

    Raises
    ------
    UsageError
        An MLflow URI without a tracking URI.
    DataError
        The folder or its files are missing or unreadable (the message names the file).
    TrackingError
        MLflow could not resolve or download the URI.
    """
    if not model.startswith(MLFLOW_SCHEMES):
        bundle, card = load_bundle_dir(Path(model))
        return bundle, {"source": str(Path(model).resolve()), "card": card}
    if not tracking_uri:
        raise UsageError(
            f"{model} is an MLflow URI: pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    info: dict[str, Any] = {"source": model, "tracking_uri": tracking_uri}
    if model.startswith("models:/"):
        name, _, version = model.removeprefix("models:/").partition("/")
        info.update(name=name, version=version or None)
    # models:/ URIs resolve through the registry URI, which does not follow the
    # tracking_uri argument of download_artifacts: point both at the given server.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="busfed-model-") as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(
                artifact_uri=model, tracking_uri=tracking_uri, dst_path=tmp
            )
        except MlflowException as error:
            raise TrackingError(f"{model} at {tracking_uri}: {error.message}") from None
        bundle, card = load_bundle_dir(Path(folder))
    return bundle, {**info, "card": card}
