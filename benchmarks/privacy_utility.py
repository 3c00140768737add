"""What does privacy cost on real patients? BUS-BRA, three scanner sites, five folds.

One command trains every arm on BUS-BRA's official 5-fold patient split and prints (and
writes) one table and one plot:

* **sites**: BUS-BRA by scanner, the natural non-IID split of a consortium: GE Logiq 7;
  GE Logiq 5; Toshiba Aplio 300 + U-Systems;
* **arms**: ``central`` (all sites' training patients pooled, no DP); ``federated`` (FedAvg
  over the three sites, no DP); ``dp-eps1``, ``dp-eps3``, ``dp-eps8`` (FedAvg, every site
  runs patient-level DP-SGD with the sigma that spends exactly that epsilon over the
  whole campaign, at delta = 1 / the site's training patients). Every arm sees the same
  number of epochs of data: the same patient sampling rate q and the same number of
  steps per site (rounds x local steps), central included;
* **models**: the key-frame model (the paper's 2D comparator) on lesion crops
  (``keyframe-crop``) and on whole images (``keyframe-whole``), and the WAUVE detector
  (``detector``);
* **output**: per model and arm, the image-level AUC with its DeLong 95% CI over the
  test folds' predictions pooled, sensitivity and specificity at the threshold that
  reaches 0.90 sensitivity, the detector's recall at IoU 0.5 and average precision, the
  epsilon each site spent, and the wall time; as ``privacy_utility.csv`` and
  ``privacy_utility.md``, and ``privacy_utility.png`` (AUC, or AP for the detector,
  against epsilon: one line per model, the central non-DP level dashed, the federated
  non-DP level dotted).

Training is the product's own: ``client.train`` (Opacus per-sample gradients, patient as
the privacy unit; a non-DP arm is the same DP-SGD loop with the noise off and a clip norm
no gradient reaches), units cut by ``common.geometry`` as a site cuts them, epsilon from
the site's accountant (``common.privacy.accountant``), FedAvg from Flower's
``aggregate``. The federation is simulated in one process: SecAgg+ sums the same
weighted updates, so the model is the same; ``busfed federation`` runs the real thing
(README, "A BUS-BRA rehearsal federation").

Data: the BUS-BRA folder (``--busbra DIR``: ``Images/``, ``bus_data.csv``,
``5-fold-cv.csv``) or one compressed array file made from it (``--arrays FILE``; write one
with ``--save-arrays FILE``): every image resized to a ``--size`` square, boxes scaled,
small enough to carry to a GPU host. ``--preset tiny`` is sized for two CPU cores (under
an hour); ``--preset paper`` is for a GPU. Each arm's time is printed as it ends, so runs
can be sized.

Usage::

    python benchmarks/privacy_utility.py --busbra /data/BUSBRA --preset tiny --out out/pu
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busbra import lesion_box, scanner  # noqa: E402  (this folder, on sys.path as the script's)

from client.train import train_detector, train_per_sample  # noqa: E402
from common.data.units import DetectorUnit  # noqa: E402
from common.evaluation.detection import detect, detection_scores  # noqa: E402
from common.geometry import crop_frames, detector_samples  # noqa: E402
from common.metrics.roc import auc_ci  # noqa: E402
from common.metrics.threshold import threshold_for_sensitivity  # noqa: E402
from common.models.detector import build_detector  # noqa: E402
from common.models.keyframe import build_keyframe_model  # noqa: E402
from common.models.loading import load_bundle_dir  # noqa: E402
from common.models.presets import Preset, get_preset  # noqa: E402
from common.privacy.accountant import SiteAccountant  # noqa: E402
from common.privacy.advice import calibrated_sigma  # noqa: E402
from common.privacy.settings import DPSettings  # noqa: E402

MODELS = ("keyframe-crop", "keyframe-whole", "detector")
EPSILONS = (1.0, 3.0, 8.0)
# "start" scores the starting model untrained: the --init model (a busfed pretrain version
# 0), or random weights.
ARMS = ("start", "central", "federated", *(f"dp-eps{e:g}" for e in EPSILONS))
TARGET_SENSITIVITY = 0.90
TARGET_AUC = 0.90  # the consortium's: federated DP at epsilon <= 8 within 0.03 of central
SITES = ("logiq7", "logiq5", "toshiba-usystems")  # benchmarks.busbra's sites by scanner
# A clip norm no per-patient gradient reaches: a non-DP arm runs the DP loop untouched.
NO_CLIP = 1e6


@dataclass(frozen=True)
class Recipe:
    """How every arm trains one model; the same for all arms, so only privacy differs.

    ``rounds * local_steps`` steps per site at patient sampling rate ``sample_rate`` are
    ``rounds * local_steps * sample_rate`` epochs of each site's data; the central arm
    takes as many steps at the same rate over the pooled patients.
    """

    rounds: int
    local_steps: int
    sample_rate: float
    lr: float
    max_grad_norm: float
    lr_no_dp: float  # unclipped gradients are larger than clipped ones: a smaller step

    @property
    def steps(self) -> int:
        return self.rounds * self.local_steps


# Sized by the times this script prints (README, "What privacy costs on real patients").
RECIPES: dict[str, dict[str, Recipe]] = {
    "tiny": {
        "keyframe": Recipe(
            rounds=4, local_steps=5, sample_rate=0.1, lr=0.5, max_grad_norm=1.0, lr_no_dp=0.05
        ),
        "detector": Recipe(
            rounds=2, local_steps=4, sample_rate=0.05, lr=0.05, max_grad_norm=1.0, lr_no_dp=0.01
        ),
    },
    "paper": {
        "keyframe": Recipe(
            rounds=10, local_steps=20, sample_rate=0.1, lr=0.5, max_grad_norm=1.0, lr_no_dp=0.05
        ),
        "detector": Recipe(
            rounds=10, local_steps=10, sample_rate=0.1, lr=0.05, max_grad_norm=1.0, lr_no_dp=0.01
        ),
    },
}


# ------------------------------------------------------------------ data


@dataclass
class Images:
    """BUS-BRA as arrays, one row per image (the order of ``bus_data.csv``).

    ``images`` uint8 [N, S, S] (each image resized to a square, as the detector's input
    is), ``boxes`` float32 [N, 4] x1y1x2y2 in pixels of the S x S image, ``labels`` 1 =
    malignant, ``patients`` BUS-BRA's case number, ``sites`` the scanner site, ``folds``
    the official 5-fold split (1..5).
    """

    ids: np.ndarray
    images: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    sites: np.ndarray
    folds: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **asdict(self))

    @classmethod
    def load(cls, path: Path) -> Images:
        with np.load(path, allow_pickle=False) as arrays:
            return cls(**{name: arrays[name] for name in cls.__dataclass_fields__})


def read_busbra(root: Path, size: int) -> Images:
    """Every BUS-BRA image resized to ``size`` x ``size``, with its box, label and fold."""
    with (root / "5-fold-cv.csv").open(newline="") as handle:
        folds = {row["ID"]: int(row["kFold"]) for row in csv.DictReader(handle)}
    with (root / "bus_data.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    images, boxes = [], []
    for done, row in enumerate(rows, start=1):
        with Image.open(root / "Images" / f"{row['ID']}.png") as image:
            gray = image.convert("L")
            width, height = gray.size
            images.append(np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR)))
        (x1, y1, x2, y2), _ = lesion_box(root, row)
        boxes.append([x1 * size / width, y1 * size / height, x2 * size / width, y2 * size / height])
        if done % 250 == 0 or done == len(rows):
            print(f"  read {done}/{len(rows)} images", flush=True)
    return Images(
        ids=np.array([row["ID"] for row in rows]),
        images=np.stack(images),
        boxes=np.array(boxes, dtype=np.float32),
        labels=np.array([row["Pathology"] == "malignant" for row in rows], dtype=np.int8),
        patients=np.array([int(row["Case"]) for row in rows]),
        sites=np.array([scanner(row["Device"])[1] for row in rows]),
        folds=np.array([folds[row["ID"]] for row in rows], dtype=np.int8),
    )


# ------------------------------------------------------------------ units


Unit = Any  # (images FloatTensor[K, 3, s, s], labels FloatTensor[K]) or DetectorUnit


def units_for(data: Images, rows: np.ndarray, model: str, preset: Preset) -> list[Unit]:
    """One unit per patient of ``rows``, cut as a site cuts its key frames."""
    by_patient: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        by_patient[int(data.patients[row])].append(int(row))
    units: list[Unit] = []
    for patient, members in sorted(by_patient.items()):
        if model == "detector":
            unit = DetectorUnit(str(patient))
            for row in members:
                box = tuple(float(v) for v in data.boxes[row])
                images, targets = detector_samples(
                    data.images[row][None], [0], {0: box}, preset.detector.image_size,
                    where=str(data.ids[row]),
                )  # fmt: skip
                unit.images += images
                unit.targets += targets
            units.append(unit)
        else:
            units.append(
                (
                    torch.cat([_keyframe_input(data, row, model, preset) for row in members]),
                    torch.tensor([float(data.labels[row]) for row in members]),
                )
            )
    return units


_UNITS: dict[tuple[str, bytes], list[Unit]] = {}


def cached_units(data: Images, rows: np.ndarray, model: str, preset: Preset) -> list[Unit]:
    """``units_for``, cut once per model and row set: every arm of a fold trains on them."""
    key = (model, rows.tobytes())
    if key not in _UNITS:
        _UNITS[key] = units_for(data, rows, model, preset)
    return _UNITS[key]


def _keyframe_input(data: Images, row: int, model: str, preset: Preset) -> torch.Tensor:
    """FloatTensor[1, 3, s, s]: the crop around the lesion box, or the whole image."""
    boxes = {0: tuple(float(v) for v in data.boxes[row])} if model == "keyframe-crop" else {}
    return crop_frames(data.images[row][None], [0], boxes, preset.keyframe.image_size)


# ------------------------------------------------------------------ training


def build_network(
    model: str, preset: Preset, seed: int, init: dict[str, dict[str, torch.Tensor]] | None = None
) -> nn.Module:
    """The arm's starting network: seeded random weights, or the ``init`` model's (a
    ``busfed pretrain`` version 0: its ``detector`` or ``keyframe`` state dict)."""
    torch.manual_seed(seed)
    network: nn.Module
    if model == "detector":
        network = build_detector(preset.detector)
    else:
        network = build_keyframe_model(preset.keyframe)
    if init is not None:
        network.load_state_dict(init["detector" if model == "detector" else "keyframe"])
    return network


def read_init(folder: Path, preset: Preset) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of a model version folder, checked against the harness' preset."""
    bundle, _ = load_bundle_dir(folder)
    if bundle.preset.name != preset.name:
        raise SystemExit(f"{folder}: preset {bundle.preset.name}, the harness runs {preset.name}")
    return {name: network.state_dict() for name, network in bundle.networks.items()}


