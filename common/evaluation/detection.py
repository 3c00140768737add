"""Lesion detection quality: recall and average precision at one IoU, and their bootstrap CI.

One function, ``detection_scores``, serves the site's validation, ``busfed evaluate`` and
the benchmark harness. It follows PASCAL VOC 2010+ (all-point interpolated AP) rather than
COCO (101 recall points): with one lesion class and a few boxes per site, the 101-point
grid moves AP by up to a point, and the consortium compares sites and rounds on a number
that does not depend on a grid. The matching is COCO's (pycocotools ``evaluateImg``), so the
tests check recall and the precision-recall curve against torchmetrics' COCO evaluation;
the product keeps its own few lines so that a site needs no C extension.

Boxes are x1y1x2y2 in pixels throughout, as torchvision's detectors return them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from torchvision.ops import box_iou


@dataclass(frozen=True)
class DetectionScores:
    """Recall and AP at one IoU threshold over a set of images.

    Attributes
    ----------
    recall : float
        Share of ground-truth boxes matched by a detection at IoU >= ``iou``; NaN when there
        is no ground-truth box.
    average_precision : float
        Area under the all-point interpolated precision-recall curve of all images'
        detections ranked by score (VOC 2010+); NaN when there is no ground-truth box.
    n_images : int
    n_boxes : int
        Ground-truth boxes.
    """

    recall: float
    average_precision: float
    n_images: int
    n_boxes: int


@dataclass(frozen=True)
class ImageMatches:
    """One image's detections after matching: what a bootstrap resamples.

    ``scores`` are in descending order (ties in detection order); ``true_positive[i]`` says
    whether detection ``i`` matched a ground-truth box not matched by a higher-ranked one.
    """

    scores: NDArray[np.float64]
    true_positive: NDArray[np.bool_]
    n_boxes: int


def detection_scores(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    *,
    iou: float = 0.5,
    max_detections: int | None = None,
) -> DetectionScores:
    """Recall and average precision of detections against ground-truth boxes.

    Parameters
    ----------
    predictions : sequence of (ndarray, ndarray)
        Per image: boxes ``[N, 4]`` x1y1x2y2 and their scores ``[N]`` (N may be 0).
    ground_truth : sequence of ndarray
        Per image, in the same order: boxes ``[M, 4]`` x1y1x2y2 (M may be 0).
    iou : float
        A detection matches a box at IoU >= ``iou``, in (0, 1].
    max_detections : int, optional
        Keep only each image's highest-scoring detections (COCO's ``maxDets``).

    Returns
    -------
    DetectionScores

    Raises
    ------
    ValueError
        The two sequences differ in length, ``iou`` or ``max_detections`` is out of range,
        or an image's arrays have the wrong shape (the message names the image's index).
    """
    matches = match_detections(predictions, ground_truth, iou=iou, max_detections=max_detections)
    return scores_from_matches(matches)


def match_detections(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    *,
    iou: float = 0.5,
    max_detections: int | None = None,
) -> list[ImageMatches]:
    """Match each image's detections to its boxes; arguments as ``detection_scores``.

    Greedy by score: each detection, best first, takes the not yet matched ground-truth
    box it overlaps most at IoU >= ``iou``; a box is matched at most once, so a duplicate
    detection of a found lesion is a false positive.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(
            f"{len(predictions)} images of predictions but {len(ground_truth)} of ground truth"
        )
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")
    return [
        _match_image(i, boxes, scores, truth, iou=iou, max_detections=max_detections)
        for i, ((boxes, scores), truth) in enumerate(zip(predictions, ground_truth, strict=True))
    ]


