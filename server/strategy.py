"""The consortium's strategy: FedAvg whose every round is recorded and registered.

Under SecAgg+ the strategy receives each site's metrics (epsilon, losses: they are not
masked and hold no patient data) but only the already-unmasked weighted SUM of the
updates; it never sees one site's weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from common.evaluation.validation import HISTOGRAM_KEY
from common.metrics import pooled_auc_from_histograms
from common.models.bundle import ModelBundle, set_weights
from common.privacy.ledger import LEDGER_METRIC
from common.site_states import STATE_FILE
from server.site_state import SiteStates
from server.tracking import Tracker

# Per-site metrics that are averaged into the round's metrics, weighted by patients.
# (Validation metrics are weighted by each site's count of what it evaluated: patients, or
# images for the detector alone.)
AVERAGED_FIT = ("detector_loss", "classifier_loss", "keyframe_loss", "fit_seconds")
# Per-site counts that the round reports as totals over the sites, not as means.
SUMMED_EVALUATE = (
    "skipped_rows",
    "skipped_videos",
    "box_problems",
    "val_patients",
    "val_clips",
    "val_images",
    "val_boxes",
)
# What each model version says about every site's privacy spend, as `KEY.<site>` tags.
PRIVACY_TAGS = ("epsilon", "delta", "epsilon_budget")


def strict_json(value: Any, *, indent: int | None = None) -> str:
    """JSON that strict parsers accept: NaN and infinities (a site that sampled nobody has no
    loss) become null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float | np.floating):
            return float(v) if np.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, indent=indent)


def privacy_tags(sites: dict[str, dict[str, float]]) -> dict[str, str]:
    """``{"epsilon.<site>": "5.372000", "delta.<site>": "1e-05", ...}`` for every site."""
    formats = {"epsilon": ".6f", "delta": "g", "epsilon_budget": "g"}
    return {
        f"{key}.{site}": format(values[key], formats[key])
        for site, values in sorted(sites.items())
        for key in PRIVACY_TAGS
        if key in values
    }


def privacy_from_tags(tags: dict[str, str]) -> dict[str, dict[str, float]]:
    """The inverse of ``privacy_tags``: what a registered version says each site spent."""
    sites: dict[str, dict[str, float]] = {}
    for tag, value in tags.items():
        key, _, site = tag.partition(".")
        if key in PRIVACY_TAGS and site:
            sites.setdefault(site, {})[key] = float(value)
    return sites


def describe_failure(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    proxy, res = failure
    return f"node {proxy.cid}: {getattr(res, 'status', res)}"


def weighted_mean(pairs: list[tuple[int, float]]) -> float:
    """Mean weighted by patients; a site without a value (NaN: nobody sampled) is left out."""
    pairs = [(n, v) for n, v in pairs if np.isfinite(v)]
    total = sum(n for n, _ in pairs)
    return float(sum(n * v for n, v in pairs) / total) if total else float("nan")


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float] = field(default_factory=dict)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    model_version: str | None = None
    # Sites that evaluated the round's model without having trained it (for example a site
    # that came back online mid-round): their validation metrics, kept apart from `sites`.
    evaluated_only: dict[str, dict[str, Any]] = field(default_factory=dict)
    # SecAgg+'s stages this round: the timeout each was given, its time, sites in and out.
    secagg_stages: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "metrics": self.metrics,
            "sites": self.sites,
            "evaluated_only": self.evaluated_only,
            "failures": self.failures,
            "dropped": self.dropped,
            "model_version": self.model_version,
            "secagg_stages": self.secagg_stages,
        }


