"""Validation on a site's held-out units (no gradient, no noise): both WAUVE networks, the
key-frame comparator, or WAUVE's detector alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data.keyframes import KeyFrameUnit
from common.data.units import DetectorUnit, SiteUnits
from common.evaluation.detection import detect, detection_scores
from common.metrics import histogram_counts, roc_auc
from common.models.bundle import DetectorBundle, KeyFrameBundle, WauveBundle

# Shared grid of the score histograms that sites report instead of individual scores.
HISTOGRAM_BINS = 1000
HISTOGRAM_KEY = "patient_score_histogram"  # the metric that carries it, as JSON


@dataclass(frozen=True)
class EvalResult:
    loss: float  # classifier (or key-frame model) binary cross-entropy per clip (or image)
    # The site's weight in the consortium's mean of its metrics: patients evaluated;
    # images for the detector alone (its recall and AP are per image).
    n_units: int
    metrics: dict[str, float]
    # Patient-level score (mean clip probability) per bin of HISTOGRAM_BINS, split by label.
    histogram: tuple[list[int], list[int]] | None


@torch.no_grad()
def evaluate_bundle(bundle: WauveBundle, units: SiteUnits, *, device: torch.device) -> EvalResult:
    """Classifier loss, accuracy and AUCs; detector loss on the same patients.

    A patient's score is the mean probability of their ground-truth-track clips; the
    patient-level AUC and a histogram of these scores (for the consortium's pooled AUC:
    no individual score leaves the site) are returned. The detector's loss is
    ``_detector_loss``'s.
    """
    loss, metrics, histogram = _evaluate_per_patient(
        bundle.classifier,
        [(u.clips, u.labels) for u in units.classifier],
        name="classifier",
        count="val_clips",
        device=device,
    )
    det_loss = _detector_loss(bundle.detector, units.detector, device=device)
    if np.isfinite(det_loss):
        metrics["detector_val_loss"] = det_loss
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


@torch.no_grad()
def evaluate_detector(
    bundle: DetectorBundle, units: list[DetectorUnit], *, device: torch.device, iou: float = 0.5
) -> EvalResult:
    """The detector's loss, recall and average precision at ``iou`` on the held-out frames.

    Metrics: ``detector_val_loss``, ``detector_val_recall50`` and ``detector_val_ap50``
    (``common.evaluation.detection``; absent when the frames hold no box), and the counts
    ``val_patients``, ``val_images`` and ``val_boxes``. The site's weight at the server is
    its number of images.
    """
    images = [image for unit in units for image in unit.images]
    truth = [t["boxes"].numpy() for unit in units for t in unit.targets]
    loss = _detector_loss(bundle.detector, units, device=device)
    scores = detection_scores(detect(bundle.detector, images, device=device), truth, iou=iou)
    metrics = {
        "detector_val_loss": loss,
        "detector_val_recall50": scores.recall,
        "detector_val_ap50": scores.average_precision,
        "val_patients": float(len(units)),
        "val_images": float(scores.n_images),
        "val_boxes": float(scores.n_boxes),
    }
    return EvalResult(
        loss=loss if np.isfinite(loss) else 0.0,
        n_units=len(images),
        metrics={k: v for k, v in metrics.items() if np.isfinite(v)},
        histogram=None,
    )


def _detector_loss(
    detector: nn.Module, units: list[DetectorUnit], *, device: torch.device
) -> float:
    """Mean Faster R-CNN loss per image; NaN without images.

    Taken in train mode (Faster R-CNN returns losses only there); with GroupNorm or frozen
    BatchNorm nothing in train mode updates state, so this is a pure evaluation.
    """
    detector = detector.to(device).train()
    losses = []
    for frames in units:
        for image, target in zip(frames.images, frames.targets, strict=True):
            out = detector([image.to(device)], [{k: v.to(device) for k, v in target.items()}])
            losses.append(float(sum(out.values())))
    return float(np.mean(losses)) if losses else float("nan")


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
