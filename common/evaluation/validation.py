"""Validation on a site's held-out units (no gradient, no noise): both WAUVE networks, or
the key-frame comparator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data.keyframes import KeyFrameUnit
from common.data.units import SiteUnits
from common.metrics import histogram_counts, roc_auc
from common.models.bundle import KeyFrameBundle, WauveBundle

# Shared grid of the score histograms that sites report instead of individual scores.
HISTOGRAM_BINS = 1000
HISTOGRAM_KEY = "patient_score_histogram"  # the metric that carries it, as JSON


@dataclass(frozen=True)
class EvalResult:
    loss: float  # classifier (or key-frame model) binary cross-entropy per clip (or image)
    n_units: int  # patients evaluated
    metrics: dict[str, float]
    # Patient-level score (mean clip probability) per bin of HISTOGRAM_BINS, split by label.
    histogram: tuple[list[int], list[int]] | None


@torch.no_grad()
def evaluate_bundle(bundle: WauveBundle, units: SiteUnits, *, device: torch.device) -> EvalResult:
    """Classifier loss, accuracy and AUCs; detector loss on the same patients.

    A patient's score is the mean probability of their ground-truth-track clips; the
    patient-level AUC and a histogram of these scores (for the consortium's pooled AUC:
    no individual score leaves the site) are returned.

    The detector's loss is taken in train mode (Faster R-CNN returns losses only there);
    with GroupNorm nothing in train mode updates state, so this is a pure evaluation.
    """
    loss, metrics, histogram = _evaluate_per_patient(
        bundle.classifier,
        [(u.clips, u.labels) for u in units.classifier],
        name="classifier",
        count="val_clips",
        device=device,
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
        loss=loss if np.isfinite(loss) else 0.0,
        n_units=len(units.classifier),
        metrics=metrics,
        histogram=histogram,
    )


@torch.no_grad()
def evaluate_keyframe(
    bundle: KeyFrameBundle, units: list[KeyFrameUnit], *, device: torch.device
) -> EvalResult:
    """The key-frame model's loss, accuracy and AUCs over the patients' key-frame crops.

    A patient's score is the mean probability of their key frames (one per sweep or
    image); the patient-level AUC and the score histogram are as in ``evaluate_bundle``.
    """
    loss, metrics, histogram = _evaluate_per_patient(
        bundle.keyframe,
        [(u.images, u.labels) for u in units],
        name="keyframe",
        count="val_images",
        device=device,
    )
    metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
    return EvalResult(
        loss=loss if np.isfinite(loss) else 0.0,
        n_units=len(units),
        metrics=metrics,
        histogram=histogram,
    )


def _evaluate_per_patient(
    model: nn.Module,
    units: list[tuple[Tensor, Tensor]],
    *,
    name: str,
    count: str,
    device: torch.device,
) -> tuple[float, dict[str, float], tuple[list[int], list[int]] | None]:
    """Per-sample loss, accuracy and AUC of a one-logit network; patient scores and AUC.

    ``units`` holds each patient's samples FloatTensor[K, ...] and labels FloatTensor[K];
    patients with K = 0 count in ``val_patients`` only. Metrics are ``<name>_val_loss``,
    ``<name>_val_accuracy``, ``<name>_val_auc``, ``patient_val_auc`` and ``count`` (samples).
    """
    model = model.to(device).eval()
    logits, labels, patient_scores, patient_labels = [], [], [], []
    for samples, y_patient in units:
        if len(samples):
            z_patient = model(samples.to(device)).float().cpu()
            logits.append(z_patient)
            labels.append(y_patient.float())
            patient_scores.append(float(torch.sigmoid(z_patient).mean()))
            patient_labels.append(int(y_patient[0] >= 0.5))
    metrics: dict[str, float] = {"val_patients": float(len(units))}
    loss = float("nan")
    if logits:
        z, y = torch.cat(logits), torch.cat(labels)
        loss = float(F.binary_cross_entropy_with_logits(z, y))
        p = torch.sigmoid(z).numpy()
        metrics.update(
            {
                f"{name}_val_loss": loss,
                f"{name}_val_accuracy": float(np.mean((p >= 0.5) == (y.numpy() >= 0.5))),
                f"{name}_val_auc": roc_auc(y.numpy(), p),
                "patient_val_auc": roc_auc(np.array(patient_labels), np.array(patient_scores)),
                count: float(len(y)),
            }
        )
    histogram = None
    if patient_scores:
        pos, neg = histogram_counts(patient_labels, patient_scores, HISTOGRAM_BINS)
        histogram = (pos.tolist(), neg.tolist())
    return loss, metrics, histogram
