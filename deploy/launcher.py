"""A federation on this machine: a SuperLink and SuperNodes on 127.0.0.1 (the demo and the
tests), the SuperNode watchdog that restarts a stalled site, and ``superlink_argv``, which
the consortium lead's ``busfed federation`` commands share.

Starting and stopping processes is ``deploy.processes``; talking to the SuperLink is
``deploy.flwr_cli``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import FederationError
from deploy.flwr_cli import FlowerCli, config_string, flower_env, write_profile
from deploy.pki import ConsortiumPKI, NodeKeys
from deploy.processes import (
    HOST,
    ManagedProcess,
    console_script,
    free_port,
    spawn,
    stop_processes,
    wait_listening,
)

# The Flower app busfed submits: this checkout (pyproject.toml's [tool.flwr.app]).
APP_DIR = Path(__file__).resolve().parent.parent


def superlink_argv(pki: ConsortiumPKI, *, host: str, port: int, database: Path | None) -> list[str]:
    """``flower-superlink`` as busfed always runs it: TLS, SuperNode authentication, and
    no package installs at run time, through ``busfed-superlink`` (a SQLite busy timeout
    fit for busy machines). Without ``database`` its state lives in memory."""
    argv = [
        console_script("busfed-superlink"),
        "--host", host,
        "--port", str(port),
        "--ssl-ca-certfile", str(pki.ca_cert),
        "--ssl-certfile", str(pki.server_cert),
        "--ssl-keyfile", str(pki.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if database is not None:
        argv += ["--database", str(database)]
    return argv


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

    Use as a context manager: every process it started is stopped on exit.
    """

    workdir: Path
    pki: ConsortiumPKI
    port: int = field(default_factory=free_port)
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.launch: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.watchdog: SuperNodeWatchdog | None = None
        self._lock = threading.RLock()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        # The lead's connection profile for the flwr CLI.
        write_profile(self.flwr_home, address=self.address, ca_cert=self.pki.ca_cert)
        # Its flwr calls carry a token of their own, so stop() also ends one that Ctrl-C
        # left running.
        self.cli = FlowerCli(self.flwr_home, self.workdir, tree_token=uuid.uuid4().hex)

    # ------------------------------------------------------------------ processes
    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = spawn(
            name, argv, env=env or self.env(), cwd=self.workdir, log=self.logs / f"{name}.log"
        )
        with self._lock:
            self.processes.append(proc)
        return proc

    def start_superlink(
        self, *, database: Path | None = None, extra_args: list[str] | None = None
    ) -> ManagedProcess:
        argv = superlink_argv(self.pki, host=HOST, port=self.port, database=database)
        proc = self._spawn("superlink", [*argv, *(extra_args or [])])
        wait_listening(proc, HOST, self.port, timeout=60)
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """Run the ``flwr`` CLI against this federation's profile; return its stdout."""
        return self.cli(*args, timeout=timeout)

    def register(self, site: str, keys: NodeKeys) -> int:
        """Enrol a site: the SuperLink accepts SuperNodes holding this key only.

        Returns the node id the SuperLink gave it.
        """
        return self.cli.register(keys.public_key, name=site)

    def unregister(self, node_id: int) -> None:
        """Revoke a node: its SuperNode is disconnected and refused when it reconnects."""
        self.cli.unregister(node_id)

    def start_supernode(
        self,
        site: str,
        keys: NodeKeys,
        *,
        node_config: Mapping[str, Any],
        env: Mapping[str, str] | None = None,
        extra_args: list[str] | None = None,
        ca_cert: Path | None = None,
        superlink: str | None = None,
    ) -> ManagedProcess:
        """Start a site's SuperNode (``busfed-supernode``, which writes its pull loop's state
        for the watchdog); ``ca_cert`` overrides the CA it trusts and ``superlink`` the
        address it dials, e.g. a test's cut-able relay."""
        name = f"supernode-{site}"
        argv = [
            console_script("busfed-supernode"),
            "--state-file", str(self.state_file(name)),
            "--superlink", superlink or self.address,
            "--root-certificates", str(ca_cert or self.pki.ca_cert),
            "--auth-supernode-private-key", str(keys.private_key),
            "--port", str(free_port()),
            "--node-config", config_string(node_config),
            *(extra_args or []),
        ]  # fmt: skip
        full_env = self.env()
        full_env.update(env or {})
        self.launch[name] = (argv, full_env)
        return self._spawn(name, argv, env=full_env)

    def state_file(self, name: str) -> Path:
        """Where the SuperNode ``name`` writes its pull loop's state."""
        return self.logs / f"{name}.state.json"

    def restart(self, name: str) -> ManagedProcess:
        """Start the SuperNode ``name`` again as it was first started (after killing
        whatever is left of it); it replaces the old one in ``processes``."""
        argv, env = self.launch[name]
        with self._lock:
            old = [p for p in self.processes if p.name == name]
            stop_processes(old)
            proc = spawn(name, argv, env=env, cwd=self.workdir, log=self.logs / f"{name}.log")
            self.processes = [p for p in self.processes if p.name != name] + [proc]
        return proc

    def start_watchdog(self, **settings: float) -> SuperNodeWatchdog:
        """Watch every SuperNode started here and restart one that dies or hangs."""
        self.watchdog = SuperNodeWatchdog(self, **settings)
        self.watchdog.start()
        return self.watchdog

    def run(self, app: Path, run_config: Mapping[str, Any]) -> int:
        """Submit the app for a run; return the run id."""
        return self.cli.submit(app, run_config)

    def run_status(self, run_id: int) -> dict[str, Any]:
        runs = self.cli.runs(run_id)
        if not runs:
            raise FederationError(f"run {run_id} is not known to the SuperLink")
        return dict(runs[0])

    def stop(self) -> None:
        """Stop every process started here and everything they spawned."""
        if self.watchdog is not None:
            self.watchdog.stop()
        with self._lock:
            stop_processes(self.processes, tokens=[self.cli.tree_token])

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Restart:
    """One restart by the watchdog: which SuperNode, why, and when (epoch seconds)."""

    name: str
    reason: str
    detected: float
    restarted: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class SuperNodeWatchdog:
    """What systemd's ``Restart=on-failure`` and ``WatchdogSec=`` do for a site, for the
    SuperNodes of a ``LocalFederation``: a SuperNode that exited (``busfed-supernode`` exits
    when its pull loop ends or stalls) or whose state file has not changed for
    ``silent_after_s`` (a frozen process) is killed with its children and started again,
    at most once every ``restart_after_s``. Each restart is logged to ``watchdog.log``.
    """

    def __init__(
        self,
        fed: LocalFederation,
        *,
        restart_after_s: float = 10.0,
        silent_after_s: float = 60.0,
        interval_s: float = 2.0,
    ) -> None:
        self.fed = fed
        self.restart_after_s = restart_after_s
        self.silent_after_s = silent_after_s
        self.interval_s = interval_s
        self.restarts: list[Restart] = []
        self._down_since: dict[str, tuple[float, str]] = {}
        self._started = {name: time.time() for name in fed.launch}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supernode-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def problem(self, proc: ManagedProcess) -> str | None:
        """Why ``proc`` needs a restart, or None while it is well."""
        if not proc.alive():
            return f"exited with code {proc.popen.returncode}"
        state = self.fed.state_file(proc.name)
        last = state.stat().st_mtime if state.exists() else self._started.get(proc.name, 0.0)
        silent = time.time() - max(last, self._started.get(proc.name, 0.0))
        if silent > self.silent_after_s:
            return f"no sign of life for {silent:.0f} s"
        return None

    def check(self) -> None:
        """One look at every SuperNode; restart those that need it and may be restarted."""
        for name in list(self.fed.launch):
            with self.fed._lock:
                proc = next((p for p in self.fed.processes if p.name == name), None)
            if proc is None:
                continue
            reason = self.problem(proc)
            if reason is None:
                self._down_since.pop(name, None)
                continue
            detected, first_reason = self._down_since.setdefault(name, (time.time(), reason))
            if time.time() - self._started.get(name, 0.0) < self.restart_after_s:
                continue
            self.fed.restart(name)
            self._started[name] = time.time()
            self._down_since.pop(name, None)
            event = Restart(name, first_reason, detected, self._started[name])
            self.restarts.append(event)
            with (self.fed.logs / "watchdog.log").open("a") as f:
                f.write(json.dumps(event.as_json()) + "\n")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a watchdog must outlive one bad look
                self.check()
