"""Each site's state in the round (sites.json): named, stage by stage, failures with reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.simulation import run_simulation
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

from common.site_states import (
    describe_site_states,
    format_site_names,
    parse_site_names,
    read_site_states,
)
from server import site_state
from server.app import secure_fit_workflow
from server.site_state import PUSH_ATTEMPTS, SiteStates, WatchedGrid, failure_reason
from tests.test_secagg import RUN_CONFIG, SHAPES, SITES, site_update


def test_site_names_round_trip_and_bad_pairs_are_named() -> None:
    names = {13275639837282753535: "hospital-b", 7: "hospital-a"}
    assert parse_site_names(format_site_names(names)) == names
    assert parse_site_names("") == {}
    with pytest.raises(ValueError, match="'12:hospital-a' is not NODE_ID=SITE"):
        parse_site_names("12:hospital-a")
    with pytest.raises(ValueError, match="'x=hospital-a'"):
        parse_site_names("x=hospital-a")


def test_a_failure_reason_is_the_sites_own_words() -> None:
    reply = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\\x1b[36mTraceback\\x1b[39m\n"
        '  File "x.py", line 3, in fit\nRuntimeError: disk full\n\n'
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: disk full'>"
    )
    assert failure_reason(reply) == "disk full"
    assert failure_reason("Traceback\n  File x\nValueError: bad clip") == "ValueError: bad clip"
    assert failure_reason("timed out") == "timed out"
    assert len(failure_reason("x" * 500)) == 200


def test_a_site_is_named_once_known_and_its_wait_is_shown(tmp_path: Path) -> None:
    states = SiteStates(tmp_path / "sites.json", names={"1": "hospital-a"})
    states.new_round(4, ["1", "2"])
    seen = read_site_states(tmp_path)
    assert seen is not None
    assert seen["round"] == 4
    assert seen["sites"] == {
        "hospital-a": {"state": "waiting", "since": seen["sites"]["hospital-a"]["since"]},
        "node 2": {"state": "waiting", "since": seen["sites"]["node 2"]["since"]},
    }
    states.learn("2", "hospital-b")
    states.unanswered([2], 61.4)
    seen = read_site_states(tmp_path)
    assert seen is not None
    assert seen["sites"]["hospital-b"]["state"] == "dropped: no reply in 61 s"
    since = seen["sites"]["hospital-a"]["since"]
    line = describe_site_states(seen, now=since + 42)
    assert line == "round 4: hospital-a waiting, hospital-b dropped: no reply in 61 s"


class ReplacedSession:
    """A grid whose SuperLink drops the first ``failures`` push sessions, as Flower 1.41's
    did under load (a retried PushMessages replaced the session the objects went to)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.pushes = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushes += 1
        if self.pushes <= self.failures:
            raise ObjectPushError("8eda13de", 1, f"session-{self.pushes}")
        return [f"id-{m}" for m in messages]


def test_a_push_whose_session_was_replaced_is_pushed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(site_state.time, "sleep", lambda s: None)
    states = SiteStates(tmp_path / "sites.json")
    asked: list[list[str]] = []
    monkeypatch.setattr(states, "asked", asked.append)
    inner = ReplacedSession(failures=2)

    ids = WatchedGrid(inner, states).push_messages(["m1", "m2"])  # type: ignore[arg-type]

    assert list(ids) == ["id-m1", "id-m2"] and inner.pushes == 3
    assert asked == [["m1", "m2"]]  # recorded once, after the push that went through


def test_a_push_that_keeps_failing_ends_with_flowers_error(tmp_path, monkeypatch):
    monkeypatch.setattr(site_state.time, "sleep", lambda s: None)
    inner = ReplacedSession(failures=PUSH_ATTEMPTS)
    grid = WatchedGrid(inner, SiteStates(tmp_path / "sites.json"))  # type: ignore[arg-type]

    with pytest.raises(ObjectPushError):
        grid.push_messages(["m1"])  # type: ignore[list-item]
    assert inner.pushes == PUSH_ATTEMPTS


class Site(NumPyClient):
    def __init__(self, i: int) -> None:
        self.i = i

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        if self.i == SITES - 1:
            raise RuntimeError("the site's disk is full")
        arrays, n = site_update(self.i)
        return arrays, n, {"site": f"hospital-{self.i}"}


class Recording(SiteStates):
    """Keeps every state each site went through, in order."""

    history: dict[str, list[str]]

    def _write(self) -> None:
        super()._write()
        for site, entry in self.as_json()["sites"].items():
            seen = self.history.setdefault(site, [])
            if not seen or seen[-1] != entry["state"]:
                seen.append(entry["state"])


def test_secaggplus_stages_are_recorded_per_site_with_the_failure(tmp_path: Path) -> None:
    states = Recording(tmp_path / "sites.json")
    states.history = {}

    class Sampling(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            instructions = super().configure_fit(server_round, parameters, client_manager)
            states.new_round(server_round, [proxy.cid for proxy, _ in instructions])
            return instructions

    strategy = Sampling(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=SITES,
        min_available_clients=SITES, accept_failures=True,
        initial_parameters=ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES]),
    )  # fmt: skip
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=1), strategy=strategy
        )
        workflow = DefaultWorkflow(fit_workflow=secure_fit_workflow(RUN_CONFIG, states))
        workflow(WatchedGrid(grid, states), legacy)

    def client_fn(context: Context) -> Any:
        return Site(int(context.node_config["partition-id"])).to_client()

    run_simulation(
        server_app=server,
        client_app=ClientApp(client_fn=client_fn, mods=[secaggplus_mod]),
        num_supernodes=SITES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )

    histories = sorted(states.history.values())
    assert len(histories) == SITES
    complete = [
        "waiting", "setting up", "set up", "exchanging keys", "keys sent", "training",
        "update sent", "unmasking", "shares sent",
    ]  # fmt: skip
    assert histories.count(complete) == SITES - 1, histories
    failed = next(h for h in histories if h != complete)
    assert failed[:6] == complete[:6]
    assert failed[6:] == ["failed: the site's disk is full"], failed
    on_disk = json.loads((tmp_path / "sites.json").read_text())
    assert on_disk["round"] == 1 and on_disk["stage"] == "unmask"
