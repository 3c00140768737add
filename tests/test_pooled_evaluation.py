"""Federated evaluation: the consortium's pooled AUC comes from per-site score histograms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, Status
from flwr.server.client_proxy import ClientProxy

from common.evaluation import HISTOGRAM_BINS, HISTOGRAM_KEY
from common.metrics import histogram_counts, roc_auc
from common.models.bundle import build_bundle
from server.strategy import RoundRecord, TrackedFedAvg
from server.tracking import Tracker


class Site(ClientProxy):
    """A node identity as the legacy strategy sees it (no transport behind it is used)."""

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def site_result(name: str, labels: np.ndarray, scores: np.ndarray) -> EvaluateRes:
    pos, neg = histogram_counts(labels, scores, HISTOGRAM_BINS)
    metrics = {
        "site": name,
        "patient_val_auc": roc_auc(labels, scores),
        HISTOGRAM_KEY: json.dumps({"pos": pos.tolist(), "neg": neg.tolist()}),
    }
    return EvaluateRes(Status(Code.OK, ""), loss=0.5, num_examples=len(labels), metrics=metrics)


def test_pooled_auc_equals_the_exact_auc_over_all_sites(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    sites = []
    for i, shift in enumerate((0.1, 0.25, 0.4)):  # sites differ: pooling is not averaging
        labels = rng.integers(0, 2, 80)
        scores = np.clip(rng.normal(0.4 + shift * labels + 0.1 * i, 0.15), 0, 1)
        sites.append((f"site-{i}", labels, scores))
    tracker = Tracker(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
        registered_model="test-model",
        run_name="pooled",
    )
    strategy = TrackedFedAvg(
        bundle=build_bundle("tiny", seed=0),
        tracker=tracker,
        rounds_log=tmp_path / "rounds.jsonl",
        secure_aggregation=True,
    )
    strategy._pending = RoundRecord(round=1)
    results = [(Site(name), site_result(name, y, s)) for name, y, s in sites]
    strategy.aggregate_evaluate(1, results, [])

    record = strategy.records[-1]
    exact = roc_auc(
        np.concatenate([y for _, y, _ in sites]), np.concatenate([s for *_, s in sites])
    )
    mean_of_sites = np.mean([roc_auc(y, s) for _, y, s in sites])
    assert record.metrics["pooled_patient_val_auc"] == pytest.approx(exact, abs=2e-3)
    assert abs(mean_of_sites - exact) > 0.01  # the pooled figure is not the sites' average
    logged = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert HISTOGRAM_KEY not in json.dumps(logged["sites"])  # counts are used, not stored
