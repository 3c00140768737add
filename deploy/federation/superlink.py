"""The consortium's SuperLink: started in the foreground with the consortium's PKI.

What the systemd unit ``busfed-superlink.service`` runs (``busfed federation superlink``):
TLS, SuperNode authentication, state on disk; a certificate near its expiry is announced.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from common.errors import ConfigError, FederationError
from deploy.federation.consortium import Consortium
from deploy.flwr_cli import flower_env
from deploy.launcher import superlink_argv
from deploy.processes import spawn, stop_processes

CERT_WARN_DAYS = 30


def certificate_days_left(path: Path, *, now: dt.datetime | None = None) -> int:
    """Whole days until the PEM certificate at ``path`` expires (negative: expired)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: certificate not found") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a PEM certificate: {exc}") from exc
    return (cert.not_valid_after_utc - (now or dt.datetime.now(dt.UTC))).days


def serve_superlink(consortium: Consortium, *, announce: Any = print) -> None:
    """Run the consortium's SuperLink in the foreground until it exits or we are stopped.

    TLS with the consortium's certificate, SuperNode authentication, state in the
    consortium's database, no package installs at run time. Ctrl-C or SIGTERM (raised as
    KeyboardInterrupt by ``busfed``) stops it and every process it started.

    Raises
    ------
    ConfigError
        A certificate or key is missing, or the SuperLink certificate has expired.
    FederationError
        The SuperLink exited by itself.
    """
    pki = consortium.pki
    missing = [str(p) for p in (pki.ca_cert, pki.server_cert, pki.server_key) if not p.is_file()]
    if missing:
        raise ConfigError(f"the SuperLink needs {', '.join(missing)}")
    days = certificate_days_left(pki.server_cert)
    if days < 0:
        raise ConfigError(
            f"{pki.server_cert}: expired; renew it with "
            f"`busfed federation renew-cert --dir {consortium.dir}`"
        )
    if days < CERT_WARN_DAYS:
        announce(
            f"warning: {pki.server_cert} expires in {days} days; renew it with "
            f"`busfed federation renew-cert --dir {consortium.dir}`"
        )
    argv = superlink_argv(
        pki, host=consortium.listen, port=consortium.port, database=consortium.database
    )
    announce(
        f"SuperLink of {consortium.name} on {consortium.listen}:{consortium.port} "
        f"(sites dial {consortium.address}); state in {consortium.database}"
    )
    proc = spawn(
        "superlink", argv, env=flower_env(consortium.flwr_home), cwd=consortium.dir, log=None
    )
    try:
        code = proc.popen.wait()
    finally:
        stop_processes([proc])
    if code != 0:
        raise FederationError(f"flower-superlink exited with code {code} (its log is above)")
