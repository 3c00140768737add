"""Does the demo's federated training learn? Plain FedAvg over generated sites, in process.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/train_quality.py --rounds 3 \\
        --setting steps=3,lr=0.05,sigma=1.5,q=0.3,patients=16 \\
        --setting steps=10,lr=0.5,sigma=0,q=1,patients=16

(``-m benchmarks.train_quality`` does not work: Opacus installs a top-level ``benchmarks``
package that shadows this folder.)

For each ``--setting`` the stages are those of ``busfed demo`` without Flower:

1. generate ``--sites`` training sites as the demo does (its vendors, seeds ``--seed + i``,
   frames and frame size), ``patients`` each;
2. ``--rounds`` rounds: every site starts from the global weights and runs the site's
   training code on its train split (``common.data.units.build_units`` with the demo
   site's frame stride and cap, then ``client.train.train_classifier``, and
   ``train_detector`` when ``detector=1``), with explicit DP parameters; the new global
   model is the mean of the sites' weights weighted by their patients (FedAvg as the
   server runs it; SecAgg+ would change weights by about 1e-5);
3. after every round, the patient-level AUC with its DeLong 95% CI on a held-out site
   generated apart (``--heldout-patients``, another seed and vendor): a patient's score is
   the mean malignancy probability of the clips of their ground-truth tracks, the score
   of the sites' validation and of the consortium's pooled AUC. Patients without a lesion
   (no clip) have no score.

The patient AUC does not depend on the detector, so ``detector=0`` (the default) skips
its training to save time; ``detector=1`` trains it too, so that ``fit s`` is a whole
site round as in the demo (one site at a time here; the demo runs its sites side by side).

``--init MODEL`` starts every setting from a model folder (``busfed pretrain``'s, or the
``pretrain/model`` of a ``busfed demo`` run) instead of seeded weights, and
``--pipeline`` also scores the held-out site after every round with the whole WAUVE
pipeline (detector boxes, tracker, clips; ``deploy.heldout.score_version``, as the demo's
table does): the number that shows whether DP fine-tuning keeps a pretrained detector.

Setting keys (defaults are the demo's): ``steps`` local DP steps per network and round
(3), ``lr`` (0.05), ``dlr`` the detector's own learning rate (0: ``lr``; the demo's run
config ``detector-learning-rate``), ``sigma`` noise multiplier (1.5; 0 is a NON-PRIVATE
run, labelled as such), ``C`` per-patient clip norm (1.0), ``q`` patient sampling rate
(0.3), ``patients`` per site (16), ``detector`` (0), ``train`` which of the
classifier's parameters train (``all``; ``last-stage``, ``norm``, ``head``:
``common.models.trainable``), ``views`` augmented copies of each clip averaged in a
patient's gradient before clipping (1; ``client.train.train_per_sample``). Epsilon is
what one site's accountant would record at delta 1e-5 after all rounds, detector and
classifier composed, as the demo's sites do whether or not the detector is trained here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.train import train_classifier, train_detector
from common.data.manifest import load_site
from common.data.units import SPLITS, ClassifierUnit, build_units
from common.metrics import AucCI, auc_ci
from common.models.bundle import build_bundle, get_weights, set_weights
from common.models.loading import load_bundle_dir
from common.models.presets import get_preset
from common.models.trainable import train_only
from common.privacy.accountant import SiteAccountant
from common.privacy.settings import DPSettings
from deploy.heldout import HeldOutScore, score_version
from deploy.synth import generate_site

# The demo's data and site settings (deploy.demo.DemoSettings, demo_site_config).
VENDORS = ("vendor-a", "vendor-b", "vendor-c")
FRAME_STRIDE, MAX_FRAMES_PER_VIDEO = 2, 16
DELTA = 1e-5


@dataclass(frozen=True)
class Setting:
    steps: int = 3
    lr: float = 0.05
    sigma: float = 1.5
    C: float = 1.0
    q: float = 0.3
    patients: int = 16
    detector: bool = False
    dlr: float = 0.0
    train: str = "all"
    views: int = 1

    @classmethod
    def parse(cls, text: str) -> Setting:
        setting = cls()
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__:
                raise SystemExit(f"--setting {text}: unknown key {key!r}")
            kind = type(getattr(setting, key))
            parsed = bool(int(value)) if kind is bool else kind(value)
            setting = replace(setting, **{key: parsed})
        return setting

    @property
    def private(self) -> bool:
        return self.sigma > 0

    def label(self) -> str:
        privacy = f"sigma {self.sigma:g}" if self.private else "NON-PRIVATE (sigma 0)"
        detector_lr = f", detector lr {self.dlr:g}" if self.dlr else ""
        trains = f", trains {self.train}" if self.train != "all" else ""
        trains += f", {self.views} views" if self.views > 1 else ""
        return (
            f"{self.patients} pt/site, {self.steps} steps, lr {self.lr:g}{detector_lr}, "
            f"q {self.q:g}, C {self.C:g}, {privacy}{trains}"
        )


@dataclass
class Outcome:
    setting: Setting
    aucs: list[AucCI]  # after round 0 (initial weights), 1, ..., R
    pipeline: list[HeldOutScore]  # the same rounds, whole pipeline (--pipeline), or []
    fit_seconds: list[float]  # wall time, per site and round
    fit_cpu_seconds: list[float]  # CPU time of this process, per site and round
    epsilon: float


def _classifier_units(root: Path, splits: tuple[str, ...]) -> list[ClassifierUnit]:
    site = load_site(root, check_videos=False)
    preset = get_preset("tiny")
    return [
        unit
        for split in splits
        for unit in build_units(
            site,
            preset,
            split=split,
            frame_stride=FRAME_STRIDE,
            max_frames_per_video=MAX_FRAMES_PER_VIDEO,
        ).classifier
    ]


@torch.no_grad()
def patient_auc(classifier: torch.nn.Module, units: list[ClassifierUnit]) -> AucCI:
    """AUC (DeLong 95% CI) of the patients' mean clip probabilities; patients with clips."""
    classifier.eval()
    scores, labels = [], []
    for unit in units:
        if len(unit.clips):
            scores.append(float(torch.sigmoid(classifier(unit.clips)).mean()))
            labels.append(bool(unit.labels[0] >= 0.5))
    return auc_ci(np.array(labels), np.array(scores), direction="<")


