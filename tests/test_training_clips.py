"""Options that bring training units closer to inference: detector-track clips, preprocessing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from common.config import (
    SiteConfig,
    SiteIdentity,
    SitePrivacy,
    SiteTraining,
    load_site_config,
    render_site_config,
)
from common.data.units import build_units
from common.data.video import read_video, write_video
from common.errors import ConfigError, UsageError
from common.geometry import crop_clip
from common.models.presets import get_preset
from common.pipeline.config import PipelineConfig, PreprocessConfig
from common.pipeline.preprocess import preprocess_frames
from common.pipeline.run import detector_clip_windows
from common.privacy.settings import DPSettings

TINY = get_preset("tiny")
CLIP_LEN, CLIP_SIZE = TINY.classifier.clip_len, TINY.classifier.clip_size
HEIGHT, WIDTH, FRAMES = 48, 64, 20
GT_BOX = (20.0, 10.0, 36.0, 30.0)
# The stub detector's box, in video pixels: the top-left quarter of the frame.
DETECTED_BOX = (0.0, 0.0, WIDTH / 2, HEIGHT / 2)


class _QuarterDetector(nn.Module):
    """Finds one lesion, the top-left quarter of every frame, and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.roi_heads = SimpleNamespace(score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        side = images[0].shape[-1]
        box = torch.tensor([[0.0, 0.0, side / 2, side / 2]])
        return [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.ones(1)}] * len(
            images
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Patient A: two train videos with ground-truth boxes; B: a train video without any."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    rows, boxes = [], {}
    videos = {
        "a1.mp4": ("A", "malignant", range(0, 19)),  # two ground-truth clips
        "a2.mp4": ("A", "malignant", range(10, 18)),  # one
        "b1.mp4": ("B", "benign", []),  # none
    }
    for name, (patient, label, boxed) in videos.items():
        frames = rng.integers(20, 60, (FRAMES, HEIGHT, WIDTH), dtype=np.uint8)
        frames[:, 10:30, 20:36] = 220
        write_video(root / name, frames, fps=10)
        rows.append(SimpleNamespace(video=name, patient_id=patient, label=label, split="train"))
        boxes[name] = dict.fromkeys(boxed, GT_BOX)
    return SimpleNamespace(root=root, rows=rows, boxes=boxes, problems=[])


def _units(site, **options):
    return build_units(site, TINY, split="train", frame_stride=5, max_frames_per_video=2, **options)


def _source(detector):
    return detector_clip_windows(
        detector, image_size=TINY.detector.image_size, clip_len=CLIP_LEN, config=PipelineConfig()
    )


def _crops(site, video, windows, box):
    frames = read_video(site.root / video)
    return [crop_clip(frames, window, [box] * CLIP_LEN, CLIP_SIZE) for window in windows]


def test_fraction_one_trains_on_detector_tracks_only(site):
    detector = _QuarterDetector()

    units = _units(site, detector_clips=_source(detector), detector_track_fraction=1.0)

    a, b = units.classifier
    # Each 20-frame video is one detected track: clips of frames 0-7 and 8-15.
    windows = [list(range(0, 8)), list(range(8, 16))]
    expected_a = _crops(site, "a1.mp4", windows, DETECTED_BOX)
    expected_a += _crops(site, "a2.mp4", windows, DETECTED_BOX)
    assert torch.equal(a.clips[:, :1], torch.stack(expected_a))
    assert a.labels.tolist() == [1.0] * 4
    # B has no ground-truth box, yet its detector track gives clips, labelled benign.
    assert torch.equal(b.clips[:, :1], torch.stack(_crops(site, "b1.mp4", windows, DETECTED_BOX)))
    assert b.labels.tolist() == [0.0, 0.0]
    # The boxes are the detector's, not the ground truth's.
    ground_truth = _crops(site, "a1.mp4", windows, GT_BOX)
    assert not any(torch.equal(a.clips[i, :1], gt) for i in range(4) for gt in ground_truth)
    # The detector units (and so the detector's training) are unchanged.
    plain = _units(site)
    for mixed_unit, plain_unit in zip(units.detector, plain.detector, strict=True):
        assert all(
            torch.equal(x, y) for x, y in zip(mixed_unit.images, plain_unit.images, strict=True)
        )


def test_fraction_zero_trains_on_ground_truth_only(site):
    detector = _QuarterDetector()

    units = _units(site, detector_clips=_source(detector), detector_track_fraction=0.0)

    plain = _units(site)
    for mixed, gt_only in zip(units.classifier, plain.classifier, strict=True):
        assert torch.equal(mixed.clips, gt_only.clips)
        assert torch.equal(mixed.labels, gt_only.labels)
    assert [len(u.clips) for u in units.classifier] == [3, 0]
    assert detector.calls == 0  # not even run


def test_half_mixes_both_per_video(site):
    units = _units(site, detector_clips=_source(_QuarterDetector()), detector_track_fraction=0.5)

    a, b = units.classifier
    # a1: 1 of 2 ground-truth clips (the first) + 1 of 2 detected (the first);
    # a2: 0 of 1 ground-truth clip + 1 of 2 detected; b1: 1 of 2 detected.
    first = [list(range(0, 8))]
    expected = [
        *_crops(site, "a1.mp4", first, GT_BOX),
        *_crops(site, "a1.mp4", first, DETECTED_BOX),
        *_crops(site, "a2.mp4", first, DETECTED_BOX),
    ]
    assert torch.equal(a.clips[:, :1], torch.stack(expected))
    assert len(b.clips) == 1


def test_bad_fraction_or_missing_detector_is_refused(site):
    with pytest.raises(UsageError, match="detector_track_fraction must be in"):
        _units(site, detector_clips=_source(_QuarterDetector()), detector_track_fraction=1.5)
    with pytest.raises(UsageError, match="needs detector_clips"):
        _units(site, detector_track_fraction=0.5)


def test_preprocess_applies_to_detector_frames_and_clips(site):
    config = PreprocessConfig()

    units = _units(site, preprocess=config)

    frames = preprocess_frames(read_video(site.root / "a1.mp4"), config)
    clip = crop_clip(frames, list(range(0, 8)), [GT_BOX] * CLIP_LEN, CLIP_SIZE)
    assert torch.equal(units.classifier[0].clips[0, :1], clip)
    assert not torch.equal(_units(site).classifier[0].clips[0, :1], clip)
    resized = torch.from_numpy(frames[:1]).float().div(255).unsqueeze(1)
    image = torch.nn.functional.interpolate(
        resized, size=(TINY.detector.image_size,) * 2, mode="bilinear", antialias=True
    ).clamp(0, 1)[0]
    torch.testing.assert_close(units.detector[0].images[0][:1], image)


def _site_config(tmp_path: Path, fraction: float) -> SiteConfig:
    model = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    return SiteConfig(
        site=SiteIdentity(name="s", data=tmp_path, state=tmp_path, device="cpu", threads=1),
        privacy=SitePrivacy(
            epsilon_budget=8.0,
            delta=1e-5,
            accountant="rdp",
            require_secure_aggregation=True,
            detector=model,
            classifier=model,
        ),
        training=SiteTraining(
            frame_stride=2,
            max_frames_per_video=8,
            max_local_steps=3,
            detector_track_fraction=fraction,
        ),
    )


def test_site_config_states_the_fraction_and_defaults_to_ground_truth(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(render_site_config(_site_config(tmp_path, 0.25)))
    assert load_site_config(path).training.detector_track_fraction == 0.25
    assert "detector_track_fraction = 0.25" in path.read_text()
    path.write_text(path.read_text().replace("detector_track_fraction = 0.25", ""))
    assert load_site_config(path).training.detector_track_fraction == 0.0
    path.write_text(render_site_config(_site_config(tmp_path, 0.25)).replace("0.25", "1.5"))
    with pytest.raises(ConfigError, match="detector_track_fraction"):
        load_site_config(path)


def test_the_site_mixes_detector_tracks_into_training_clips_only(tmp_path):
    """SiteClient passes its configured fraction and the round's detector to training units,
    and keeps validation on ground-truth tracks so that rounds stay comparable."""
    from rich.console import Console

    from client.site import SiteClient
    from deploy.demo import DemoSettings, prepare_sites

    (path, *_) = prepare_sites(
        tmp_path, DemoSettings(sites=3, patients=4, frames=16, size=64), Console(quiet=True)
    )
    config = load_site_config(path)
    training = config.training.model_copy(update={"detector_track_fraction": 1.0})
    client = SiteClient(
        config.model_copy(update={"training": training}),
        {"preset": "tiny", "local-steps": 1, "learning-rate": 0.05},
    )
    detector = _QuarterDetector()
    mixed = client._units("train", detector)
    assert detector.calls > 0
    assert sum(len(u.clips) for u in mixed.classifier) > 0

    calls = detector.calls
    client._units("val", detector)
    assert detector.calls == calls  # validation never runs the detector
