"""The site's federated client: private local training and validation of the chosen model.

The run config's ``model`` picks what a round trains: ``wauve`` (detector and video
classifier) or ``keyframe2d`` (the 2D key-frame comparator; a site of still key frames can
train only this one, and refuses a WAUVE round). The site's own config decides the data,
device and every privacy parameter; the server's run config proposes only the model, the
preset, the number of local steps (capped by the site) and the learning rate.
"""

from __future__ import annotations

import functools
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

from client.dp import INSECURE_NOISE, SECURE_NOISE
from client.sent import SentUpdate, SentUpdates, fingerprint
from client.train import DPParams, MechanismRecord, train_classifier, train_detector, train_keyframe
from common.config import ModelPrivacy, SiteConfig
from common.data.keyframes import KeyFrameUnits, build_keyframe_units
from common.data.manifest import BOXES, MANIFEST, Problem, load_site
from common.data.units import SiteUnits, build_units
from common.errors import BudgetExceeded, DataError, PrivacyError
from common.evaluation.validation import (
    HISTOGRAM_KEY,
    EvalResult,
    evaluate_bundle,
    evaluate_keyframe,
)
from common.keys import load_signing_key, signing_key_paths
from common.models.bundle import (
    DEFAULT_MODEL,
    KeyFrameBundle,
    ModelBundle,
    WauveBundle,
    build_bundle,
    bundle_class,
    get_weights,
    set_weights,
    weight_names,
)
from common.models.presets import get_preset
from common.pipeline.config import PipelineConfig
from common.pipeline.run import detector_clip_windows
from common.privacy.accountant import SiteAccountant
from common.privacy.ledger import LEDGER_FILE, LEDGER_METRIC, PrivacyLedger

# SecAgg+ quantizes values in [-CLIPPING_RANGE, CLIPPING_RANGE]; anything outside would be
# silently clipped in the sum, so the site refuses to send it (it is the only one who can
# look: the server sees masked vectors only).
CLIPPING_RANGE = 8.0
ACCOUNTANT_FILE = "accountant.json"
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


