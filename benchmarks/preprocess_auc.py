"""Does the pipeline's optional preprocess stage change the AUC? Measured on a held-out site.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python benchmarks/preprocess_auc.py [--model DIR]
    PYTHONPATH=. .venv/bin/python benchmarks/preprocess_auc.py --train-preprocess

(``-m benchmarks.preprocess_auc`` does not work: Opacus installs a top-level
``benchmarks`` package that shadows this folder.)

Stages:

1. generate a held-out synthetic site (``deploy.synth.generate_site``);
2. get a model: ``--model DIR`` loads a model version folder (``weights.pt`` +
   ``model.json``); without it a tiny-preset bundle is trained here with the site training
   code (``client.train.train_detector`` and ``train_classifier``) on a generated training
   site (every split), with the DP parameters given (``--sigma 0``, the default, is a
   NON-PRIVATE run and is labelled so). ``--train-preprocess`` cuts the training units from
   preprocessed videos (``build_units(preprocess=...)``): the pipeline preprocesses before
   detection, so detector frames and classifier clips must both see the preprocessed
   pixels for inference with preprocessing to be the condition the model was trained in;
3. score every held-out video with ``run_pipeline``, preprocess off and on, same model,
   for each ``--boxes`` source: ``gt`` (oracle ground-truth tracks: the classifier alone;
   videos without a ground-truth clip, i.e. without a lesion, are left out of both) and
   ``detector`` (deployment; a video where no lesion is tracked gets score 0.0, nothing
   suspicious found, as ``busfed evaluate``'s ``with_fallback`` block, so both conditions
   score the same videos). A briefly trained detector may track nothing at the
   pipeline's box threshold (every score 0.0, AUC 0.5); ``--score-threshold`` lowers it,
   ``--save-model`` keeps the model to score again with ``--model``;
4. print the video-level AUC with its DeLong 95% CI for each condition and DeLong's paired
   test of preprocess on against off.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.train import train_classifier, train_detector
from common.data.manifest import load_site
from common.data.units import SPLITS, SiteUnits, build_units
from common.data.video import read_video
from common.metrics import auc_ci, delong_test
from common.models.bundle import build_bundle
from common.models.presets import get_preset
from common.pipeline.config import PipelineConfig, PreprocessConfig
from common.pipeline.run import run_pipeline
from common.privacy.accountant import SiteAccountant
from common.privacy.settings import DPSettings
from deploy.synth import generate_site

FALLBACK_SCORE = 0.0  # no lesion tracked: nothing suspicious found
DELTA = 1e-5


def train_bundle(root: Path, args: argparse.Namespace, console: Console) -> tuple[Any, str]:
    """A tiny bundle trained on every split of the site at ``root``; its label in words."""
    preset = get_preset("tiny")
    site = load_site(root, check_videos=False)
    preprocess = PreprocessConfig() if args.train_preprocess else None
    per_split = [
        build_units(
            site,
            preset,
            split=split,
            frame_stride=args.frame_stride,
            max_frames_per_video=args.max_frames_per_video,
            preprocess=preprocess,
        )
        for split in SPLITS
    ]
    units = SiteUnits(
        detector=[u for s in per_split for u in s.detector],
        classifier=[u for s in per_split for u in s.classifier],
    )
    bundle = build_bundle("tiny", seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    device = torch.device("cpu")
    plans = {
        name: (
            DPSettings.allowing_noise_off(
                noise_multiplier=args.sigma, max_grad_norm=args.clip_norm, sample_rate=rate
            ),
            steps,
        )
        for name, rate, steps in (
            ("detector", args.detector_sample_rate, args.detector_steps),
            ("classifier", args.classifier_sample_rate, args.classifier_steps),
        )
    }
    started = time.perf_counter()
    for name, train, network, unit_list in (
        ("detector", train_detector, bundle.detector, units.detector),
        ("classifier", train_classifier, bundle.classifier, units.classifier),
    ):
        dp, steps = plans[name]
        record = train(
            network, unit_list, dp=dp, steps=steps, lr=args.lr, device=device,
            generator=generator, secure_rng=False,  # seeded: a reproducible benchmark
        )  # fmt: skip
        console.print(
            f"  {name}: {steps} steps, q {dp.sample_rate:g}, {record.n_units} patients, "
            f"mean loss {record.mean_loss:.3f}"
        )
    if args.sigma > 0:
        accountant = SiteAccountant("rdp")
        for dp, steps in plans.values():
            accountant.record(dp.noise_multiplier, dp.sample_rate, steps)
        privacy = f"DP sigma {args.sigma:g}, C {args.clip_norm:g}: epsilon "
        privacy += f"{accountant.epsilon(DELTA):.2f} at delta {DELTA:g}"
    else:
        privacy = "NON-PRIVATE (noise multiplier 0: no differential privacy)"
    label = (
        f"tiny bundle trained here on {len(units.detector)} patients, lr {args.lr:g}, "
        f"{privacy}, preprocess in training {'ON' if preprocess else 'OFF'}"
    )
    console.print(f"  trained in {time.perf_counter() - started:.0f} s: {label}", soft_wrap=True)
    return bundle, label


def score_site(
    root: Path,
    bundle: Any,
    boxes_source: str,
    preprocess: PreprocessConfig | None,
    *,
    score_threshold: float,
) -> tuple[list[str], list[bool], list[float | None]]:
    """Per video: name, malignant?, score (None when no lesion was tracked)."""
    site = load_site(root)
    config = PipelineConfig(
        boxes_source=boxes_source,  # type: ignore[arg-type]
        preprocess=preprocess,
        score_threshold=score_threshold,
    )
    names, labels, scores = [], [], []
    for row in site.rows:
        result = run_pipeline(
            read_video(site.path(row)), bundle, config, gt_boxes=site.boxes.get(row.video, {})
        )
        names.append(row.video)
        labels.append(row.label == "malignant")
        scores.append(result.score)
    return names, labels, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model version folder; default: train one")
    parser.add_argument(
        "--save-model", type=Path, metavar="DIR", help="keep the trained model (for --model)"
    )
    parser.add_argument("--train-preprocess", action="store_true")
    parser.add_argument("--boxes", nargs="+", default=["gt", "detector"])
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="detector box threshold (pipeline)"
    )
    parser.add_argument("--heldout-patients", type=int, default=48)
    parser.add_argument("--train-patients", type=int, default=32)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    # training (ignored with --model)
    parser.add_argument("--sigma", type=float, default=0.0, help="noise multiplier; 0: no DP")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="per-patient clip norm C")
    parser.add_argument("--detector-sample-rate", type=float, default=0.25)
    parser.add_argument("--classifier-sample-rate", type=float, default=1.0)
    parser.add_argument("--detector-steps", type=int, default=20, help="0: untrained")
    parser.add_argument("--classifier-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--frame-stride", type=int, default=2)
    parser.add_argument("--max-frames-per-video", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Wide enough for the result table when the output goes to a file.
    console = Console(highlight=False, width=200)

    with tempfile.TemporaryDirectory(prefix="busfed-preprocess-") as tmp:
        heldout = Path(tmp) / "heldout"
        summary = generate_site(
            heldout, site="heldout", patients=args.heldout_patients, seed=args.seed + 100,
            vendor="vendor-c", frames=args.frames, size=args.size,
        )  # fmt: skip
        console.print(
            f"held-out site: {summary.n_patients} patients, {summary.n_videos} videos, "
            f"{summary.n_malignant} malignant patients, {summary.vendor}"
        )
        if args.model is not None:
            from common.models.loading import load_bundle_dir

            bundle, card = load_bundle_dir(args.model)
            label = f"{args.model} ({card.get('preset')}, round {card.get('round')})"
        else:
            generate_site(
                Path(tmp) / "train", site="train", patients=args.train_patients,
                seed=args.seed, vendor="vendor-a", frames=args.frames, size=args.size,
            )  # fmt: skip
            console.print("training:")
            bundle, label = train_bundle(Path(tmp) / "train", args, console)
            if args.save_model is not None:
                from common.models.loading import save_bundle_dir

                card = {"preset": "tiny", "round": 0, "trained_by": "preprocess_auc.py"}
                save_bundle_dir(bundle, args.save_model, {**card, "training": label})

        table = Table(title=f"video-level AUC (DeLong 95% CI), model: {label}")
        for column in ("boxes", "videos", "preprocess OFF", "preprocess ON", "ON - OFF", "p"):
            table.add_column(column, justify="left" if column == "boxes" else "right")
        for boxes_source in args.boxes:
            started = time.perf_counter()
            names, labels, off = score_site(
                heldout, bundle, boxes_source, None, score_threshold=args.score_threshold
            )
            _, _, on = score_site(
                heldout, bundle, boxes_source, PreprocessConfig(),
                score_threshold=args.score_threshold,
            )  # fmt: skip
            if boxes_source == "gt":
                # Same videos in both: those with a ground-truth clip.
                keep = [i for i in range(len(names)) if off[i] is not None]
                note = f"{len(keep)} with a lesion clip"
            else:
                keep = list(range(len(names)))
                untracked = (sum(s is None for s in off), sum(s is None for s in on))
                note = f"{len(keep)} (untracked: {untracked[0]} off, {untracked[1]} on)"
            y = np.array([labels[i] for i in keep])
            a = np.array([FALLBACK_SCORE if off[i] is None else off[i] for i in keep])
            b = np.array([FALLBACK_SCORE if on[i] is None else on[i] for i in keep])
            ci_off = auc_ci(y, a, direction="<")
            ci_on = auc_ci(y, b, direction="<")
            test = delong_test(y, b, a, direction="<")
            table.add_row(
                boxes_source,
                f"{note}; {int(y.sum())} malignant",
                f"{ci_off.auc:.3f} ({ci_off.ci_low:.3f}-{ci_off.ci_high:.3f})",
                f"{ci_on.auc:.3f} ({ci_on.ci_low:.3f}-{ci_on.ci_high:.3f})",
                f"{test.difference:+.3f} ({test.ci_low:+.3f} to {test.ci_high:+.3f})",
                f"{test.p_value:.3g}",
            )
            console.print(f"scored {boxes_source} boxes in {time.perf_counter() - started:.0f} s")
    console.print(table)


if __name__ == "__main__":
    main()
