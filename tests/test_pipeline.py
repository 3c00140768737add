"""Inference pipeline stages: tracks, clips, scores, categories, CAMs, oracle boxes, rendering."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from common.data.manifest import load_site
from common.data.units import build_units
from common.data.video import read_video
from common.errors import UsageError
from common.geometry import consecutive_windows
from common.models.bundle import build_bundle
from common.models.presets import get_preset
from common.pipeline.classify import classify_clips
from common.pipeline.clip import crop_clips, plan_clips
from common.pipeline.config import CamMode, PipelineConfig, PreprocessConfig
from common.pipeline.detect import FrameDetections, detect_lesions
from common.pipeline.explain import activation_volume, clip_cams, project_cam
from common.pipeline.preprocess import preprocess_frames
from common.pipeline.render import annotate_frames, frame_layout, report_dict, save_heatmap
from common.pipeline.run import run_pipeline
from common.pipeline.score import BiradsThresholds, categorise, score_video
from common.pipeline.track import Track, gt_tracks, link_tracks
from deploy.synth import generate_site

TINY = get_preset("tiny")
CLIP_LEN = TINY.classifier.clip_len
CLIP_SIZE = TINY.classifier.clip_size


def _frames_with(boxes_per_frame: list[list[tuple[float, float, float, float]]]):
    """FrameDetections from per-frame box lists; the first box of a frame scores highest."""
    return [
        FrameDetections(
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            scores=np.linspace(0.9, 0.6, len(boxes), dtype=np.float32),
        )
        for boxes in boxes_per_frame
    ]


# ------------------------------------------------------------------ track


def test_track_survives_a_short_gap_and_interpolates_it():
    moving = [(10.0 + f, 10.0, 30.0 + f, 30.0) for f in range(12)]
    detections = _frames_with([[box] if f not in (4, 5) else [] for f, box in enumerate(moving)])

    (track,) = link_tracks(detections, link_iou=0.3, max_gap=2)

    assert sorted(track.boxes) == [f for f in range(12) if f not in (4, 5)]
    filled = track.filled_boxes()
    assert sorted(filled) == list(range(12))
    # Linear between frame 3 and frame 6: exactly the box the lesion had.
    assert filled[4] == pytest.approx(moving[4])
    assert filled[5] == pytest.approx(moving[5])


def test_track_ends_after_a_gap_longer_than_max_gap():
    box = (10.0, 10.0, 30.0, 30.0)
    detections = _frames_with([[box] if f not in (4, 5, 6) else [] for f in range(12)])

    tracks = link_tracks(detections, link_iou=0.3, max_gap=2)

    assert [(t.first, t.last) for t in tracks] == [(0, 3), (7, 11)]


def test_track_splits_when_the_box_jumps():
    near, far = (10.0, 10.0, 30.0, 30.0), (40.0, 40.0, 60.0, 60.0)
    detections = _frames_with([[near]] * 5 + [[far]] * 5)

    tracks = link_tracks(detections, link_iou=0.3, max_gap=2)

    assert [(t.first, t.last) for t in tracks] == [(0, 4), (5, 9)]
    assert tracks[1].boxes[5] == far


def test_two_lesions_keep_their_tracks_when_scores_swap():
    left, right = (0.0, 0.0, 20.0, 20.0), (14.0, 0.0, 34.0, 20.0)  # IoU 0.18 with each other
    # Detection order (score order) alternates between frames; assignment must not follow it.
    detections = _frames_with([[left, right] if f % 2 else [right, left] for f in range(6)])

    tracks = link_tracks(detections, link_iou=0.1, max_gap=0)

    assert len(tracks) == 2
    assert {t.boxes[0] for t in tracks} == {left, right}
    for track in tracks:
        assert len(set(track.boxes.values())) == 1


def test_assignment_is_optimal_not_greedy():
    """Greedy would give d1 to A (IoU 0.82), leaving d2 with B at IoU 0.25: a broken track."""
    a, b = (2.0, 0.0, 12.0, 10.0), (6.0, 0.0, 16.0, 10.0)
    d1, d2 = (3.0, 0.0, 13.0, 10.0), (0.0, 0.0, 10.0, 10.0)

    tracks = link_tracks(_frames_with([[a, b], [d1, d2]]), link_iou=0.3, max_gap=0)

    assert [t.boxes for t in tracks] == [{0: a, 1: d2}, {0: b, 1: d1}]


def test_gt_tracks_split_at_gaps_and_ignore_frames_past_the_end():
    box = (1.0, 2.0, 3.0, 4.0)
    boxes = dict.fromkeys([*range(0, 5), *range(7, 10), 12], box)

    tracks = gt_tracks(boxes, n_frames=12)

    assert [sorted(t.boxes) for t in tracks] == [list(range(0, 5)), list(range(7, 10))]
    assert all(score == 1.0 for t in tracks for score in t.scores.values())


# ------------------------------------------------------------------ clip


def test_clips_drop_short_tracks_and_tails():
    box = (10.0, 10.0, 30.0, 30.0)
    short = Track(0, dict.fromkeys(range(0, CLIP_LEN - 1), box), {})
    # 19 frames with a gap at 10: filled, two clips and a dropped tail of 3.
    long_boxes = dict.fromkeys([f for f in range(20, 39) if f != 30], box)
    long = Track(1, long_boxes, {})

    plans = plan_clips([short, long], clip_len=CLIP_LEN)

    assert [p.frames for p in plans] == [tuple(range(20, 28)), tuple(range(28, 36))]
    assert plans[1].interpolated == tuple(f == 30 for f in range(28, 36))
    assert all(p.track_id == 1 for p in plans)


def test_a_short_track_gives_one_resampled_clip_when_asked():
    box = (10.0, 10.0, 30.0, 30.0)
    three = Track(0, {5: box, 7: box}, {})  # frames 5-7 once the gap is filled
    two = Track(1, {40: box, 41: box}, {})
    long = Track(2, dict.fromkeys(range(20, 29), box), {})  # a clip and a tail of 1

    plans = plan_clips([three, two, long], clip_len=CLIP_LEN, min_track_frames=3)

    assert [p.track_id for p in plans] == [0, 2]
    assert plans[0].frames == (5, 5, 6, 6, 6, 6, 7, 7)  # in order, every frame kept
    assert plans[0].interpolated == (False,) * 2 + (True,) * 4 + (False,) * 2
    assert plans[1].frames == tuple(range(20, 28))  # a full track keeps the paper's rule
    assert plan_clips([three, two], clip_len=CLIP_LEN) == []  # default: the paper's rule


def test_no_clip_gives_an_empty_batch_of_the_right_shape():
    clips = crop_clips(np.zeros((4, 32, 32), np.uint8), [], clip_len=CLIP_LEN, clip_size=16)
    assert clips.shape == (0, 3, CLIP_LEN, 16, 16)


# ------------------------------------------------------------------ score and categorise


def test_score_is_the_mean_of_clip_probabilities():
    verdict = score_video([0.2, 0.4, 0.9])
    assert verdict.score == pytest.approx(0.5)
    assert verdict.category == "4B"
    assert not verdict.no_lesion_tracked


def test_no_clip_means_no_lesion_tracked_and_no_score():
    verdict = score_video([])
    assert verdict.score is None
    assert verdict.category is None
    assert verdict.no_lesion_tracked


@pytest.mark.parametrize(
    ("score", "category"),
    [
        (0.0, "3"),
        (0.02, "3"),
        (0.0201, "4A"),
        (0.10, "4A"),
        (0.1001, "4B"),
        (0.50, "4B"),
        (0.5001, "4C"),
        (0.9499, "4C"),
        (0.95, "5"),
        (1.0, "5"),
    ],
)
def test_categorise_boundaries(score, category):
    assert categorise(score) == category


def test_categorise_thresholds_are_configurable_and_checked():
    strict = BiradsThresholds(
        category_3_max=0.01, category_4a_max=0.2, category_4b_max=0.6, category_5_min=0.9
    )
    assert categorise(0.015, thresholds=strict) == "4A"
    assert categorise(0.9, thresholds=strict) == "5"
    with pytest.raises(UsageError, match="increase"):
        BiradsThresholds(category_3_max=0.2, category_4a_max=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        categorise(1.5)


def test_config_reports_every_bad_setting():
    with pytest.raises(UsageError) as error:
        PipelineConfig(score_threshold=1.5, max_gap=-1, link_iou=0.0)
    message = str(error.value)
    assert "score_threshold" in message
    assert "max_gap" in message
    assert "link_iou" in message
    assert json.dumps(PipelineConfig(preprocess=PreprocessConfig()).to_dict())


# ------------------------------------------------------------------ detect


class _FixedDetector(nn.Module):
    """Returns one box covering the top-left quarter of its input, and records its settings."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.roi_heads = SimpleNamespace(score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
        self.seen: list[tuple[float, float, int]] = []

    def forward(self, images):
        heads = self.roi_heads
        self.seen.append((heads.score_thresh, heads.nms_thresh, heads.detections_per_img))
        side = images[0].shape[-1]
        box = torch.tensor([[0.0, 0.0, side / 2, side / 2]])
        return [{"boxes": box, "scores": torch.tensor([0.8]), "labels": torch.ones(1)}] * len(
            images
        )


