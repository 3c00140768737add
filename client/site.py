"""The site's federated client: private local training and validation of the chosen model.

The run config's ``model`` picks what a round trains: ``wauve`` (detector and video
classifier), ``keyframe2d`` (the 2D key-frame comparator) or ``detector`` (WAUVE's detector
alone, on annotated video frames and still key frames alike). A site of still key frames
trains the last two, and refuses a WAUVE round: it has no clip. The site's own config
decides the data, device and every privacy parameter; the server's run config proposes
only the model, the preset, the number of local steps (capped by the site) and the
learning rate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from flwr.common.logger import log
from torchvision.models.detection import FasterRCNN

from client.budget import Proposal, RoundId, SiteBudget
from client.dp import MechanismRecord
from client.sent import SentUpdate, SentUpdates
from client.train import train_classifier, train_detector, train_keyframe
from common.config import SiteConfig
from common.data.keyframes import KeyFrameUnits, build_keyframe_units
from common.data.manifest import BOXES, MANIFEST, Problem, load_site
from common.data.units import SiteUnits, build_units
from common.errors import DataError, PrivacyError
from common.evaluation.validation import (
    HISTOGRAM_KEY,
    EvalResult,
    evaluate_bundle,
    evaluate_detector,
    evaluate_keyframe,
)
from common.models.bundle import (
    CLIPPING_RANGE,
    DEFAULT_MODEL,
    DetectorBundle,
    KeyFrameBundle,
    ModelBundle,
    WauveBundle,
    build_bundle,
    bundle_class,
    fingerprint,
    get_weights,
    set_weights,
    weight_names,
)
from common.models.detector import DEFAULT_TRUNK, check_trunk
from common.models.presets import get_preset
from common.models.trainable import check_trains, train_only
from common.pipeline.config import PipelineConfig
from common.pipeline.run import detector_clip_windows
from common.privacy.ledger import LEDGER_METRIC, LedgerEntry
from common.privacy.settings import DPSettings

EVENTS_FILE = "events.jsonl"
# How each network trains; the chosen bundle's ``networks`` say which ones a round trains.
TRAINERS: dict[str, Callable[..., MechanismRecord]] = {
    "detector": train_detector,
    "classifier": train_classifier,
    "keyframe": train_keyframe,
}


def resolve_device(setting: str) -> torch.device:
    """'auto' picks the site's GPU when one is visible, the CPU otherwise."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def skipped_counts(problems: list[Problem]) -> dict[str, Scalar]:
    """What a site's units left out, as flat metrics the server records per site.

    ``skipped_rows`` counts manifest rows, ``box_problems`` problems in ``boxes.csv`` (a
    bad row, or all box rows of one unusable video), ``skipped_videos`` videos of the split
    that could not be read.
    """
    return {
        "skipped_rows": len({p.line for p in problems if p.file == MANIFEST}),
        "box_problems": sum(p.file == BOXES for p in problems),
        "skipped_videos": sum(p.file not in (MANIFEST, BOXES) for p in problems),
    }


def check_update(weights: NDArrays, names: list[str]) -> None:
    """Refuse to send an update with NaN/inf or values SecAgg+ would clip."""
    for name, w in zip(names, weights, strict=True):
        if not np.all(np.isfinite(w)):
            raise PrivacyError(f"update refused: {name} has non-finite values")
        peak = float(np.max(np.abs(w))) if w.size else 0.0
        if peak > CLIPPING_RANGE:
            raise PrivacyError(
                f"update refused: {name} reaches {peak:.3g}, outside SecAgg+'s range "
                f"+-{CLIPPING_RANGE}"
            )