def site_epsilon(setting: Setting, rounds: int) -> float:
    if not setting.private:
        return float("inf")
    accountant = SiteAccountant("rdp")
    for _ in range(rounds):
        for _network in ("detector", "classifier"):
            accountant.record(setting.sigma, setting.q, setting.steps)
    return accountant.epsilon(DELTA)


def run_setting(
    setting: Setting,
    sites: list[Path],
    heldout: list[ClassifierUnit],
    *,
    rounds: int,
    seed: int,
    console: Console,
    init: Path | None = None,
    pipeline_site: Path | None = None,
) -> Outcome:
    preset = get_preset("tiny")
    device = torch.device("cpu")
    dp = DPSettings.allowing_noise_off(
        noise_multiplier=setting.sigma, max_grad_norm=setting.C, sample_rate=setting.q
    )
    bundle = load_bundle_dir(init)[0] if init is not None else build_bundle("tiny", seed=seed)
    global_weights = get_weights(bundle)
    aucs = [patient_auc(bundle.classifier, heldout)]
    held_site = load_site(pipeline_site) if pipeline_site is not None else None

    def pipeline_score(round_: int) -> list[HeldOutScore]:
        if held_site is None:
            return []
        with tempfile.TemporaryDirectory(prefix="busfed-pipeline-") as out:
            score = score_version(
                bundle, held_site, round=round_, version=f"round {round_}", out=Path(out)
            )
        return [score]  # the trainers put the networks back in train mode

    pipeline = pipeline_score(0)
    fit_seconds: list[float] = []
    fit_cpu_seconds: list[float] = []
    for round_ in range(1, rounds + 1):
        updates, sizes = [], []
        for index, root in enumerate(sites):
            started, started_cpu = time.perf_counter(), time.process_time()
            # What a site does in a round: load its units, train from the global weights.
            units = build_units(
                load_site(root, check_videos=False),
                preset,
                split="train",
                frame_stride=FRAME_STRIDE,
                max_frames_per_video=MAX_FRAMES_PER_VIDEO,
            )
            set_weights(bundle, global_weights)
            # Seeded randomness (secure_rng=False): settings are compared on the same draws.
            generator = torch.Generator().manual_seed(seed * 1000 + round_ * 10 + index)
            if setting.detector:
                train_detector(
                    bundle.detector, units.detector, dp=dp, steps=setting.steps,
                    lr=setting.dlr or setting.lr, device=device, generator=generator,
                    secure_rng=False,
                )  # fmt: skip
            train_only(bundle.classifier, setting.train)
            train_classifier(
                bundle.classifier, units.classifier, dp=dp, steps=setting.steps,
                lr=setting.lr, device=device, generator=generator, secure_rng=False,
                views=setting.views,
            )  # fmt: skip
            fit_seconds.append(time.perf_counter() - started)
            fit_cpu_seconds.append(time.process_time() - started_cpu)
            updates.append(get_weights(bundle))
            sizes.append(len(units.detector))
        weights = np.array(sizes, dtype=np.float64) / sum(sizes)
        global_weights = [
            np.sum(
                [w * update[i] for w, update in zip(weights, updates, strict=True)], axis=0
            ).astype(np.float32)
            for i in range(len(global_weights))
        ]
        set_weights(bundle, global_weights)
        aucs.append(patient_auc(bundle.classifier, heldout))
        pipeline += pipeline_score(round_)
        whole = f", whole pipeline AUC {pipeline[-1].text()}" if pipeline else ""
        console.print(
            f"  round {round_}: held-out patient AUC {_auc_text(aucs[-1])}{whole}, "
            f"fit {np.mean(fit_seconds[-len(sites) :]):.1f} s/site "
            f"(CPU {np.mean(fit_cpu_seconds[-len(sites) :]):.1f} s)",
            soft_wrap=True,
        )
    return Outcome(
        setting, aucs, pipeline, fit_seconds, fit_cpu_seconds, site_epsilon(setting, rounds)
    )


