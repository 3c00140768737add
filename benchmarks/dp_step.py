"""Cost of patient-level DP-SGD: a DP step against a plain SGD step, and secure randomness.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/dp_step.py [--preset tiny] [--patients 4]

(``-m benchmarks.dp_step`` does not work: Opacus installs a top-level ``benchmarks``
package that shadows this folder.) It needs no Flower, MLflow or rich: torch, torchvision,
Opacus, cryptography, numpy, pydantic and the project's training code (whose data module
brings PyAV and SciPy). It prints each row as soon as it is measured.

For each network (detector, classifier, key-frame model) and device (CPU, and CUDA when
visible) it times, median (or ``--stat best``: the least disturbed run on a shared machine)
of ``--repeats``, the variants of one network taking turns:

* non-DP: one batched forward and backward over every frame / clip / image, SGD step;
* DP: ``train_detector`` / ``train_classifier`` / ``train_keyframe`` for one step with
  sample rate 1 (every patient drawn), so per-patient gradients, clipping, noise and the
  SGD step, including the per-call set-up (DPOptimizer, Opacus hooks), with the seeded
  torch generator (``secure_rng=False``) and with the CSPRNG (``secure_rng=True``);
* frame-level DP: the seeded step with every frame, clip or image its own privacy unit,
  the weaker guarantee that patient-level DP replaces: same data, same code.

Then, for the ``--noise-preset`` networks' trained parameters, the noise of one step
alone: Opacus' ``_generate_noise`` from a torch generator (as ``secure_rng=False``), the
same in Opacus' ``secure_mode`` (four draws, still a torch generator), and the CSPRNG's
``gaussian_like`` (four draws from ChaCha20; on CUDA the bits are copied to the device).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.optimizers.optimizer import _generate_noise
from timing import STATISTICS, time_in_turn
from torch import nn

from client.secure_rng import ChaCha20Random
from client.train import train_classifier, train_detector, train_keyframe
from common.data.keyframes import KeyFrameUnit
from common.data.units import ClassifierUnit, DetectorUnit
from common.models.bundle import build_bundle
from common.models.detector import build_detector
from common.models.i3d import build_classifier
from common.models.keyframe import build_keyframe_model
from common.models.presets import Preset, get_preset
from common.privacy.settings import DPSettings

LR = 0.01
NETWORKS = ("detector", "classifier", "keyframe")
Units = list[DetectorUnit] | list[ClassifierUnit] | list[KeyFrameUnit]


def _units(
    preset: Preset, patients: int, frames: int, clips: int
) -> tuple[list[DetectorUnit], list[ClassifierUnit], list[KeyFrameUnit]]:
    """Per patient: ``frames`` detector frames, ``clips`` clips and ``clips`` key frames."""
    g = torch.Generator().manual_seed(0)
    size, c, k = preset.detector.image_size, preset.classifier, preset.keyframe
    detector_units, classifier_units, keyframe_units = [], [], []
    for i in range(patients):
        unit = DetectorUnit(f"p{i}")
        for f in range(frames):
            unit.images.append(torch.rand(1, size, size, generator=g).expand(3, -1, -1))
            lesion = f % 2 == 0  # half the frames show the lesion
            box = torch.tensor([[0.3, 0.3, 0.6, 0.7]]) * size if lesion else torch.zeros(0, 4)
            unit.targets.append({"boxes": box, "labels": torch.ones(len(box), dtype=torch.int64)})
        detector_units.append(unit)
        shape = (clips, 3, c.clip_len, c.clip_size, c.clip_size)
        labels = torch.full((clips,), float(i % 2))
        classifier_units.append(ClassifierUnit(f"p{i}", torch.rand(shape, generator=g), labels))
        images = torch.rand(clips, 3, k.image_size, k.image_size, generator=g)
        keyframe_units.append(KeyFrameUnit(f"p{i}", images, labels))
    return detector_units, classifier_units, keyframe_units


def _per_item_units(
    detector_units: list[DetectorUnit],
    classifier_units: list[ClassifierUnit],
    keyframe_units: list[KeyFrameUnit],
) -> tuple[list[DetectorUnit], list[ClassifierUnit], list[KeyFrameUnit]]:
    """The same data with each frame / clip / image as its own privacy unit."""
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
    images = [
        KeyFrameUnit(f"{u.patient_id}-k{i}", u.images[i : i + 1], u.labels[i : i + 1])
        for u in keyframe_units
        for i in range(len(u.images))
    ]
    return frames, clips, images


def _seconds(
    steps: list[Callable[[], object]], device: torch.device, repeats: int, stat: str
) -> list[float]:
    """Each step's median or best seconds, the steps timed in turn (``timing``)."""
    times, _ = time_in_turn({str(i): step for i, step in enumerate(steps)}, device, repeats)
    return [STATISTICS[stat](took) for took in times.values()]


