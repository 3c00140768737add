"""``busfed-superlink`` and ``busfed-supernode``: Flower's own programs, fit for busy machines.

Each runs Flower 1.41's ``flower-superlink`` / ``flower-supernode`` in-process, with the
same arguments, after the changes in ``common.flower_compat``:

* SuperLink: SQLite waits ``--sqlite-busy-timeout`` seconds (default 60) for a lock
  instead of Flower's fixed 5 s, so a starved writer no longer turns into HTTP 500
  "database is locked";
* SuperNode: HTTP 500 from the SuperLink is retried with Flower's back-off for up to
  ``--transient-retry`` seconds of consecutive errors instead of ending the pull loop.

A SuperNode also watches its own pull loop. In Flower 1.41 the loop ends on an error it
does not retry while the process lives on (its Runtime API thread keeps it up): a site
that looks alive and never trains. Here the process exits instead (code 75), and so does
one whose loop has not come round for ``--stall-timeout`` seconds while it was not
waiting for its ClientApp (code 76), so the launcher's watchdog (``deploy.launcher``) or
systemd (``Restart=on-failure``) starts it again. With ``--state-file`` it writes its
loop's state there every few seconds; under systemd with ``WatchdogSec=`` it sends
``WATCHDOG=1`` only while the loop is healthy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.files import write_atomic
from common.flower_compat import (
    SUPERLINK_BUSY_TIMEOUT_S,
    TRANSIENT_ERROR_WINDOW_S,
    retry_transient_superlink_errors,
    set_sqlite_busy_timeout,
)

# Exit codes of busfed-supernode when its own watch ends it (both are "restart me").
EXIT_LOOP_ENDED = 75
EXIT_LOOP_STALLED = 76
STALL_TIMEOUT_S = 900.0
STATE_INTERVAL_S = 2.0


def _split(
    argv: list[str], parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, list[str]]:
    """busfed's own options, and the rest for Flower (``--`` may separate them).

    ``--help`` prints busfed's options, then Flower's (its program prints them and exits).
    """
    if "-h" in argv or "--help" in argv:
        print(parser.format_help(), flush=True)
        return parser.parse_args([]), ["--help"]
    ours, rest = parser.parse_known_args(argv)
    return ours, [a for a in rest if a != "--"]


def superlink_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="busfed-superlink",
        add_help=False,
        description="flower-superlink with a longer SQLite busy timeout; "
        "every other option is flower-superlink's.",
    )
    parser.add_argument(
        "--sqlite-busy-timeout", type=float, default=SUPERLINK_BUSY_TIMEOUT_S, metavar="S",
        help=f"seconds SQLite waits for a lock (default {SUPERLINK_BUSY_TIMEOUT_S:g}; Flower: 5)",
    )  # fmt: skip
    ours, rest = _split(sys.argv[1:] if argv is None else argv, parser)
    set_sqlite_busy_timeout(ours.sqlite_busy_timeout)
    from flwr.superlink.cli import flower_superlink

    # The SuperLink starts its SuperExec (which starts the ServerApp) by name; that one is
    # a client of the SuperLink too, so it runs as busfed-superexec (retrying HTTP 500).
    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    build = module._get_superexec_command

    def busfed_superexec(**kwargs: Any) -> list[str]:
        command = list(build(**kwargs))
        if command and command[0] == "flower-superexec":
            command[0] = str(Path(sys.executable).parent / "busfed-superexec")
        return command

    module._get_superexec_command = busfed_superexec  # type: ignore[attr-defined]
    sys.argv = ["flower-superlink", *rest]
    flower_superlink()


def superexec_main() -> None:
    """``flower-superexec`` retrying HTTP 500 from the SuperLink (its arguments unchanged)."""
    retry_transient_superlink_errors()
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *sys.argv[1:]]
    flower_superexec()


class LoopWatch:
    """The SuperNode's pull loop, seen from inside: when it last came round, and whether it
    is waiting for its ClientApp's reply (which may take a whole local training)."""

    def __init__(self, stall_timeout_s: float, state_file: Path | None) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.state_file = state_file
        self.started = time.time()
        self.last_tick = time.monotonic()
        self.ticks = 0
        self.phase = "connecting"
        self.lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.last_tick, self.phase = time.monotonic(), phase
                self.ticks += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.last_tick, self.phase = time.monotonic(), "idle"

        return watched

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "pid": os.getpid(),
                "phase": self.phase,
                "ticks": self.ticks,
                "seconds_since_tick": round(time.monotonic() - self.last_tick, 1),
                "started": self.started,
                "time": time.time(),
            }

    def stalled(self) -> bool:
        """No turn of the loop for too long, while not waiting on the ClientApp."""
        state = self.snapshot()
        return state["phase"] != "push" and state["seconds_since_tick"] > self.stall_timeout_s

    def write_state(self) -> None:
        if self.state_file is None:
            return
        # A full disk must not stop the watch itself: the state file just goes stale.
        with contextlib.suppress(OSError):
            write_atomic(self.state_file, json.dumps(self.snapshot()))


