"""The site's federated client: private local training and validation of both networks.

The site's own config decides the data, device and every privacy parameter; the server's
run config proposes only the preset, the number of local steps (capped by the site) and
the learning rate.
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from client.train import DPParams, train_classifier, train_detector
from common.config import ModelPrivacy, SiteConfig
from common.data.manifest import load_site
from common.data.units import SiteUnits, build_units
from common.errors import BudgetExceeded, PrivacyError
from common.evaluation import HISTOGRAM_KEY, evaluate_bundle
from common.keys import load_signing_key, signing_key_paths
from common.models.bundle import (
    ModelBundle,
    build_bundle,
    get_weights,
    set_weights,
    weight_names,
)
from common.models.presets import get_preset
from common.privacy.accountant import SiteAccountant
from common.privacy.ledger import LEDGER_FILE, LEDGER_METRIC, PrivacyLedger

# SecAgg+ quantizes values in [-CLIPPING_RANGE, CLIPPING_RANGE]; anything outside would be
# silently clipped in the sum, so the site refuses to send it (it is the only one who can
# look: the server sees masked vectors only).
CLIPPING_RANGE = 8.0
ACCOUNTANT_FILE = "accountant.json"
EVENTS_FILE = "events.jsonl"


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
        torch.set_num_threads(config.site.threads)
        self.device = resolve_device(config.site.device)
        self.accountant_path = config.site.state / ACCOUNTANT_FILE

    def _bundle(self, parameters: NDArrays) -> ModelBundle:
        bundle = build_bundle(self.preset, seed=self.seed)
        set_weights(bundle, parameters)
        return bundle

    def _units(self, split: str) -> SiteUnits:
        site = load_site(self.config.site.data, check_videos=False)
        return build_units(
            site,
            get_preset(self.preset),
            split=split,
            frame_stride=self.config.training.frame_stride,
            max_frames_per_video=self.config.training.max_frames_per_video,
        )

    def event(self, name: str, **fields: Scalar) -> None:
        """Append to the site's activity log, so hospital IT can see what the site did."""
        self.config.site.state.mkdir(parents=True, exist_ok=True)
        line = {"time": time.time(), "site": self.config.site.name, "event": name, **fields}
        with (self.config.site.state / EVENTS_FILE).open("a") as f:
            f.write(json.dumps(line) + "\n")

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
        for model in (privacy.detector, privacy.classifier):
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
        run_id = str(config.get("run_id", "unknown"))
        privacy = self.config.privacy
        steps = min(self.proposed_steps, self.config.training.max_local_steps)
        self.check_proposal()
        plans = {"detector": _dp(privacy.detector), "classifier": _dp(privacy.classifier)}
        self.config.site.state.mkdir(parents=True, exist_ok=True)
        ledger = self._ledger()
        if any(
            e.run_id == run_id and e.round == server_round and e.status == "trained"
            for e in ledger.entries()
        ):
            # A restarted server may ask again; the patients' privacy was spent already.
            raise PrivacyError(
                f"site {self.config.site.name} already trained round {server_round} of run "
                f"{run_id}; it will not spend epsilon on it twice"
            )
        units = self._units("train")
        accountant = self._accountant()
        record_entry = functools.partial(
            ledger.append,
            run_id=run_id,
            round=server_round,
            privacy_unit=privacy.privacy_unit,
            n_units=len(units.detector),
            delta=privacy.delta,
            accountant=privacy.accountant,
            budget=privacy.epsilon_budget,
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

        bundle = self._bundle(parameters)
        generator = torch.Generator().manual_seed(int(time.time_ns() % 2**63))
        records = {
            "detector": train_detector(
                bundle.detector, units.detector, dp=plans["detector"], steps=steps, lr=self.lr,
                device=self.device, generator=generator,
            ),
            "classifier": train_classifier(
                bundle.classifier, units.classifier, dp=plans["classifier"], steps=steps,
                lr=self.lr, device=self.device, generator=generator,
            ),
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
            "n_patients": len(units.detector),
            "detector_loss": losses["detector"],
            "classifier_loss": losses["classifier"],
            "fit_seconds": time.perf_counter() - started,
            "device": str(self.device),
            # The round's signed ledger entries hold parameters and epsilons, no patient data.
            LEDGER_METRIC: json.dumps(entries),
        }
        return weights, len(units.detector), metrics

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        bundle = self._bundle(parameters)
        units = self._units("val")
        result = evaluate_bundle(bundle, units, device=self.device)
        metrics: dict[str, Scalar] = {"site": self.config.site.name, **result.metrics}
        if result.histogram is not None:
            # Counts per score bin, never a single patient's score (Flower metrics are flat).
            pos, neg = result.histogram
            metrics[HISTOGRAM_KEY] = json.dumps({"pos": pos, "neg": neg})
        return result.loss, result.n_units, metrics
