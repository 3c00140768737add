"""End to end: a federation rides out a site's network cut and another site's damaged data.

Real SuperLink and SuperNodes on 127.0.0.1 (TLS, node auth, SecAgg+). One site reaches the
SuperLink through ``tests.netproxy.TcpRelay``; TLS passes through it untouched.

How Flower 1.41 behaves, from its source: a SuperNode heartbeats every 17.5-22.5 s
(``HEARTBEAT_DEFAULT_INTERVAL`` 30 s less the 5 s call timeout, times 0.7-0.9), and the
SuperLink marks it offline ``HEARTBEAT_PATIENCE`` x 30 s = 60 s after the last heartbeat it
received. Without ``--max-retries`` / ``--max-wait-time`` a SuperNode retries every call
forever (exponential backoff, full jitter, at most 20 s apart), and its next heartbeat sets
an offline node online again: a site reconnects by itself, so deployments must not set
those flags.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from deploy.demo import (
    APP_DIR,
    DemoSettings,
    prepare_sites,
    run_config_for,
    site_keys,
    wait_online,
)
from deploy.launcher import LocalFederation
from deploy.pki import create_consortium_pki
from deploy.processes import HOST, ManagedProcess
from tests.faults import damage_site
from tests.netproxy import TcpRelay

pytestmark = pytest.mark.e2e

SETTINGS = DemoSettings(rounds=1, sites=3, patients=6, frames=16, size=64, local_steps=1)
QUIET = Console(quiet=True)
# Above the SuperLink's 60 s patience after a heartbeat that can be 22.5 s old at the cut.
OFFLINE_WITHIN_S = 90.0
# A heartbeat retry is at most 20 s away (full jitter), plus the CLI's own latency.
ONLINE_AGAIN_WITHIN_S = 60.0
# A cut during the round: at most this long, so that the SuperLink keeps the node online
# through it (22.5 s since the last heartbeat + 15 s + at most 16 s to the next retry < 60 s).
BLIP_S = 15.0
# Seconds after the site's fit-end before the link comes back: its reply is sent meanwhile.
REPLY_GRACE_S = 4.0


def wait_status(
    fed: LocalFederation, node_id: int, status: str, *, timeout: float, node: ManagedProcess
) -> float:
    """Seconds until the SuperLink reports ``status`` for the node; fails after ``timeout``."""
    started = time.monotonic()
    while True:
        now = next(n["status"] for n in fed.cli.nodes() if int(n["node-id"]) == node_id)
        if now == status:
            return time.monotonic() - started
        assert node.alive(), f"the SuperNode exited:\n{node.tail()}"
        assert time.monotonic() - started < timeout, f"still {now} after {timeout:.0f} s"
        time.sleep(1)


def events(config: Path) -> list[dict[str, Any]]:
    path = config.parent / "state" / "events.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def test_a_site_reconnects_after_a_network_cut_and_a_damaged_site_trains(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    configs = prepare_sites(out, SETTINGS, QUIET)
    damaged, remote = configs[0], configs[1]  # hospital-a's export is damaged; b is remote
    damage = damage_site(damaged.parent / "data")
    pki = create_consortium_pki(out / "pki", hosts=["127.0.0.1"])
    timings: dict[str, float | bool] = {}
    with LocalFederation(out / "federation", pki) as fed, TcpRelay((HOST, fed.port)) as relay:
        fed.start_superlink()
        node_ids = {}
        for config in configs:
            site = config.parent.name
            node_ids[site] = fed.register(site, site_keys(config))
            fed.start_supernode(
                site,
                site_keys(config),
                node_config={"site-config": str(config)},
                superlink=relay.address if config == remote else None,
            )
        wait_online(fed, len(configs), timeout=120)
        node_id = node_ids[remote.parent.name]
        node = next(p for p in fed.processes if p.name == f"supernode-{remote.parent.name}")
        assert node.log is not None
        log = node.log
        assert relay.accepted > 0  # the remote site really goes through the relay

        # 1. The link drops for longer than the SuperLink's patience, then comes back.
        relay.cut()
        timings["offline_after_cut_s"] = wait_status(
            fed, node_id, "offline", timeout=OFFLINE_WITHIN_S, node=node
        )
        accepted = relay.accepted
        relay.restore()
        timings["online_after_restore_s"] = wait_status(
            fed, node_id, "online", timeout=ONLINE_AGAIN_WITHIN_S, node=node
        )
        assert relay.accepted > accepted  # it reconnected by itself, same process
        wait_online(fed, len(configs), timeout=30)

        # 2. A round, with a short blip while the remote site trains.
        run_id = fed.run(APP_DIR, run_config_for(out, SETTINGS))
        started = time.monotonic()
        while not any(e["event"] == "fit-start" for e in events(remote)):
            assert time.monotonic() - started < 240, "the remote site never started training"
            assert node.alive(), node.tail()
            time.sleep(0.5)
        # Cut while it trains; restore a few seconds after it finishes (so that its reply
        # meets the cut link) but within BLIP_S, before the SuperLink would give up on it.
        relay.cut()
        cut_at = time.monotonic()
        reconnects = log.read_text().count("Connection successful after")
        while time.monotonic() - cut_at < BLIP_S:
            if (ended := [e for e in events(remote) if e["event"] == "fit-end"]) and (
                time.time() - float(ended[0]["time"]) > REPLY_GRACE_S
            ):
                break
            time.sleep(0.2)
        timings["blip_s"] = time.monotonic() - cut_at
        accepted = relay.accepted
        relay.restore()
        deadline = time.monotonic() + 400
        while not (status := fed.run_status(run_id)["status"]).startswith("finished"):
            assert time.monotonic() < deadline, "the round never finished"
            time.sleep(2)
        timings["run_s"] = time.monotonic() - started
        assert relay.accepted > accepted
        # Whether the reply itself was retried across the cut (it is unless training
        # outlasted the blip): reported, not asserted, as it depends on the machine's speed.
        timings["reply_retried"] = log.read_text().count("Connection successful after") > (
            reconnects
        )
    print(f"\nfault timings: {json.dumps(timings)}")

    assert status == "finished:completed"
    [round1] = [json.loads(line) for line in (out / "rounds.jsonl").open()]
    sites = round1["sites"]
    assert sorted(sites) == ["hospital-a", "hospital-b", "hospital-c"], round1
    assert round1["dropped"] == [] and round1["failures"] == []
    assert [e["event"] for e in events(remote)] == ["fit-start", "fit-end"]

    # The damaged site trained and validated around its bad files, and said what it skipped.
    a = sites["hospital-a"]
    assert (a["skipped_rows"], a["box_problems"], a["skipped_videos"]) == (1, 2, 1)
    assert (a["eval.skipped_rows"], a["eval.skipped_videos"]) == (1, 1)
    assert a["steps"] == 1 and a["epsilon"] > 0
    logged = events(damaged)
    assert [e["event"] for e in logged] == ["data-skipped", "fit-start", "fit-end", "data-skipped"]
    assert any(str(p).startswith(f"{damage.train_video} video:") for p in logged[0]["problems"])
    assert any(str(p).startswith(f"{damage.val_video} video:") for p in logged[3]["problems"])
    for clean in ("hospital-b", "hospital-c"):
        assert (sites[clean]["skipped_rows"], sites[clean]["skipped_videos"]) == (0, 0)