@dataclass
class SiteRun:
    """One site's training in one arm: its patients, its DP settings and what it spent."""

    name: str
    units: list[Unit]
    dp: DPSettings
    delta: float
    epsilon: float = 0.0


def local_training(
    network: nn.Module, site: SiteRun, model: str, *, steps: int, lr: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    common = {
        "dp": site.dp, "steps": steps, "lr": lr, "device": torch.device("cpu"),
        "generator": generator, "secure_rng": False,
    }  # fmt: skip
    if model == "detector":
        train_detector(network, site.units, **common)  # type: ignore[arg-type]
    else:
        train_per_sample(model, network, site.units, samples_per_pass=64, **common)  # type: ignore[arg-type]


def weights(network: nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().astype(np.float32) for t in network.state_dict().values()]


def load_weights(network: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    state = network.state_dict()
    network.load_state_dict(
        {
            k: torch.from_numpy(np.asarray(a)).to(v.dtype)
            for (k, v), a in zip(state.items(), arrays, strict=True)
        }
    )


def train_arm(
    arm: str,
    model: str,
    sites: list[SiteRun],
    preset: Preset,
    recipe: Recipe,
    seed: int,
    init: dict[str, dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """The arm's final model: FedAvg over ``sites``, or one pooled site for ``central``."""
    network = build_network(model, preset, seed, init)
    if arm == "start":
        return network
    lr = recipe.lr if arm.startswith("dp-eps") else recipe.lr_no_dp
    if arm == "central":
        pooled = SiteRun("all", [u for s in sites for u in s.units], sites[0].dp, sites[0].delta)
        local_training(network, pooled, model, steps=recipe.steps, lr=lr, seed=seed)
        return network
    for round_ in range(recipe.rounds):
        updates = []
        for index, site in enumerate(sites):
            local = copy.deepcopy(network)
            local_training(
                local, site, model, steps=recipe.local_steps, lr=lr,
                seed=seed * 1000 + round_ * 10 + index,
            )  # fmt: skip
            updates.append((weights(local), len(site.units)))
        load_weights(network, aggregate(updates))
    return network


def site_runs(
    data: Images, train_rows: np.ndarray, arm: str, model: str, preset: Preset, recipe: Recipe
) -> list[SiteRun]:
    """The arm's sites: their units and DP settings (sigma calibrated to the arm's epsilon).

    delta is 1 / the site's patients (all folds), so at most 1 / its training patients in
    every fold, and one sigma serves all folds.
    """
    runs = []
    for name in SITES:
        rows = train_rows[data.sites[train_rows] == name]
        units = cached_units(data, rows, model, preset)
        delta = 1.0 / len(set(data.patients[data.sites == name].tolist()))
        if arm.startswith("dp-eps"):
            epsilon = float(arm.removeprefix("dp-eps"))
            sigma = calibrated_sigma(
                epsilon=epsilon, delta=delta, sample_rate=recipe.sample_rate, steps=recipe.steps
            )
            dp = DPSettings(
                noise_multiplier=sigma, max_grad_norm=recipe.max_grad_norm,
                sample_rate=recipe.sample_rate,
            )  # fmt: skip
            spent = SiteAccountant().epsilon_if(delta, [(sigma, recipe.sample_rate, recipe.steps)])
        else:
            dp = DPSettings.allowing_noise_off(
                noise_multiplier=0.0, max_grad_norm=NO_CLIP, sample_rate=recipe.sample_rate
            )
            spent = 0.0 if arm == "start" else math.inf  # the start has seen no patient
        runs.append(SiteRun(name, units, dp, delta, spent))
    return runs


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def keyframe_scores(
    network: nn.Module, data: Images, rows: np.ndarray, model: str, preset: Preset
) -> np.ndarray:
    network.eval()
    inputs = torch.cat([_keyframe_input(data, int(row), model, preset) for row in rows])
    return torch.cat(
        [torch.sigmoid(network(inputs[i : i + 128])) for i in range(0, len(inputs), 128)]
    ).numpy()


@dataclass
class Result:
    """One model and arm, pooled over the folds run."""

    model: str
    arm: str
    folds: list[int]
    seconds: float = 0.0
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    predictions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    epsilons: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "arm": self.arm, "folds": len(self.folds)}
        if self.model == "detector":
            scores = detection_scores(self.predictions, self.truths, iou=0.5)
            out |= {
                "n": scores.n_images,
                "recall_iou50": scores.recall,
                "ap_iou50": scores.average_precision,
            }
        else:
            labels, scores_ = np.array(self.labels), np.array(self.scores)
            ci = auc_ci(labels, scores_, direction="<")
            match = threshold_for_sensitivity(labels, scores_, target=TARGET_SENSITIVITY)
            out |= {
                "n": len(labels), "auc": ci.auc, "auc_low": ci.ci_low, "auc_high": ci.ci_high,
                "sensitivity": match.sensitivity, "specificity": match.specificity,
            }  # fmt: skip
        for site, values in self.epsilons.items():
            out[f"eps_{site}"] = max(values)
        out["seconds"] = self.seconds
        return out


def detections(
    network: nn.Module, data: Images, rows: np.ndarray, preset: Preset
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The detector's boxes and scores per test image, at its input size (as a site runs it)."""
    size = preset.detector.image_size
    picked = [int(r) for r in rows]
    images, _ = detector_samples(
        data.images[picked], list(range(len(picked))), {}, size, where="test"
    )
    return detect(network, images, device=torch.device("cpu"), batch_size=16)


def truth_boxes(data: Images, rows: np.ndarray, preset: Preset) -> list[np.ndarray]:
    scale = preset.detector.image_size / data.images.shape[-1]
    return [data.boxes[int(r)][None] * scale for r in rows]


# ------------------------------------------------------------------ output


COLUMNS = (
    "model", "arm", "folds", "n", "auc", "auc_low", "auc_high", "sensitivity", "specificity",
    "recall_iou50", "ap_iou50", *(f"eps_{s}" for s in SITES), "seconds",
)  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    epsilon_columns = " | ".join(f"ε {s}" for s in SITES)
    lines = [
        header,
        "",
        "| model | arm | AUC (95% CI) | sens / spec at 0.90 sens | recall@0.5 / AP | "
        f"{epsilon_columns} | time |",
        "|---|---|---|---|---|" + "---|" * len(SITES) + "---|",
    ]
    for row in rows:
        auc = (
            f"{row['auc']:.3f} ({row['auc_low']:.3f}–{row['auc_high']:.3f})"
            if "auc" in row
            else "—"
        )
        sens = f"{row['sensitivity']:.2f} / {row['specificity']:.2f}" if "auc" in row else "—"
        det = f"{row['recall_iou50']:.2f} / {row['ap_iou50']:.2f}" if "ap_iou50" in row else "—"
        eps = " | ".join(
            "∞" if math.isinf(row[f"eps_{s}"]) else f"{row[f'eps_{s}']:.2f}" for s in SITES
        )
        minutes = f"{row['seconds'] / 60:.1f} min"
        lines.append(
            f"| {row['model']} | {row['arm']} | {auc} | {sens} | {det} | {eps} | {minutes} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """AUC (AP for the detector) against epsilon; the non-DP levels as horizontal lines."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    colors = dict(zip(MODELS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for model in MODELS:
        mine = {r["arm"]: r for r in rows if r["model"] == model}
        if not mine:
            continue
        metric = "ap_iou50" if model == "detector" else "auc"
        label = f"{model} ({'AP@0.5' if model == 'detector' else 'AUC'})"
        points = [(e, mine[f"dp-eps{e:g}"][metric]) for e in EPSILONS if f"dp-eps{e:g}" in mine]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=colors[model],
                    label=f"{label}, federated DP")  # fmt: skip
        for arm, style, what in (
            ("start", "-", "starting model, untrained"),
            ("central", "--", "central no DP"),
            ("federated", ":", "federated no DP"),
        ):
            if arm in mine:
                ax.axhline(mine[arm][metric], color=colors[model], linestyle=style, linewidth=1.2,
                           label=f"{label}, {what}")  # fmt: skip
    ax.axhline(TARGET_AUC, color="black", linestyle="-.", linewidth=0.8,
               label=f"consortium's target AUC {TARGET_AUC:.2f}")  # fmt: skip
    ax.axhline(0.5, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε per site, whole campaign (δ = 1 / the site's patients)")
    ax.set_ylabel("AUC (key-frame models) / AP at IoU 0.5 (detector)")
    ax.set_ylim(0, 1)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_outputs(
    results: list[Result],
    out: Path,
    preset: str,
    folds: list[int],
    started: float,
    start: str = "random weights",
) -> str:
    """The CSV, markdown table and plot of the folds done so far; returns the table."""
    rows = [result.row() for result in results]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "privacy_utility.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    device = "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    header = (
        f"BUS-BRA, 3 scanner sites, official folds {','.join(map(str, folds))} held out in turn; "
        f"preset {preset}, from {start}; {device}, {torch.get_num_threads()} threads; "
        f"{time.strftime('%Y-%m-%d')}; total {(time.perf_counter() - started) / 60:.1f} min"
    )
    table = markdown(rows, header)
    (out / "privacy_utility.md").write_text(table)
    plot(rows, out / "privacy_utility.png", header)
    return table


# ------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--busbra", type=Path, help="the BUS-BRA folder")
    source.add_argument("--arrays", type=Path, help="an array file written by --save-arrays")
    parser.add_argument("--save-arrays", type=Path, help="write the resized data set here")
    parser.add_argument("--size", type=int, default=256, help="square side images are resized to")
    parser.add_argument("--preset", choices=tuple(RECIPES), default="tiny")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--folds", default="1,2,3,4,5", help="official folds to hold out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--init", type=Path, help="start every arm from this model version (busfed pretrain)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    arms = [a for a in args.arms.split(",") if a]
    folds = [int(f) for f in args.folds.split(",") if f]
    unknown = sorted({*models} - {*MODELS}) + sorted({*arms} - {*ARMS})
    if unknown:
        parser.error(f"unknown model or arm: {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    init = read_init(args.init, preset) if args.init is not None else None
    started = time.perf_counter()
    if args.arrays is not None:
        data = Images.load(args.arrays)
    else:
        print(f"reading {args.busbra} at {args.size} px", flush=True)
        data = read_busbra(args.busbra, args.size)
    if args.save_arrays is not None:
        data.save(args.save_arrays)
        print(f"wrote {args.save_arrays} ({args.save_arrays.stat().st_size / 2**20:.1f} MiB)")
    sites = {s: int((data.sites == s).sum()) for s in SITES}
    patients = len(set(data.patients.tolist()))
    print(
        f"{len(data)} images of {patients} patients; sites {sites}; preset {args.preset}, "
        f"folds {folds}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results = {(m, a): Result(m, a, []) for m in models for a in arms}
    table = ""
    for fold in folds:
        test_rows = np.flatnonzero(data.folds == fold)
        train_rows = np.flatnonzero(data.folds != fold)
        for model in models:
            recipe = RECIPES[args.preset]["detector" if model == "detector" else "keyframe"]
            for arm in arms:
                t0 = time.perf_counter()
                runs = site_runs(data, train_rows, arm, model, preset, recipe)
                network = train_arm(arm, model, runs, preset, recipe, args.seed + fold, init)
                result = results[(model, arm)]
                result.folds.append(fold)
                if model == "detector":
                    result.predictions += detections(network, data, test_rows, preset)
                    result.truths += truth_boxes(data, test_rows, preset)
                else:
                    result.labels += data.labels[test_rows].tolist()
                    result.scores += keyframe_scores(
                        network, data, test_rows, model, preset
                    ).tolist()
                for run in runs:
                    result.epsilons[run.name].append(run.epsilon)
                seconds = time.perf_counter() - t0
                result.seconds += seconds
                sigmas = ", ".join(f"{r.name} σ={r.dp.noise_multiplier:.2f}" for r in runs)
                print(f"fold {fold} {model:14s} {arm:10s} {seconds:6.1f} s  ({sigmas})", flush=True)
        done = folds[: folds.index(fold) + 1]
        table = write_outputs(
            list(results.values()), args.out, args.preset, done, started,
            start="random weights" if init is None else f"{args.init} (busfed pretrain)",
        )  # fmt: skip
    print(table)
    print(f"wrote {args.out}/privacy_utility.csv, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
