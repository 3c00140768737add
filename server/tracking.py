"""MLflow at the consortium: per-round metrics and one registered model version per round.

The embedded default is a SQLite file with a local artifact folder; at scale the same code
talks to an ``mlflow server`` (PostgreSQL + object store) through its tracking URI.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from common.errors import TrackingError
from common.models.bundle import DEFAULT_MODEL, ModelBundle
from common.models.loading import save_bundle_dir

EXPERIMENT = "busfed"
MODEL_TAG = "model"  # on a registered model: the model kind all its versions are


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str


def model_card(bundle: ModelBundle) -> dict[str, Any]:
    """What a registered version says about itself (stored as tags and as model.json).

    ``model`` is the run config's model kind (``wauve``, ``keyframe2d``, ``detector``); the rest
    describes each of its networks (architecture, parameter count, input size).
    """
    return {
        "model": bundle.kind,
        "method": bundle.method,
        "preset": bundle.preset.name,
        **bundle.architecture(),
    }


class Tracker:
    """One MLflow run per federated run; a registered model version per round."""

    def __init__(
        self, *, tracking_uri: str, artifact_location: str, registered_model: str, run_name: str
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registered_model = registered_model
        try:
            mlflow.set_tracking_uri(tracking_uri)
            # The registry explicitly too: MlflowClient otherwise takes the process-wide
            # registry URI, which a previous models:/ download may have pointed elsewhere.
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                experiment_id = self.client.create_experiment(
                    EXPERIMENT, artifact_location=artifact_location or None
                )
            else:
                experiment_id = experiment.experiment_id
            self.run = self.client.create_run(experiment_id, run_name=run_name)
            if not self.client.search_registered_models(f"name = '{registered_model}'"):
                self.client.create_registered_model(
                    registered_model,
                    description="A model trained by busfed (federated, patient-level DP-SGD, "
                    "SecAgg+); its `model` tag says which: wauve (detector + video "
                    "classifier), keyframe2d (the 2D key-frame comparator) or detector "
                    "(WAUVE's detector alone).",
                )
        except MlflowException as exc:
            raise TrackingError(f"MLflow at {tracking_uri}: {exc}") from exc

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def register_round(
        self, bundle: ModelBundle, *, server_round: int, tags: Mapping[str, str]
    ) -> RegisteredVersion:
        """Log the networks' weights and the model card; register them as a new version.

        A version is only ever created, never overwritten: each round adds one. A registered
        model holds one model kind (its ``model`` tag); another kind is refused.

        Raises
        ------
        TrackingError
            MLflow failed, or the registered model holds another model kind.
        """
        self._claim(bundle.kind)
        card = model_card(bundle)
        path = f"round-{server_round:04d}"
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            save_bundle_dir(bundle, folder, {**card, "round": server_round, **tags})
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=path)
        try:
            version = self.client.create_model_version(
                self.registered_model,
                source=f"{self.run.info.artifact_uri}/{path}",
                run_id=self.run_id,
                tags={**{k: str(v) for k, v in card.items()}, **tags},
                description=f"global model after federated round {server_round}",
            )
        except MlflowException as exc:
            raise TrackingError(f"could not register round {server_round}: {exc}") from exc
        return RegisteredVersion(self.registered_model, str(version.version), str(version.source))

    def _claim(self, kind: str) -> None:
        """Tag the registered model with the model kind it holds, or check that tag."""
        try:
            registered = self.client.get_registered_model(self.registered_model)
            holds = registered.tags.get(MODEL_TAG)
            if holds is None:
                # Versions from before the choice of model are WAUVE's.
                versions = self.client.search_model_versions(
                    f"name = '{self.registered_model}'", max_results=1
                )
                holds = DEFAULT_MODEL if versions else kind
                self.client.set_registered_model_tag(self.registered_model, MODEL_TAG, holds)
        except MlflowException as exc:
            raise TrackingError(f"MLflow at {self.tracking_uri}: {exc}") from exc
        if holds != kind:
            raise TrackingError(
                f"registered model {self.registered_model!r} holds {holds} versions; register "
                f"the {kind} model under another name (run config registered-model)"
            )

    def campaign_versions(self, campaign: str) -> list[ModelVersion]:
        """Every registered version of a campaign, by round (the registry is the record)."""
        try:
            versions = self.client.search_model_versions(f"name = '{self.registered_model}'")
        except MlflowException as exc:
            raise TrackingError(f"MLflow at {self.tracking_uri}: {exc}") from exc
        mine = [v for v in versions if v.tags.get("campaign") == campaign]
        return sorted(mine, key=lambda v: int(v.tags.get("round", "0")))

    def load_version(self, version: ModelVersion) -> ModelBundle:
        """Download a registered version's weights and load them (CPU, eval mode)."""
        from common.models.loading import load_bundle_dir

        with tempfile.TemporaryDirectory(prefix="busfed-resume-") as tmp:
            try:
                folder = mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source, tracking_uri=self.tracking_uri, dst_path=tmp
                )
            except MlflowException as exc:
                raise TrackingError(
                    f"could not download {self.registered_model} version {version.version} "
                    f"from {version.source}: {exc}"
                ) from exc
            bundle, _ = load_bundle_dir(Path(folder))
        return bundle

    def tag_run(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def tag_version(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.registered_model, version, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
