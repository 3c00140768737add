"""Processes busfed starts, and stopping every one of them with all they spawned.

Flower starts its own processes (a SuperLink, one SuperNode per site, and the
``flwr-serverapp`` / ``flwr-clientapp`` children they spawn). Each one is started here in a
session of its own, and stopping it stops its whole process tree, on success, failure
or Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import psutil

from common.errors import FederationError

HOST = "127.0.0.1"
# Every process busfed spawns carries this variable (a token per spawn), and so does every
# process those spawn: Flower detaches some (flower-superexec, flwr-serverapp) into
# sessions of their own, and once their parent is gone they hang from PID 1.
TREE_VARIABLE = "BUSFED_PROCESS_TREE"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def console_script(name: str) -> str:
    # The console scripts of the interpreter running us, so a venv works without activation.
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FederationError(f"'{name}' not found; install busfed's dependencies (make venv)")
    return found


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


def process_tree(
    processes: list[ManagedProcess], tokens: Collection[str] = ()
) -> list[psutil.Process]:
    """These processes and every process they spawned, parents first: their children, and
    any process that carries one of their tree tokens (orphans that Flower detached) or
    one of ``tokens`` (see ``FlowerCli.tree_token``)."""
    tree: dict[int, psutil.Process] = {}
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.popen.pid)
            for p in [root, *root.children(recursive=True)]:
                tree.setdefault(p.pid, p)
    tokens = {*tokens, *(proc.tree_token for proc in processes if proc.tree_token)}
    if tokens:
        for p in psutil.process_iter():
            if p.pid in tree or p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.environ().get(TREE_VARIABLE) in tokens:
                    tree[p.pid] = p
    return list(tree.values())


def stop_processes(processes: list[ManagedProcess], tokens: Collection[str] = ()) -> None:
    """Stop these processes, everything they spawned, and every process carrying one of
    ``tokens``.

    Flower detaches some children (flower-superexec, flwr-serverapp) into sessions of
    their own, so process groups are not enough: the whole tree is collected first
    (children while parents still exist, and orphans by their tree token), then sent
    SIGTERM, then SIGKILL after a grace period.
    """
    tree = process_tree(processes, tokens)
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
