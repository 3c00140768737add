"""What ``busfed demo`` runs with: its own module, so the CLI reads the defaults for its help
without importing the demo (torch, Flower and MLflow take seconds to load)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoSettings:
    rounds: int = 3
    sites: int = 3
    patients: int = 16
    frames: int = 32
    size: int = 128
    seed: int = 7
    preset: str = "tiny"
    model: str = "wauve"
    local_steps: int = 3
    learning_rate: float = 0.05
    # From the pretrained start the detector takes smaller steps (pyproject's comment).
    detector_learning_rate: float = 0.01
    classifier_trains: str = "all"  # run config classifier-trains (pyproject's comment)
    augment_views: int = 1  # run config augment-views
    secure_aggregation: bool = True
    timeout_s: float = 1500.0
    secagg_timeout: float = 60.0
    secagg_timeout_limit: float = 900.0
    # Ingested site datasets (one folder each) to federate instead of synthetic hospitals.
    data_from: Path | None = None
    # The model the campaign starts from (a folder or models:/ URI). "" with
    # pretrain_patients > 0: a version 0 pretrained here on synthetic public patients
    # (busfed pretrain's work); "" without: seeded random weights.
    init: str = ""
    pretrain_patients: int = 150
    pretrain_steps: int = 300  # the classifier's (or key-frame model's) AdamW steps
    pretrain_detector_steps: int = 600
    # A synthetic hospital that never trains, scored with every version (0: none).
    held_out_patients: int = 40
