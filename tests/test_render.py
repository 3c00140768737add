"""What ``busfed predict`` draws: the annotated video's layout and risk strip, the heatmap's frames.

The results are built by hand (no model), so each test knows which clip covers which frame
and with what probability.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.geometry import Box, clip_region
from common.pipeline.clip import ClipPlan
from common.pipeline.config import PipelineConfig
from common.pipeline.render import (
    MIN_IMAGE_HEIGHT,
    annotate_frames,
    frame_layout,
    frame_risk,
    heatmap_frames,
    save_heatmap,
)
from common.pipeline.run import ClipResult, VideoResult
from common.pipeline.score import categorise
from common.pipeline.track import Track

LESION: Box = (40.0, 50.0, 72.0, 78.0)
OTHER: Box = (80.0, 90.0, 100.0, 110.0)


def _video(n_frames: int, height: int, width: int) -> np.ndarray:
    """Textured frames (a smooth upscale differs from a blocky one) with a bright header."""
    rng = np.random.default_rng(0)
    frames = rng.integers(40, 200, (n_frames, height, width), dtype=np.uint8)
    frames[:, : height // 8] = 250  # where a scanner burns in its header
    return frames


def _clip(track_id: int, frames: list[int], p: float, box: Box = LESION) -> ClipResult:
    plan = ClipPlan(
        track_id=track_id,
        frames=tuple(frames),
        boxes=(box,) * len(frames),
        interpolated=(False,) * len(frames),
        region=clip_region([box]),
    )
    cam = np.linspace(-1.0, 1.0, len(frames) * 16 * 16, dtype=np.float32)
    return ClipResult(plan, p, cam.reshape(len(frames), 16, 16))


def _result(frames: np.ndarray, clips: list[ClipResult], tracks: list[Track]) -> VideoResult:
    score = float(np.mean([c.probability for c in clips])) if clips else None
    return VideoResult(
        score=score,
        category=None if score is None else categorise(score),
        no_lesion_tracked=not clips,
        tracks=tracks,
        clips=clips,
        n_frames=len(frames),
        frame_shape=(frames.shape[1], frames.shape[2]),
        config=PipelineConfig(),
    )


def _track(track_id: int, frames: range, box: Box = LESION) -> Track:
    return Track(track_id, dict.fromkeys(frames, box), dict.fromkeys(frames, 0.9))


@pytest.mark.parametrize(
    ("shape", "image"),
    [((128, 128), (512, 512)), ((101, 75), (512, 380)), ((600, 800), (600, 800))],
)
def test_a_small_video_is_scaled_up_to_512_pixels_high_and_a_large_one_kept(shape, image):
    frames = _video(2, *shape)

    annotated = annotate_frames(frames, _result(frames, [], []))

    layout = frame_layout(shape)
    assert (layout.image_height, layout.image_width) == image
    assert annotated.shape == (2, layout.height, layout.width, 3)
    assert annotated.shape[1] >= MIN_IMAGE_HEIGHT
    assert annotated.shape[1] % 2 == 0 and annotated.shape[2] % 2 == 0  # yuv420p
    assert layout.panel_width >= 300 and layout.band_height >= 60


def test_nothing_but_the_boxes_is_drawn_on_the_image():
    frames = _video(16, 128, 128)
    clip = _clip(0, list(range(8)), 0.9)
    tail = _track(1, range(8, 12), OTHER)  # too short for a clip: a yellow box
    result = _result(frames, [clip], [_track(0, range(8)), tail])

    annotated = annotate_frames(frames, result)

    layout = frame_layout((128, 128))
    scale = layout.scale_x
    for f, box in ((3, LESION), (9, OTHER), (14, None)):
        expected = np.asarray(
            Image.fromarray(frames[f]).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)
        )
        image = annotated[f, :512, :512]
        untouched = np.ones((512, 512), dtype=bool)
        if box is not None:
            x1, y1, x2, y2 = (round(v * scale) for v in box)
            untouched[y1 - 4 : y2 + 4, x1 - 4 : x2 + 4] = False
            # The box is drawn: its left edge is not the image's grey.
            edge = image[y1 + 10 : y2 - 10, x1 + 1]
            assert (edge[:, 0] != edge[:, 2]).all()
            # Inside the box the image is untouched too.
            inside = (slice(y1 + 8, y2 - 8), slice(x1 + 8, x2 - 8))
            assert np.array_equal(image[inside], expected[inside])
        # No text over the image, the scanner's header included.
        assert np.array_equal(image[untouched], expected[untouched])
    # The verdict is in the panel: its text is drawn there.
    panel = annotated[0, :100, 512:]
    assert (panel.max(axis=2) > 200).sum() > 500


def test_the_risk_strip_is_red_for_a_malignant_clip_blue_for_a_benign_one_grey_elsewhere():
    frames = _video(32, 128, 128)
    clips = [
        _clip(0, list(range(0, 8)), 0.95),
        _clip(0, list(range(16, 24)), 0.05),
        _clip(1, list(range(4, 12)), 0.3, OTHER),  # overlaps the first: the strip shows max
    ]
    result = _result(frames, clips, [_track(0, range(24)), _track(1, range(4, 12), OTHER)])

    risk = frame_risk(result)
    annotated = annotate_frames(frames, result)

    np.testing.assert_allclose(risk[[0, 7, 8, 11, 16, 23]], [0.95, 0.95, 0.3, 0.3, 0.05, 0.05])
    assert np.isnan(risk[12:16]).all() and np.isnan(risk[24:]).all()
    layout = frame_layout((128, 128))
    _, y0, _, y1 = layout.strip_box

    def cell(f: int) -> np.ndarray:
        left, right = layout.frame_cell(f, 32)
        return annotated[28, (y0 + y1) // 2, (left + right) // 2].astype(int)

    high, middle, low, none = cell(3), cell(9), cell(20), cell(14)
    assert high[0] > high[2] + 100  # red
    assert low[2] > low[0] + 100  # blue
    assert abs(middle[0] - middle[2]) < abs(high[0] - high[2])  # paler than 0.95
    assert none[0] == none[1] == none[2]  # grey


def test_the_strip_marks_the_current_frame():
    frames = _video(32, 128, 128)
    result = _result(frames, [], [])

    annotated = annotate_frames(frames, result)

    layout = frame_layout((128, 128))
    _, y0, _, _ = layout.strip_box
    row = y0 - 6  # in the marker's triangle, above the cells
    for f in (0, 20):
        left, right = layout.frame_cell(f, 32)
        x = (left + right) // 2
        assert annotated[f, row, x].min() > 200
        assert annotated[31 - f, row, x].max() < 60


def test_heatmap_panels_are_distinct_frames_of_the_most_suspicious_clips(tmp_path: Path):
    frames = _video(80, 128, 128)
    clips = [
        _clip(0, list(range(10, 18)), 0.9),
        _clip(1, list(range(10, 18)), 0.8),  # same frames, another track: the middle is taken
        _clip(2, [13, 13, 13, 14, 14, 14, 14, 14], 0.7),  # a short track's: all taken
        _clip(3, list(range(40, 48)), 0.2),
        _clip(4, list(range(60, 68)), 0.1),
    ]
    result = _result(frames, clips, [])

    chosen = heatmap_frames(result)

    assert [f for f, _, _ in chosen] == [13, 14, 44, 64]
    assert [clip.probability for _, clip, _ in chosen] == [0.8, 0.9, 0.2, 0.1]
    for f, clip, i in chosen:
        assert clip.plan.frames[i] == f
    save_heatmap(tmp_path / "heatmap.png", frames, result)
    with Image.open(tmp_path / "heatmap.png") as png:
        width, height = png.size
    assert height >= 512 and width >= 4 * 400


def test_heatmap_without_a_clip_shows_one_frame(tmp_path: Path):
    frames = _video(8, 64, 64)
    result = _result(frames, [], [])

    assert heatmap_frames(result) == []
    save_heatmap(tmp_path / "heatmap.png", frames, result)
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n_clips", [1, 4])
def test_the_heatmap_title_fits_its_figure(tmp_path: Path, monkeypatch, n_clips: int):
    """One clip gives a narrow figure; its title once ran off the right edge."""
    import common.pipeline.render as render

    frames = _video(80, 128, 128)
    clips = [_clip(k, list(range(10 * k, 10 * k + 8)), 0.2 * k + 0.1) for k in range(n_clips)]
    figures = []
    monkeypatch.setattr(render.plt, "close", figures.append)

    save_heatmap(tmp_path / "heatmap.png", frames, _result(frames, clips, []))

    (figure,) = figures
    title = figure.get_suptitle()
    assert "BI-RADS" in title and ("clips" in title) == (n_clips > 1)
    box = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= figure.bbox.width
