"""A loopback TCP relay whose link can be cut and restored, to test how sites ride out
network failures.

Hand-written on purpose: no maintained library offers a TCP relay that runs inside the test
process and can drop its live connections on demand (toxiproxy is a separate Go server,
socat is not installed here and cannot be cut without killing it). Bytes pass through
untouched, so TLS runs end to end between the SuperNode and the SuperLink; the relay
listens on 127.0.0.1, which the SuperLink's certificate names.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

HOST = "127.0.0.1"
_CHUNK = 65536
_ACCEPT_POLL_S = 0.2  # how often the accept loop looks whether it was cut


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Link:
    """One client connection and its upstream connection."""

    client: socket.socket
    upstream: socket.socket
    open_directions: int = 2
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpRelay:
    """Forward ``HOST:port`` to ``target`` until cut; restore listens on the same port.

    Use as a context manager, or call ``start()`` and ``stop()``.

    Attributes
    ----------
    accepted : int
        Connections accepted since ``start()``, over all cuts.
    """

    def __init__(self, target: tuple[str, int], *, port: int = 0) -> None:
        self.target = target
        self.port = port
        self.accepted = 0
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop_accepting = threading.Event()
        self._acceptor: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def live_connections(self) -> int:
        with self._lock:
            return len(self._links)

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def start(self) -> None:
        """Listen (on a free port the first time) and relay every connection."""
        if self._listener is not None:
            raise RuntimeError(f"the relay on {self.address} is already listening")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        listener.settimeout(_ACCEPT_POLL_S)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._stop_accepting = threading.Event()
        self._acceptor = threading.Thread(
            target=self._accept_loop,
            args=(listener, self._stop_accepting),
            name=f"relay-accept-{self.port}",
            daemon=True,
        )
        self._acceptor.start()

    def cut(self) -> None:
        """Drop every live connection and stop listening: new connections are refused."""
        self._stop_accepting.set()
        if self._acceptor is not None:
            self._acceptor.join()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()

    def restore(self) -> None:
        """Listen again on the same port."""
        self.start()

    def stop(self) -> None:
        self.cut()

    def __enter__(self) -> TcpRelay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ relaying
    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()  # the far end is down: the client sees the link fail
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                if stop.is_set():
                    link.close()
                    return
                self._links.add(link)
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(link, src, dst), name="relay-pump", daemon=True
                ).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        """Copy one direction until EOF or error, then half-close it."""
        reset = False
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the FIN on; the other way may go on
        except OSError:
            reset = True  # the whole connection is gone, both ways
        with link.lock:
            link.open_directions -= 1
            finished = reset or link.open_directions == 0
        if finished:
            link.close()
            with self._lock:
                self._links.discard(link)
