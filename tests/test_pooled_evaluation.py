"""Federated evaluation: the consortium's pooled AUC comes from per-site score histograms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, Status
from flwr.server.client_proxy import ClientProxy

from common.evaluation.validation import HISTOGRAM_BINS, HISTOGRAM_KEY
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
        campaign="pooled",
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


def test_a_round_without_an_aggregate_is_recorded_and_counts_are_summed(tmp_path: Path) -> None:
    """SecAgg+ halts below its threshold and never calls aggregate_fit: the round must still
    appear in the round log, with the sites it asked, and skip counts add up over sites."""
    tracker = Tracker(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
        registered_model="test-model",
        run_name="halted",
    )
    strategy = TrackedFedAvg(
        bundle=build_bundle("tiny", seed=0),
        tracker=tracker,
        rounds_log=tmp_path / "rounds.jsonl",
        secure_aggregation=True,
        campaign="halted",
        round_offset=4,  # a resumed campaign: Flower's round 1 is the campaign's round 5
    )
    strategy._sampled = {"11", "12"}
    rng = np.random.default_rng(0)
    results = []
    for name, skipped in (("site-0", 1), ("site-1", 2)):
        res = site_result(name, rng.integers(0, 2, 10), rng.random(10))
        res.metrics["skipped_videos"] = skipped
        results.append((Site(name), res))
    strategy.aggregate_evaluate(1, results, [])

    (logged,) = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert logged["round"] == 5 and logged["model_version"] is None
    assert logged["metrics"]["sites_participating"] == 0
    assert logged["failures"] and "model unchanged" in logged["failures"][0]
    assert logged["dropped"] == ["node 11", "node 12"]
    assert logged["metrics"]["skipped_videos"] == 3  # a total over sites, not a mean