class SiteClient(NumPyClient):
    """One hospital: trains on its own videos, reports its cumulative epsilon."""

    def __init__(self, config: SiteConfig, run_config: dict[str, Scalar]) -> None:
        self.config = config
        self.preset = str(run_config["preset"])
        self.proposed_steps = int(run_config["local-steps"])
        self.lr = float(run_config["learning-rate"])
        # The detector's own step size; 0 (or absent, from an older server): the same.
        self.detector_lr = float(run_config.get("detector-learning-rate", 0.0)) or self.lr
        self.seed = int(run_config.get("seed", 0))
        # Absent (an older server): every parameter trains, as before.
        self.classifier_trains = check_trains(str(run_config.get("classifier-trains", "all")))
        self.augment_views = int(run_config.get("augment-views", 1))
        self.proposal = Proposal.from_run_config(run_config)
        self.model = bundle_class(str(run_config.get("model", DEFAULT_MODEL))).kind
        self.trunk = check_trunk(str(run_config.get("trunk", DEFAULT_TRUNK)))
        torch.set_num_threads(config.site.threads)
        self.device = resolve_device(config.site.device)
        self.sent = SentUpdates(config.site.state)

    def _bundle(self, parameters: NDArrays) -> ModelBundle:
        bundle = build_bundle(self.preset, seed=self.seed, model=self.model, trunk=self.trunk)
        set_weights(bundle, parameters)
        return bundle

    def _keyframe_units(self, split: str) -> KeyFrameUnits:
        site = load_site(self.config.site.data, check_videos=False)
        units = build_keyframe_units(site, get_preset(self.preset), split=split)
        self._report_skipped(split, units.skipped)
        return units

    def _training_units(
        self, split: str, bundle: ModelBundle | None = None
    ) -> tuple[dict[str, list[Any]], list[Problem]]:
        """Per network of the chosen model, its per-patient units; and what they left out.

        ``bundle`` is the global model this round starts from: its detector finds the
        tracks that ``training.detector_track_fraction`` mixes into the classifier's clips.

        Raises
        ------
        DataError
            The split has nothing the model can train on: for WAUVE, no clip of
            ``clip_len`` consecutive annotated frames (a site of still key frames has
            none); for the key-frame model, no key frame; for the detector, no frame.
        """
        name = self.config.site.name
        if self.model == KeyFrameBundle.kind:
            frames = self._keyframe_units(split)
            if not any(len(u.images) for u in frames.keyframe):
                raise DataError(
                    f"site {name} cannot train the keyframe2d model: its {split} split has "
                    "no key frame (a sweep with a lesion box, or a still image)"
                )
            return {"keyframe": frames.keyframe}, frames.skipped
        if self.model == DetectorBundle.kind:
            # A still key frame is a one-frame video: its frame 0 and box are a sample.
            units = self._units(split)
            if not units.detector:
                raise DataError(
                    f"site {name} cannot train the detector: its {split} split has no "
                    "readable video or still image"
                )
            return {"detector": units.detector}, units.skipped
        units = self._units(split, bundle.detector if isinstance(bundle, WauveBundle) else None)
        if not any(len(u.clips) for u in units.classifier):
            clip_len = get_preset(self.preset).classifier.clip_len
            raise DataError(
                f"site {name} cannot train WAUVE (a video model): no video of its {split} "
                f"split has {clip_len} consecutive annotated frames. A site of still key "
                "frames trains only the keyframe2d or detector model (run config "
                "model=keyframe2d or model=detector)"
            )
        return {"detector": units.detector, "classifier": units.classifier}, units.skipped

    def _units(self, split: str, detector: FasterRCNN | None = None) -> SiteUnits:
        """Detector frames and classifier clips; training clips may mix in detector tracks.

        Validation always uses ground-truth tracks, so that rounds stay comparable.
        """
        site = load_site(self.config.site.data, check_videos=False)
        preset = get_preset(self.preset)
        fraction = self.config.training.detector_track_fraction
        clips = None
        if split == "train" and fraction > 0 and detector is not None:
            clips = detector_clip_windows(
                detector.to(self.device),
                image_size=preset.detector.image_size,
                clip_len=preset.classifier.clip_len,
                config=PipelineConfig(),
            )
        units = build_units(
            site,
            preset,
            split=split,
            frame_stride=self.config.training.frame_stride,
            max_frames_per_video=self.config.training.max_frames_per_video,
            detector_clips=clips,
            detector_track_fraction=fraction if clips is not None else 0.0,
        )
        self._report_skipped(split, units.skipped)
        return units

    def _report_skipped(self, split: str, skipped: list[Problem]) -> None:
        if skipped:
            # A bad row or a damaged video never stops the round, and is never skipped
            # silently: hospital IT sees which files to fix.
            self.event(
                "data-skipped",
                split=split,
                **skipped_counts(skipped),
                problems=[
                    f"{p.file}{f':{p.line}' if p.line else ''} {p.field}: {p.reason}"
                    for p in skipped
                ],
            )

    def event(self, name: str, **fields: object) -> None:
        """Append to the site's activity log, so hospital IT can see what the site did."""
        self.config.site.state.mkdir(parents=True, exist_ok=True)
        line = {"time": time.time(), "site": self.config.site.name, "event": name, **fields}
        with (self.config.site.state / EVENTS_FILE).open("a") as f:
            f.write(json.dumps(line) + "\n")

    def warn_insecure_rng(self, server_round: int) -> None:
        """Log, and record as an event, a round trained with predictable randomness."""
        reason = (
            f"site {self.config.site.name} trains round {server_round} with secure_rng = false: "
            "its DP noise and patient samples come from a seeded torch generator, which is "
            "predictable; acceptable for tests and benchmarks, never for patient data"
        )
        log(WARNING, "%s", reason)
        self.event("insecure-rng", round=server_round, reason=reason)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """One round: the site's guards, private training, its signed record, the update."""
        started = time.perf_counter()
        round_id = RoundId.from_fit_config(config)
        budget = SiteBudget(
            self.config, networks=bundle_class(self.model).network_names, log=self.event
        )
        budget.check_proposal(self.proposal)
        global_model = fingerprint(parameters)
        if budget.trained(round_id):
            return self._send_again(round_id, global_model, budget)
        bundle = self._bundle(parameters)
        try:
            units, skipped = self._training_units("train", bundle)
        except DataError as error:
            budget.refuse(round_id.round, error)
        n_patients = len(next(iter(units.values())))
        budget.guard(round_id, n_units=n_patients, steps=self.steps)
        records = self._train(round_id, bundle, units, budget.settings)
        entries = budget.spend(round_id, records, n_units=n_patients)
        weights = get_weights(bundle)
        check_update(weights, weight_names(bundle))
        epsilon = budget.epsilon
        self.event("fit-end", round=round_id.round, epsilon=epsilon)
        metrics = self._fit_metrics(
            epsilon=epsilon, n_patients=n_patients, records=records, skipped=skipped,
            entries=entries, seconds=time.perf_counter() - started,
        )  # fmt: skip
        # Kept (at the site only) so that a resumed federation's repeated request for this
        # round is answered without training, and so without spending epsilon, again.
        update = SentUpdate(weights, n_patients, metrics)
        self.sent.save(round_id.run_id, round_id.round, global_model=global_model, update=update)
        return weights, n_patients, metrics

    @property
    def steps(self) -> int:
        """DP steps per network this round: the server's proposal, capped by the site."""
        return min(self.proposed_steps, self.config.training.max_local_steps)

    def _send_again(
        self, round_id: RoundId, global_model: str, budget: SiteBudget
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """A round already trained, asked for again: the same update, or a refusal.

        A resumed federation asks again for the round it lost. Re-sending the update
        already released for the same global model is free; training again is not.
        """
        again = self.sent.load(round_id.run_id, round_id.round, global_model=global_model)
        if again is None:
            budget.refuse_twice(round_id)
        self.event("fit-resent", round=round_id.round, campaign=round_id.run_id)
        return again.weights, again.num_examples, again.metrics

    def _train(
        self,
        round_id: RoundId,
        bundle: ModelBundle,
        units: dict[str, list[Any]],
        settings: dict[str, DPSettings],
    ) -> dict[str, MechanismRecord]:
        """DP-SGD of every network of ``bundle`` in place, with the site's settings."""
        self.event("fit-start", round=round_id.round, steps=self.steps)
        secure_rng = self.config.privacy.secure_rng
        if not secure_rng:
            self.warn_insecure_rng(round_id.round)
        # Used only with secure_rng = false: then whoever knows the seed knows the noise.
        generator = torch.Generator().manual_seed(int(time.time_ns() % 2**63))
        for name, network in bundle.networks.items():
            if name != "detector":
                train_only(network, self.classifier_trains)
        return {
            name: TRAINERS[name](
                network, units[name], dp=settings[name], steps=self.steps,
                lr=self.detector_lr if name == "detector" else self.lr,
                device=self.device, generator=generator, secure_rng=secure_rng,
                **({} if name == "detector" else {"views": self.augment_views}),
            )
            for name, network in bundle.networks.items()
        }  # fmt: skip

    def _fit_metrics(
        self,
        *,
        epsilon: float,
        n_patients: int,
        records: dict[str, MechanismRecord],
        skipped: list[Problem],
        entries: list[LedgerEntry],
        seconds: float,
    ) -> dict[str, Scalar]:
        """What the server records of this site's round: flat, and no patient's data."""
        privacy = self.config.privacy
        return {
            "site": self.config.site.name,
            "epsilon": epsilon,
            "delta": privacy.delta,
            "epsilon_budget": privacy.epsilon_budget,
            "privacy_unit": privacy.privacy_unit,
            "steps": self.steps,
            "model": self.model,
            "n_patients": n_patients,
            **{f"{name}_loss": rec.mean_loss for name, rec in records.items()},
            "fit_seconds": seconds,
            "device": str(self.device),
            **skipped_counts(skipped),
            # The round's signed ledger entries hold parameters and epsilons, no patient data.
            LEDGER_METRIC: json.dumps([e.model_dump(mode="json") for e in entries]),
        }

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        bundle = self._bundle(parameters)
        result: EvalResult
        if isinstance(bundle, KeyFrameBundle):
            frames = self._keyframe_units("val")
            result = evaluate_keyframe(bundle, frames.keyframe, device=self.device)
            skipped = frames.skipped
        elif isinstance(bundle, WauveBundle):
            units = self._units("val")
            result = evaluate_bundle(bundle, units, device=self.device)
            skipped = units.skipped
        elif isinstance(bundle, DetectorBundle):
            units = self._units("val")
            result = evaluate_detector(bundle, units.detector, device=self.device)
            skipped = units.skipped
        metrics: dict[str, Scalar] = {
            "site": self.config.site.name,
            **result.metrics,
            **skipped_counts(skipped),
        }
        if result.histogram is not None:
            # Counts per score bin, never a single patient's score (Flower metrics are flat).
            pos, neg = result.histogram
            metrics[HISTOGRAM_KEY] = json.dumps({"pos": pos, "neg": neg})
        return result.loss, result.n_units, metrics
