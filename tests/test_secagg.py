"""SecAgg+ as busfed configures it gives plain weighted FedAvg, up to quantization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.simulation import run_simulation

from server.app import secure_fit_workflow

SHAPES = [(64, 3), (17,), (2, 5, 5)]
SITES = 3
RUN_CONFIG = {
    "secure-aggregation": True,
    "secagg-num-shares": 3,
    "secagg-reconstruction-threshold": 2,
    "secagg-timeout": 60.0,
    "secagg-timeout-limit": 900.0,
    "secagg-timeout-factor": 3.0,
}


def site_update(i: int) -> tuple[list[np.ndarray], int]:
    rng = np.random.default_rng(100 + i)
    return [rng.uniform(-1, 1, s).astype(np.float32) for s in SHAPES], 10 * (i + 1)


class FixedSite(NumPyClient):
    def __init__(self, i: int) -> None:
        self.i = i

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        arrays, n = site_update(self.i)
        return arrays, n, {"site": f"s{self.i}"}


def quantization_bound(updates: list[tuple[list[np.ndarray], int]]) -> float:
    """Worst-case error of SecAgg+'s aggregate: each site's weighted update is rounded to
    a grid of 2*clipping_range/quantization_range, then divided by the summed weights."""
    step = 2 * 8.0 / (4194304 - 1)
    max_weight = 1000.0  # SecAggPlusWorkflow's default
    total_ratio = sum(n for _, n in updates) / max_weight
    return len(updates) * step / total_ratio


def simulate_secagg(
    strategy: FedAvg, fit_workflow: Callable[[], Any], *, rounds: int, client: ClientApp
) -> None:
    """``rounds`` rounds of ``strategy`` over ``fit_workflow()`` (SecAgg+) with ``SITES``
    simulated sites running ``client``, in Flower's simulation engine."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=fit_workflow())(grid, legacy)

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=SITES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def test_secaggplus_sum_equals_weighted_fedavg(tmp_path: pytest.TempPathFactory) -> None:
    captured: dict[str, list[np.ndarray]] = {}

    class Capture(FedAvg):
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            params, metrics = super().aggregate_fit(server_round, results, failures)
            captured["aggregate"] = parameters_to_ndarrays(params)
            captured["sites"] = [r.metrics["site"] for _, r in results]
            return params, metrics

    strategy = Capture(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=SITES,
        min_available_clients=SITES,
        initial_parameters=ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES]),
    )  # fmt: skip

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return FixedSite(int(context.node_config["partition-id"])).to_client()

    simulate_secagg(
        strategy,
        lambda: secure_fit_workflow(RUN_CONFIG),
        rounds=1,
        client=ClientApp(client_fn=client_fn, mods=[secaggplus_mod]),
    )

    assert sorted(captured["sites"]) == ["s0", "s1", "s2"]
    updates = [site_update(i) for i in range(SITES)]
    total = sum(n for _, n in updates)
    expected = [sum(u[k] * n for u, n in updates) / total for k in range(len(SHAPES))]
    for got, want in zip(captured["aggregate"], expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=quantization_bound(updates))
    unweighted = [sum(u[k] for u, _ in updates) / SITES for k in range(len(SHAPES))]
    gaps = [
        float(np.abs(g - w).max()) for g, w in zip(captured["aggregate"], unweighted, strict=True)
    ]
    assert max(gaps) > 1e-2  # a wrong weighting would be caught
