"""The cut-able TCP relay used to test network failures: cut drops and refuses, restore
relays again on the same port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.netproxy import HOST, TcpRelay


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socket.create_server((HOST, 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(conn: socket.socket = conn) -> None:
                with conn:
                    while data := conn.recv(4096):
                        conn.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()
    server.close()


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # the relay passes the half-close on
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def test_cut_drops_live_connections_and_refuses_new_ones_until_restored(
    echo_server: tuple[str, int],
) -> None:
    with TcpRelay(echo_server) as relay:
        payload = bytes(range(256)) * 1000
        assert roundtrip(relay.port, payload) == payload

        live = socket.create_connection((HOST, relay.port), timeout=5)
        live.sendall(b"ping")
        assert live.recv(4) == b"ping"
        port = relay.port
        relay.cut()
        assert relay.is_cut and relay.live_connections == 0
        assert live.recv(4) == b""  # the peer saw the link go down
        live.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, port), timeout=5)

        relay.restore()
        assert relay.port == port and not relay.is_cut
        assert roundtrip(port, b"again") == b"again"
        assert relay.accepted == 3