def test_detector_boxes_are_mapped_back_to_video_pixels():
    detector = _FixedDetector()
    frames = np.zeros((5, 48, 64), np.uint8)

    found = detect_lesions(
        frames,
        detector,  # type: ignore[arg-type]
        image_size=TINY.detector.image_size,
        score_threshold=0.7,
        nms_iou=0.4,
        max_detections=3,
        batch_size=2,
    )

    assert len(found) == 5
    assert found[0].boxes.tolist() == [[0.0, 0.0, 32.0, 24.0]]
    assert detector.seen == [(0.7, 0.4, 3)] * 3  # batches of 2, 2 and 1
    assert (detector.roi_heads.score_thresh, detector.roi_heads.nms_thresh) == (0.05, 0.5)


# ------------------------------------------------------------------ classify and explain


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("tiny", seed=0)


def test_cam_mean_plus_bias_is_the_logit(bundle):
    clips = torch.rand(
        2, 3, CLIP_LEN, CLIP_SIZE, CLIP_SIZE, generator=torch.Generator().manual_seed(0)
    )
    output = classify_clips(bundle.classifier, clips, batch_size=1, keep_features=True)

    assert output.features is not None
    volume = activation_volume(output.features, bundle.classifier.fc)
    logits = volume.mean(dim=(1, 2, 3)) + bundle.classifier.fc.bias.detach()
    np.testing.assert_allclose(logits.numpy(), output.logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(output.probabilities, 1 / (1 + np.exp(-output.logits)))

    modes: tuple[tuple[CamMode, float], ...] = (("signed", -1.0), ("relu", 0.0))
    for mode, low in modes:
        cams = clip_cams(
            output.features, bundle.classifier.fc, clip_len=CLIP_LEN, clip_size=CLIP_SIZE, mode=mode
        )
        assert cams.shape == (2, CLIP_LEN, CLIP_SIZE, CLIP_SIZE)
        assert cams.min() >= low
        assert cams.abs().amax(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 1.0])


