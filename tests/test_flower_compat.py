"""busfed's changes to Flower 1.41 for busy machines: where they patch, and what they do.

A Flower upgrade that moves the patched globals fails here first.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from common.errors import FederationError
from common.flower_compat import (
    TransientStatusCodes,
    retry_transient_superlink_errors,
    set_sqlite_busy_timeout,
    sqlite_busy_timeout_ms,
)
from deploy.federation.runs import check_finished_run
from deploy.flwr_cli import FlowerCli, is_transient
from deploy.launcher import LocalFederation
from deploy.pki import pki_paths


def test_flower_still_has_the_globals_busfed_replaces() -> None:
    from flwr.supercore import sql_mixin
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.retry import http_retry
    from flwr.superlink.cli.flower_superlink import _get_superexec_command
    from flwr.supernode import start_client_internal

    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"]
    assert 500 not in frozenset({502, 503, 504}) & set(http_retry._RETRYABLE_STATUS_CODES)
    assert callable(start_client_internal._pull_and_store_message)
    assert callable(start_client_internal._push_messages)
    assert callable(flower_superexec)
    command = _get_superexec_command(
        runtime_address="127.0.0.1:1",
        runtime_certificates=None,
        runtime_root_certificates_path=None,
        parent_pid=1,
        runtime_dependency_install=False,
    )
    assert command[0] == "flower-superexec"  # busfed-superlink swaps this name


def test_busy_timeout_is_set_for_new_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore import sql_mixin

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    assert sqlite_busy_timeout_ms() == 5000  # Flower's own
    set_sqlite_busy_timeout(60)
    assert sqlite_busy_timeout_ms() == 60000

    class Cursor:
        executed: ClassVar[list[str]] = []

        def execute(self, sql: str) -> None:
            self.executed.append(sql)

        def close(self) -> None:
            pass

    class Connection:
        def cursor(self) -> Cursor:
            return Cursor()

    sql_mixin._set_sqlite_pragmas(Connection(), None)
    assert "PRAGMA busy_timeout = 60000;" in Cursor.executed
    with pytest.raises(ValueError):
        set_sqlite_busy_timeout(0)


def test_500_is_retried_within_its_window_only() -> None:
    clock = iter([0.0, 10.0, 20.0, 29.0, 31.0, 100.0, 200.0])
    codes = TransientStatusCodes(window_s=30.0, clock=clock)
    assert 503 in codes and 404 not in codes and 401 not in codes
    # A run of 500s, 10 s apart: retried while the run is younger than 30 s.
    assert [500 in codes for _ in range(5)] == [True, True, True, True, False]
    # 69 s without a 500 (more than the quiet gap): a new run begins, retried again.
    assert 500 in codes
    assert codes.retried == 5


def test_patch_reaches_flowers_retry_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx
    from flwr.supercore.retry import http_retry

    monkeypatch.setattr(http_retry, "_RETRYABLE_STATUS_CODES", http_retry._RETRYABLE_STATUS_CODES)
    invoker = http_retry.make_simple_http_retry_invoker()
    request = httpx.Request("POST", "https://127.0.0.1/v1/fleet/pull-messages")
    error = httpx.HTTPStatusError(
        "500", request=request, response=httpx.Response(500, request=request)
    )
    assert invoker.should_giveup is not None
    assert invoker.should_giveup(error)  # Flower alone gives up on a 500
    retry_transient_superlink_errors(60.0)
    assert not invoker.should_giveup(error)  # the same invoker now retries it


def test_flwr_cli_retries_a_busy_superlink(tmp_path: Path) -> None:
    cli = FlowerCli(tmp_path, tmp_path, retry_s=10.0)
    answers = itertools.chain(
        [FederationError("listing runs failed: Internal server error.")] * 2, ["ok"]
    )

    def call() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert cli._retrying(call, "listing runs") == "ok"
    assert is_transient("(sqlite3.OperationalError) database is locked")
    assert not is_transient("Failed to activate SuperNode")

    def refused() -> str:
        raise FederationError("registering failed: public key already in use")

    with pytest.raises(FederationError, match="already in use"):
        cli._retrying(refused, "registering")  # not transient: raised at once


def test_stopping_a_federation_ends_a_flwr_call_that_ctrl_c_left_running(tmp_path: Path) -> None:
    """Ctrl-C between Popen's fork and exec leaves the ``flwr`` child running, unknown to
    ``subprocess.run`` (it outlived a demo once): stop() finds it by the CLI's token."""
    federation = LocalFederation(tmp_path, pki_paths(tmp_path))
    left = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], env=federation.cli.env()
    )
    try:
        federation.stop()  # waits for what it stopped (and reaps it: no exit code here)
        assert left.poll() is not None
    finally:
        left.kill()
        left.wait()


