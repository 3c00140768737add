"""``busfed predict`` and ``busfed evaluate``: the trained WAUVE pipeline applied to videos.

``predict_command`` and ``evaluate_command`` are plain Typer command functions; the
``busfed`` app mounts them, and ``predict_app`` registers both for tests. Each turns a
``BusfedError`` into its documented exit code itself, so it behaves the same either way.

MODEL is a local model version folder (``weights.pt`` + ``model.json``, as
``server.tracking.Tracker.register_round`` logs it) or an MLflow URI ``models:/NAME/VERSION``
(also ``models:/NAME@ALIAS`` and ``runs:/RUN_ID/PATH``), downloaded from the registry at
``--tracking-uri`` (default: the ``MLFLOW_TRACKING_URI`` environment variable).
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.cli import exit_codes
from common.errors import DataError, TrackingError, UsageError
from common.pipeline.config import PipelineConfig, PreprocessConfig

if TYPE_CHECKING:
    from common.data.manifest import ManifestRow
    from common.models.bundle import ModelBundle, WauveBundle
    from common.pipeline.run import VideoResult

# torch, the models and MLflow are imported inside the commands: mounted in ``busfed``, this
# module must not slow down every other command (importing torch takes seconds).

MLFLOW_SCHEMES = ("models:/", "runs:/")
DEFAULTS = PipelineConfig()
FALLBACK_SCORE = 0.0
OPERATING_POINT = "BI-RADS 4A or above (biopsy recommended): score > the category 3 bound"

console = Console(highlight=False)

EXIT_HELP = (
    "Exit codes:\n"
    "0  success\n"
    "2  bad usage: a bad option, or an MLflow URI without a tracking URI\n"
    "3  unreadable input: a missing, corrupt or unsupported video, manifest or model folder\n"
    "6  MLflow could not resolve or download the model version"
)

PREDICT_HELP = (
    "Score one video: cancer-risk score, BI-RADS-aligned category, boxes and heatmaps.\n\n"
    "Writes DIR/report.json (score, category, tracks, per-clip probabilities with frame "
    "ranges and boxes in video pixels, model, pipeline settings), DIR/annotated.mp4 (the "
    "video with boxes, clip probabilities and the score) and DIR/heatmap.png (class "
    "activation maps of the most suspicious clips: red towards malignant, blue towards "
    "benign). A video where no lesion is tracked gets score null and says so in all "
    "three.\n\n" + EXIT_HELP
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
    "per video, with metrics per mode.\n\n" + EXIT_HELP
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
    preprocess: PreprocessOption = False,
    device: DeviceOption = "cpu",
) -> None:
    from common.data.video import probe_video, read_video, write_video_rgb
    from common.pipeline.render import annotate_frames, report_dict, save_heatmap
    from common.pipeline.run import run_pipeline

    with exit_codes():
        config = PipelineConfig(
            score_threshold=score_threshold,
            max_gap=max_gap,
            cams=True,
            preprocess=PreprocessConfig() if preprocess else None,
        )
        _check_out(out)
        # The video first: a bad file fails before a model is downloaded.
        frames = read_video(video)
        fps = probe_video(video).fps
        bundle, model_info = load_model(model, tracking_uri=tracking_uri)
        wauve = _wauve(bundle, "busfed predict")
        _to_device(bundle, device)
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
    preprocess: PreprocessOption = False,
    device: DeviceOption = "cpu",
) -> None:
    from common.data.manifest import load_site
    from common.data.units import SPLITS
    from common.data.video import read_video
    from common.models.bundle import KeyFrameBundle
    from common.pipeline.run import run_pipeline

    with exit_codes():
        if split != "all" and split not in SPLITS:
            raise UsageError(f"--split must be one of {', '.join(SPLITS)} or all, got {split!r}")
        _check_out(out)
        config = PipelineConfig(
            boxes_source=(boxes or BoxesSource.detector).value,
            score_threshold=score_threshold,
            max_gap=max_gap,
            preprocess=PreprocessConfig() if preprocess else None,
        )
        # Probing every video validates the boxes against frame counts and sizes; bad rows
        # are skipped and listed in metrics.json.
        site = load_site(data)
        rows = [row for row in site.rows if split in ("all", row.split)]
        if not rows:
            raise DataError(f"{data}: no usable video in split {split!r}")
        bundle, model_info = load_model(model, tracking_uri=tracking_uri)
        _to_device(bundle, device)
        if isinstance(bundle, KeyFrameBundle):
            if boxes is BoxesSource.detector:
                raise UsageError(
                    "a keyframe2d model has no detector: it reads the site's annotated boxes "
                    "(--boxes gt, the default for it)"
                )
            from deploy.keyframe_eval import evaluate_key_frames

            summary = evaluate_key_frames(
                bundle, site, rows, out=out,
                threshold=float(np.nextafter(config.birads.category_3_max, 1.0)),
                preprocess=config.preprocess, wauve_scores=wauve_scores,
                info={"model": model_info, "data": str(data), "split": split},
                console=console,
            )  # fmt: skip
            console.print(summary, soft_wrap=True)
            return
        if wauve_scores is not None:
            raise UsageError("--wauve-scores is for a keyframe2d model; MODEL is WAUVE")
        wauve = _wauve(bundle, "busfed evaluate")

        records: list[dict[str, Any]] = []
        failures: list[dict[str, str]] = []
        with Progress(
            TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task("", total=len(rows))
            for row in rows:
                progress.update(task, description=row.video)
                try:
                    frames = read_video(site.path(row))
                except DataError as error:
                    # One unreadable video must not end an evaluation; it is listed.
                    failures.append({"video": row.video, "error": str(error)})
                    progress.advance(task)
                    continue
                result = run_pipeline(frames, wauve, config, gt_boxes=site.boxes.get(row.video, {}))
                records.append(_score_row(row, result))
                progress.advance(task)

        out.mkdir(parents=True, exist_ok=True)
        _write_scores(out / "scores.csv", records)
        metrics = _metrics(records, config)
        metrics.update(
            model=model_info,
            data=str(data),
            split=split,
            pipeline=config.to_dict(),
            n_videos=len(rows),
            n_failed=len(failures),
            failed=failures,
            skipped_rows=[asdict(problem) for problem in site.problems],
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        _plot_roc(out / "roc.png", records, metrics)
    auc = metrics["video_level"]["auc"]
    console.print(
        f"{len(records)} videos scored ({metrics['n_no_lesion_tracked']} without a tracked "
        f"lesion, {len(failures)} unreadable); AUC "
        f"{'n/a' if auc is None else f'{auc:.3f}'} -> {out}",
        soft_wrap=True,
    )


evaluate_command.__doc__ = EVALUATE_HELP

predict_app = typer.Typer(
    help="Apply a trained WAUVE model to videos.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
predict_app.command("predict", help=PREDICT_HELP)(predict_command)
predict_app.command("evaluate", help=EVALUATE_HELP)(evaluate_command)


def load_model(model: str, *, tracking_uri: str | None) -> tuple[ModelBundle, dict[str, Any]]:
    """Load MODEL from a folder or the MLflow registry.

    Returns
    -------
    tuple of ModelBundle and dict
        The models (CPU, eval mode) and where they came from: ``source`` (the folder or
        URI), ``name`` and ``version`` for a ``models:/NAME/VERSION`` URI, and ``card``
        (the saved model.json).

    Raises
    ------
    UsageError
        An MLflow URI without a tracking URI.
    DataError
        The folder or its files are missing or unreadable (the message names the file).
    TrackingError
        MLflow could not resolve or download the URI.
    """
    from common.models.loading import load_bundle_dir

    if not model.startswith(MLFLOW_SCHEMES):
        bundle, card = load_bundle_dir(Path(model))
        return bundle, {"source": str(Path(model).resolve()), "card": card}
    if not tracking_uri:
        raise UsageError(
            f"{model} is an MLflow URI: pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    info: dict[str, Any] = {"source": model, "tracking_uri": tracking_uri}
    if model.startswith("models:/"):
        name, _, version = model.removeprefix("models:/").partition("/")
        info.update(name=name, version=version or None)
    # models:/ URIs resolve through the registry URI, which does not follow the
    # tracking_uri argument of download_artifacts: point both at the given server.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="busfed-model-") as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(
                artifact_uri=model, tracking_uri=tracking_uri, dst_path=tmp
            )
        except MlflowException as error:
            raise TrackingError(f"{model} at {tracking_uri}: {error.message}") from None
        bundle, card = load_bundle_dir(Path(folder))
    return bundle, {**info, "card": card}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")


def _to_device(bundle: ModelBundle, device: str) -> None:
    import torch

    try:
        bundle.to(torch.device(device))
    except (RuntimeError, AssertionError) as error:
        raise UsageError(f"--device {device}: {error}") from None


def _wauve(bundle: ModelBundle, command: str) -> WauveBundle:
    """The bundle as WAUVE's; ``UsageError`` for another model kind."""
    from common.models.bundle import WauveBundle

    if not isinstance(bundle, WauveBundle):
        raise UsageError(
            f"{command} runs the WAUVE video pipeline, and MODEL is a {bundle.kind} model "
            "(busfed evaluate scores a keyframe2d model on a site's annotated videos)"
        )
    return bundle


