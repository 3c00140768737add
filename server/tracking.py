"""MLflow at the consortium: per-round metrics and one registered model version per round.

The embedded default is a SQLite file with a local artifact folder; at scale the same code
talks to an ``mlflow server`` (PostgreSQL + object store) through its tracking URI.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from common.errors import TrackingError
from common.models.bundle import ModelBundle

EXPERIMENT = "busfed"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str


def model_card(bundle: ModelBundle) -> dict[str, Any]:
    """What a registered version says about itself (stored as tags and as model.json)."""
    preset = bundle.preset
    return {
        "method": "WAUVE (Han et al., Cancer Imaging 2025)",
        "preset": preset.name,
        "detector": "Faster R-CNN, ResNet-34 + FPN, GroupNorm, 1 lesion class",
        "detector_params": sum(p.numel() for p in bundle.detector.parameters()),
        "detector_image_size": preset.detector.image_size,
        "classifier": "I3D inflated from ResNet-50, GroupNorm, 1 malignancy logit",
        "classifier_params": sum(p.numel() for p in bundle.classifier.parameters()),
        "clip_len": preset.classifier.clip_len,
        "clip_size": preset.classifier.clip_size,
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
            self.client = MlflowClient(tracking_uri=tracking_uri)
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
                    description="WAUVE detector + video classifier, trained by busfed "
                    "(federated, patient-level DP-SGD, SecAgg+).",
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
        """Log both networks' weights and the model card; register them as a new version.

        A version is only ever created, never overwritten: each round adds one.
        """
        card = model_card(bundle)
        path = f"round-{server_round:04d}"
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            torch.save(
                {
                    "detector": bundle.detector.state_dict(),
                    "classifier": bundle.classifier.state_dict(),
                },
                folder / "weights.pt",
            )
            (folder / "model.json").write_text(
                json.dumps({**card, "round": server_round, **tags}, indent=2)
            )
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

    def tag_version(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.registered_model, version, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