def _boxes(index: int, name: str, array: np.ndarray) -> Tensor:
    boxes = np.asarray(array, dtype=np.float64)
    if boxes.size == 0:
        return torch.zeros((0, 4), dtype=torch.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {index}: {name} must be [N, 4], got shape {boxes.shape}")
    return torch.from_numpy(boxes)


def _match_image(
    index: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    iou: float,
    max_detections: int | None,
) -> ImageMatches:
    detected = _boxes(index, "predicted boxes", boxes)
    score = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(score) != len(detected):
        raise ValueError(f"image {index}: {len(detected)} predicted boxes but {len(score)} scores")
    gt = _boxes(index, "ground-truth boxes", truth)
    # Stable, as pycocotools: equal scores keep the detector's order.
    order = np.argsort(-score, kind="mergesort")[:max_detections]
    score = score[order]
    true_positive = np.zeros(len(order), dtype=bool)
    if len(order) and len(gt):
        overlaps = box_iou(detected[torch.from_numpy(order)], gt).numpy()
        taken = np.zeros(len(gt), dtype=bool)
        for d, row in enumerate(overlaps):
            candidates = np.where(taken, -1.0, row)
            best = int(np.argmax(candidates))
            if candidates[best] >= iou:
                taken[best] = True
                true_positive[d] = True
    return ImageMatches(scores=score, true_positive=true_positive, n_boxes=len(gt))


def precision_recall(
    matches: Sequence[ImageMatches],
) -> tuple[NDArray[np.float64], NDArray[np.float64], int]:
    """Precision and recall after each detection of all images, ranked by score.

    Returns
    -------
    precision, recall : ndarray
        One value per detection, best first (ties in image order, as pycocotools).
    n_boxes : int
        Ground-truth boxes; recall is NaN when it is 0.
    """
    n_boxes = sum(m.n_boxes for m in matches)
    if not matches:
        return np.zeros(0), np.zeros(0), 0
    scores = np.concatenate([m.scores for m in matches])
    hits = np.concatenate([m.true_positive for m in matches])
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_boxes if n_boxes else np.full(len(tp), np.nan)
    return precision.astype(np.float64), recall.astype(np.float64), n_boxes


def scores_from_matches(matches: Sequence[ImageMatches]) -> DetectionScores:
    """Recall and all-point interpolated AP of matched images."""
    precision, recall, n_boxes = precision_recall(matches)
    if n_boxes == 0:
        nan = float("nan")
        return DetectionScores(nan, nan, n_images=len(matches), n_boxes=0)
    found = sum(int(m.true_positive.sum()) for m in matches)
    # VOC 2010+: the precision envelope (best precision at any higher recall), integrated
    # over every recall step.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    ap = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    return DetectionScores(
        recall=found / n_boxes, average_precision=ap, n_images=len(matches), n_boxes=n_boxes
    )


@dataclass(frozen=True)
class DetectionCI:
    """Recall and AP with percentile intervals from a patient-level bootstrap.

    Attributes
    ----------
    scores : DetectionScores
        On all images.
    recall_ci, average_precision_ci : tuple of float
        Lower and upper bound at ``level``; NaN when no resample had a box.
    level : float
    n_patients, n_resamples : int
    """

    scores: DetectionScores
    recall_ci: tuple[float, float]
    average_precision_ci: tuple[float, float]
    level: float
    n_patients: int
    n_resamples: int


def bootstrap_detection_scores(
    matches: Sequence[ImageMatches],
    patients: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> DetectionCI:
    """Bootstrap recall and AP over patients: a patient's images are drawn together.

    Images of one patient are not independent (one lesion, sweeps of one breast), so the
    resampling unit is the patient, as the privacy unit. The same ``seed`` gives the same
    interval.

    Parameters
    ----------
    matches : sequence of ImageMatches
        ``match_detections``' result, one per image.
    patients : sequence of str
        The patient of each image.
    n_resamples : int
    seed : int
    level : float
        Coverage of the percentile interval, in (0, 1).
    """
    if len(matches) != len(patients):
        raise ValueError(f"{len(matches)} images but {len(patients)} patient ids")
    if n_resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")
    groups: dict[str, list[ImageMatches]] = {}
    for match, patient in zip(matches, patients, strict=True):
        groups.setdefault(patient, []).append(match)
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    draws = np.full((n_resamples, 2), np.nan)
    for r in range(n_resamples):
        picked = rng.integers(0, max(len(members), 1), len(members))
        resample = scores_from_matches([m for i in picked for m in members[i]])
        draws[r] = resample.recall, resample.average_precision
    tails = (100 * (1 - level) / 2, 100 * (1 + level) / 2)

    def interval(column: NDArray[np.float64]) -> tuple[float, float]:
        finite = column[np.isfinite(column)]
        if not len(finite):
            return float("nan"), float("nan")
        low, high = np.percentile(finite, tails)
        return float(low), float(high)

    return DetectionCI(
        scores=scores_from_matches(matches),
        recall_ci=interval(draws[:, 0]),
        average_precision_ci=interval(draws[:, 1]),
        level=level,
        n_patients=len(members),
        n_resamples=n_resamples,
    )


@torch.no_grad()
def detect(
    detector: nn.Module,
    images: Sequence[Tensor],
    *,
    device: torch.device,
    batch_size: int = 8,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run a detector over images and return each image's boxes and scores as numpy.

    Parameters
    ----------
    detector : nn.Module
        A torchvision detector (``common.models.detector.build_detector``); it is put in
        eval mode and on ``device``, and left so.
    images : sequence of Tensor
        FloatTensor[3, S, S] in [0, 1].
    device : torch.device
    batch_size : int
        Images per forward pass.

    Returns
    -------
    list of (ndarray, ndarray)
        Per image: boxes float32 ``[N, 4]`` x1y1x2y2 in input pixels and scores float32
        ``[N]``, as ``detection_scores`` takes them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    detector.to(device).eval()
    results: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        batch = [image.to(device) for image in images[start : start + batch_size]]
        for out in detector(batch):
            results.append(
                (
                    out["boxes"].detach().to("cpu", torch.float32).numpy(),
                    out["scores"].detach().to("cpu", torch.float32).numpy(),
                )
            )
    return results