def _verdict(result: VideoResult) -> str:
    if result.no_lesion_tracked:
        return "no lesion tracked"
    return (
        f"risk score {result.score:.3f}, BI-RADS {result.category} "
        f"({len(result.clips)} clips, {len(result.tracks)} tracks)"
    )


SCORE_COLUMNS = (
    "video", "patient_id", "label", "score", "category", "n_tracks", "n_clips",
    "no_lesion_tracked", "vendor", "birads", "age", "lesion_size_mm",
)  # fmt: skip


def _score_row(row: ManifestRow, result: VideoResult) -> dict[str, Any]:
    """One line of scores.csv; ``birads`` is the manifest's (the radiologist's) category."""
    return {
        "video": row.video,
        "patient_id": row.patient_id,
        "label": row.label,
        "score": result.score,
        "category": result.category,
        "n_tracks": len(result.tracks),
        "n_clips": len(result.clips),
        "no_lesion_tracked": result.no_lesion_tracked,
        "vendor": row.vendor,
        "birads": row.birads,
        "age": row.age,
        "lesion_size_mm": row.lesion_size_mm,
    }


def _write_scores(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, SCORE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})


def _metrics(records: list[dict[str, Any]], config: PipelineConfig) -> dict[str, Any]:
    """Video-level discrimination; videos without a tracked lesion are excluded, and counted.

    A second block scores them ``FALLBACK_SCORE`` (0.0: nothing suspicious was found, the
    reading a negative detector gives) over every scored video, so that a detector that
    misses lesions is not flattered by their exclusion.
    """
    tracked = [r for r in records if not r["no_lesion_tracked"]]
    labels = np.array([r["label"] == "malignant" for r in tracked], dtype=bool)
    scores = np.array([r["score"] for r in tracked], dtype=float)
    all_labels = np.array([r["label"] == "malignant" for r in records], dtype=bool)
    all_scores = np.array(
        [FALLBACK_SCORE if r["no_lesion_tracked"] else r["score"] for r in records], dtype=float
    )
    # Positive call at the biopsy threshold: BI-RADS 4A or above, i.e. above category 3.
    biopsy = float(np.nextafter(config.birads.category_3_max, 1.0))
    return {
        "n_scored": len(records),
        "n_no_lesion_tracked": len(records) - len(tracked),
        "no_lesion_tracked_videos": [r["video"] for r in records if r["no_lesion_tracked"]],
        "no_lesion_tracked_handling": (
            "video_level excludes videos without a tracked lesion (they have no score); "
            f"with_fallback gives them score {FALLBACK_SCORE} (nothing suspicious found) "
            "and keeps every scored video"
        ),
        "video_level": _discrimination(labels, scores, threshold=biopsy),
        "with_fallback": {
            "fallback_score": FALLBACK_SCORE,
            **_discrimination(all_labels, all_scores, threshold=biopsy),
        },
    }


