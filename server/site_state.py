"""Where each site is in the round in progress: ``out_dir/sites.json``, for the lead to watch.

A round is minutes of silence otherwise: the demo's progress bar sat at 0/3 while one site
had stopped training, and the lead learnt it only at the end. The ServerApp knows every
message it sends a site and every reply, so it records, per site:

* ``waiting``: sampled for the round, nothing asked of it yet;
* ``setting up`` / ``set up`` and ``exchanging keys`` / ``keys sent`` (SecAgg+'s first two
  stages);
* ``training`` (asked for an update; under SecAgg+ the masked update) / ``update sent``;
* ``unmasking`` / ``shares sent`` (SecAgg+'s last stage);
* ``evaluating`` / ``evaluated``;
* ``failed: REASON`` (the site answered with an error) and ``dropped: no reply in N s``.

Flower knows a site only by its node id; names come from the run config's ``site-names``
(``NODE=SITE`` pairs from the lead's enrolment log, or the demo's own enrolment) and from
the sites' own metrics, so no line names a 19-digit node id where a name is known.

The ``Grid`` wrapper repeats Flower's ``send_and_receive`` loop (push, then pull every 3 s
until every reply is in or the timeout passes, as ``flwr.superlink.grid.http_grid`` does)
with a note of each reply: Flower has no hook for replies as they arrive.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
from flwr.supercore.run import Run

from common.files import write_atomic
from common.site_states import ASKED

POLL_S = 3.0  # Flower's own pull interval
# A push whose session the SuperLink replaced is repeated this often, waiting 2, 4, 8, 16 s.
PUSH_ATTEMPTS = 5
PUSH_RETRY_WAIT_S = 2.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REASON_CHARS = 200


def failure_reason(text: str | None) -> str:
    """The site's own words from a Flower error reply, without the traceback around them.

    A ClientApp's exception reaches the server as ``<class '...'>:<'TRACEBACK ... Exception
    ClientAppException occurred. Message: WORDS'>``; the words are what the lead needs.
    """
    text = ANSI.sub("", text or "").strip()
    found = re.findall(r"Message: (.+?)(?:'>)?$", text, flags=re.MULTILINE)
    if not found:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
        found = errors[-1:] or lines[:1]
    reason = found[-1].strip() if found else ""
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + "…"


@dataclass
class SiteStates:
    """Each sampled site's state in the round in progress, kept in ``path``."""

    path: Path
    # Node ids as Flower's messages (int) and legacy proxies (str cid) give them: keyed by
    # their text, so both find the same site.
    names: dict[str, str] = field(default_factory=dict)
    round: int = 0
    stage: str = ""  # the SecAgg+ stage under way ("" outside SecAgg+)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = {str(node): site for node, site in self.names.items()}

    def name(self, node_id: int | str) -> str:
        return self.names.get(str(node_id), f"node {node_id}")

    def learn(self, node_id: int | str, site: str) -> None:
        """A site told its name in its metrics."""
        self.names[str(node_id)] = site

    def new_round(self, server_round: int, node_ids: Iterable[int | str]) -> None:
        # Not the stage: SecAgg+ samples the round's sites inside its setup stage.
        self.round = server_round
        now = time.time()
        self.sites = {str(n): {"state": "waiting", "since": now} for n in node_ids}
        self._write()

    def asked(self, messages: list[Message]) -> None:
        for message in messages:
            doing, _ = self._labels(message)
            self._set(message.metadata.dst_node_id, doing)
        self._write()

    def answered(self, replies: Iterable[Message]) -> None:
        changed = False
        for reply in replies:
            if reply.has_error():
                state = f"failed: {failure_reason(reply.error.reason) or reply.error.code}"
            else:
                _, state = self._labels(reply)
            self._set(reply.metadata.src_node_id, state)
            changed = True
        if changed:
            self._write()

    def unanswered(self, node_ids: Iterable[int], waited_s: float) -> None:
        node_ids = list(node_ids)
        for node in node_ids:
            self._set(node, f"dropped: no reply in {waited_s:.0f} s")
        if node_ids:
            self._write()

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "stage": self.stage,
            "updated": time.time(),
            "sites": {self.name(n): entry for n, entry in sorted(self.sites.items())},
        }

    def _labels(self, message: Message) -> tuple[str, str]:
        kind = message.metadata.message_type.split(".")[0]
        key = self.stage if kind == "train" and self.stage else kind
        return ASKED.get(key, (f"asked ({kind})", f"answered ({kind})"))

    def _set(self, node_id: int | str, state: str) -> None:
        entry = self.sites.setdefault(str(node_id), {"state": "", "since": 0.0})
        if entry["state"] != state:
            entry.update(state=state, since=time.time())

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self.as_json(), indent=1) + "\n")
        except OSError:
            pass  # a view for people; never a reason to fail a round


class WatchedGrid(Grid):
    """A ``Grid`` that records each site's state as messages go out and replies come in."""

    def __init__(self, grid: Grid, states: SiteStates) -> None:
        self.grid = grid
        self.states = states

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages``; pushed again when the SuperLink dropped their push session.

        Flower 1.41's push is two calls: PushMessages opens a session, then each object is
        pushed with it. On a busy machine the first call can time out and be retried while
        the SuperLink still serves it; the later session replaces the earlier one and the
        objects' pushes fail with ``ObjectPushError`` ("... expired or been replaced"),
        which ended a ServerApp between round 1 and its evaluation under CI load. Pushing
        the same messages again opens a fresh session; objects already stored are skipped.
        """
        messages = list(messages)
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            try:
                ids = self.grid.push_messages(messages)
                break
            except ObjectPushError as error:
                if attempt == PUSH_ATTEMPTS:
                    raise
                wait = PUSH_RETRY_WAIT_S * 2 ** (attempt - 1)
                log(WARNING, "busfed: push failed (%s); pushing again in %.0f s", error, wait)
                time.sleep(wait)
        self.states.asked(messages)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self.states.answered(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        node_of = dict(
            zip(
                self.push_messages(messages),
                (m.metadata.dst_node_id for m in messages),
                strict=True,
            )
        )
        waiting = set(node_of)
        started = time.time()
        end = started + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            time.sleep(POLL_S)
        self.states.unanswered((node_of[i] for i in waiting), time.time() - started)
        return replies
