"""Start a federation as real processes on 127.0.0.1 and stop every one of them.

Flower starts its own processes (a SuperLink, one SuperNode per site, and the
``flwr-serverapp`` / ``flwr-clientapp`` children they spawn). Each one is started here in a
process group of its own so that stopping it also stops its children, on success, failure
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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.errors import FederationError
from deploy.pki import ConsortiumPKI, NodeKeys

HOST = "127.0.0.1"
PROFILE = "busfed"


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


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL this process and everything it spawned, as a machine failure would."""
        try:
            root = psutil.Process(self.popen.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=5)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


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
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        # The lead's connection profile for the flwr CLI.
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{PROFILE}"\n\n'
            f"[superlink.{PROFILE}]\n"
            f'address = "{HOST}:{self.port}"\n'
            f'root-certificates = "{self.pki.ca_cert}"\n'
        )

    # ------------------------------------------------------------------ processes
    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Flower spawns its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp)
        # by name, so this interpreter's script folder must come first on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(
            FLWR_HOME=str(self.flwr_home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> ManagedProcess:
        log = self.logs / f"{name}.log"
        handle = log.open("ab")
        popen = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or self.env(),
            cwd=self.workdir,
            start_new_session=True,
        )
        handle.close()
        proc = ManagedProcess(name=name, popen=popen, log=log)
        self.processes.append(proc)
        return proc

    def start_superlink(self, *, database: Path | None = None) -> ManagedProcess:
        argv = [
            _bin("flower-superlink"),
            "--host", HOST,
            "--port", str(self.port),
            "--ssl-ca-certfile", str(self.pki.ca_cert),
            "--ssl-certfile", str(self.pki.server_cert),
            "--ssl-keyfile", str(self.pki.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if database is not None:
            argv += ["--database", str(database)]
        proc = self._spawn("superlink", argv)
        self._wait_listening(proc, timeout=60)
        return proc

    def _wait_listening(self, proc: ManagedProcess, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise FederationError(f"{proc.name} exited at start:\n{proc.tail()}")
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.3)
        raise FederationError(f"{proc.name} did not listen on {self.address} in {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """Run the ``flwr`` CLI against this federation's profile; return its stdout."""
        res = subprocess.run(
            [_bin("flwr"), *args],
            env=self.env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0:
            raise FederationError(
                f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res.stdout

    def register(self, site: str, keys: NodeKeys) -> None:
        """Enrol a site: the SuperLink accepts SuperNodes holding this key only."""
        self.flwr("supernode", "register", str(keys.public_key), PROFILE, "--name", site)

    def start_supernode(
        self,
        site: str,
        keys: NodeKeys,
        *,
        node_config: Mapping[str, Any],
        env: Mapping[str, str] | None = None,
        extra_args: list[str] | None = None,
        ca_cert: Path | None = None,
    ) -> ManagedProcess:
        """Start a site's SuperNode; ``ca_cert`` overrides the CA it trusts (tests)."""
        argv = [
            _bin("flower-supernode"),
            "--superlink", self.address,
            "--root-certificates", str(ca_cert or self.pki.ca_cert),
            "--auth-supernode-private-key", str(keys.private_key),
            "--port", str(free_port()),
            "--node-config", config_string(node_config),
            *(extra_args or []),
        ]  # fmt: skip
        full_env = self.env()
        full_env.update(env or {})
        return self._spawn(f"supernode-{site}", argv, env=full_env)

    def run(self, app: Path, run_config: Mapping[str, Any]) -> int:
        """Submit the app for a run; return the run id."""
        out = self.flwr(
            "run", str(app), PROFILE, "--run-config", config_string(run_config), "--format", "json"
        )
        data = json.loads(out[out.index("{") :])
        if not data.get("success", False):
            raise FederationError(f"flwr run was refused: {out}")
        return int(data["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        out = self.flwr("list", PROFILE, "--run-id", str(run_id), "--format", "json")
        data = json.loads(out[out.index("{") :])
        runs = data.get("runs", [])
        if not runs:
            raise FederationError(f"run {run_id} is not known to the SuperLink: {out}")
        return dict(runs[0])

    def stop(self) -> None:
        """Stop every process started here and everything they spawned.

        Flower detaches some children (flower-superexec, flwr-serverapp) into sessions of
        their own, so process groups are not enough: the whole tree is collected first
        (while parents still exist), then sent SIGTERM, then SIGKILL after a grace period.
        """
        tree: list[psutil.Process] = []
        for proc in self.processes:
            try:
                root = psutil.Process(proc.popen.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for p in reversed(tree):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=1)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