def _discrimination(labels: np.ndarray, scores: np.ndarray, *, threshold: float) -> dict[str, Any]:
    """AUC with DeLong 95% CI, and the confusion table at ``threshold``; None where undefined."""
    from common.metrics import auc_ci, threshold_metrics

    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    block: dict[str, Any] = {
        "n": len(labels), "n_malignant": n_pos, "n_benign": n_neg, "auc": None,
        "auc_ci95": None, "operating_point": OPERATING_POINT, "threshold": threshold,
        "sensitivity": None, "specificity": None,
    }  # fmt: skip
    if n_pos and n_neg:
        ci = auc_ci(labels, scores, direction="<")
        block["auc"] = ci.auc
        if math.isfinite(ci.variance):
            block["auc_ci95"] = [ci.ci_low, ci.ci_high]
    if len(labels):
        at = threshold_metrics(labels, scores, threshold=threshold)
        for name in ("sensitivity", "specificity"):
            value = getattr(at, name).estimate
            block[name] = value if math.isfinite(value) else None
    return block


def _plot_roc(path: Path, records: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    from common.metrics import roc_curve
    from deploy.plots import RocLine, write_roc_png

    tracked = [r for r in records if not r["no_lesion_tracked"]]
    block = metrics["video_level"]
    lines = []
    if block["auc"] is not None:
        labels = np.array([r["label"] == "malignant" for r in tracked], dtype=bool)
        legend = f"AUC {block['auc']:.3f}"
        if block["auc_ci95"] is not None:
            legend += " (95% CI {:.3f}-{:.3f})".format(*block["auc_ci95"])
        scores = np.array([r["score"] for r in tracked], dtype=float)
        lines.append(RocLine(legend, roc_curve(labels, scores, direction="<")))
    title = f"{len(tracked)} videos ({metrics['n_no_lesion_tracked']} untracked excluded)"
    write_roc_png(path, lines, title=title)
