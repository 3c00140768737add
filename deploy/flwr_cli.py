"""The ``flwr`` command line against one SuperLink: connection profiles, run configs as
Flower's ``k=v`` strings, JSON replies, and retries when the SuperLink was busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.errors import FederationError
from deploy.processes import TREE_VARIABLE, console_script

PROFILE = "busfed"
T = TypeVar("T")


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

    With a ``tree_token``, every ``flwr`` process carries it as ``TREE_VARIABLE``, so
    its owner can stop one that outlived the call: Ctrl-C between Popen's fork and exec
    leaves the child running, unknown to ``subprocess.run``.

    A call the SuperLink answers with a transient error (``is_transient``) is tried again
    with exponential back-off (1, 2, 4 ... 15 s) for up to ``retry_s`` seconds; each retry
    is announced on stderr. Every other failure raises at once.
    """

    flwr_home: Path
    cwd: Path
    profile: str = PROFILE
    retry_s: float = TRANSIENT_RETRY_S
    tree_token: str = ""

    def env(self) -> dict[str, str]:
        env = flower_env(self.flwr_home)
        if self.tree_token:
            env[TREE_VARIABLE] = self.tree_token
        return env

    def _once(self, args: tuple[str, ...], timeout: float) -> str:
        try:
            res = subprocess.run(
                [console_script("flwr"), *args],
                env=self.env(),
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
            [console_script("flwr"), *args],
            env=self.env(),
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
