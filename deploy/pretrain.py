"""Consortium pretraining on public data: a campaign's version 0, with no privacy budget spent.

DP-SGD from random weights cannot learn much from a few hundred patients per site: the
noise grows with the number of trained parameters and shrinks only with the patients per
step (Tramèr & Boneh 2021). So the consortium first trains the chosen networks centrally,
without privacy, on data it may share: the synthetic generator's sweeps and key frames,
and public image sets in the ingest layout (``busfed site ingest``). The sites then
fine-tune that model privately (``busfed federation start --init``).

The training here is ordinary supervised learning (AdamW, cosine schedule, class-balanced
minibatches, horizontal flips): no clipping and no noise, because no patient of a site is
in these data. The model card names every data set with the SHA-256 of its files, so an
auditor can tell which data the version 0 saw and that none was a site's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data.keyframes import build_keyframe_units
from common.data.manifest import load_site
from common.data.units import build_units
from common.errors import DataError, UsageError
from common.evaluation.detection import detect, detection_scores
from common.metrics.roc import auc_ci
from common.models.bundle import ModelBundle, fingerprint, get_weights

PRIVACY_NOTE = "public data, no privacy budget spent"
# Splits of a public data set used for training; its "val" split is held out and scored.
TRAIN_SPLITS = ("train", "test")
HELD_OUT_SPLIT = "val"
# Detector frames per video, as a site trains them (client/cli.py site init's defaults).
FRAME_STRIDE = 2
MAX_FRAMES_PER_VIDEO = 16
# Classifier clips start every CLIP_STRIDE frames of a boxed run (overlapping, unlike a
# site's back-to-back clips): public data has no privacy unit to protect, and four times
# the clips of the same lesions teach the I3D more per synthesised patient.
CLIP_STRIDE = 2

Progress = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class DataSet:
    """A public data set: a site-layout folder (``manifest.csv``, videos or key frames).

    ``kind`` is ``synthetic`` (the generator's, made by ``busfed pretrain``) or ``public``
    (named by the consortium lead).
    """

    name: str
    path: Path
    kind: str


@dataclass
class NetworkData:
    """One network's training and held-out samples, pooled over the data sets."""

    inputs: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)  # one-logit networks
    targets: list[dict[str, Tensor]] = field(default_factory=list)  # the detector
    val_inputs: list[Tensor] = field(default_factory=list)
    val_labels: list[Tensor] = field(default_factory=list)
    val_targets: list[dict[str, Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """How every network is trained; all explicit, all in the model card."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    # The detector's own steps and learning rate (None: ``steps`` and ``lr``): Faster
    # R-CNN needs several times the steps of a one-logit network before its boxes track.
    detector_steps: int | None = None
    detector_lr: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or (self.detector_steps or 0) < 0:
            raise UsageError("--steps and --detector-steps must be >= 0, --batch-size >= 1")
        for flag, lr in (("--lr", self.lr), ("--detector-lr", self.detector_lr)):
            if lr is not None and not (lr > 0 and math.isfinite(lr)):
                raise UsageError(f"{flag} must be a positive number, got {lr}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")

    def for_network(self, name: str) -> Settings:
        """The settings that train network ``name``: the detector's own steps and lr."""
        if name != "detector":
            return self
        steps = self.steps if self.detector_steps is None else self.detector_steps
        lr = self.lr if self.detector_lr is None else self.detector_lr
        return replace(self, steps=steps, lr=lr)


def synthesise_public(
    out: Path, *, patients: int, seed: int, frames: int = 32, size: int = 128
) -> list[DataSet]:
    """Generate ``patients`` synthetic public patients, spread over the generator's scanner
    presets (one data set each, ``out/<vendor>``), so that version 0 has seen every
    scanner look; return the data sets."""
    from deploy.synth import generate_site
    from deploy.synth.scanner import VENDORS

    vendors = sorted(VENDORS)[: max(1, min(len(VENDORS), patients))]
    data_sets = []
    for i, vendor in enumerate(vendors):
        n = patients // len(vendors) + (i < patients % len(vendors))
        generate_site(
            out / vendor, site=f"public-{vendor}", patients=n, seed=seed + i, vendor=vendor,
            frames=frames, size=size, min_per_class=max(1, n // 8),
        )  # fmt: skip
        data_sets.append(DataSet(f"synthetic-{vendor}", out / vendor, "synthetic"))
    return data_sets


def folder_sha256(root: Path) -> str:
    """SHA-256 over a folder's files: each relative path and its bytes, in sorted order.

    The same files give the same hash wherever the folder lies; a changed, added or removed
    file changes it. Symbolic links are followed (ingest may link images in place).
    """
    h = hashlib.sha256()
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def collect(
    bundle: ModelBundle, data_sets: Sequence[DataSet]
) -> tuple[dict[str, NetworkData], list[dict[str, Any]]]:
    """Every network's samples from every data set, and what each data set gave.

    Raises
    ------
    DataError
        A folder is not a readable site data set, or the data sets give a network nothing
        to train on (names the network and the model).
    """
    pooled = {name: NetworkData() for name in bundle.networks}
    records = []
    for data_set in data_sets:
        site = load_site(data_set.path, check_videos=False)
        counts: dict[str, int] = {}
        for split in (*TRAIN_SPLITS, HELD_OUT_SPLIT):
            held_out = split == HELD_OUT_SPLIT
            for name, inputs, labels, targets in _samples(bundle, site, split):
                into = pooled[name]
                (into.val_inputs if held_out else into.inputs).extend(inputs)
                (into.val_labels if held_out else into.labels).extend(labels)
                (into.val_targets if held_out else into.targets).extend(targets)
                if not held_out:
                    counts[name] = counts.get(name, 0) + len(inputs)
        records.append(
            {
                "name": data_set.name,
                "kind": data_set.kind,
                "path": str(data_set.path.resolve()),
                "sha256": folder_sha256(data_set.path),
                "patients": len({row.patient_id for row in site.rows}),
                "samples": counts,
                "skipped_rows": len(site.problems),
            }
        )
    for name, data in pooled.items():
        if data_sets and not data.inputs:
            raise DataError(
                f"the data sets give the {name} of model {bundle.kind!r} nothing to train on "
                f"(splits {', '.join(TRAIN_SPLITS)})"
            )
    return pooled, records


def _samples(
    bundle: ModelBundle, site: Any, split: str
) -> list[tuple[str, list[Tensor], list[Tensor], list[dict[str, Tensor]]]]:
    """(network, inputs, labels, detector targets) of one split of one data set."""
    preset = bundle.preset
    names = set(bundle.networks)
    out: list[tuple[str, list[Tensor], list[Tensor], list[dict[str, Tensor]]]] = []
    if "keyframe" in names:
        frames = build_keyframe_units(site, preset, split=split).keyframe
        out.append(
            (
                "keyframe",
                [x for u in frames for x in u.images],
                [y for u in frames for y in u.labels],
                [],
            )
        )
    if names & {"detector", "classifier"}:
        units = build_units(
            site, preset, split=split, frame_stride=FRAME_STRIDE,
            max_frames_per_video=MAX_FRAMES_PER_VIDEO, clip_stride=CLIP_STRIDE,
        )  # fmt: skip
        if "detector" in names:
            images = [x for u in units.detector for x in u.images]
            targets = [t for u in units.detector for t in u.targets]
            out.append(("detector", images, [], targets))
        if "classifier" in names:
            clips = units.classifier
            out.append(
                (
                    "classifier",
                    [x for u in clips for x in u.clips],
                    [y for u in clips for y in u.labels],
                    [],
                )
            )
    return out


def _flip(batch: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror a random half of the batch left-right (a probe held the other way round)."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = batch.clone()
    batch[flip] = batch[flip].flip(-1)
    return batch


def optimise(
    name: str,
    network: nn.Module,
    loss_of_step: Callable[[], Tensor],
    settings: Settings,
    progress: Progress | None = None,
) -> list[float]:
    """AdamW over ``settings.steps`` minibatch losses; linear warm-up over 5% of the
    steps, then cosine decay to 0. Returns the step losses."""
    network.train()
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps, warmup = settings.steps, max(1, settings.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = []
    for step in range(steps):
        loss = loss_of_step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(name, step + 1, steps, losses[-1])
    return losses


def train_network(
    name: str,
    network: nn.Module,
    data: NetworkData,
    settings: Settings,
    *,
    generator: torch.Generator,
    progress: Progress | None = None,
) -> list[float]:
    """Train one network in place; return the step losses.

    The detector learns Faster R-CNN's four losses on random boxed frames. A one-logit
    network (key-frame model, I3D) learns binary cross-entropy on minibatches drawn with
    replacement, each class equally likely, so that a data set with few malignant lesions
    still teaches both classes.
    """
    if name == "detector":

        def detector_loss() -> Tensor:
            index = torch.randint(len(data.inputs), (settings.batch_size,), generator=generator)
            images = [data.inputs[i] for i in index.tolist()]
            losses = network(images, [data.targets[i] for i in index.tolist()])
            return torch.stack(list(losses.values())).sum()

        return optimise(name, network, detector_loss, settings, progress)
    x = torch.stack(data.inputs)
    y = torch.stack(data.labels).float()
    positives = float(y.sum())
    if positives in (0.0, float(len(y))):
        raise DataError(f"the {name} needs both classes in the public data; found one only")
    weights = torch.where(y > 0.5, 1.0 / positives, 1.0 / (len(y) - positives))

    def loss_of_step() -> Tensor:
        index = torch.multinomial(
            weights, settings.batch_size, replacement=True, generator=generator
        )
        return F.binary_cross_entropy_with_logits(network(_flip(x[index], generator)), y[index])

    return optimise(name, network, loss_of_step, settings, progress)


@torch.no_grad()
def held_out_scores(name: str, network: nn.Module, data: NetworkData) -> dict[str, Any]:
    """How the network does on the data sets' held-out (val) split: AUC with its 95% CI
    (one-logit networks) or recall and AP at IoU 0.5 (the detector)."""
    if not data.val_inputs:
        return {"n": 0}
    network.eval()
    if name == "detector":
        predictions = detect(network, data.val_inputs, device=torch.device("cpu"))
        truth = [t["boxes"].numpy() for t in data.val_targets]
        scores = detection_scores(predictions, truth, iou=0.5)
        return {
            "n": scores.n_images, "recall@0.5": scores.recall,
            "ap@0.5": scores.average_precision,
        }  # fmt: skip
    x = torch.stack(data.val_inputs)
    labels = torch.stack(data.val_labels).numpy()
    logits = torch.cat([network(x[i : i + 64]) for i in range(0, len(x), 64)]).numpy()
    result: dict[str, Any] = {"n": len(labels), "malignant": int(labels.sum())}
    if 0 < labels.sum() < len(labels):
        ci = auc_ci(labels, logits, direction="<")
        # DeLong's CI is undefined (NaN) with one case of a class: null, never NaN, in JSON.
        bounds = [b if math.isfinite(b) else None for b in (ci.ci_low, ci.ci_high)]
        result.update(auc=ci.auc, auc_ci=bounds)
    return result


def pretrain(
    bundle: ModelBundle,
    data_sets: Sequence[DataSet],
    settings: Settings,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train every network of ``bundle`` in place on the public data sets.

    Returns
    -------
    dict
        The ``pretraining`` section of the model card: the data sets (with their
        SHA-256), the settings, per network its samples, first and last losses and its
        held-out scores, the resulting weights' fingerprint and ``privacy``: "public data,
        no privacy budget spent".
    """
    if not data_sets and settings.steps:
        raise UsageError("nothing to train on: pass --synthetic N and/or --public DIR")
    if not settings.steps:  # the starting weights as they are (a backbone file's, say)
        data_sets = []
    pooled, records = collect(bundle, data_sets)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # Faster R-CNN's anchor and RoI sampling
    networks: dict[str, Any] = {}
    for name, network in bundle.networks.items() if settings.steps else ():
        data = pooled[name]
        if not settings.for_network(name).steps:  # --detector-steps 0: kept as it starts
            continue
        losses = train_network(
            name, network, data, settings.for_network(name), generator=generator,
            progress=progress,
        )  # fmt: skip
        tail = losses[-max(1, len(losses) // 10) :]
        networks[name] = {
            "samples": len(data.inputs),
            "loss_first": losses[0],
            "loss_last_tenth": float(np.mean(tail)),
            "held_out": held_out_scores(name, network, data),
        }
        network.eval()
    return {
        "privacy": PRIVACY_NOTE,
        "data_sets": records,
        "settings": asdict(settings),
        "networks": networks,
        "weights_sha256": fingerprint(get_weights(bundle)),
    }
