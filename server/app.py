"""The consortium's ServerApp: FedAvg over SecAgg+, tracked in MLflow.

Legacy Flower path on purpose: ``SecAggPlusWorkflow`` runs only with ``LegacyContext``,
``DefaultWorkflow`` and the legacy ``FedAvg``.
"""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common import Context, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from common.models.bundle import build_bundle, get_weights
from server.strategy import TrackedFedAvg
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


def secure_fit_workflow(run_config: dict[str, Any]) -> SecAggPlusWorkflow | None:
    """SecAgg+ as the run config asks for it, or None for Flower's plain fit workflow."""
    if not bool(run_config["secure-aggregation"]):
        return None
    return SecAggPlusWorkflow(
        num_shares=int(run_config["secagg-num-shares"]),
        reconstruction_threshold=int(run_config["secagg-reconstruction-threshold"]),
        timeout=float(run_config["secagg-timeout"]),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out_dir = Path(str(rc["out-dir"]))
    secure = bool(rc["secure-aggregation"])
    rounds = int(rc["num-server-rounds"])
    min_sites = int(rc["min-sites"])
    preset = str(rc["preset"])

    tracker = Tracker(
        tracking_uri=str(rc["mlflow-tracking-uri"]),
        artifact_location=str(rc["mlflow-artifact-location"]),
        registered_model=str(rc["registered-model"]),
        run_name=f"flower-run-{context.run_id}",
    )
    tracker.log_params({k: v for k, v in rc.items() if not k.startswith("mlflow")})
    bundle = build_bundle(preset, seed=INITIAL_SEED)
    strategy = TrackedFedAvg(
        bundle=bundle,
        tracker=tracker,
        rounds_log=out_dir / "rounds.jsonl",
        secure_aggregation=secure,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=min_sites,
        min_evaluate_clients=min_sites,
        min_available_clients=min_sites,
        initial_parameters=ndarrays_to_parameters(get_weights(bundle)),
        accept_failures=True,
        on_fit_config_fn=lambda server_round: {
            "round": server_round,
            "run_id": str(context.run_id),
        },
        on_evaluate_config_fn=lambda server_round: {"round": server_round},
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=rounds, round_timeout=float(rc["round-timeout"])),
        strategy=strategy,
    )
    fit_workflow = secure_fit_workflow(dict(rc))
    log(INFO, "busfed: %s rounds, preset %s, secure aggregation %s", rounds, preset, secure)
    status = "FAILED"
    try:
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        status = "FINISHED"
    finally:
        strategy.finish()
        tracker.finish(status)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(
            json.dumps(summary(strategy, tracker, secure=secure), indent=2, default=float)
        )