def _plain_detector_step(model, units: list[DetectorUnit], device: torch.device) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    images = [im.to(device) for u in units for im in u.images]
    targets = [{k: v.to(device) for k, v in t.items()} for u in units for t in u.targets]
    optimizer.zero_grad(set_to_none=True)
    sum(model(images, targets).values()).backward()
    optimizer.step()


def _plain_logit_step(
    model, inputs: list[torch.Tensor], labels: list[torch.Tensor], device: torch.device
) -> None:
    """One batched step of a one-logit network (classifier clips, key-frame images)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad(set_to_none=True)
    logits = model(torch.cat(inputs).to(device))
    F.binary_cross_entropy_with_logits(logits, torch.cat(labels).to(device)).backward()
    optimizer.step()


def _print_row(cells: list[str], widths: list[int]) -> None:
    print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)), flush=True)


def _print_header(title: str, threads: int, head: list[str], widths: list[int]) -> None:
    print(f"{title}, {threads} CPU threads", flush=True)
    _print_row(head, widths)


STEP_HEAD = [
    "device", "model", "non-DP ms", "DP seeded ms", "DP secure ms", "secure-seeded",
    "secure/seeded",
    "DP/non-DP", "frame DP ms", "patient/frame",
]  # fmt: skip
STEP_WIDTHS = [max(len(h), 10) for h in STEP_HEAD]


def step_rows(args: argparse.Namespace, device: torch.device) -> None:
    """Print, per network, the plain, seeded-DP, secure-DP and frame-level DP step times."""
    bundles = (
        build_bundle(args.preset, seed=0),
        build_bundle(args.preset, seed=0, model="keyframe2d"),
    )
    networks = {**bundles[0].networks, **bundles[1].networks}
    models = {name: copy.deepcopy(net).to(device).train() for name, net in networks.items()}
    patient_units = _units(bundles[0].preset, args.patients, args.frames, args.clips)
    item_units = _per_item_units(*patient_units)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0)
    generator = torch.Generator().manual_seed(0)
    trainers = {
        "detector": train_detector,
        "classifier": train_classifier,
        "keyframe": train_keyframe,
    }
    detector_units, classifier_units, keyframe_units = patient_units
    plain: dict[str, Callable[[], None]] = {
        "detector": lambda: _plain_detector_step(models["detector"], detector_units, device),
        "classifier": lambda: _plain_logit_step(
            models["classifier"], [u.clips for u in classifier_units],
            [u.labels for u in classifier_units], device,
        ),
        "keyframe": lambda: _plain_logit_step(
            models["keyframe"], [u.images for u in keyframe_units],
            [u.labels for u in keyframe_units], device,
        ),
    }  # fmt: skip

    def dp_step(name: str, units: Units, secure_rng: bool) -> Callable[[], object]:
        return lambda: trainers[name](
            models[name], units, dp=dp, steps=1, lr=LR, device=device, generator=generator,
            secure_rng=secure_rng,
        )  # fmt: skip

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for name, units, items in zip(NETWORKS, patient_units, item_units, strict=True):
        plain_s, seeded_s, secure_s, item_s = _seconds(
            [plain[name], dp_step(name, units, False), dp_step(name, units, True),
             dp_step(name, items, False)],
            device, args.repeats, args.stat,
        )  # fmt: skip
        _print_row(
            [
                label[:10], name, f"{plain_s * 1e3:.0f}", f"{seeded_s * 1e3:.0f}",
                f"{secure_s * 1e3:.0f}", f"{(secure_s - seeded_s) * 1e3:+.0f}",
                f"{secure_s / seeded_s:.2f}",
                f"{seeded_s / plain_s:.2f}", f"{item_s * 1e3:.0f}", f"{seeded_s / item_s:.2f}",
            ],
            STEP_WIDTHS,
        )  # fmt: skip


NOISE_HEAD = [
    "device", "model", "params (M)", "torch ms", "torch x4 ms", "CSPRNG ms", "CSPRNG/torch",
    "CSPRNG/x4",
]  # fmt: skip
NOISE_WIDTHS = [max(len(h), 10) for h in NOISE_HEAD]
BUILDERS: dict[str, Callable[[Preset], nn.Module]] = {
    "detector": lambda p: build_detector(p.detector),
    "classifier": lambda p: build_classifier(p.classifier),
    "keyframe": lambda p: build_keyframe_model(p.keyframe),
}


def noise_seconds(
    grads: list[torch.Tensor], device: torch.device, repeats: int, stat: str
) -> tuple[float, float, float]:
    """Seconds to noise ``grads`` once: torch, torch in Opacus' secure_mode, CSPRNG."""
    generator = torch.Generator(device=device).manual_seed(0)
    rng = ChaCha20Random()

    def torch_noise(secure_mode: bool) -> Callable[[], object]:
        return lambda: [_generate_noise(1.0, g, generator, secure_mode) for g in grads]

    seeded, fourfold, secure = _seconds(
        [torch_noise(False), torch_noise(True), lambda: [rng.gaussian_like(g, 1.0) for g in grads]],
        device, repeats, stat,
    )  # fmt: skip
    return seeded, fourfold, secure


