"""Cost of patient-level DP-SGD: one DP step against one plain SGD step on the same batch.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/dp_step.py [--preset tiny] [--patients 4]

(``-m benchmarks.dp_step`` does not work: Opacus installs a top-level ``benchmarks``
package that shadows this folder.)

For each model and device (CPU, and CUDA when visible) it times, median of ``--repeats``:

* non-DP: one batched forward and backward over every frame / clip of the batch, SGD step;
* DP: ``train_detector`` / ``train_classifier`` for one step with sample rate 1 (every
  patient drawn), so per-patient gradients, clipping, noise and the SGD step, including
  the per-call set-up (DPOptimizer, Opacus hooks for the classifier);
* frame-level DP: the same step with every frame (detector) or clip (classifier) its own
  privacy unit, the weaker guarantee that patient-level DP replaces: same data, same code.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from client.train import DPParams, train_classifier, train_detector
from common.data.units import ClassifierUnit, DetectorUnit
from common.models.bundle import ModelBundle, build_bundle
from common.models.presets import Preset

LR = 0.01


def _units(
    preset: Preset, patients: int, frames: int, clips: int
) -> tuple[list[DetectorUnit], list[ClassifierUnit]]:
    g = torch.Generator().manual_seed(0)
    size, c = preset.detector.image_size, preset.classifier
    detector_units, classifier_units = [], []
    for i in range(patients):
        unit = DetectorUnit(f"p{i}")
        for f in range(frames):
            unit.images.append(torch.rand(1, size, size, generator=g).expand(3, -1, -1))
            lesion = f % 2 == 0  # half the frames show the lesion
            box = torch.tensor([[0.3, 0.3, 0.6, 0.7]]) * size if lesion else torch.zeros(0, 4)
            unit.targets.append({"boxes": box, "labels": torch.ones(len(box), dtype=torch.int64)})
        detector_units.append(unit)
        shape = (clips, 3, c.clip_len, c.clip_size, c.clip_size)
        classifier_units.append(
            ClassifierUnit(
                f"p{i}", torch.rand(shape, generator=g), torch.full((clips,), float(i % 2))
            )
        )
    return detector_units, classifier_units


def _per_item_units(
    detector_units: list[DetectorUnit], classifier_units: list[ClassifierUnit]
) -> tuple[list[DetectorUnit], list[ClassifierUnit]]:
    """The same data with each frame / clip as its own privacy unit (frame-level DP)."""
    frames = [
        DetectorUnit(f"{u.patient_id}-f{i}", [image], [target])
        for u in detector_units
        for i, (image, target) in enumerate(zip(u.images, u.targets, strict=True))
    ]
    clips = [
        ClassifierUnit(f"{u.patient_id}-c{i}", u.clips[i : i + 1], u.labels[i : i + 1])
        for u in classifier_units
        for i in range(len(u.clips))
    ]
    return frames, clips


def _median_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    step()  # warm-up: allocator, cuDNN autotuning, lazy inits
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plain_detector_step(model, units: list[DetectorUnit], device: torch.device) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    images = [im.to(device) for u in units for im in u.images]
    targets = [{k: v.to(device) for k, v in t.items()} for u in units for t in u.targets]
    optimizer.zero_grad(set_to_none=True)
    sum(model(images, targets).values()).backward()
    optimizer.step()


def _plain_classifier_step(model, units: list[ClassifierUnit], device: torch.device) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    clips = torch.cat([u.clips for u in units]).to(device)
    labels = torch.cat([u.labels for u in units]).to(device)
    optimizer.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model(clips), labels).backward()
    optimizer.step()


def _rows(bundle: ModelBundle, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Table rows for one device: model, non-DP, patient-level and frame-level DP times."""
    detector_units, classifier_units = _units(bundle.preset, args.patients, args.frames, args.clips)
    detector = copy.deepcopy(bundle.detector).to(device).train()
    classifier = copy.deepcopy(bundle.classifier).to(device).train()
    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
    generator = torch.Generator().manual_seed(0)
    frame_units, clip_units = _per_item_units(detector_units, classifier_units)

    def detector_dp(units: list[DetectorUnit]) -> Callable[[], object]:
        return lambda: train_detector(
            detector, units, dp=dp, steps=1, lr=LR, device=device, generator=generator
        )

    def classifier_dp(units: list[ClassifierUnit]) -> Callable[[], object]:
        return lambda: train_classifier(
            classifier, units, dp=dp, steps=1, lr=LR, device=device, generator=generator
        )

    cases = [
        (
            "detector",
            lambda: _plain_detector_step(detector, detector_units, device),
            detector_dp(detector_units),
            detector_dp(frame_units),
        ),
        (
            "classifier",
            lambda: _plain_classifier_step(classifier, classifier_units, device),
            classifier_dp(classifier_units),
            classifier_dp(clip_units),
        ),
    ]
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for name, plain, patient_level, item_level in cases:
        plain_s = _median_seconds(plain, device, args.repeats)
        dp_s = _median_seconds(patient_level, device, args.repeats)
        item_s = _median_seconds(item_level, device, args.repeats)
        rows.append(
            [
                label, name, f"{plain_s * 1e3:.0f}", f"{dp_s * 1e3:.0f}", f"{dp_s / plain_s:.2f}",
                f"{item_s * 1e3:.0f}", f"{dp_s / item_s:.2f}",
            ]
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4, help="detector frames per patient")
    parser.add_argument("--clips", type=int, default=3, help="classifier clips per patient")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)

    bundle = build_bundle(args.preset, seed=0)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    table = Table(
        title=f"one step, preset {args.preset!r}, {args.patients} patients x "
        f"({args.frames} frames | {args.clips} clips), median of {args.repeats}"
    )
    for column in ("device", "model"):
        table.add_column(column)
    for column in (
        "non-DP (ms)", "patient DP (ms)", "patient DP / non-DP", "frame DP (ms)",
        "patient DP / frame DP",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for device in devices:
        for row in _rows(bundle, args, device):
            table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
