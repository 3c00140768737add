"""Per-patient training units cut from videos: frames, boxes, clips and dropped tails."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.data.units import build_units
from common.data.video import write_video
from common.geometry import consecutive_windows
from common.models.presets import get_preset

TINY = get_preset("tiny")
CLIP_LEN = TINY.classifier.clip_len
HEIGHT, WIDTH, FRAMES = 48, 64, 20


def test_consecutive_windows_drop_tails_and_short_runs():
    frames = [*range(0, 19), *range(25, 30), *range(40, 48)]
    windows = consecutive_windows(frames, 8)
    assert windows == [list(range(0, 8)), list(range(8, 16)), list(range(40, 48))]
    assert consecutive_windows([], 8) == []


def _video(path: Path, box: tuple[float, float, float, float]) -> None:
    """Dark frames with a bright lesion inside ``box``."""
    frames = np.full((FRAMES, HEIGHT, WIDTH), 30, dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    frames[:, y1:y2, x1:x2] = 220
    write_video(path, frames, fps=10)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Three patients: A has two train videos, B a train video without lesion boxes, C is val."""
    root = tmp_path_factory.mktemp("site")
    box = (20.0, 10.0, 36.0, 30.0)
    rows, boxes = [], {}
    videos = {
        # 19 boxed frames: two clips and a dropped tail of 3.
        "a1.mp4": ("A", "malignant", "train", range(0, 19)),
        # runs of 5 (dropped) and 8 (one clip).
        "a2.mp4": ("A", "malignant", "train", [*range(2, 7), *range(10, 18)]),
        "b1.mp4": ("B", "benign", "train", []),
        "c1.mp4": ("C", "benign", "val", range(0, 16)),
    }
    for name, (patient, label, split, boxed) in videos.items():
        _video(root / name, box)
        rows.append(SimpleNamespace(video=name, patient_id=patient, label=label, split=split))
        boxes[name] = dict.fromkeys(boxed, box)
    return SimpleNamespace(root=root, rows=rows, boxes=boxes, problems=[])


def test_units_group_by_patient_and_drop_tails(site):
    units = build_units(site, TINY, split="train", frame_stride=3, max_frames_per_video=4)
    assert [u.patient_id for u in units.detector] == ["A", "B"]
    assert [u.patient_id for u in units.classifier] == ["A", "B"]

    a, b = units.classifier
    s = TINY.classifier.clip_size
    assert a.clips.shape == (3, 3, CLIP_LEN, s, s)
    torch.testing.assert_close(a.labels, torch.ones(3))
    assert b.clips.shape == (0, 3, CLIP_LEN, s, s) and b.labels.shape == (0,)
    assert float(a.clips.min()) >= 0.0 and float(a.clips.max()) <= 1.0
    # The crop is centred on the lesion: bright middle, dark margin.
    assert float(a.clips[:, :, :, s // 2, s // 2].min()) > 0.7
    assert float(a.clips[:, :, :, 0, 0].max()) < 0.3


def test_detector_frames_resized_with_boxes(site):
    units = build_units(site, TINY, split="train", frame_stride=3, max_frames_per_video=4)
    det_a, det_b = units.detector
    size = TINY.detector.image_size
    assert (
        len(det_a.images) == 8 and len(det_b.images) == 4
    )  # 7 strided frames per video, capped at 4
    assert all(im.shape == (3, size, size) for im in det_a.images + det_b.images)
    # a1: frames 0, 6, 12, 18 (evenly spaced among 0, 3, ..., 18) all carry the box.
    expected = torch.tensor([[20.0, 10.0, 36.0, 30.0]]) * torch.tensor(
        [size / WIDTH, size / HEIGHT, size / WIDTH, size / HEIGHT]
    )
    for target in det_a.targets[:4]:
        torch.testing.assert_close(target["boxes"], expected)
        assert target["labels"].tolist() == [1]
    for target in det_b.targets:
        assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64


def test_split_selects_patients(site):
    units = build_units(site, TINY, split="val", frame_stride=5, max_frames_per_video=10)
    assert [u.patient_id for u in units.classifier] == ["C"]
    assert len(units.classifier[0].clips) == 2


def test_synthetic_site(tmp_path):
    from common.data import manifest
    from deploy import synth

    synth.generate_site(
        tmp_path, site="s", patients=4, seed=0, vendor="vendor-a", frames=16, size=64
    )
    site = manifest.load_site(tmp_path)
    for split in sorted({row.split for row in site.rows}):
        units = build_units(site, TINY, split=split, frame_stride=4, max_frames_per_video=3)
        rows = [row for row in site.rows if row.split == split]
        patients = sorted({row.patient_id for row in rows})
        assert [u.patient_id for u in units.detector] == patients
        assert [u.patient_id for u in units.classifier] == patients
        for clip_unit in units.classifier:
            expected = sum(
                len(consecutive_windows(sorted(site.boxes.get(row.video, {})), CLIP_LEN))
                for row in rows
                if row.patient_id == clip_unit.patient_id
            )
            assert clip_unit.clips.shape[0] == expected == len(clip_unit.labels)
            assert clip_unit.clips.shape[1:] == (3, CLIP_LEN, 64, 64)
        # 16 frames at stride 4 give 4 per video, capped at 3.
        for frame_unit in units.detector:
            n_videos = sum(row.patient_id == frame_unit.patient_id for row in rows)
            assert len(frame_unit.images) == 3 * n_videos