def _auc_text(auc: AucCI) -> str:
    return f"{auc.auc:.3f} ({auc.ci_low:.3f}-{auc.ci_high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setting", action="append", default=[], help="key=value,... (see the module doc)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--heldout-patients", type=int, default=48)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7, help="the demo's seed (sites seed+i)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", type=Path, help="start from this model folder")
    parser.add_argument(
        "--pipeline", action="store_true", help="also score the whole pipeline every round"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [Setting.parse(text) for text in args.setting] or [Setting()]
    # Wide enough for the result table when the output goes to a file.
    console = Console(highlight=False, width=200)

    with tempfile.TemporaryDirectory(prefix="busfed-quality-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        generate_site(
            root / "heldout", site="heldout", patients=args.heldout_patients,
            seed=args.seed + 100, vendor=VENDORS[args.sites % len(VENDORS)],
            frames=args.frames, size=args.size,
        )  # fmt: skip
        heldout = _classifier_units(root / "heldout", SPLITS)
        n_pos = sum(bool(u.labels[0] >= 0.5) for u in heldout if len(u.clips))
        n_neg = sum(1 for u in heldout if len(u.clips)) - n_pos
        console.print(
            f"held-out site: {args.heldout_patients} patients, {n_pos} malignant and {n_neg} "
            f"benign with a lesion clip ({time.perf_counter() - started:.0f} s to generate)"
        )
        site_roots: dict[int, list[Path]] = {}
        outcomes = []
        for setting in settings:
            if setting.patients not in site_roots:
                site_roots[setting.patients] = [
                    root / f"p{setting.patients}-site{i}" for i in range(args.sites)
                ]
                for i, site_root in enumerate(site_roots[setting.patients]):
                    generate_site(
                        site_root, site=f"site{i}", patients=setting.patients,
                        seed=args.seed + i, vendor=VENDORS[i % len(VENDORS)],
                        frames=args.frames, size=args.size,
                    )  # fmt: skip
            console.print(f"[bold]{setting.label()}[/bold]")
            outcomes.append(
                run_setting(
                    setting, site_roots[setting.patients], heldout,
                    rounds=args.rounds, seed=args.seed, console=console, init=args.init,
                    pipeline_site=root / "heldout" if args.pipeline else None,
                )
            )  # fmt: skip

    table = Table(
        title=f"FedAvg over {args.sites} generated sites, {args.rounds} rounds; patient AUC "
        f"(DeLong 95% CI) on a held-out site ({n_pos} malignant, {n_neg} benign)"
    )
    columns = ["setting", "epsilon", "fit s/site", "CPU s/site", "AUC initial", "AUC final"]
    if args.pipeline:
        columns += ["pipeline AUC initial", "pipeline AUC final"]
    for column in columns:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for outcome in outcomes:
        table.add_row(
            outcome.setting.label()
            + (" (+detector)" if outcome.setting.detector else " (classifier only)"),
            f"{outcome.epsilon:.2f}" if np.isfinite(outcome.epsilon) else "inf",
            f"{np.mean(outcome.fit_seconds):.1f} (max {max(outcome.fit_seconds):.1f})",
            f"{np.mean(outcome.fit_cpu_seconds):.1f}",
            _auc_text(outcome.aucs[0]),
            _auc_text(outcome.aucs[-1]),
            *([outcome.pipeline[0].text(), outcome.pipeline[-1].text()] if args.pipeline else []),
        )
    console.print(table)


if __name__ == "__main__":
    main()
