"""Start Flower's processes, talk to them with the flwr CLI, and stop every one of them.

The shared pieces (``superlink_argv``, ``FlowerCli``, ``spawn``, ``stop_processes``) serve
both ``LocalFederation`` (the demo and tests, on 127.0.0.1) and the consortium lead's
``busfed federation`` commands.

Flower starts its own processes (a SuperLink, one SuperNode per site, and the
``flwr-serverapp`` / ``flwr-clientapp`` children they spawn). Each one is started here in a
session of its own, and stopping it stops its whole process tree, on success, failure
or Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from common.errors import FederationError
from deploy.pki import ConsortiumPKI, NodeKeys

HOST = "127.0.0.1"
PROFILE = "busfed"
# The Flower app busfed submits: this checkout (pyproject.toml's [tool.flwr.app]).
APP_DIR = Path(__file__).resolve().parent.parent
# Every process busfed spawns carries this variable (a token per spawn), and so does every
# process those spawn: Flower detaches some (flower-superexec, flwr-serverapp) into
# sessions of their own, and once their parent is gone they hang from PID 1.
TREE_VARIABLE = "BUSFED_PROCESS_TREE"
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    # The console scripts of the interpreter running us, so a venv works without activation.
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FederationError(f"'{name}' not found; install busfed's dependencies (make venv)")
    return found


def toml_value(value: Any) -> str:
    """Render a Python value as a TOML literal for Flower's ``k=v`` config strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def config_string(values: Mapping[str, Any]) -> str:
    """``{'a': 1, 'b': 'x'}`` -> ``a=1 b="x"`` (Flower's --run-config / --node-config)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's processes and its CLI, with ``flwr_home`` as FLWR_HOME."""
    env = dict(os.environ)
    # Flower spawns its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp)
    # by name, so this interpreter's script folder must come first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def write_profile(flwr_home: Path, *, address: str, ca_cert: Path, name: str = PROFILE) -> Path:
    """Write the ``flwr`` CLI's connection profile ``name`` (TLS, trusting ``ca_cert``).

    An identical file is left alone.
    """
    path = flwr_home / "config.toml"
    text = (
        f"[superlink]\ndefault = {toml_value(name)}\n\n"
        f"[superlink.{name}]\n"
        f"address = {toml_value(address)}\n"
        f"root-certificates = {toml_value(str(ca_cert))}\n"
    )
    if not (path.is_file() and path.read_text() == text):
        flwr_home.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def superlink_argv(pki: ConsortiumPKI, *, host: str, port: int, database: Path | None) -> list[str]:
    """``flower-superlink`` as busfed always runs it: TLS, SuperNode authentication, and
    no package installs at run time, through ``busfed-superlink`` (a SQLite busy timeout
    fit for busy machines). Without ``database`` its state lives in memory."""
    argv = [
        _bin("busfed-superlink"),
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
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None
    tree_token: str = ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL this process and everything it spawned, as a machine failure would."""
        tree = process_tree([self])
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=5)

    def tail(self, n: int = 30) -> str:
        if self.log is None:
            return ""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(
    name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log: Path | None
) -> ManagedProcess:
    """Start ``argv`` in a session of its own; its output goes to ``log``, or to ours if None."""
    token = uuid.uuid4().hex
    handle = log.open("ab") if log is not None else None
    try:
        popen = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT if handle is not None else None,
            stdin=subprocess.DEVNULL,
            env={**env, TREE_VARIABLE: token},
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        if handle is not None:
            handle.close()
    return ManagedProcess(name=name, popen=popen, log=log, tree_token=token)


def process_tree(processes: list[ManagedProcess]) -> list[psutil.Process]:
    """These processes and every process they spawned, parents first: their children, and
    any process that carries one of their tree tokens (orphans that Flower detached)."""
    tree: dict[int, psutil.Process] = {}
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.popen.pid)
            for p in [root, *root.children(recursive=True)]:
                tree.setdefault(p.pid, p)
    tokens = {proc.tree_token for proc in processes if proc.tree_token}
    if tokens:
        for p in psutil.process_iter():
            if p.pid in tree or p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.environ().get(TREE_VARIABLE) in tokens:
                    tree[p.pid] = p
    return list(tree.values())


def stop_processes(processes: list[ManagedProcess]) -> None:
    """Stop these processes and everything they spawned.

    Flower detaches some children (flower-superexec, flwr-serverapp) into sessions of
    their own, so process groups are not enough: the whole tree is collected first
    (children while parents still exist, and orphans by their tree token), then sent
    SIGTERM, then SIGKILL after a grace period.
    """
    tree = process_tree(processes)
    for p in reversed(tree):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=1)


def wait_listening(proc: ManagedProcess, host: str, port: int, *, timeout: float) -> None:
    """Return once ``host:port`` accepts connections; raise if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise FederationError(f"{proc.name} exited at start:\n{proc.tail()}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise FederationError(f"{proc.name} did not listen on {host}:{port} in {timeout:.0f} s")


def _json_reply(out: str, what: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` printed; FederationError if it failed.

    The flwr CLI exits 0 after many errors and reports them as ``"success": false``.
    """
    try:
        data = json.loads(out[out.index("{") :])
    except ValueError as exc:
        raise FederationError(f"{what}: no JSON answer from flwr:\n{out}") from exc
    if not data.get("success", False):
        # The message repeats flwr's progress output first; the cause is its last line.
        lines = [x.strip() for x in str(data.get("error-message", out)).splitlines()]
        raise FederationError(f"{what} failed: {[x for x in lines if x][-1]}")
    return dict(data)


# What the flwr CLI prints when the SuperLink was busy, not wrong: HTTP 500 from a locked
# SQLite database, or a proxy's 502-504. Such calls are tried again (TRANSIENT_RETRY_S).
TRANSIENT_FLWR_ERRORS = (
    "internal server error",
    "database is locked",
    "bad gateway",
    "service unavailable",
    "gateway timeout",
)
TRANSIENT_RETRY_S = 120.0


def is_transient(message: str) -> bool:
    """Whether a failed flwr call says the SuperLink was busy (worth trying again)."""
    lowered = message.lower()
    return any(marker in lowered for marker in TRANSIENT_FLWR_ERRORS)


@dataclass(frozen=True)
class FlowerCli:
    """The ``flwr`` CLI against one SuperLink connection profile in ``flwr_home``.

    A call the SuperLink answers with a transient error (``is_transient``) is tried again
    with exponential back-off (1, 2, 4 ... 15 s) for up to ``retry_s`` seconds; each retry
    is announced on stderr. Every other failure raises at once.
    """

    flwr_home: Path
    cwd: Path
    profile: str = PROFILE
    retry_s: float = TRANSIENT_RETRY_S

    def _once(self, args: tuple[str, ...], timeout: float) -> str:
        try:
            res = subprocess.run(
                [_bin("flwr"), *args],
                env=flower_env(self.flwr_home),
                cwd=self.cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise FederationError(
                f"flwr {' '.join(args)} did not answer in {timeout:.0f} s"
            ) from exc
        if res.returncode != 0:
            raise FederationError(
                f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res.stdout

    def _retrying(self, call: Callable[[], T], what: str) -> T:
        deadline = time.monotonic() + self.retry_s
        wait = 1.0
        while True:
            try:
                return call()
            except FederationError as exc:
                if not is_transient(str(exc)) or time.monotonic() + wait > deadline:
                    raise
                print(f"busfed: {what}: the SuperLink is busy ({str(exc).splitlines()[-1]}); "
                      f"trying again in {wait:.0f} s", file=sys.stderr)  # fmt: skip
                time.sleep(wait)
                wait = min(2 * wait, 15.0)

    def __call__(self, *args: str, timeout: float = 120) -> str:
        """Run ``flwr ARGS``; return its stdout, or raise FederationError naming the call."""
        return self._retrying(lambda: self._once(args, timeout), f"flwr {' '.join(args)}")

    def passthrough(self, *args: str) -> int:
        """Run ``flwr ARGS`` with its output on ours (``flwr log --stream``); its exit code."""
        return subprocess.call(
            [_bin("flwr"), *args],
            env=flower_env(self.flwr_home),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
        )

    def json(self, *args: str, what: str, timeout: float = 120) -> dict[str, Any]:
        return self._retrying(
            lambda: _json_reply(self._once((*args, "--format", "json"), timeout), what), what
        )

    def register(self, public_key: Path, *, name: str) -> int:
        """Enrol a SuperNode public key; return the node id the SuperLink gave it."""
        data = self.json(
            "supernode", "register", str(public_key), self.profile, "--name", name,
            what=f"registering {public_key} for {name}",
        )  # fmt: skip
        return int(data["node-id"])

    def unregister(self, node_id: int) -> None:
        """Remove a node: its SuperNode is disconnected and refused from then on."""
        self.json(
            "supernode", "unregister", str(node_id), self.profile,
            what=f"unregistering node {node_id}",
        )  # fmt: skip

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list``: node id (a string), status, and times."""
        data = self.json("supernode", "list", self.profile, what="listing SuperNodes")
        return list(data["nodes"])

    def runs(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """``flwr list``: every run, or the one with ``run_id``."""
        args = ["list", self.profile] + ([] if run_id is None else ["--run-id", str(run_id)])
        return list(self.json(*args, what="listing runs")["runs"])

    def submit(self, app: Path, run_config: Mapping[str, Any]) -> int:
        """Submit the app for a run; return the run id."""
        data = self.json(
            "run", str(app), self.profile, "--run-config", config_string(run_config),
            what=f"submitting the app in {app}",
        )  # fmt: skip
        return int(data["run-id"])

    def stop_run(self, run_id: int) -> None:
        self.json("stop", str(run_id), self.profile, what=f"stopping run {run_id}")


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
        self.cli = FlowerCli(self.flwr_home, self.workdir)

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
            _bin("busfed-supernode"),
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
            stop_processes(self.processes)

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
