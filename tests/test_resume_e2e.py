"""The SuperLink (and with it the ServerApp) dies mid-round; the federation resumes.

Real processes on 127.0.0.1: a SuperLink with TLS, node auth and ``--database``, three
SuperNodes, SecAgg+, Opacus at the sites, MLflow on SQLite. After the restart the lead
launches the campaign again with ``resume=true``. Nothing may be lost or doubled: each
round has exactly one registered version, each site's ledger has each round once, and the
sites that had already trained the lost round re-send the same update instead of spending
epsilon on it again.

The same run then answers "does the server ever write a single site's update?": each
site's released update is looked for, byte for byte, in everything the consortium side
wrote (SuperLink database and logs, MLflow database and artifacts, round log, summary).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient
from rich.console import Console

from common.errors import FederationError
from deploy.demo import (
    APP_DIR,
    DemoSettings,
    audit,
    prepare_sites,
    run_config_for,
    start_sites,
    wait_online,
)
from deploy.flwr_cli import PROFILE
from deploy.launcher import LocalFederation
from deploy.pki import create_consortium_pki

pytestmark = pytest.mark.e2e

SETTINGS = DemoSettings(rounds=2, sites=3, patients=6, frames=16, size=64, local_steps=1)
QUIET = Console(quiet=True)
CAMPAIGN = "trial-1"


def wait_for(what: str, check: Callable[[], bool], fed: LocalFederation, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in fed.processes)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.5)


def events(config: Path) -> list[dict[str, object]]:
    path = config.parent / "state" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_serverapps(fed: LocalFederation) -> int:
    """SIGKILL the ServerApps of this SuperLink (Flower starts them detached from it)."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flwr-serverapp" in cmdline and fed.address in cmdline:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
                killed += 1
    return killed


def finished(fed: LocalFederation, run_id: int) -> bool:
    return str(fed.run_status(run_id).get("status", "")).startswith("finished")


def test_superlink_killed_mid_round_resumes_with_nothing_lost_or_doubled(tmp_path: Path) -> None:
    out = tmp_path
    configs = prepare_sites(out, SETTINGS, QUIET)
    pki = create_consortium_pki(out / "pki", hosts=["127.0.0.1"])
    run_config = {**run_config_for(out, SETTINGS), "campaign": CAMPAIGN}
    database = out / "federation" / "superlink.db"
    uri = run_config["mlflow-tracking-uri"]
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model = "busfed-wauve"

    with LocalFederation(out / "federation", pki) as fed:
        superlink = fed.start_superlink(database=database)
        start_sites(fed, configs)
        first = fed.run(APP_DIR, run_config)

        # Round 1 completes; the SuperLink is killed as soon as a site has trained round 2.
        def a_site_trained_round_2() -> bool:
            return any(
                e["event"] == "fit-end" and e["round"] == 2 for c in configs for e in events(c)
            )

        wait_for("a site to train round 2", a_site_trained_round_2, fed, timeout=600)
        # The consortium's machine dies: the SuperLink and the run's ServerApp with it.
        superlink.kill()
        kill_serverapps(fed)  # in case one outlived its parents
        versions = registry.search_model_versions(f"name = '{model}'")
        assert [v.tags["round"] for v in versions] == ["1"], "round 2 must be lost, not saved"

        # The lead restarts the SuperLink on its database; the sites reconnect by themselves.
        fed.start_superlink(database=database)
        wait_online(fed, len(configs), timeout=240)
        with contextlib.suppress(FederationError):  # the dead run's ServerApp is gone
            fed.flwr("stop", str(first), PROFILE)
        second = fed.run(APP_DIR, {**run_config, "resume": True})
        wait_for("the resumed run to finish", lambda: finished(fed, second), fed, timeout=900)
        assert str(fed.run_status(second)["status"]) == "finished:completed"

    # The registry holds each round once, in order, all in the one campaign.
    versions = sorted(
        registry.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version)
    )
    assert [(str(v.version), v.tags["round"], v.tags["campaign"]) for v in versions] == [
        ("1", "1", CAMPAIGN),
        ("2", "2", CAMPAIGN),
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == {"round": 1, "model_version": "1"}
    assert [r["round"] for r in summary["rounds"]] == [2]

    # Each site trained each round once; those that had trained round 2 re-sent it.
    resent = 0
    for config in configs:
        trained = [(e["event"], e["round"]) for e in events(config) if e["event"] != "fit-start"]
        assert trained.count(("fit-end", 1)) == 1 and trained.count(("fit-end", 2)) == 1
        resent += trained.count(("fit-resent", 2))
        ledger = config.parent / "state" / "privacy-ledger.jsonl"
        entries = [json.loads(line) for line in ledger.read_text().splitlines()]
        keys = [(e["run_id"], e["round"], e["model"]) for e in entries if e["status"] == "trained"]
        assert sorted(keys) == sorted(
            (CAMPAIGN, r, m) for r in (1, 2) for m in ("detector", "classifier")
        )
        # The last version carries exactly the epsilon the site's ledger ends with.
        site = config.parent.name
        assert float(versions[-1].tags[f"epsilon.{site}"]) == pytest.approx(
            entries[-1]["epsilon_total"], abs=1e-6
        )
        assert float(versions[-1].tags[f"epsilon_budget.{site}"]) == 8.0
    assert resent >= 1
    verdict = audit(out, configs, summary, QUIET)
    assert verdict["ok"], verdict

    # No single site's update, in the clear, anywhere on the consortium's side.
    consortium_files = [
        p for p in out.rglob("*") if p.is_file() and (out / "sites") not in p.parents
    ]
    assert any(p.name == "superlink.db" for p in consortium_files)

    def window(array: np.ndarray) -> np.ndarray:
        flat = array.ravel()
        return flat[flat.size // 2 : flat.size // 2 + 16]

    # Positive control: the same search finds what the server does write, the global model
    # (each registered version's weights.pt), so a site's update written the same way would
    # be found too.
    (weights,) = (out / "mlartifacts").rglob("round-0002/weights.pt")
    state = torch.load(weights, map_location="cpu")
    largest_global = max(
        (t for part in state.values() for t in part.values()), key=lambda t: t.numel()
    )
    needle = window(largest_global.numpy()).astype(np.float32).tobytes()
    assert any(needle in p.read_bytes() for p in consortium_files)
    for config in configs:
        (sent,) = (config.parent / "state" / "sent").rglob("round-0002.npz")
        with np.load(sent) as data:
            update = window(max((data[k] for k in data.files if k != "meta"), key=np.size))
        needles = [update.astype(np.float32).tobytes(), update.astype(np.float64).tobytes()]
        for path in consortium_files:
            blob = path.read_bytes()
            for needle in needles:
                assert needle not in blob, f"{config.parent.name}'s update found in {path}"