def test_a_run_that_registered_no_model_is_a_failure(tmp_path: Path) -> None:
    def summary(ok: bool, reason: str = "") -> None:
        (tmp_path / "summary.json").write_text(
            json.dumps({"rounds": [], "outcome": {"ok": ok, "reason": reason}})
        )

    summary(True)
    assert check_finished_run(1, "finished:completed", tmp_path)["outcome"]["ok"]
    summary(False, "round(s) 1, 2 produced no model")
    with pytest.raises(FederationError, match="produced no model"):
        check_finished_run(1, "finished:completed", tmp_path)
    with pytest.raises(FederationError, match="finished:failed: round"):
        check_finished_run(1, "finished:failed", tmp_path)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(FederationError, match="no readable"):
        check_finished_run(1, "finished:completed", tmp_path)


def test_outcome_counts_rounds_with_a_model() -> None:
    from types import SimpleNamespace

    from server.app import outcome

    def records(*versions: str | None) -> SimpleNamespace:
        return SimpleNamespace(
            records=[SimpleNamespace(round=i + 1, model_version=v) for i, v in enumerate(versions)]
        )

    assert outcome(records("1", "2"), asked=2)["ok"]  # type: ignore[arg-type]
    none = outcome(records(None, None), asked=2)  # type: ignore[arg-type]
    assert not none["ok"] and none["rounds_with_model"] == 0
    assert none["reason"] == "round(s) 1, 2 produced no model; 0 of 2 round(s) produced a model"
    short = outcome(records("1"), asked=3)  # type: ignore[arg-type]
    assert not short["ok"] and short["reason"] == "1 of 3 round(s) produced a model"


def test_federation_start_wait_follows_the_run_and_fails_without_a_model(tmp_path: Path) -> None:
    import datetime as dt
    from types import SimpleNamespace

    from deploy.federation.runs import LaunchRecord, wait_for_run

    out = tmp_path / "run"
    out.mkdir()
    statuses = iter(["running", "running", "finished:completed"])

    def runs(run_id: int) -> list[dict[str, str]]:
        status = next(statuses)
        if status.startswith("finished"):
            round_ = {"round": 1, "model_version": None, "sites": {}, "dropped": ["hospital-b"]}
            (out / "rounds.jsonl").write_text(json.dumps(round_) + "\n")
            reason = "round(s) 1 produced no model"
            (out / "summary.json").write_text(
                json.dumps({"rounds": [round_], "outcome": {"ok": False, "reason": reason}})
            )
        return [{"run-id": str(run_id), "status": status}]

    consortium = SimpleNamespace(cli=lambda: SimpleNamespace(runs=runs))
    launch = LaunchRecord(
        run_id=7, campaign="c", out_dir=out, at=dt.datetime.now(dt.UTC), run_config={}
    )
    said: list[str] = []
    with pytest.raises(FederationError, match="run 7: round\\(s\\) 1 produced no model"):
        wait_for_run(consortium, launch, announce=said.append, poll_s=0.01)  # type: ignore[arg-type]
    assert said == ["round 1: model version None, sites none, no update from hospital-b"]
