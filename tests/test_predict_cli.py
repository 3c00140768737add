"""``busfed predict`` and ``busfed evaluate``: outputs, exit codes, both ways to name a model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common.data.manifest import load_site
from common.data.video import read_video, write_video
from common.errors import DataError
from common.evaluation.scoring import score_videos
from common.geometry import consecutive_windows
from common.models.bundle import build_bundle
from common.pipeline.config import PipelineConfig
from deploy.predict_cli import predict_app
from deploy.synth import generate_site
from server.tracking import Tracker, model_card

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("tiny", seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bundle) -> Path:
    """A model version folder as ``Tracker.register_round`` logs it."""
    folder = tmp_path_factory.mktemp("model")
    torch.save(
        {"detector": bundle.detector.state_dict(), "classifier": bundle.classifier.state_dict()},
        folder / "weights.pt",
    )
    (folder / "model.json").write_text(json.dumps({**model_card(bundle), "round": 0}))
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Eight patients: enough for both labels in the train split."""
    root = tmp_path_factory.mktemp("eval") / "site"
    generate_site(root, site="e", patients=8, seed=0, vendor="vendor-a", frames=24, size=64)
    return root


@pytest.fixture(scope="module")
def video(site) -> Path:
    return site / load_site(site).rows[0].video


DEFAULTS = PipelineConfig()


def _predict(*args: str):
    return runner.invoke(predict_app, ["predict", *args])


def test_predict_writes_report_annotated_video_and_heatmap(video, model_dir, tmp_path):
    out = tmp_path / "out"

    result = _predict(str(video), "--model", str(model_dir), "--out", str(out))

    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for field in ("score", "category", "no_lesion_tracked", "n_tracks", "n_clips", "clips"):
        assert field in report
    assert report["no_lesion_tracked"] == (report["score"] is None) == (report["n_clips"] == 0)
    assert report["n_clips"] == len(report["clips"])
    assert report["model"]["source"] == str(model_dir.resolve())
    assert report["model"]["card"]["preset"] == "tiny"
    assert report["pipeline"]["boxes_source"] == "detector"
    for clip in report["clips"]:
        # Eight frames: consecutive, or a shorter track's resampled (min_track_frames).
        assert len(clip["frames"]) == len(clip["boxes"]) == 8
        assert clip["frames"] == sorted(clip["frames"])
        span = clip["last_frame"] - clip["first_frame"] + 1
        assert span == 8 or (span < 8 and span >= DEFAULTS.min_track_frames)
        assert 0.0 <= clip["probability"] <= 1.0
    annotated = read_video(out / "annotated.mp4")
    assert len(annotated) == len(read_video(video))
    # A 64-pixel video is shown 512 pixels high, the panel and risk strip beside it.
    assert annotated.shape[1] > 512 and annotated.shape[2] > 512
    assert (out / "heatmap.png").read_bytes()[:8] == PNG