def noise_rows(args: argparse.Namespace, device: torch.device) -> None:
    """Print, per network of ``--noise-preset``, the time to draw one step's noise."""
    preset = get_preset(args.noise_preset)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for name, build in BUILDERS.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            shapes = [p.shape for p in build(preset).parameters() if p.requires_grad]
        grads = [torch.zeros(shape, device=device) for shape in shapes]
        seeded_s, fourfold_s, secure_s = noise_seconds(grads, device, args.noise_repeats, args.stat)
        _print_row(
            [
                label[:10], name, f"{sum(g.numel() for g in grads) / 1e6:.1f}",
                f"{seeded_s * 1e3:.0f}", f"{fourfold_s * 1e3:.0f}", f"{secure_s * 1e3:.0f}",
                f"{secure_s / seeded_s:.1f}", f"{secure_s / fourfold_s:.1f}",
            ],
            NOISE_WIDTHS,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4, help="detector frames per patient")
    parser.add_argument("--clips", type=int, default=3, help="clips and key frames per patient")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noise-preset", default="paper", help="networks of the noise timing")
    parser.add_argument("--noise-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--stat", choices=sorted(STATISTICS), default="median")
    parser.add_argument("--skip-steps", action="store_true", help="only the noise timing")
    parser.add_argument(
        "--device", choices=("all", "cpu", "cuda"), default="all",
        help="where to time (all: the CPU, and CUDA when visible)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device in ("all", "cpu") else []
    if torch.cuda.is_available() and args.device in ("all", "cuda"):
        devices.append(torch.device("cuda"))
    if not args.skip_steps:
        title = (
            f"one DP step, preset {args.preset!r}, {args.patients} patients x ({args.frames} "
            f"frames | {args.clips} clips | {args.clips} key frames), {args.stat} of {args.repeats}"
        )
        _print_header(title, args.threads, STEP_HEAD, STEP_WIDTHS)
        for device in devices:
            step_rows(args, device)
    title = (
        f"\nnoise of one DP step alone, preset {args.noise_preset!r} (every trained "
        f"parameter), {args.stat} of {args.noise_repeats}"
    )
    _print_header(title, args.threads, NOISE_HEAD, NOISE_WIDTHS)
    for device in devices:
        noise_rows(args, device)


if __name__ == "__main__":
    main()