def test_cam_is_projected_inside_the_crop_region_only():
    cam = np.ones((CLIP_LEN, 16, 16), np.float32)
    region = (-6.0, 10.0, 20.0, 36.0)  # reaches past the left edge of the frame

    heat = project_cam(cam, region, (48, 64))

    assert heat.shape == (CLIP_LEN, 48, 64)
    rows, cols = np.nonzero(heat[0])
    assert rows.min() + 0.5 >= region[1] and rows.max() + 0.5 <= region[3]
    assert cols.min() == 0 and cols.max() + 0.5 <= region[2]
    assert heat[0, 10:36, 0:20] == pytest.approx(1.0)
    assert not heat[:, :, 20:].any()


def test_cam_projection_inverts_the_crop():
    """A map that varies left to right lands on the frame in the same order."""
    cam = np.tile(np.linspace(-1, 1, 16, dtype=np.float32), (1, 16, 1))
    heat = project_cam(cam, (8.0, 8.0, 40.0, 40.0), (48, 48))[0]
    row = heat[24, 8:40]
    assert np.all(np.diff(row) >= 0)
    assert row[0] < 0 < row[-1]


# ------------------------------------------------------------------ whole pipeline


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "site"
    generate_site(root, site="t", patients=3, seed=0, vendor="vendor-a", frames=24, size=64)
    return load_site(root)


@pytest.fixture(scope="module")
def tracked(site):
    """The first video whose ground truth gives a clip, its frames and boxes."""
    for row in site.rows:
        boxes = site.boxes.get(row.video, {})
        if consecutive_windows(sorted(boxes), CLIP_LEN):
            return row, read_video(site.path(row)), boxes
    raise AssertionError("the synthetic site has no video with a ground-truth clip")