def _dp(m: ModelPrivacy) -> DPParams:
    return DPParams(
        noise_multiplier=m.noise_multiplier,
        max_grad_norm=m.max_grad_norm,
        sample_rate=m.sample_rate,
    )


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
        self.seed = int(run_config.get("seed", 0))
        self.proposed_noise = float(run_config.get("proposed-noise-multiplier", 0.0))
        self.proposed_rate = float(run_config.get("proposed-sample-rate", 0.0))
        self.model = bundle_class(str(run_config.get("model", DEFAULT_MODEL))).kind
        torch.set_num_threads(config.site.threads)
        self.device = resolve_device(config.site.device)
        self.accountant_path = config.site.state / ACCOUNTANT_FILE

    def _bundle(self, parameters: NDArrays) -> ModelBundle:
        bundle = build_bundle(self.preset, seed=self.seed, model=self.model)
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
            none); for the key-frame model, no key frame.
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
        units = self._units(split, bundle.detector if isinstance(bundle, WauveBundle) else None)
        if not any(len(u.clips) for u in units.classifier):
            clip_len = get_preset(self.preset).classifier.clip_len
            raise DataError(
                f"site {name} cannot train WAUVE (a video model): no video of its {split} "
                f"split has {clip_len} consecutive annotated frames. A site of still key "
                "frames trains only the keyframe2d model (run config model=keyframe2d)"
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

    def _accountant(self) -> SiteAccountant:
        if self.accountant_path.exists():
            return SiteAccountant.load(self.accountant_path)
        return SiteAccountant(kind=self.config.privacy.accountant)

    def check_proposal(self) -> None:
        """The site's privacy settings win; a server proposal weaker than them is refused.

        Less noise or a higher patient sampling rate than the site's would spend more of its
        budget per step than the hospital agreed to; stronger proposals change nothing
        (the site trains with its own values either way).
        """
        privacy = self.config.privacy
        for model in map(privacy.of, bundle_class(self.model).network_names):
            if 0 < self.proposed_noise < model.noise_multiplier:
                raise PrivacyError(
                    f"site {self.config.site.name} refuses: the server proposes noise multiplier "
                    f"{self.proposed_noise}, weaker than the site's {model.noise_multiplier}"
                )
            if self.proposed_rate > model.sample_rate:
                raise PrivacyError(
                    f"site {self.config.site.name} refuses: the server proposes sample rate "
                    f"{self.proposed_rate}, weaker than the site's {model.sample_rate}"
                )

    def _ledger(self) -> PrivacyLedger:
        site = self.config.site
        key_path, _ = signing_key_paths(site.keys, site=site.name)
        return PrivacyLedger(
            site.state / LEDGER_FILE, site=site.name, signing_key=load_signing_key(key_path)
        )

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        started = time.perf_counter()
        server_round = int(config.get("round", 0))
        # The campaign outlives a restarted server (each restart is a new Flower run), so
        # the ledger and the duplicate guard key on it.
        run_id = str(config.get("campaign") or config.get("run_id", "unknown"))
        privacy = self.config.privacy
        steps = min(self.proposed_steps, self.config.training.max_local_steps)
        self.check_proposal()
        plans = {name: _dp(privacy.of(name)) for name in bundle_class(self.model).network_names}
        self.config.site.state.mkdir(parents=True, exist_ok=True)
        ledger = self._ledger()
        sent = SentUpdates(self.config.site.state)
        global_model = fingerprint(parameters)
        if any(
            e.run_id == run_id and e.round == server_round and e.status == "trained"
            for e in ledger.entries()
        ):
            # A resumed federation asks again for the round it lost. Re-sending the update
            # already released for the same global model is free; training again is not.
            if (again := sent.load(run_id, server_round, global_model=global_model)) is not None:
                self.event("fit-resent", round=server_round, campaign=run_id)
                return again.weights, again.num_examples, again.metrics
            reason = (
                f"site {self.config.site.name} already trained round {server_round} of "
                f"campaign {run_id} from another global model; it will not spend epsilon on "
                "it twice"
            )
            self.event("fit-refused", round=server_round, reason=reason)
            raise PrivacyError(reason)
        bundle = self._bundle(parameters)
        try:
            units, skipped = self._training_units("train", bundle)
        except DataError as error:
            self.event("fit-refused", round=server_round, reason=str(error))
            raise
        n_patients = len(next(iter(units.values())))
        accountant = self._accountant()
        record_entry = functools.partial(
            ledger.append,
            run_id=run_id,
            round=server_round,
            privacy_unit=privacy.privacy_unit,
            n_units=n_patients,
            delta=privacy.delta,
            accountant=privacy.accountant,
            budget=privacy.epsilon_budget,
            noise_source=SECURE_NOISE if privacy.secure_rng else INSECURE_NOISE,
        )

        # Budget guard first: a round that would take the site past its budget trains nothing.
        projected = accountant.epsilon_if(
            privacy.delta, [(dp.noise_multiplier, dp.sample_rate, steps) for dp in plans.values()]
        )
        if projected > privacy.epsilon_budget:
            reason = (
                f"site {self.config.site.name} refuses round {server_round}: epsilon would "
                f"reach {projected:.3f} > budget {privacy.epsilon_budget} at delta {privacy.delta}"
            )
            for model, dp in plans.items():
                record_entry(
                    model=model, sample_rate=dp.sample_rate,
                    noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                    steps=0, epsilon_round=0.0, epsilon_total=accountant.epsilon(privacy.delta),
                    status="refused",
                )  # fmt: skip
            self.event("fit-refused", round=server_round, reason=reason)
            raise BudgetExceeded(reason)
        self.event("fit-start", round=server_round, steps=steps)
        if not privacy.secure_rng:
            self.warn_insecure_rng(server_round)

        # Used only with secure_rng = false: then whoever knows the seed knows the noise.
        generator = torch.Generator().manual_seed(int(time.time_ns() % 2**63))
        records = {
            name: TRAINERS[name](
                network, units[name], dp=plans[name], steps=steps, lr=self.lr,
                device=self.device, generator=generator, secure_rng=privacy.secure_rng,
            )
            for name, network in bundle.networks.items()
        }  # fmt: skip
        entries: list[dict[str, object]] = []
        losses: dict[str, float] = {}
        for model, rec in records.items():
            losses[model] = rec.mean_loss
            alone = SiteAccountant(privacy.accountant)
            alone.record(rec.noise_multiplier, rec.sample_rate, rec.steps)
            accountant.record(rec.noise_multiplier, rec.sample_rate, rec.steps)
            # The spend is saved before it is logged: a crash between the two overstates,
            # never understates, what the site has spent.
            accountant.save(self.accountant_path)
            entry = record_entry(
                model=model, sample_rate=rec.sample_rate,
                noise_multiplier=rec.noise_multiplier, max_grad_norm=rec.max_grad_norm,
                steps=rec.steps, epsilon_round=alone.epsilon(privacy.delta),
                epsilon_total=accountant.epsilon(privacy.delta), status="trained",
                noise_source=rec.noise_source,
            )  # fmt: skip
            entries.append(entry.model_dump(mode="json"))

        weights = get_weights(bundle)
        check_update(weights, weight_names(bundle))
        epsilon = accountant.epsilon(privacy.delta)
        self.event("fit-end", round=server_round, epsilon=epsilon)
        metrics: dict[str, Scalar] = {
            "site": self.config.site.name,
            "epsilon": epsilon,
            "delta": privacy.delta,
            "epsilon_budget": privacy.epsilon_budget,
            "privacy_unit": privacy.privacy_unit,
            "steps": steps,
            "model": self.model,
            "n_patients": n_patients,
            **{f"{name}_loss": loss for name, loss in losses.items()},
            "fit_seconds": time.perf_counter() - started,
            "device": str(self.device),
            **skipped_counts(skipped),
            # The round's signed ledger entries hold parameters and epsilons, no patient data.
            LEDGER_METRIC: json.dumps(entries),
        }
        # Kept (at the site only) so that a resumed federation's repeated request for this
        # round is answered without training, and so without spending epsilon, again.
        sent.save(
            run_id,
            server_round,
            global_model=global_model,
            update=SentUpdate(weights, n_patients, metrics),
        )
        return weights, n_patients, metrics

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
