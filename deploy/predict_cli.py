"""``busfed predict`` and ``busfed evaluate``: the trained WAUVE pipeline applied to videos.

``predict_command`` and ``evaluate_command`` are plain Typer command functions; the
``busfed`` app mounts them, and ``predict_app`` registers both for tests. Each turns a
``BusfedError`` into its documented exit code itself, so it behaves the same either way.

MODEL is a local model version folder or an MLflow URI (``common.evaluation.loading``),
downloaded from the registry at ``--tracking-uri`` (default: the ``MLFLOW_TRACKING_URI``
environment variable). The work is in ``common.pipeline`` (one video) and
``common.evaluation`` (a site's videos, either model kind); this module parses the options,
draws the progress bar and ROC curves, and prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.cli import exit_codes
from common.errors import DataError, UsageError
from common.pipeline.config import PipelineConfig, PreprocessConfig

if TYPE_CHECKING:
    from common.evaluation.scoring import VideoEvaluation
    from common.pipeline.run import VideoResult
    from deploy.plots import RocLine

# torch, the models and MLflow are imported inside the commands: mounted in ``busfed``, this
# module must not slow down every other command (importing torch takes seconds).

DEFAULTS = PipelineConfig()

console = Console(highlight=False)

EXIT_HELP = (
    "Exit codes:\n"
    "0  success\n"
    "2  bad usage: a bad option, or an MLflow URI without a tracking URI\n"
    "3  unreadable input: a missing, corrupt or unsupported video (text or a still image "
    "is not one; predict needs at least a clip's frames), manifest or model folder\n"
    "6  MLflow could not resolve or download the model version"
)

PREDICT_HELP = (
    "Score one video: cancer-risk score, BI-RADS-aligned category, boxes and heatmaps.\n\n"
    "Writes DIR/report.json (score, category, tracks, per-clip probabilities with frame "
    "ranges and boxes in video pixels, model, pipeline settings), DIR/annotated.mp4 (the "
    "video at its own resolution, or scaled up to 512 pixels high, with only the lesion "
    "boxes on the image; beside it the score and BI-RADS category, the colour scale, each "
    "box's clip probability and a per-frame risk strip) and DIR/heatmap.png (class "
    "activation maps on distinct frames of the most suspicious clips: red towards "
    "malignant, blue towards benign). A video where no lesion is tracked gets score null "
    "and says so in all three.\n\n" + EXIT_HELP
)

EVALUATE_HELP = (
    "Score every video of a site's split and measure discrimination against the labels.\n\n"
    "Writes DIR/scores.csv (one row per video), DIR/metrics.json (video-level AUC with "
    "DeLong 95% CI, sensitivity and specificity at the biopsy threshold, videos without a "
    "tracked lesion and how they were handled) and DIR/roc.png. --boxes gt uses the site's "
    "ground-truth boxes instead of the detector, to measure the classifier alone.\n\n"
    "A keyframe2d model (the 2D comparator) reads the annotated boxes and writes "
    "score_keyframe1 (the key frame: largest box), score_keyframe2 (with the key frame of "
    "the patient's most orthogonal other sweep) and score_allframes (every annotated frame) "
    "per video, with metrics per mode.\n\n"
    "A detector model (WAUVE's detector alone) is run on the split's frames and still key "
    "frames: DIR/metrics.json gives its recall and average precision at IoU 0.5 with 95% "
    "CIs from a patient-level bootstrap (1,000 resamples, fixed seed).\n\n" + EXIT_HELP
)


class BoxesSource(StrEnum):
    detector = "detector"
    gt = "gt"


ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        metavar="MODEL",
        help="Model folder (weights.pt + model.json) or MLflow URI models:/NAME/VERSION.",
    ),
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI for a models:/ MODEL.",
    ),
]
DeviceOption = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 ...")]
ScoreThresholdOption = Annotated[
    float, typer.Option(help="Detector score above which a box is kept.")
]
MaxGapOption = Annotated[
    int, typer.Option(min=0, help="Missed frames a lesion track survives (interpolated).")
]
MinTrackOption = Annotated[
    int,
    typer.Option(
        min=0,
        help="A lesion track shorter than a clip but at least this many frames long is "
        "scored from its frames resampled (0: dropped, as in the WAUVE paper).",
    ),
]
PreprocessOption = Annotated[
    bool,
    typer.Option(
        help="Lee speckle filter and contrast stretch first (off: training does not do it)."
    ),
]


def predict_command(
    video: Annotated[Path, typer.Argument(metavar="VIDEO", help="The ultrasound video.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the outputs.")],
    tracking_uri: TrackingUriOption = None,
    score_threshold: ScoreThresholdOption = DEFAULTS.score_threshold,
    max_gap: MaxGapOption = DEFAULTS.max_gap,
    min_track_frames: MinTrackOption = DEFAULTS.min_track_frames,
    preprocess: PreprocessOption = False,
    device: DeviceOption = "cpu",
) -> None:
    from common.data.video import probe_video, read_video, write_video_rgb
    from common.evaluation.loading import as_wauve, to_device
    from common.pipeline.render import annotate_frames, report_dict, save_heatmap
    from common.pipeline.run import run_pipeline
    from server.registry import load_model

    with exit_codes():
        config = PipelineConfig(
            score_threshold=score_threshold,
            max_gap=max_gap,
            min_track_frames=min_track_frames,
            cams=True,
            preprocess=PreprocessConfig() if preprocess else None,
        )
        _check_out(out)
        # The video first: a bad file fails before a model is downloaded.
        frames = read_video(video)
        fps = probe_video(video).fps
        bundle, model_info = load_model(model, tracking_uri=tracking_uri)
        wauve = as_wauve(bundle, "busfed predict")
        _check_clip_frames(video, len(frames), wauve.preset.classifier.clip_len, config)
        to_device(bundle, device)
        result = run_pipeline(frames, wauve, config)

        out.mkdir(parents=True, exist_ok=True)
        report = report_dict(result, video=str(video), model=model_info)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_video_rgb(
            out / "annotated.mp4",
            annotate_frames(frames, result),
            fps=max(1, round(fps)) if fps > 0 else 10,
        )
        save_heatmap(out / "heatmap.png", frames, result)
    console.print(f"{video}: {_verdict(result)} -> {out}", soft_wrap=True)


predict_command.__doc__ = PREDICT_HELP


def evaluate_command(
    model: ModelOption,
    data: Annotated[
        Path, typer.Option("--data", metavar="SITE_DIR", help="Site folder with manifest.csv.")
    ],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for the outputs.")],
    split: Annotated[
        str, typer.Option(help="Split to score: train, val, test, or all (a held-out site).")
    ] = "test",
    boxes: Annotated[
        BoxesSource | None,
        typer.Option(
            help="Lesion boxes from the detector (WAUVE's default) or the ground truth (the "
            "only source of a keyframe2d model, which has no detector)."
        ),
    ] = None,
    wauve_scores: Annotated[
        Path | None,
        typer.Option(
            metavar="SCORES_CSV",
            help="keyframe2d model only: a WAUVE evaluation's scores.csv of the same videos; "
            "its score is copied in as score_wauve, for busfed metrics' DeLong tests.",
        ),
    ] = None,
    tracking_uri: TrackingUriOption = None,
    score_threshold: ScoreThresholdOption = DEFAULTS.score_threshold,
    max_gap: MaxGapOption = DEFAULTS.max_gap,
    min_track_frames: MinTrackOption = DEFAULTS.min_track_frames,
    preprocess: PreprocessOption = False,
    device: DeviceOption = "cpu",
) -> None:
    import torch

    from common.data.manifest import load_site
    from common.data.units import SPLITS
    from common.evaluation.detector import evaluate_detector_site
    from common.evaluation.keyframe import read_wauve_scores
    from common.evaluation.loading import to_device
    from common.evaluation.videos import evaluate_videos
    from common.models.bundle import DetectorBundle, KeyFrameBundle
    from server.registry import load_model

    with exit_codes():
        if split != "all" and split not in SPLITS:
            raise UsageError(f"--split must be one of {', '.join(SPLITS)} or all, got {split!r}")
        _check_out(out)
        config = PipelineConfig(
            boxes_source=(boxes or BoxesSource.detector).value,
            score_threshold=score_threshold,
            max_gap=max_gap,
            min_track_frames=min_track_frames,
            preprocess=PreprocessConfig() if preprocess else None,
        )
        # Probing every video validates the boxes against frame counts and sizes; bad rows
        # are skipped and listed in metrics.json.
        site = load_site(data)
        rows = [row for row in site.rows if split in ("all", row.split)]
        if not rows:
            raise DataError(f"{data}: no usable video in split {split!r}")
        bundle, model_info = load_model(model, tracking_uri=tracking_uri)
        to_device(bundle, device)
        if isinstance(bundle, DetectorBundle):
            if boxes is not None or wauve_scores is not None:
                raise UsageError("--boxes and --wauve-scores are not for a detector model")
            splits = SPLITS if split == "all" else (split,)
            metrics = evaluate_detector_site(
                bundle, site, splits=splits, device=torch.device(device),
                info={"model": model_info, "data": str(data), "split": split},
            )  # fmt: skip
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
            (out / "metrics.json").write_text(text)
            console.print(_detector_summary(metrics, out), soft_wrap=True)
            return
        keyframe = isinstance(bundle, KeyFrameBundle)
        if keyframe and boxes is BoxesSource.detector:
            raise UsageError(
                "a keyframe2d model has no detector: it reads the site's annotated boxes "
                "(--boxes gt, the default for it)"
            )
        if not keyframe and wauve_scores is not None:
            raise UsageError("--wauve-scores is for a keyframe2d model; MODEL is WAUVE")
        wauve = read_wauve_scores(wauve_scores) if wauve_scores is not None else None
        with _scoring_progress(len(rows)) as progress:
            evaluation = evaluate_videos(
                bundle, site, rows, config=config, wauve=wauve,
                info={"model": model_info, "data": str(data), "split": split},
                progress=progress,
            )  # fmt: skip
        evaluation.write(out)
        if keyframe:
            _plot_keyframe_rocs(out / "roc.png", evaluation)
            summary = _keyframe_summary(evaluation, out)
        else:
            _plot_wauve_roc(out / "roc.png", evaluation)
            summary = _wauve_summary(evaluation, out)
    console.print(summary, soft_wrap=True)


evaluate_command.__doc__ = EVALUATE_HELP

predict_app = typer.Typer(
    help="Apply a trained WAUVE model to videos.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
predict_app.command("predict", help=PREDICT_HELP)(predict_command)
predict_app.command("evaluate", help=EVALUATE_HELP)(evaluate_command)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")


def _check_clip_frames(video: Path, n_frames: int, clip_len: int, config: PipelineConfig) -> None:
    """``DataError`` if the video is too short to give a single clip, whatever is tracked."""
    from common.pipeline.clip import fewest_clip_frames

    needed = fewest_clip_frames(clip_len=clip_len, min_track_frames=config.min_track_frames)
    if n_frames >= needed:
        return
    resampled = (
        f" ({needed} resampled, --min-track-frames {config.min_track_frames})"
        if needed < clip_len
        else ""
    )
    raise DataError(
        f"{video}: {n_frames} frame{'s' if n_frames != 1 else ''}, "
        f"a clip needs {clip_len}{resampled}"
    )


def _verdict(result: VideoResult) -> str:
    if result.no_lesion_tracked:
        return "no lesion tracked"
    return (
        f"risk score {result.score:.3f}, BI-RADS {result.category} "
        f"({len(result.clips)} clips, {len(result.tracks)} tracks)"
    )


@contextmanager
def _scoring_progress(total: int) -> Iterator[Callable[[int, str], None]]:
    """A progress bar over ``total`` videos, and the callback that moves it."""
    with Progress(
        TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=total)

        def tick(done: int, video: str) -> None:
            progress.update(task, completed=done, description=video)

        yield tick


def _detector_summary(metrics: dict[str, Any], out: Path) -> str:
    def reading(name: str) -> str:
        value, (low, high) = metrics[name], metrics[f"{name}_ci95"]
        if value is None:
            return "n/a (no lesion box)"
        ci = "" if low is None else f" (95% CI {low:.3f}-{high:.3f})"
        return f"{value:.3f}{ci}"

    return (
        f"detector on {metrics['n_images']} images of {metrics['n_patients']} patients, "
        f"{metrics['n_boxes']} lesion boxes: recall@{metrics['iou']} {reading('recall')}, "
        f"AP@{metrics['iou']} {reading('average_precision')} -> {out / 'metrics.json'}"
    )


def _auc_text(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.3f}"


def _wauve_summary(evaluation: VideoEvaluation, out: Path) -> str:
    metrics = evaluation.metrics
    return (
        f"{len(evaluation.records)} videos scored ({metrics['n_no_lesion_tracked']} without a "
        f"tracked lesion, {len(evaluation.failures)} unreadable); AUC "
        f"{_auc_text(metrics['video_level']['auc'])} -> {out}"
    )


def _keyframe_summary(evaluation: VideoEvaluation, out: Path) -> str:
    from common.data.keyframes import KEYFRAME_MODES

    modes = evaluation.metrics["modes"]
    aucs = ", ".join(
        f"{mode} {_auc_text(modes[mode]['video_level']['auc'])}" for mode in KEYFRAME_MODES
    )
    return (
        f"{len(evaluation.records)} videos scored ({evaluation.metrics['n_no_roi']} without a "
        f"lesion box, {len(evaluation.failures)} unreadable); AUC {aucs} -> {out}"
    )


def _roc_line(label: str, records: list[dict[str, Any]], *, column: str, unscored: str) -> RocLine:
    """The ROC curve of ``column`` over the records whose ``unscored`` flag is false."""
    from common.evaluation.discrimination import malignant
    from common.metrics import roc_curve
    from deploy.plots import RocLine

    scored = [r for r in records if not r[unscored]]
    scores = np.array([r[column] for r in scored], dtype=float)
    return RocLine(label, roc_curve(malignant(scored), scores, direction="<"))


def _plot_wauve_roc(path: Path, evaluation: VideoEvaluation) -> None:
    from deploy.plots import write_roc_png

    metrics = evaluation.metrics
    block = metrics["video_level"]
    lines = []
    if block["auc"] is not None:
        legend = f"AUC {block['auc']:.3f}"
        if block["auc_ci95"] is not None:
            legend += " (95% CI {:.3f}-{:.3f})".format(*block["auc_ci95"])
        lines.append(
            _roc_line(legend, evaluation.records, column="score", unscored="no_lesion_tracked")
        )
    title = f"{block['n']} videos ({metrics['n_no_lesion_tracked']} untracked excluded)"
    write_roc_png(path, lines, title=title)


def _plot_keyframe_rocs(path: Path, evaluation: VideoEvaluation) -> None:
    from common.data.keyframes import KEYFRAME_MODES
    from deploy.plots import write_roc_png

    metrics = evaluation.metrics
    lines = [
        _roc_line(
            f"{mode}: AUC {block['auc']:.3f}",
            evaluation.records,
            column=f"score_{mode}",
            unscored="no_roi",
        )
        for mode in KEYFRAME_MODES
        if (block := metrics["modes"][mode]["video_level"])["auc"] is not None
    ]
    n_with_roi = metrics["n_scored"] - metrics["n_no_roi"]
    title = f"2D key-frame model, {n_with_roi} videos ({metrics['n_no_roi']} without ROI)"
    write_roc_png(path, lines, title=title)
