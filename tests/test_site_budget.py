"""The site's own guards around training: its budget, and never spending a round twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from client.site import SiteClient
from common.config import load_site_config, render_site_config
from common.errors import BudgetExceeded, PrivacyError
from common.models.bundle import build_bundle, get_weights
from common.privacy.ledger import LEDGER_FILE
from deploy.demo import DemoSettings, prepare_sites

RUN_CONFIG = {"preset": "tiny", "local-steps": 1, "learning-rate": 0.05, "seed": 0}


@pytest.fixture
def site_config(tmp_path: Path) -> Path:
    settings = DemoSettings(sites=3, patients=4, frames=16, size=64)
    return prepare_sites(tmp_path, settings, Console(quiet=True))[0]


def with_budget(path: Path, budget: float) -> Path:
    config = load_site_config(path)
    privacy = config.privacy.model_copy(update={"epsilon_budget": budget})
    site = config.site.model_copy(update={"data": Path("data"), "state": Path("state")})
    path.write_text(
        render_site_config(config.model_copy(update={"privacy": privacy, "site": site}))
    )
    return path


def entries(config_path: Path) -> list[dict[str, object]]:
    ledger = config_path.parent / "state" / LEDGER_FILE
    return [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []


def test_an_over_budget_round_is_refused_and_nothing_is_trained(site_config: Path) -> None:
    path = with_budget(site_config, 1.0)  # one round of the demo's settings costs ~2.2
    client = SiteClient(load_site_config(path), RUN_CONFIG)
    weights = get_weights(build_bundle("tiny", seed=0))
    with pytest.raises(BudgetExceeded, match=r"epsilon would reach .* > budget 1.0"):
        client.fit(weights, {"round": 1, "run_id": "r1"})
    state = path.parent / "state"
    assert not (state / "accountant.json").exists()  # no epsilon spent
    refused = entries(path)
    assert [(e["model"], e["status"], e["steps"]) for e in refused] == [
        ("detector", "refused", 0),
        ("classifier", "refused", 0),
    ]
    assert "fit-start" not in (state / "events.jsonl").read_text()


def test_a_round_is_never_trained_twice(site_config: Path) -> None:
    """A resumed server asks again for the round it lost: the site re-sends, never retrains."""
    client = SiteClient(load_site_config(site_config), RUN_CONFIG)
    weights = get_weights(build_bundle("tiny", seed=0))
    update, n, metrics = client.fit(weights, {"round": 1, "campaign": "c1", "run_id": "7"})
    spent = metrics["epsilon"]
    accountant = (site_config.parent / "state" / "accountant.json").read_text()

    # Same campaign and round, same global model (a new Flower run after a restart; the
    # first time it came as SecAgg+'s float64 aggregate, now as the registry's float32).
    as_float64 = [w.astype(np.float64) for w in weights]
    again, n_again, metrics_again = client.fit(
        as_float64, {"round": 1, "campaign": "c1", "run_id": "8"}
    )
    assert n_again == n and json.dumps(metrics_again) == json.dumps(metrics)  # NaN-safe
    assert all(np.array_equal(a, b) for a, b in zip(update, again, strict=True))
    assert (site_config.parent / "state" / "accountant.json").read_text() == accountant
    assert len(entries(site_config)) == 2  # detector and classifier, once
    events = (site_config.parent / "state" / "events.jsonl").read_text()
    assert events.count('"fit-end"') == 1 and events.count('"fit-resent"') == 1

    # The same round from another global model would be a second release: refused.
    other = [w + 0.01 for w in weights]
    with pytest.raises(PrivacyError, match="already trained round 1 of campaign c1"):
        client.fit(other, {"round": 1, "campaign": "c1", "run_id": "8"})
    assert len(entries(site_config)) == 2

    _, _, next_round = client.fit(update, {"round": 2, "campaign": "c1", "run_id": "8"})
    assert next_round["epsilon"] > spent
    # Only the latest round's update is kept at the site.
    kept = sorted(p.name for p in (site_config.parent / "state" / "sent").rglob("*.npz"))
    assert kept == ["round-0002.npz"]


def test_the_site_refuses_to_send_an_update_it_cannot_vouch_for() -> None:
    from client.site import check_update

    names = ["detector.a", "classifier.b"]
    good = [np.zeros(3, np.float32), np.ones(2, np.float32)]
    check_update(good, names)
    with pytest.raises(PrivacyError, match=r"classifier\.b has non-finite values"):
        check_update([good[0], np.array([1.0, np.nan], np.float32)], names)
    # SecAgg+ would silently clip this inside the masked sum: refused before it is sent.
    with pytest.raises(PrivacyError, match=r"detector.a reaches 9.*outside SecAgg\+'s range"):
        check_update([np.array([9.0], np.float32), good[1]], names)


def test_a_weaker_server_proposal_is_refused_and_the_site_values_win(site_config: Path) -> None:
    config = load_site_config(site_config)  # the demo site: sigma 1.5, q 0.3
    weights = get_weights(build_bundle("tiny", seed=0))
    weaker = SiteClient(config, {**RUN_CONFIG, "proposed-noise-multiplier": 0.5})
    with pytest.raises(PrivacyError, match=r"proposes noise multiplier 0\.5, weaker"):
        weaker.fit(weights, {"round": 1, "run_id": "r1"})
    greedier = SiteClient(config, {**RUN_CONFIG, "proposed-sample-rate": 0.9})
    with pytest.raises(PrivacyError, match=r"proposes sample rate 0\.9, weaker"):
        greedier.fit(weights, {"round": 1, "run_id": "r1"})
    assert entries(site_config) == []  # nothing trained, nothing spent

    stronger = SiteClient(config, {**RUN_CONFIG, "proposed-noise-multiplier": 3.0})
    stronger.fit(weights, {"round": 1, "run_id": "r1"})
    assert [e["noise_multiplier"] for e in entries(site_config)] == [1.5, 1.5]  # the site's
