"""Inference throughput of the WAUVE pipeline, and its overhead over the bare detector.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_throughput.py [--presets tiny,paper]

For each preset (tiny, paper) and device (CPU, and CUDA when visible), on the same
synthetic sweep, it times ``--tiny-repeats`` / ``--paper-repeats`` runs after one warm-up,
the four steps in turn within each repeat so that a shared machine's load affects them
alike, and prints two tables: the median run (the typical cost) and the best run (the
least disturbed by other work):

* detector alone: the Faster R-CNN's forward passes on the already resized frames, in the
  pipeline's batches: the floor any detector-driven pipeline pays;
* detect + track + crop: the stages before the classifier (resize, detector, tracking,
  clip cropping); its overhead over the detector alone is the pipeline's glue;
* whole pipeline, detector boxes: ``run_pipeline`` end to end (resize, detect, track, clip,
  classify, score) with untrained weights. An untrained detector's boxes are noise, so
  how many clips it leaves to classify varies (the count is shown);
* pipeline, ground-truth boxes: ``run_pipeline`` in oracle mode with one lesion box on
  every frame, so no detector and every frame in a clip: the classifier's share of the
  work when a lesion is tracked through the whole sweep.

Throughput is video frames per second (f/s); overhead is the time over the detector-alone
time, minus one. The paper preset runs on a short sweep (``--paper-frames``, default one
clip's worth) to stay within minutes on a CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from timing import STATISTICS, time_in_turn

from common.geometry import detector_samples
from common.models.bundle import ModelBundle, build_bundle
from common.pipeline.clip import crop_clips, plan_clips
from common.pipeline.config import PipelineConfig
from common.pipeline.detect import detect_lesions
from common.pipeline.run import VideoResult, run_pipeline
from common.pipeline.track import link_tracks
from deploy.synth import render_sweep, sample_lesion, vendor_preset


def _sweep(frames: int, size: int) -> np.ndarray:
    """A synthetic breast-ultrasound sweep, ``uint8 [frames, size, size]``."""
    rng = np.random.default_rng(0)
    lesion = sample_lesion(rng)
    return render_sweep(lesion, vendor_preset("vendor-a"), frames=frames, size=size, rng=rng).frames


@dataclass
class Measurement:
    """Wall times of the four steps on one preset and device, and what the runs found."""

    preset: str
    device: str
    frames: tuple[int, int, int]
    seconds: dict[str, list[float]]
    detector_clips: int
    oracle_clips: int


def _measure(
    bundle: ModelBundle, frames: np.ndarray, device: torch.device, repeats: int
) -> Measurement:
    bundle.detector.to(device).eval()
    bundle.classifier.to(device).eval()
    config = PipelineConfig()
    gt_config = PipelineConfig(boxes_source="gt")
    n, height, width = frames.shape
    # One lesion tracked through the whole sweep: every frame ends up in a clip.
    lesion = (0.35 * width, 0.4 * height, 0.65 * width, 0.6 * height)
    gt_boxes = dict.fromkeys(range(n), lesion)
    size, batch = bundle.preset.detector.image_size, config.detector_batch_size
    c = bundle.preset.classifier
    images, _ = detector_samples(frames, range(n), {}, size, where="benchmark")
    batches = [[image.to(device) for image in images[i : i + batch]] for i in range(0, n, batch)]

    @torch.no_grad()
    def detector_alone() -> None:
        for chunk in batches:
            bundle.detector(chunk)

    def up_to_clips() -> None:
        detections = detect_lesions(
            frames, bundle.detector, image_size=size, score_threshold=config.score_threshold,
            nms_iou=config.nms_iou, max_detections=config.max_detections, batch_size=batch,
        )  # fmt: skip
        tracks = link_tracks(detections, link_iou=config.link_iou, max_gap=config.max_gap)
        plans = plan_clips(tracks, clip_len=c.clip_len)
        crop_clips(frames, plans, clip_len=c.clip_len, clip_size=c.clip_size)

    times, results = time_in_turn(
        {
            "detector": detector_alone,
            "up_to_clips": up_to_clips,
            "pipeline": lambda: run_pipeline(frames, bundle, config),
            "oracle": lambda: run_pipeline(frames, bundle, gt_config, gt_boxes=gt_boxes),
        },
        device,
        repeats,
    )
    detected, oracle = results["pipeline"], results["oracle"]
    assert isinstance(detected, VideoResult) and isinstance(oracle, VideoResult)
    return Measurement(
        bundle.preset.name, device.type, (n, height, width), times,
        len(detected.clips), len(oracle.clips),
    )  # fmt: skip


def _table(measurements: list[Measurement], statistic: str, title: str) -> Table:
    table = Table(
        "preset", "device", "frames", "detector\nalone f/s", "detect+track+crop\nf/s (overhead)",
        "whole pipeline\nf/s (overhead)", "clips", "pipeline,\nGT boxes f/s", "clips",
        title=title,
    )  # fmt: skip
    for m in measurements:
        t = {name: STATISTICS[statistic](times) for name, times in m.seconds.items()}
        n, height, width = m.frames
        rate = {name: f"{n / seconds:.2f}" for name, seconds in t.items()}
        for name in ("up_to_clips", "pipeline"):
            rate[name] += f" ({100 * (t[name] / t['detector'] - 1):+.0f}%)"
        table.add_row(
            m.preset, m.device, f"{n} @ {height}x{width}", rate["detector"],
            rate["up_to_clips"], rate["pipeline"], str(m.detector_clips), rate["oracle"],
            str(m.oracle_clips),
        )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,paper", help="comma-separated")
    parser.add_argument("--tiny-frames", type=int, default=32)
    parser.add_argument("--paper-frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="video frame side in pixels")
    parser.add_argument("--tiny-repeats", type=int, default=15)
    parser.add_argument("--paper-repeats", type=int, default=3)
    args = parser.parse_args()

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    runs = {
        "tiny": (args.tiny_frames, args.tiny_repeats),
        "paper": (args.paper_frames, args.paper_repeats),
    }
    measurements = []
    for preset in args.presets.split(","):
        n_frames, repeats = runs[preset]
        frames = _sweep(n_frames, args.size)
        bundle = build_bundle(preset, seed=0)
        for device in devices:
            measurements.append(_measure(bundle, frames, device, repeats))
    console = Console(width=120)
    repeats_text = f"{args.tiny_repeats} tiny / {args.paper_repeats} paper repeats"
    threads = f"torch threads {torch.get_num_threads()}"
    for statistic, label in (("median", "median"), ("best", "best run")):
        console.print(
            _table(
                measurements,
                statistic,
                f"WAUVE inference throughput, {label} of {repeats_text} ({threads})",
            )
        )


if __name__ == "__main__":
    main()
