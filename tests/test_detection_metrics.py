"""Detection recall and AP (common/evaluation/detection.py): hand-computed cases and
properties of the maths. The check against COCO's evaluation is test_detection_reference.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.evaluation.detection import (
    bootstrap_detection_scores,
    detect,
    detection_scores,
    match_detections,
    scores_from_matches,
)

BOX = np.array([[0.0, 0.0, 10.0, 10.0]])
FAR = np.array([[50.0, 50.0, 60.0, 60.0]])
NONE = np.zeros((0, 4))


def _pred(boxes: np.ndarray, scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64)


def test_hand_computed_all_point_ap() -> None:
    # Ranked: TP (0.9), FP (0.8), TP (0.7) over two boxes. Precision 1, 1/2, 2/3 at
    # recall 1/2, 1/2, 1; the envelope gives 1 on (0, 1/2] and 2/3 on (1/2, 1]: AP 5/6.
    # (COCO's 101 points would give (51 + 50 * 2/3) / 101 = 0.8350.)
    scores = detection_scores(
        [_pred(np.vstack([BOX, FAR]), [0.9, 0.8]), _pred(BOX, [0.7])], [BOX, BOX]
    )
    assert scores.recall == 1.0
    assert scores.average_precision == pytest.approx(5 / 6)
    assert (scores.n_images, scores.n_boxes) == (2, 2)


def test_duplicate_detection_is_a_false_positive() -> None:
    predictions = [_pred(np.vstack([BOX, BOX]), [0.9, 0.8]), _pred(BOX, [0.7])]
    matches = match_detections(predictions, [BOX, BOX])
    assert matches[0].true_positive.tolist() == [True, False]
    # The duplicate outranks the second image's hit: the same curve as a far miss.
    assert detection_scores(predictions, [BOX, BOX]).average_precision == pytest.approx(5 / 6)


def test_iou_threshold_is_inclusive() -> None:
    half = np.array([[0.0, 0.0, 10.0, 5.0]])  # IoU 0.5 with BOX
    below = np.array([[0.0, 0.0, 10.0, 4.9]])  # IoU 0.49
    assert detection_scores([_pred(half, [1.0])], [BOX]).recall == 1.0
    assert detection_scores([_pred(below, [1.0])], [BOX]).recall == 0.0
    assert detection_scores([_pred(half, [1.0])], [BOX], iou=0.6).recall == 0.0


def test_a_detection_takes_the_best_box_not_yet_matched() -> None:
    # COCO's rule: the second detection's best box is taken, so it takes the other one.
    truth = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0]])
    scores = detection_scores([_pred(np.vstack([BOX, BOX]), [0.9, 0.8])], [truth])
    assert scores.recall == 1.0
    assert scores.average_precision == 1.0


def test_max_detections_keeps_the_best_scored() -> None:
    truth = np.vstack([BOX, FAR])
    predictions = [_pred(np.vstack([FAR, BOX]), [0.2, 0.9])]
    assert detection_scores(predictions, [truth]).recall == 1.0
    limited = detection_scores(predictions, [truth], max_detections=1)
    assert limited.recall == 0.5
    assert limited.average_precision == 0.5


def test_no_detections_and_no_boxes() -> None:
    empty = detection_scores([_pred(NONE, [])], [BOX])
    assert (empty.recall, empty.average_precision) == (0.0, 0.0)
    undefined = detection_scores([_pred(BOX, [0.5])], [NONE])
    assert math.isnan(undefined.recall) and math.isnan(undefined.average_precision)
    assert undefined.n_boxes == 0
    nothing = detection_scores([], [])
    assert nothing.n_images == 0 and math.isnan(nothing.recall)


def test_bad_input_names_the_image() -> None:
    with pytest.raises(ValueError, match="2 images of predictions but 1"):
        detection_scores([_pred(BOX, [1.0])] * 2, [BOX])
    with pytest.raises(ValueError, match=r"image 1: 1 predicted boxes but 2 scores"):
        detection_scores([_pred(BOX, [1.0]), _pred(BOX, [1.0, 0.5])], [BOX, BOX])
    with pytest.raises(ValueError, match=r"image 0: ground-truth boxes must be \[N, 4\]"):
        detection_scores([_pred(BOX, [1.0])], [np.zeros((1, 3))])
    with pytest.raises(ValueError, match="iou"):
        detection_scores([_pred(BOX, [1.0])], [BOX], iou=0.0)
    with pytest.raises(ValueError, match="max_detections"):
        detection_scores([_pred(BOX, [1.0])], [BOX], max_detections=0)


@st.composite
def _images(draw: st.DrawFn) -> list[np.ndarray]:
    """1-5 images of 0-3 boxes each, x1y1x2y2, 2-10 px, each in its own 30-px cell of a
    90-px frame: no detection can overlap two of an image's boxes at IoU 0.5."""
    images = []
    for _ in range(draw(st.integers(1, 5))):
        cells = draw(st.lists(st.integers(0, 8), max_size=3, unique=True))
        boxes = []
        for cell in cells:
            x = 30 * (cell % 3) + draw(st.integers(0, 18))
            y = 30 * (cell // 3) + draw(st.integers(0, 18))
            w, h = draw(st.integers(2, 10)), draw(st.integers(2, 10))
            boxes.append([x, y, x + w, y + h])
        images.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    return images


def _scores(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(np.linspace(0.05, 0.95, n)) if n else np.zeros(0)


@settings(max_examples=60, deadline=None)
@given(_images(), st.integers(0, 2**32 - 1))
def test_perfect_detections_score_one(truth: list[np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = sum(len(t) for t in truth)
    flat = _scores(rng, n)
    predictions, start = [], 0
    for boxes in truth:
        predictions.append((boxes.copy(), flat[start : start + len(boxes)]))
        start += len(boxes)
    scores = detection_scores(predictions, truth)
    if n == 0:
        assert math.isnan(scores.recall)
    else:
        assert scores.recall == 1.0 and scores.average_precision == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(_images(), st.integers(0, 2**32 - 1))
def test_properties_of_noisy_detections(truth: list[np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    predictions = []
    for boxes in truth:
        jittered = boxes + rng.normal(0.0, 1.5, boxes.shape)
        extra = rng.uniform(0, 90, (int(rng.integers(0, 3)), 2))
        misses = np.hstack([extra, extra + 5.0])
        found = np.vstack([jittered, misses])
        predictions.append((found, rng.uniform(0, 1, len(found))))
    scores = detection_scores(predictions, truth)
    if scores.n_boxes == 0:
        return
    # AP integrates a precision <= 1 up to the recall reached.
    assert 0.0 <= scores.average_precision <= scores.recall + 1e-12 <= 1.0 + 1e-12
    # A copy of every detection, ranked below all of them, finds nothing new.
    doubled = [(np.vstack([b, b]), np.concatenate([s, s - 2.0])) for b, s in predictions]
    again = detection_scores(doubled, truth)
    assert again.recall == scores.recall
    assert again.average_precision == pytest.approx(scores.average_precision)
    # The images' order does not matter.
    order = rng.permutation(len(truth))
    shuffled = detection_scores([predictions[i] for i in order], [truth[i] for i in order])
    assert shuffled.recall == scores.recall
    assert shuffled.average_precision == pytest.approx(scores.average_precision)
    # No detections, nothing found.
    blind = detection_scores([(NONE, np.zeros(0)) for _ in truth], truth)
    assert blind.recall == 0.0 and blind.average_precision == 0.0


class _FixedDetector(torch.nn.Module):
    """Returns one box per image at the image's mean intensity times 10, and records
    its batches and mode."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.grad_enabled: list[bool] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.batches.append(len(images))
        self.grad_enabled.append(torch.is_grad_enabled())
        out = []
        for image in images:
            v = float(image.mean()) * 10
            out.append(
                {
                    "boxes": torch.tensor([[0.0, 0.0, v, v]]),
                    "scores": torch.tensor([v / 10]),
                    "labels": torch.ones(1, dtype=torch.int64),
                }
            )
        return out


def test_detect_batches_in_eval_mode_without_gradients() -> None:
    detector = _FixedDetector().train()
    images = [torch.full((3, 8, 8), v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)]
    results = detect(detector, images, device=torch.device("cpu"), batch_size=2)
    assert detector.batches == [2, 2, 1]
    assert detector.grad_enabled == [False, False, False]
    assert not detector.training
    assert [float(r[1][0]) for r in results] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert results[2][0].shape == (1, 4) and results[2][0].dtype == np.float32


def test_patient_bootstrap_is_reproducible_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    predictions, truth, patients = [], [], []
    for p in range(12):
        for _ in range(2):  # two images per patient, a lesion each
            hit = rng.uniform() < 0.7
            found = BOX if hit else FAR
            predictions.append(_pred(np.vstack([found, FAR + 5]), [0.9, rng.uniform()]))
            truth.append(BOX)
            patients.append(f"P{p}")
    matches = match_detections(predictions, truth)
    ci = bootstrap_detection_scores(matches, patients, n_resamples=200, seed=3)
    assert ci == bootstrap_detection_scores(matches, patients, n_resamples=200, seed=3)
    assert ci.n_patients == 12 and ci.scores == scores_from_matches(matches)
    assert ci.recall_ci[0] <= ci.scores.recall <= ci.recall_ci[1]
    assert ci.recall_ci[0] < ci.recall_ci[1]
    low, high = ci.average_precision_ci
    assert low <= ci.scores.average_precision <= high
    # One patient: every resample is that patient, the interval is a point.
    single = bootstrap_detection_scores(matches[:2], ["P0", "P0"], n_resamples=20)
    assert single.recall_ci == (single.scores.recall, single.scores.recall)
    with pytest.raises(ValueError, match="patient ids"):
        bootstrap_detection_scores(matches, patients[:-1])
