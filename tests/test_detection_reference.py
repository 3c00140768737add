"""Detection matching and the precision-recall curve against COCO's evaluation (pycocotools
through torchmetrics' MeanAveragePrecision), on random scenes.

busfed reports VOC's all-point AP, COCO reports the 101-point one; so the test reads
busfed's curve at COCO's 101 recall points and compares that with COCO's AP, and busfed's
recall with COCO's recall at 100 detections. Both need the ``dev`` extra.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.evaluation.detection import match_detections, precision_recall

pytest.importorskip("pycocotools")
detection = pytest.importorskip("torchmetrics.detection")


def _coco_101_point_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """pycocotools' ``accumulate``: the precision envelope read at 101 recall points."""
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.mean([envelope[i] if i < len(envelope) else 0.0 for i in at]))


def _scene(
    rng: np.random.Generator,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    predictions, truth = [], []
    for _ in range(int(rng.integers(1, 8))):
        n = int(rng.integers(0, 4))
        corner = rng.uniform(0, 80, (n, 2))
        boxes = np.hstack([corner, corner + rng.uniform(4, 20, (n, 2))])
        # Hits with jitter (some below IoU 0.5), a few duplicates, and misses.
        found = (
            boxes + rng.normal(0, 1.0, boxes.shape) * np.tile(boxes[:, 2:] - boxes[:, :2], 2) / 8
        )
        found = found[rng.uniform(size=n) < 0.8]
        dups = found[rng.uniform(size=len(found)) < 0.3] + rng.normal(0, 1.0, (1, 4))
        far = rng.uniform(0, 80, (int(rng.integers(0, 3)), 2))
        misses = np.hstack([far, far + rng.uniform(4, 20, far.shape)])
        detected = np.vstack([found, dups, misses]).reshape(-1, 4)
        predictions.append((detected, rng.uniform(0, 1, len(detected))))
        truth.append(boxes.reshape(-1, 4))
    return predictions, truth


@pytest.mark.parametrize("seed", range(25))
def test_recall_and_curve_equal_coco(seed: int) -> None:
    rng = np.random.default_rng(seed)
    predictions, truth = _scene(rng)
    if sum(len(t) for t in truth) == 0:
        pytest.skip("a scene without boxes has no AP in either")
    coco = detection.MeanAveragePrecision(
        box_format="xyxy",
        iou_thresholds=[0.5],
        # torchmetrics' default grid is float32 (0.6 reads 0.6000000238), which moves a
        # recall of exactly 3/5 to the next point; pycocotools' own grid is float64.
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
        backend="pycocotools",
    )
    coco.update(
        [
            {
                "boxes": torch.tensor(b, dtype=torch.float32),
                "scores": torch.tensor(s, dtype=torch.float32),
                "labels": torch.zeros(len(b), dtype=torch.int64),
            }
            for b, s in predictions
        ],
        [
            {
                "boxes": torch.tensor(t, dtype=torch.float32),
                "labels": torch.zeros(len(t), dtype=torch.int64),
            }
            for t in truth
        ],
    )
    expected = coco.compute()
    # COCO sees float32 boxes; give busfed the same numbers.
    as32 = [(b.astype(np.float32), s.astype(np.float32)) for b, s in predictions]
    matches = match_detections(as32, [t.astype(np.float32) for t in truth], max_detections=100)
    precision, recall, n_boxes = precision_recall(matches)
    found = sum(int(m.true_positive.sum()) for m in matches)
    assert found / n_boxes == pytest.approx(float(expected["mar_100"]), abs=1e-6)
    assert _coco_101_point_ap(precision, recall) == pytest.approx(
        float(expected["map_50"]), abs=1e-6
    )