def test_gt_boxes_give_the_training_clips(site, bundle):
    """Oracle mode crops exactly what ``build_units`` trains on, for the same boxes."""
    compared = 0
    for split in ("train", "val", "test"):
        units = build_units(site, TINY, split=split, frame_stride=4, max_frames_per_video=2)
        for unit in units.classifier:
            crops = []
            for row in site.rows:
                if row.patient_id == unit.patient_id:
                    frames = read_video(site.path(row))
                    tracks = gt_tracks(site.boxes.get(row.video, {}), n_frames=len(frames))
                    plans = plan_clips(tracks, clip_len=CLIP_LEN)
                    crops.append(crop_clips(frames, plans, clip_len=CLIP_LEN, clip_size=CLIP_SIZE))
            inference = torch.cat(crops)
            assert torch.equal(inference, unit.clips)
            compared += len(inference)
    assert compared > 0


def test_run_pipeline_with_gt_boxes_scores_every_clip(tracked, bundle):
    _, frames, boxes = tracked

    result = run_pipeline(
        frames, bundle, PipelineConfig(boxes_source="gt", cams=True), gt_boxes=boxes
    )

    assert len(result.clips) == len(consecutive_windows(sorted(boxes), CLIP_LEN)) > 0
    assert not result.no_lesion_tracked and result.score is not None
    assert result.score == pytest.approx(np.mean([c.probability for c in result.clips]))
    assert result.category == categorise(result.score)
    for clip in result.clips:
        assert 0.0 <= clip.probability <= 1.0
        assert clip.cam is not None and clip.cam.shape == (CLIP_LEN, CLIP_SIZE, CLIP_SIZE)
        assert clip.plan.boxes == tuple(boxes[f] for f in clip.plan.frames)


def test_run_pipeline_without_a_detection_says_no_lesion(tracked, bundle):
    _, frames, _ = tracked

    result = run_pipeline(frames, bundle, PipelineConfig(score_threshold=0.999, cams=True))

    assert result.no_lesion_tracked
    assert result.score is None and result.category is None
    assert result.clips == [] and result.tracks == []


def test_gt_mode_needs_boxes(bundle):
    with pytest.raises(UsageError, match="ground-truth"):
        run_pipeline(np.zeros((8, 32, 32), np.uint8), bundle, PipelineConfig(boxes_source="gt"))


# ------------------------------------------------------------------ preprocess


def test_preprocess_smooths_speckle_and_keeps_the_contract():
    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(100, 20, (3, 40, 40)), 0, 255).astype(np.uint8)
    frames[:, 10:30, 10:30] = np.clip(rng.normal(200, 20, (3, 20, 20)), 0, 255)

    lee = preprocess_frames(frames, PreprocessConfig(contrast=False))
    median = preprocess_frames(frames, PreprocessConfig(speckle_filter="median", contrast=False))
    stretched = preprocess_frames(frames, PreprocessConfig(speckle_filter="none"))

    for out in (lee, median, stretched):
        assert out.dtype == np.uint8 and out.shape == frames.shape
    flat = (slice(None), slice(2, 8), slice(2, 38))  # background, away from the edge
    assert lee[flat].std() < 0.7 * frames[flat].std()
    assert median[flat].std() < 0.7 * frames[flat].std()
    assert stretched.min() == 0 and stretched.max() == 255
    with pytest.raises(UsageError, match="window"):
        PreprocessConfig(window=4)


# ------------------------------------------------------------------ render


def test_render_outputs(tracked, bundle, tmp_path: Path):
    row, frames, boxes = tracked
    result = run_pipeline(
        frames, bundle, PipelineConfig(boxes_source="gt", cams=True), gt_boxes=boxes
    )

    report = json.loads(json.dumps(report_dict(result, video=row.video, model={"source": "x"})))
    assert report["n_clips"] == len(report["clips"]) == len(result.clips)
    assert report["clips"][0]["first_frame"] == result.clips[0].first_frame

    annotated = annotate_frames(frames, result)
    layout = frame_layout(result.frame_shape)
    assert annotated.shape == (len(frames), layout.height, layout.width, 3)
    assert annotated.dtype == np.uint8
    clip = result.clips[0]
    f = clip.first_frame
    x1, y1 = clip.plan.boxes[0][:2]
    x, y = round(x1 * layout.scale_x) + 1, round(y1 * layout.scale_y) + 1
    # The clip's box is drawn in colour on the grey frame (scaled up to the output).
    assert len(set(annotated[f, y + 4 : y + 12, x].reshape(-1, 3)[0])) > 1

    save_heatmap(tmp_path / "lesion.png", frames, result)
    empty = run_pipeline(frames, bundle, PipelineConfig(score_threshold=0.999))
    save_heatmap(tmp_path / "empty.png", frames, empty)
    for name in ("lesion.png", "empty.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
