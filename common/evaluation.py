"""Validation of both WAUVE networks on a site's held-out units (no gradient, no noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.data.units import SiteUnits
from common.metrics import roc_auc
from common.models.bundle import ModelBundle


@dataclass(frozen=True)
class EvalResult:
    loss: float  # classifier binary cross-entropy per clip
    n_units: int  # patients evaluated
    metrics: dict[str, float]


@torch.no_grad()
def evaluate_bundle(bundle: ModelBundle, units: SiteUnits, *, device: torch.device) -> EvalResult:
    """Classifier loss, accuracy and clip-level AUC; detector loss on the same patients.

    The detector's loss is taken in train mode (Faster R-CNN returns losses only there);
    with GroupNorm nothing in train mode updates state, so this is a pure evaluation.
    """
    classifier = bundle.classifier.to(device).eval()
    logits, labels = [], []
    for patient in units.classifier:
        if len(patient.clips):
            logits.append(classifier(patient.clips.to(device)).float().cpu())
            labels.append(patient.labels.float())
    metrics: dict[str, float] = {"val_patients": float(len(units.classifier))}
    loss = float("nan")
    if logits:
        z, y = torch.cat(logits), torch.cat(labels)
        loss = float(F.binary_cross_entropy_with_logits(z, y))
        p = torch.sigmoid(z).numpy()
        metrics.update(
            classifier_val_loss=loss,
            classifier_val_accuracy=float(np.mean((p >= 0.5) == (y.numpy() >= 0.5))),
            classifier_val_auc=roc_auc(y.numpy(), p),
            val_clips=float(len(y)),
        )

    detector = bundle.detector.to(device).train()
    det_losses = []
    for frames in units.detector:
        for image, target in zip(frames.images, frames.targets, strict=True):
            out = detector([image.to(device)], [{k: v.to(device) for k, v in target.items()}])
            det_losses.append(float(sum(out.values())))
    if det_losses:
        metrics["detector_val_loss"] = float(np.mean(det_losses))
    # NaN does not survive Flower's metric records as a useful number; drop it.
    metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
    return EvalResult(
        loss=loss if np.isfinite(loss) else 0.0, n_units=len(units.classifier), metrics=metrics
    )
