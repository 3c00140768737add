"""The consortium's ServerApp: FedAvg over SecAgg+, tracked in MLflow.

Legacy Flower path on purpose: ``SecAggPlusWorkflow`` runs only with ``LegacyContext``,
``DefaultWorkflow`` and the legacy ``FedAvg``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common import Context, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from common.errors import BusfedError, FederationError
from common.flower_compat import retry_transient_superlink_errors
from common.models.bundle import (
    DEFAULT_MODEL,
    ModelBundle,
    build_bundle,
    bundle_class,
    fingerprint,
    get_weights,
)
from common.models.detector import DEFAULT_TRUNK
from common.site_states import STATE_FILE, parse_site_names
from server.registry import load_model
from server.secagg import PacedSecAggPlusWorkflow, StagePacing
from server.site_state import SiteStates, WatchedGrid
from server.strategy import TrackedFedAvg, privacy_from_tags, strict_json
from server.tracking import Tracker

app = ServerApp()

# The global model starts from the same seeded weights at every run, so that a round's
# result depends on the sites' data and noise only.
INITIAL_SEED = 0


def summary(strategy: TrackedFedAvg, tracker: Tracker, *, secure: bool) -> dict[str, Any]:
    """The run's summary: per-round metrics and each site's last reported epsilon."""
    sites: dict[str, dict[str, Any]] = {}
    for record in strategy.records:
        for name, values in record.sites.items():
            if "epsilon" in values:
                sites[name] = {
                    "name": name,
                    "epsilon": float(values["epsilon"]),
                    "delta": float(values["delta"]),
                    "epsilon_budget": float(values.get("epsilon_budget", float("nan"))),
                    "last_round": record.round,
                }
    return {
        "rounds": [
            {
                "round": r.round,
                "metrics": r.metrics,
                "model_version": r.model_version,
                "sites": sorted(r.sites),
                "failures": r.failures,
                "dropped": r.dropped,
            }
            for r in strategy.records
        ],
        "sites": [sites[name] for name in sorted(sites)],
        "secure_aggregation": secure,
        "mlflow_tracking_uri": tracker.tracking_uri,
        "mlflow_run_id": tracker.run_id,
        "registered_model": tracker.registered_model,
    }


def secure_fit_workflow(
    run_config: dict[str, Any], states: SiteStates | None = None
) -> PacedSecAggPlusWorkflow | None:
    """SecAgg+ as the run config asks for it, or None for Flower's plain fit workflow.

    Each stage waits ``secagg-timeout-limit`` seconds until it has been timed once, then
    ``secagg-timeout-factor`` times its slowest complete run, at least ``secagg-timeout``.
    """
    if not bool(run_config["secure-aggregation"]):
        return None
    pacing = StagePacing(
        floor_s=float(run_config["secagg-timeout"]),
        limit_s=float(run_config["secagg-timeout-limit"]),
        factor=float(run_config["secagg-timeout-factor"]),
    )
    return PacedSecAggPlusWorkflow(
        pacing=pacing,
        states=states,
        num_shares=int(run_config["secagg-num-shares"]),
        reconstruction_threshold=int(run_config["secagg-reconstruction-threshold"]),
    )


def outcome(strategy: TrackedFedAvg, *, asked: int) -> dict[str, Any]:
    """Whether the run did what it was asked: ``asked`` rounds, each with a new model.

    A round that aggregated nothing leaves the global model unchanged; a run with such a
    round has not trained what was asked, whatever Flower's own status says.
    """
    with_model = [r.round for r in strategy.records if r.model_version is not None]
    without = [r.round for r in strategy.records if r.model_version is None]
    reasons = []
    if without:
        reasons.append(f"round(s) {', '.join(map(str, without))} produced no model")
    if len(with_model) < asked:
        reasons.append(f"{len(with_model)} of {asked} round(s) produced a model")
    return {
        "ok": not reasons,
        "rounds_asked": asked,
        "rounds_with_model": len(with_model),
        "reason": "; ".join(reasons),
    }


@dataclass
class InitialModel:
    """What a campaign started from: its fingerprint and where it came from.

    ``bundle`` is the model to start from when the run config's ``init-model`` names one
    (a ``busfed pretrain`` version 0, say) and the campaign is not resumed.
    """

    source: str
    sha256: str = ""
    bundle: ModelBundle | None = None

    def tags(self) -> dict[str, str]:
        return {"initial_model": self.source, "initial_model_sha256": self.sha256}


def initial_model(run_config: dict[str, Any], start: ResumePoint) -> InitialModel:
    """The campaign's initial model: a resumed campaign's (from its versions' tags), the
    run config's ``init-model`` (a model folder on the server, or ``models:/NAME/VERSION``
    at the consortium's MLflow), or the seeded random weights.

    Raises
    ------
    FederationError
        ``init-model`` cannot be loaded, or is not the run config's model kind.
    """
    if start.bundle is not None:
        return InitialModel(
            source=start.initial_tags.get("initial_model", f"version {start.model_version}"),
            sha256=start.initial_tags.get("initial_model_sha256")
            or fingerprint(get_weights(start.bundle)),
        )
    source = str(run_config.get("init-model", ""))
    if not source:
        return InitialModel(source=f"seeded random weights (seed {INITIAL_SEED})")
    model, _ = chosen_model(run_config)
    try:
        bundle, _ = load_model(source, tracking_uri=str(run_config["mlflow-tracking-uri"]))
    except BusfedError as error:
        raise FederationError(f"init-model {source}: {error}") from None
    if bundle.kind != model:
        raise FederationError(f"init-model {source} is a {bundle.kind} model, not {model}")
    return InitialModel(source=source, bundle=bundle)


@dataclass
class ResumePoint:
    """Where a campaign starts: round 0 from the seeded model, or its last registered round."""

    round: int = 0
    model_version: str | None = None
    bundle: ModelBundle | None = None
    site_privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    initial_tags: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any] | None:
        if self.model_version is None:
            return None
        return {"round": self.round, "model_version": self.model_version}


def resume_point(tracker: Tracker, campaign: str, *, resume: bool) -> ResumePoint:
    """The registry is the record of a campaign: resume from its latest version.

    A campaign that already has versions is only continued when asked (``resume``); it is
    never restarted from round 1, which would register a second version for each round.
    """
    versions = tracker.campaign_versions(campaign)
    if not versions:
        if resume:
            log(INFO, "busfed: campaign %s has no registered version; starting at round 1",
                campaign)  # fmt: skip
        return ResumePoint()
    last = versions[-1]
    last_round = int(last.tags["round"])
    if not resume:
        raise FederationError(
            f"campaign {campaign!r} already has registered versions up to round {last_round} "
            f"(version {last.version}); pass resume=true to continue it, or name a new campaign"
        )
    log(INFO, "busfed: resuming campaign %s after round %s from version %s",
        campaign, last_round, last.version)  # fmt: skip
    return ResumePoint(
        round=last_round,
        model_version=str(last.version),
        bundle=tracker.load_version(last),
        site_privacy=privacy_from_tags(dict(last.tags)),
        initial_tags={k: v for k, v in last.tags.items() if k.startswith("initial_model")},
    )


def chosen_model(run_config: dict[str, Any]) -> tuple[str, str]:
    """The run config's ``model`` (``wauve``, ``keyframe2d``, ``detector``) and its registry name.

    ``registered-model`` empty (the default) names it ``busfed-<model>``, so the two kinds
    never share a registered model.

    Raises
    ------
    UsageError
        An unknown model, naming the known ones.
    """
    model = bundle_class(str(run_config.get("model", DEFAULT_MODEL))).kind
    return model, str(run_config.get("registered-model", "")) or f"busfed-{model}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    # The SuperLink may answer "database is locked" (HTTP 500) on a busy machine.
    retry_transient_superlink_errors()
    out_dir = Path(str(rc["out-dir"]))
    secure = bool(rc["secure-aggregation"])
    rounds = int(rc["num-server-rounds"])
    min_sites = int(rc["min-sites"])
    preset = str(rc["preset"])
    model, registered_model = chosen_model(dict(rc))

    campaign = str(rc.get("campaign", "")) or f"run-{context.run_id}"
    try:
        names = parse_site_names(str(rc.get("site-names", "")))
    except ValueError as exc:
        raise FederationError(f"run config {exc}") from exc
    states = SiteStates(out_dir / STATE_FILE, names={str(n): site for n, site in names.items()})

    tracker = Tracker(
        tracking_uri=str(rc["mlflow-tracking-uri"]),
        artifact_location=str(rc["mlflow-artifact-location"]),
        registered_model=registered_model,
        run_name=f"flower-run-{context.run_id}",
    )
    tracker.log_params({k: v for k, v in rc.items() if not k.startswith("mlflow")})
    tracker.tag_run({"campaign": campaign})
    start = resume_point(tracker, campaign, resume=bool(rc.get("resume", False)))
    initial = initial_model(dict(rc), start)
    trunk = str(rc.get("trunk", DEFAULT_TRUNK))
    bundle = (
        start.bundle
        or initial.bundle
        or build_bundle(preset, seed=INITIAL_SEED, model=model, trunk=trunk)
    )
    if start.bundle is None:
        initial.sha256 = fingerprint(get_weights(bundle))
    if bundle.kind != model:
        raise FederationError(f"campaign {campaign!r} trains model {bundle.kind!r}, not {model!r}")
    what = "was trained" if start.bundle is not None else f"starts from {initial.source}"
    if bundle.preset.name != preset:
        raise FederationError(
            f"campaign {campaign!r} {what} with preset {bundle.preset.name!r}, not {preset!r}"
        )
    if bundle.trunk != trunk:
        # The sites build the run config's trunk: its tensors would not fit.
        raise FederationError(
            f"campaign {campaign!r} {what} with trunk {bundle.trunk!r}, not {trunk!r} "
            "(run config trunk)"
        )
    if start.round >= rounds:
        log(INFO, "busfed: campaign %s already has %s rounds; nothing to do", campaign, rounds)
    strategy = TrackedFedAvg(
        bundle=bundle,
        tracker=tracker,
        rounds_log=out_dir / "rounds.jsonl",
        secure_aggregation=secure,
        campaign=campaign,
        round_offset=start.round,
        site_privacy=start.site_privacy,
        version_tags=initial.tags(),
        site_states=states,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=min_sites,
        min_evaluate_clients=min_sites,
        min_available_clients=min_sites,
        initial_parameters=ndarrays_to_parameters(get_weights(bundle)),
        accept_failures=True,
        on_fit_config_fn=lambda server_round: {
            "round": server_round + start.round,
            "campaign": campaign,
            "run_id": str(context.run_id),
            "initial-model": initial.sha256,
        },
        on_evaluate_config_fn=lambda server_round: {"round": server_round + start.round},
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(
            num_rounds=max(0, rounds - start.round), round_timeout=float(rc["round-timeout"])
        ),
        strategy=strategy,
    )
    fit_workflow = secure_fit_workflow(dict(rc), states)
    if fit_workflow is not None:
        strategy.stage_timing = fit_workflow.round_timing
    log(
        INFO,
        "busfed: campaign %s, rounds %s to %s, preset %s, secure aggregation %s",
        campaign, start.round + 1, rounds, preset, secure,
    )  # fmt: skip
    status = "FAILED"
    result_of_run: dict[str, Any] = {"ok": False, "reason": "the ServerApp failed"}
    try:
        DefaultWorkflow(fit_workflow=fit_workflow)(WatchedGrid(grid, states), legacy)
        strategy.finish()
        result_of_run = outcome(strategy, asked=max(0, rounds - start.round))
        status = "FINISHED" if result_of_run["ok"] else "FAILED"
    finally:
        strategy.finish()
        tracker.finish(status)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = summary(strategy, tracker, secure=secure)
        result["campaign"] = campaign
        result["resumed_from"] = start.as_json()
        result["outcome"] = result_of_run
        (out_dir / "summary.json").write_text(strict_json(result, indent=2))
    if not result_of_run["ok"]:
        # Flower then ends the run as failed, and busfed's commands exit non-zero.
        raise FederationError(f"campaign {campaign}: {result_of_run['reason']}")
