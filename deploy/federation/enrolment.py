"""Enrolment: register a site's SuperNode key with the SuperLink, revoke it, and log both.

Flower keeps the nodes (``flwr supernode register|unregister|list``); this module adds what
Flower does not: which site holds which node and key, in the append-only enrolment log.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field

from common.errors import FederationError, UsageError
from deploy.federation.consortium import NAME_PATTERN, Consortium
from deploy.federation.logs import append_line, read_jsonl
from deploy.flwr_cli import FlowerCli

# SuperNode statuses in `flwr supernode list`; "unregistered" is a revoked node.
REVOKED = "unregistered"


class EnrolmentEvent(BaseModel):
    """One line of the enrolment log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: Literal["enrol", "revoke"]
    site: str = Field(pattern=NAME_PATTERN)
    node_id: int
    fingerprint: str
    at: dt.datetime
    public_key: str = ""
    reason: str = ""


def read_enrolments(path: Path) -> list[EnrolmentEvent]:
    """Every event in the enrolment log, oldest first ([] if there is none yet)."""
    return read_jsonl(path, EnrolmentEvent)


def enrolled_sites(events: list[EnrolmentEvent]) -> dict[str, EnrolmentEvent]:
    """Each site's current enrolment: its latest ``enrol`` not revoked since."""
    active: dict[str, EnrolmentEvent] = {}
    for event in events:
        if event.event == "enrol":
            active[event.site] = event
        elif event.site in active and active[event.site].node_id == event.node_id:
            del active[event.site]
    return active


def node_public_key(path: Path) -> tuple[str, str]:
    """Read a site's SuperNode public key; return ``(OpenSSH line, SHA256 fingerprint)``.

    The fingerprint is what ``ssh-keygen -lf PATH`` prints, so the lead and the site can
    compare it over the phone.

    Raises
    ------
    UsageError
        Naming the file: missing, a private key, not an OpenSSH public key, or not ECDSA
        P-384 (what ``busfed site init`` makes and Flower's node authentication expects).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: public key file not found") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the public key: {exc.strerror or exc}") from exc
    if b"PRIVATE KEY" in data:
        raise UsageError(
            f"{path}: this is a PRIVATE key, which must never leave the site; ask the site "
            "for its .pub file (and for a new key pair, since this one was shared)"
        )
    expected = "expected one line 'ecdsa-sha2-nistp384 AAAA... SITE' as `busfed site init` writes"
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"{path}: not an OpenSSH public key ({exc}); {expected}") from exc
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        kind = line.split()[0].decode()
        raise UsageError(
            f"{path}: an {kind} key, but sites are enrolled with ECDSA P-384 keys only; {expected}"
        )
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return line.decode(), f"SHA256:{digest}"


def _check_site_name(site: str) -> None:
    if not re.match(NAME_PATTERN, site):
        raise UsageError(f"SITE {site!r}: use letters, digits, '.', '_' and '-' only")


def enrol_site(
    consortium: Consortium,
    site: str,
    public_key: Path,
    *,
    replace: bool = False,
    now: dt.datetime | None = None,
) -> list[EnrolmentEvent]:
    """Register a site's SuperNode key with the running SuperLink and log it.

    With ``replace`` a site that is enrolled already gets the new key, then its old node
    is unregistered (key rotation: the site restarts its SuperNode with the new key).

    Returns the events appended to the enrolment log.

    Raises
    ------
    UsageError
        A bad SITE or key file (named), the site enrolled already (without ``replace``),
        or the key enrolled already.
    FederationError
        The SuperLink is unreachable or refused the key.
    """
    _check_site_name(site)
    line, fingerprint = node_public_key(public_key)
    active = enrolled_sites(read_enrolments(consortium.enrolment_log))
    for other, event in active.items():
        if event.fingerprint == fingerprint:
            raise UsageError(f"{public_key}: this key ({fingerprint}) is enrolled for {other}")
    previous = active.get(site)
    if previous is not None and not replace:
        raise UsageError(
            f"{site} is enrolled already (node {previous.node_id}, key {previous.fingerprint}); "
            "pass --replace to enrol its new key, or revoke it first"
        )
    cli = consortium.cli()
    # flwr runs in the consortium folder: a relative path would name another file there.
    node_id = cli.register(public_key.resolve(), name=site)
    now = now or dt.datetime.now(dt.UTC)
    events = [
        EnrolmentEvent(
            event="enrol",
            site=site,
            node_id=node_id,
            fingerprint=fingerprint,
            at=now,
            public_key=line,
        )
    ]
    append_line(consortium.enrolment_log, events[0].model_dump_json())
    if previous is not None:
        events.append(
            _unregister(consortium, cli, previous, reason=f"key replaced by {fingerprint}", now=now)
        )
    return events


def revoke_site(
    consortium: Consortium, site: str, *, reason: str = "", now: dt.datetime | None = None
) -> EnrolmentEvent:
    """Unregister a site's node: it is disconnected now and refused when it reconnects.

    Raises
    ------
    UsageError
        The site is not enrolled (the enrolled ones are named).
    FederationError
        The SuperLink is unreachable or does not know the site's node.
    """
    _check_site_name(site)
    active = enrolled_sites(read_enrolments(consortium.enrolment_log))
    if site not in active:
        enrolled = ", ".join(sorted(active)) or "none"
        raise UsageError(f"{site} is not enrolled in {consortium.dir} (enrolled: {enrolled})")
    return _unregister(consortium, consortium.cli(), active[site], reason=reason, now=now)


def _unregister(
    consortium: Consortium,
    cli: FlowerCli,
    enrolment: EnrolmentEvent,
    *,
    reason: str,
    now: dt.datetime | None,
) -> EnrolmentEvent:
    # flwr's node list carries no site names: the node id comes from the enrolment log,
    # and the list confirms the SuperLink knows it.
    nodes = {int(node["node-id"]): node for node in cli.nodes()}
    node = nodes.get(enrolment.node_id)
    if node is None:
        raise FederationError(
            f"the SuperLink at {consortium.address} does not know node {enrolment.node_id} "
            f"of {enrolment.site} (was {consortium.database} replaced?); nothing was revoked"
        )
    if node["status"] != REVOKED:
        cli.unregister(enrolment.node_id)
    event = EnrolmentEvent(
        event="revoke",
        site=enrolment.site,
        node_id=enrolment.node_id,
        fingerprint=enrolment.fingerprint,
        at=now or dt.datetime.now(dt.UTC),
        reason=reason,
    )
    append_line(consortium.enrolment_log, event.model_dump_json())
    return event