class TrackedFedAvg(FedAvg):
    """Legacy FedAvg (SecAgg+ needs the legacy path) plus MLflow and a round log."""

    def __init__(
        self,
        *,
        bundle: ModelBundle,
        tracker: Tracker,
        rounds_log: Path,
        secure_aggregation: bool,
        campaign: str,
        round_offset: int = 0,
        site_privacy: dict[str, dict[str, float]] | None = None,
        version_tags: dict[str, str] | None = None,
        site_states: SiteStates | None = None,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.bundle = bundle
        self.tracker = tracker
        self.rounds_log = rounds_log
        self.secure_aggregation = secure_aggregation
        self.campaign = campaign
        self.version_tags = dict(version_tags or {})  # on every registered version
        # Flower numbers a run's rounds from 1; a resumed campaign continues its own count.
        self.round_offset = round_offset
        self.records: list[RoundRecord] = []
        self._pending: RoundRecord | None = None
        self._last_round_end = time.time()
        self._sampled: set[str] = set()
        # Each site's state in the round in progress (sites.json), and its name: from the
        # run config's site-names (the enrolment log) and from the sites' own metrics.
        self.site_states = site_states or SiteStates(rounds_log.parent / STATE_FILE)
        # Every site's latest reported epsilon, delta and budget: a site that sat a round out
        # still has its spend tagged on that round's model version (after a resume too).
        self._privacy_of_site: dict[str, dict[str, float]] = dict(site_privacy or {})
        # Set by the ServerApp to the SecAgg+ workflow's timing of the round in progress.
        self.stage_timing: Callable[[], list[dict[str, Any]]] = list

    # ------------------------------------------------------------------ fit
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self._sampled = {proxy.cid for proxy, _ in instructions}
        self.site_states.new_round(server_round + self.round_offset, self._sampled)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        self._flush()
        record = RoundRecord(round=server_round, secagg_stages=self.stage_timing())
        record.failures = [describe_failure(f) for f in failures]
        for proxy, res in results:
            if "site" in res.metrics:
                self.site_states.learn(proxy.cid, str(res.metrics["site"]))
        # A site that died mid-round sends neither an update nor an error (under SecAgg+ it
        # drops out of the protocol), and SecAgg+ errors carry no node id: so every sampled
        # site without an update is listed by name, never left to vanish silently.
        answered = {proxy.cid for proxy, _ in results}
        record.dropped = sorted(self.site_states.name(c) for c in self._sampled - answered)
        for reason in record.failures:
            log(WARNING, "round %s: a site failed or refused: %s", server_round, reason)
        if record.dropped:
            log(WARNING, "round %s: no update from %s", server_round, ", ".join(record.dropped))
        parameters, _ = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            record.metrics["sites_participating"] = 0.0
            self._pending = record
            self._flush()
            return None, {}

        for _, res in results:
            site = str(res.metrics.get("site", "?"))
            metrics = dict(res.metrics)
            entries = metrics.pop(LEDGER_METRIC, None)
            record.sites[site] = {"n_patients": res.num_examples, **metrics}
            if isinstance(entries, str):
                # The server's copy of the site's signed ledger entries, for the auditor.
                self.tracker.log_json(
                    json.loads(entries), f"ledgers/{site}/round-{server_round:04d}.json"
                )
        record.metrics["sites_participating"] = float(len(results))
        record.metrics["sites_dropped"] = float(len(record.dropped))
        for key in AVERAGED_FIT:
            pairs = [
                (r.num_examples, float(r.metrics[key])) for _, r in results if key in r.metrics
            ]
            if np.isfinite(value := weighted_mean(pairs)):
                record.metrics[key] = value
        epsilons = [float(r.metrics["epsilon"]) for _, r in results if "epsilon" in r.metrics]
        if epsilons:
            record.metrics["epsilon_max"] = max(epsilons)

        set_weights(self.bundle, parameters_to_ndarrays(parameters))
        tags = {
            "round": str(server_round),
            "sites": ",".join(sorted(record.sites)),
            "secure_aggregation": str(self.secure_aggregation).lower(),
            "privacy_unit": "patient",
            "flower_run": self.tracker.run_id,
            "campaign": self.campaign,
            **self.version_tags,
        }
        for site, values in record.sites.items():
            if "epsilon" in values:
                self._privacy_of_site[site] = {
                    key: float(values[key])
                    for key in PRIVACY_TAGS
                    if isinstance(values.get(key), int | float)
                }
        tags.update(privacy_tags(self._privacy_of_site))
        version = self.tracker.register_round(self.bundle, server_round=server_round, tags=tags)
        record.model_version = version.version
        log(INFO, "round %s: registered %s version %s", server_round, version.name, version.version)
        self.tracker.log_metrics(
            {k: v for k, v in record.metrics.items() if np.isfinite(v)}, step=server_round
        )
        for site, values in record.sites.items():
            if "epsilon" in values:
                self.tracker.log_metrics(
                    {f"epsilon.{site}": float(values["epsilon"])}, step=server_round
                )
        self._pending = record
        return parameters, {}

    # ------------------------------------------------------------------ evaluate
    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        server_round += self.round_offset
        loss, _ = super().aggregate_evaluate(server_round, results, failures)
        record = self._pending
        if record is None or record.round != server_round:
            # No aggregate reached the strategy this round (SecAgg+ halts when fewer sites
            # than its threshold answer, for example when every site refused): the global
            # model is unchanged. The round is still recorded, never left to vanish.
            self._flush()
            record = RoundRecord(round=server_round, secagg_stages=self.stage_timing())
            record.failures = ["no aggregate: too few sites sent an update; model unchanged"]
            record.dropped = sorted(self.site_states.name(c) for c in self._sampled)
            record.metrics["sites_participating"] = 0.0
            self._pending = record
        histograms = [
            (np.array(h["pos"]), np.array(h["neg"]))
            for _, r in results
            if isinstance(r.metrics.get(HISTOGRAM_KEY), str)
            for h in [json.loads(str(r.metrics[HISTOGRAM_KEY]))]
        ]
        if histograms and np.isfinite(pooled := pooled_auc_from_histograms(histograms)):
            # The consortium's AUC over every site's patients, from binned counts only.
            record.metrics["pooled_patient_val_auc"] = pooled
        keys = {k for _, r in results for k, v in r.metrics.items() if isinstance(v, int | float)}
        keys |= {"pooled_patient_val_auc"} & set(record.metrics)
        for key in sorted(keys):
            pairs = [
                (r.num_examples, float(r.metrics[key])) for _, r in results if key in r.metrics
            ]
            if key in SUMMED_EVALUATE:
                record.metrics[key] = float(sum(v for _, v in pairs))
            elif np.isfinite(value := weighted_mean(pairs)):
                record.metrics[key] = value
        for _, r in results:
            site = str(r.metrics.get("site", "?"))
            # `sites` lists the sites whose updates made this round's model, nothing else.
            into = record.sites if site in record.sites else record.evaluated_only
            into.setdefault(site, {}).update(
                {f"eval.{k}": v for k, v in r.metrics.items() if k not in ("site", HISTOGRAM_KEY)}
            )
        eval_metrics = {k: record.metrics[k] for k in keys if k in record.metrics}
        self.tracker.log_metrics(eval_metrics, step=server_round)
        if record.model_version is not None:
            self.tracker.tag_version(
                record.model_version, {f"val.{k}": f"{v:.6f}" for k, v in eval_metrics.items()}
            )
        self._flush()
        return loss, {}

    # ------------------------------------------------------------------ bookkeeping
    def _flush(self) -> None:
        """Append the finished round to the round log (JSON lines) and MLflow."""
        record, self._pending = self._pending, None
        if record is None:
            return
        now = time.time()
        # From the end of the previous round (or the start) to the end of this one:
        # local training, SecAgg+ stages, registration and federated evaluation.
        record.metrics["round_seconds"] = now - self._last_round_end
        self._last_round_end = now
        self.records.append(record)
        self.rounds_log.parent.mkdir(parents=True, exist_ok=True)
        with self.rounds_log.open("a") as f:
            f.write(strict_json(record.as_json()) + "\n")
        self.tracker.log_json(record.as_json(), f"rounds/round-{record.round:04d}.json")

    def finish(self) -> None:
        self._flush()
