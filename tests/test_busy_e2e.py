"""A busy SuperLink: its database locked for longer than SQLite waits, with real processes.

Real ``busfed-superlink`` (TLS, node auth, ``--database``) and ``busfed-supernode``
processes on 127.0.0.1. The test holds a write lock on the SuperLink's SQLite database, as a
writer starved of CPU does, for longer than the busy timeout (set to 1 s here so the lock
need not be long), so the SuperLink answers HTTP 500 "database is locked":

* a SuperNode whose retry window is shorter than the lock gives up, and Flower ends its
  pull loop; ``busfed-supernode`` then exits (75) instead of living on without pulling, and
  the launcher's watchdog starts it again;
* a SuperNode with a longer retry window rides the lock out in the same process;
* a SuperNode frozen outright (SIGSTOP) stops writing its state and is restarted too.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from deploy.flower_guard import EXIT_LOOP_ENDED
from deploy.launcher import LocalFederation
from deploy.pki import create_consortium_pki, create_node_keys

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LOCK_S = 20.0
SHORT_RETRY_S = 4.0


def online(fed: LocalFederation) -> int:
    return sum(n["status"] == "online" for n in fed.cli.nodes())


def wait_until(what: str, check, timeout: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)
    return time.monotonic() - started


def test_a_locked_superlink_database_is_survived_or_recovered(tmp_path: Path) -> None:
    pki = create_consortium_pki(tmp_path / "pki", hosts=["127.0.0.1"])
    database = tmp_path / "federation" / "superlink.db"
    with LocalFederation(tmp_path / "federation", pki) as fed:
        fed.start_superlink(database=database, extra_args=["--sqlite-busy-timeout", "1"])
        for site, retry in (("short", SHORT_RETRY_S), ("long", 300.0)):
            keys = create_node_keys(tmp_path / site, site=site)
            fed.register(site, keys)
            fed.start_supernode(site, keys, node_config={"site-config": "unused"})
            fed.launch[f"supernode-{site}"][0].insert(1, f"--transient-retry={retry:g}")
            fed.restart(f"supernode-{site}")
        watchdog = fed.start_watchdog(restart_after_s=2.0, silent_after_s=15.0)
        wait_until("both sites online", lambda: online(fed) == 2, 120)
        long_pid = next(p for p in fed.processes if p.name == "supernode-long").popen.pid

        lock = sqlite3.connect(database, timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        lock.execute("CREATE TABLE busfed_test_lock (x)")
        time.sleep(LOCK_S)
        lock.execute("ROLLBACK")
        lock.close()
        released = time.monotonic()

        superlink_log = (fed.logs / "superlink.log").read_text()
        assert "database is locked" in superlink_log  # the lock did reach Flower
        short_log = (fed.logs / "supernode-short.log").read_text()
        assert "the pull loop ended" in short_log
        wait_until("the short site restarted", lambda: watchdog.restarts, 60)
        assert watchdog.restarts[0].name == "supernode-short"
        assert watchdog.restarts[0].reason == f"exited with code {EXIT_LOOP_ENDED}"
        recovered = wait_until("both sites online again", lambda: online(fed) == 2, 120)
        print(f"lock {LOCK_S:.0f} s; online again {time.monotonic() - released:.1f} s after it")
        assert recovered < 120
        # The long-window site retried through the lock in the same process.
        long_now = next(p for p in fed.processes if p.name == "supernode-long")
        assert long_now.popen.pid == long_pid and long_now.alive()
        assert (
            "Connection attempt failed, retrying" in (fed.logs / "supernode-long.log").read_text()
        )

        # A SuperNode frozen outright writes no state: the watchdog restarts it. The
        # SuperLink refuses the new process until it has missed the old one's heartbeats
        # for about a minute; the watchdog keeps trying, as systemd would.
        os.kill(long_pid, signal.SIGSTOP)
        frozen = time.monotonic()
        wait_until(
            "the frozen site restarted",
            lambda: any(r.name == "supernode-long" for r in watchdog.restarts),
            60,
        )
        back = wait_until("both sites online after the freeze", lambda: online(fed) == 2, 240)
        print(f"frozen site online again {time.monotonic() - frozen:.1f} s after SIGSTOP")
        assert back < 240