def sd_notify(message: str) -> None:
    """Tell systemd ``message`` (READY=1, WATCHDOG=1) when it asked to be told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


def _exit(code: int, why: str) -> None:
    print(f"busfed-supernode: {why}; exiting with code {code} to be restarted", flush=True)
    os._exit(code)


def _monitor(watch: LoopWatch) -> None:
    ready = False
    while True:
        watch.write_state()
        if watch.stalled():
            _exit(EXIT_LOOP_STALLED, f"the pull loop has not run for {watch.stall_timeout_s:g} s")
        if watch.ticks and not ready:
            sd_notify("READY=1")
            ready = True
        if ready:
            sd_notify("WATCHDOG=1")
        time.sleep(STATE_INTERVAL_S)


def supernode_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="busfed-supernode",
        add_help=False,
        description="flower-supernode that retries a busy SuperLink and exits (to be "
        "restarted) when its pull loop ends or stalls; every other option is "
        "flower-supernode's.",
    )
    parser.add_argument(
        "--transient-retry", type=float, default=TRANSIENT_ERROR_WINDOW_S, metavar="S",
        help="retry HTTP 500 from the SuperLink for up to S seconds in a row "
        f"(default {TRANSIENT_ERROR_WINDOW_S:g})",
    )  # fmt: skip
    parser.add_argument(
        "--stall-timeout", type=float, default=STALL_TIMEOUT_S, metavar="S",
        help="exit if the pull loop has not come round for S seconds while not waiting for "
        f"the ClientApp (default {STALL_TIMEOUT_S:g})",
    )  # fmt: skip
    parser.add_argument(
        "--state-file", type=Path, default=None, metavar="FILE",
        help="write the pull loop's state (JSON) here every few seconds, for a watchdog",
    )  # fmt: skip
    ours, rest = _split(sys.argv[1:] if argv is None else argv, parser)
    retry_transient_superlink_errors(ours.transient_retry)

    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    watch = LoopWatch(ours.stall_timeout, ours.state_file)
    loop._pull_and_store_message = watch.wrap(loop._pull_and_store_message, "pull")
    loop._push_messages = watch.wrap(loop._push_messages, "push")
    threading.Thread(target=_monitor, args=(watch,), name="busfed-loop-watch", daemon=True).start()

    sys.argv = ["flower-supernode", *rest]
    try:
        flower_supernode()
    except SystemExit as exc:  # Flower's own exits: signals, refused connections
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        os._exit(code)
    except BaseException:  # anything that ends the loop ends the process
        traceback.print_exc()
        _exit(EXIT_LOOP_ENDED, "the pull loop raised")
    _exit(EXIT_LOOP_ENDED, "the pull loop ended (see the error above)")
