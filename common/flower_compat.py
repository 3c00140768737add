"""Where busfed changes Flower 1.41's behaviour, and why: one place, checked by a test.

Flower 1.41 fixes two things that break a federation on a busy machine, with no option to
change them:

* the SuperLink keeps its state in SQLite with ``busy_timeout`` 5000 ms
  (``flwr.supercore.constant.SQLITE_PRAGMAS``); a writer starved of CPU holds the lock
  longer than that, and the SuperLink answers HTTP 500 "database is locked";
* every Flower HTTP client (SuperNode, ServerApp grid, SuperExec) retries only 502, 503 and
  504 (``flwr.supercore.retry.http_retry._RETRYABLE_STATUS_CODES``) and gives up on a 500:
  a SuperNode's pull loop then ends while its process lives on.

Both are module globals that Flower reads at call time, so replacing them in a process
before (or after) Flower's objects are built changes that process alone. Nothing here
opens a connection. ``tests/test_flower_compat.py`` fails if a Flower upgrade moves them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

# SQLite waits this long for a lock before answering "database is locked".
SUPERLINK_BUSY_TIMEOUT_S = 60.0
# A SuperLink answering 500 for this long in a row is broken, not busy: give up then.
TRANSIENT_ERROR_WINDOW_S = 300.0
# Status codes Flower itself retries; 500 joins them for a bounded time.
_FLOWER_RETRIED = frozenset({502, 503, 504})
_INTERNAL_SERVER_ERROR = 500
# A 500 more than this long after the previous one starts a new run of errors.
_QUIET_GAP_S = 30.0


def set_sqlite_busy_timeout(seconds: float) -> None:
    """Make this process' Flower SQLite connections wait ``seconds`` for a lock."""
    from flwr.supercore import sql_mixin

    if not seconds > 0:
        raise ValueError(f"the SQLite busy timeout must be > 0 s, got {seconds}")
    pragmas = dict(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in pragmas:
        raise RuntimeError("flwr.supercore.sql_mixin.SQLITE_PRAGMAS has no busy_timeout")
    pragmas["busy_timeout"] = str(round(seconds * 1000))
    sql_mixin.SQLITE_PRAGMAS = tuple(pragmas.items())  # type: ignore[assignment]


def sqlite_busy_timeout_ms() -> int:
    """The busy timeout this process' Flower SQLite connections use, in ms."""
    from flwr.supercore import sql_mixin

    return int(dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"])


class TransientStatusCodes:
    """The status codes Flower's HTTP clients retry: 502-504 always, and 500 while the
    SuperLink has answered 500 for less than ``window_s`` in a row.

    Flower asks ``code in RETRYABLE`` after each failed call; this container answers it.
    A run of 500s ends after ``_QUIET_GAP_S`` without one.
    """

    def __init__(self, window_s: float, clock: Iterator[float] | None = None) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._first: float | None = None
        self._last: float | None = None
        self.retried = 0

    def _now(self) -> float:
        return next(self._clock) if self._clock is not None else time.monotonic()

    def __contains__(self, code: object) -> bool:
        if code in _FLOWER_RETRIED:
            return True
        if code != _INTERNAL_SERVER_ERROR:
            return False
        now = self._now()
        with self._lock:
            if self._last is None or now - self._last > _QUIET_GAP_S:
                self._first = now
            self._last = now
            assert self._first is not None
            retry = now - self._first < self.window_s
            self.retried += retry
            return retry

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*_FLOWER_RETRIED, _INTERNAL_SERVER_ERROR}))


def retry_transient_superlink_errors(window_s: float = TRANSIENT_ERROR_WINDOW_S) -> None:
    """Make this process' Flower HTTP clients retry HTTP 500 (with Flower's own exponential
    back-off) for up to ``window_s`` of consecutive errors, instead of giving up at once."""
    from flwr.supercore.retry import http_retry

    if not isinstance(http_retry._RETRYABLE_STATUS_CODES, TransientStatusCodes | frozenset):
        raise RuntimeError("flwr's _RETRYABLE_STATUS_CODES is not where busfed expects it")
    http_retry._RETRYABLE_STATUS_CODES = TransientStatusCodes(window_s)  # type: ignore[assignment]