def test_predict_without_a_lesion_still_reports(video, model_dir, tmp_path):
    out = tmp_path / "out"

    result = _predict(
        str(video), "--model", str(model_dir), "--out", str(out), "--score-threshold", "0.999"
    )

    assert result.exit_code == 0, result.output
    assert "no lesion tracked" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["no_lesion_tracked"] is True
    assert report["score"] is None and report["category"] is None
    assert report["clips"] == []
    assert len(read_video(out / "annotated.mp4")) == len(read_video(video))
    assert (out / "heatmap.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("content", [None, b"not a video at all" * 50])
def test_predict_unreadable_video_exits_3_naming_it(model_dir, tmp_path, content):
    video = tmp_path / "scan.mp4"
    if content is not None:
        video.write_bytes(content)

    result = _predict(str(video), "--model", str(model_dir), "--out", str(tmp_path / "out"))

    assert result.exit_code == 3
    assert "scan.mp4" in result.stderr
    assert "[Errno" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_predict_broken_model_folder_exits_3_naming_the_file(video, model_dir, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "weights.pt").write_bytes((model_dir / "weights.pt").read_bytes())
    (broken / "model.json").write_text("{not json")

    result = _predict(str(video), "--model", str(broken), "--out", str(tmp_path / "out"))

    assert result.exit_code == 3
    assert "model.json" in result.stderr


def test_predict_from_the_mlflow_registry(video, bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow may write next to the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(
        tracking_uri=uri,
        artifact_location=str(tmp_path / "artifacts"),
        registered_model="busfed-wauve",
        run_name="test",
    )
    version = tracker.register_round(bundle, server_round=3, tags={"federation": "test"})
    out = tmp_path / "out"

    result = _predict(
        str(video),
        "--model",
        f"models:/busfed-wauve/{version.version}",
        "--tracking-uri",
        uri,
        "--out",
        str(out),
        "--score-threshold",
        "0.999",
    )

    assert result.exit_code == 0, result.output
    model = json.loads((out / "report.json").read_text())["model"]
    assert (model["name"], model["version"]) == ("busfed-wauve", version.version)
    assert model["card"]["round"] == 3

    missing = _predict(
        str(video), "--model", "models:/busfed-wauve/99", "--tracking-uri", uri, "--out",
        str(tmp_path / "missing"),
    )  # fmt: skip
    assert missing.exit_code == 6
    assert "models:/busfed-wauve/99" in missing.stderr


def test_evaluate_with_gt_boxes_writes_scores_metrics_and_roc(site, model_dir, tmp_path):
    out = tmp_path / "eval"

    result = runner.invoke(
        predict_app,
        ["evaluate", "--model", str(model_dir), "--data", str(site), "--out", str(out),
         "--split", "train", "--boxes", "gt"],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    data = load_site(site)
    train = [row for row in data.rows if row.split == "train"]
    # A video whose lesion is never boxed in 8 consecutive frames gives no clip.
    untracked = [
        row.video
        for row in train
        if not consecutive_windows(sorted(data.boxes.get(row.video, {})), 8)
    ]
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["video"] for r in rows] == [row.video for row in train]
    assert {"patient_id", "label", "score", "category", "n_clips", "vendor", "birads"} <= set(
        rows[0]
    )
    for r in rows:
        no_lesion = r["video"] in untracked
        assert r["no_lesion_tracked"] == str(no_lesion)
        assert (r["score"] == "") == no_lesion == (r["n_clips"] == "0")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pipeline"]["boxes_source"] == "gt"
    assert metrics["n_videos"] == len(train)
    assert metrics["no_lesion_tracked_videos"] == untracked
    assert "no_lesion_tracked_handling" in metrics
    assert metrics["with_fallback"]["n"] == len(train)
    train = [row for row in train if row.video not in untracked]
    video_level = metrics["video_level"]
    n_malignant = sum(row.label == "malignant" for row in train)
    assert (video_level["n_malignant"], video_level["n_benign"]) == (
        n_malignant,
        len(train) - n_malignant,
    )
    assert 0.0 <= video_level["auc"] <= 1.0
    if min(n_malignant, len(train) - n_malignant) >= 2:
        low, high = video_level["auc_ci95"]
        assert low <= video_level["auc"] <= high
    else:  # DeLong's variance needs two cases of each class
        assert video_level["auc_ci95"] is None
    assert (out / "roc.png").read_bytes()[:8] == PNG


def test_evaluate_rejects_an_unknown_split(site, model_dir, tmp_path):
    result = runner.invoke(
        predict_app,
        ["evaluate", "--model", str(model_dir), "--data", str(site), "--out", str(tmp_path),
         "--split", "holdout"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "holdout" in result.stderr


def test_the_scoring_loop_lists_unreadable_videos_and_moves_the_progress_bar():
    rows = [SimpleNamespace(video=name) for name in ("a", "b", "c")]

    def read(row):
        if row.video == "b":
            raise DataError("b: corrupt")
        return row.video.upper()

    calls = []
    scored, failures = score_videos(
        rows, read, lambda row, frames: frames * 2, progress=lambda *a: calls.append(a)
    )

    assert [(row.video, score) for row, score in scored] == [("a", "AA"), ("c", "CC")]
    assert failures == [{"video": "b", "error": "b: corrupt"}]
    assert calls == [(0, "a"), (1, "a"), (1, "b"), (2, "b"), (2, "c"), (3, "c")]


def _not_videos(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Inputs FFmpeg would decode as "videos", and the reason each must be refused."""
    from PIL import Image

    text = tmp / "readme.txt"
    text.write_text("# busfed\n\nFederated breast-ultrasound models.\n" * 20)
    image = tmp / "scan.png"
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(image)
    folder = tmp / "sweeps"
    folder.mkdir()
    return {
        "text": (text, f"{text}: not a video: FFmpeg reads it as text"),
        "png": (image, f"{image}: a still image (png), not a video"),
        "folder": (folder, f"{folder}: is a folder, not a file"),
    }


@pytest.mark.parametrize("kind", ["text", "png", "folder"])
def test_predict_refuses_what_is_not_a_video(model_dir, tmp_path, kind):
    path, reason = _not_videos(tmp_path)[kind]

    result = _predict(str(path), "--model", str(model_dir), "--out", str(tmp_path / "out"))

    assert result.exit_code == 3, result.output
    assert reason in result.stderr
    assert "[Errno" not in result.stderr
    assert "no lesion tracked" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("n_frames", "options", "reason"),
    [
        (5, ["--min-track-frames", "0"], "5 frames, a clip needs 8"),
        (2, [], "2 frames, a clip needs 8 (3 resampled, --min-track-frames 3)"),
        (1, ["--min-track-frames", "0"], "1 frame, a clip needs 8"),
    ],
    ids=["short", "short-resampled", "one-frame"],
)
def test_predict_refuses_a_video_shorter_than_a_clip(
    model_dir, tmp_path, n_frames, options, reason
):
    video = tmp_path / "short.mp4"
    write_video(video, np.full((n_frames, 64, 64), 90, np.uint8), fps=10)

    result = _predict(
        str(video), "--model", str(model_dir), "--out", str(tmp_path / "out"), *options
    )

    assert result.exit_code == 3, result.output
    assert f"{video}: {reason}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_predict_accepts_a_video_as_short_as_a_resampled_clip(model_dir, tmp_path):
    video = tmp_path / "short.mp4"
    write_video(video, np.full((DEFAULTS.min_track_frames, 64, 64), 90, np.uint8), fps=10)

    result = _predict(str(video), "--model", str(model_dir), "--out", str(tmp_path / "out"))

    assert result.exit_code == 0, result.output
