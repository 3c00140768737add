"""Consortium PKI: the CA and the SuperLink's TLS certificate (site key pairs: common.keys).

Written with ``cryptography`` because Flower ships no PKI tooling; what it expects is fixed:
the SuperLink's certificate needs a SAN for the address sites dial (127.0.0.1 in the demo),
and SuperNode authentication uses ECDSA keys on a NIST curve in OpenSSH format.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError, UsageError
from common.files import atomic_path

# Site key pairs are made by the site itself (`busfed site init`), so they live in common/.
from common.keys import NodeKeys, create_node_keys, write_private_key

__all__ = [
    "ConsortiumPKI",
    "NodeKeys",
    "RenewedCertificate",
    "create_consortium_pki",
    "create_node_keys",
    "pki_paths",
    "renew_server_certificate",
]

CA_LIFETIME = dt.timedelta(days=5 * 365)
SERVER_LIFETIME = dt.timedelta(days=365)
PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class ConsortiumPKI:
    """Paths of the consortium's CA and SuperLink certificate (PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "busfed consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_consortium_pki(
    out: Path, *, hosts: list[str], consortium: str = "busfed"
) -> ConsortiumPKI:
    """Create a CA and a SuperLink TLS certificate signed by it.

    Parameters
    ----------
    out
        Folder for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``.
    hosts
        Names and IP addresses the SuperLink is reached at; each becomes a SAN.

    Raises
    ------
    UsageError
        If any of the four files exists: a replaced CA would cut every site off.
    """
    pki = pki_paths(out)
    files = (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key)
    if existing := [str(path) for path in files if path.exists()]:
        raise UsageError(f"refusing to overwrite the consortium PKI: {', '.join(existing)}")
    if not hosts:
        raise UsageError("the SuperLink certificate needs at least one host name or address")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name(f"{consortium} consortium CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(
        ca_cert,
        ca_key,
        server_key,
        subject=_name(f"{consortium} superlink"),
        sans=_sans(hosts),
        not_before=now - dt.timedelta(minutes=5),
        not_after=now + SERVER_LIFETIME,
    )
    pki.ca_cert.write_bytes(ca_cert.public_bytes(PEM))
    pki.server_cert.write_bytes(server_cert.public_bytes(PEM))
    write_private_key(pki.ca_key, _pkcs8(ca_key), replace=False)
    write_private_key(pki.server_key, _pkcs8(server_key), replace=False)
    return pki


def pki_paths(folder: Path) -> ConsortiumPKI:
    """Where ``create_consortium_pki`` writes the four files in ``folder``."""
    return ConsortiumPKI(
        ca_cert=folder / "ca.crt",
        ca_key=folder / "ca.key",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
    )


@dataclass(frozen=True)
class RenewedCertificate:
    """What ``renew_server_certificate`` did: the new certificate and the kept old files."""

    certificate: x509.Certificate
    backup_cert: Path
    backup_key: Path
    capped_at_ca_expiry: bool


def renew_server_certificate(
    pki: ConsortiumPKI,
    *,
    days: int = SERVER_LIFETIME.days,
    ca_key: Path | None = None,
    now: dt.datetime | None = None,
) -> RenewedCertificate:
    """Reissue the SuperLink certificate from the existing CA, with a new key.

    The subject and SANs are those of the current certificate, and the CA is unchanged,
    so sites need nothing new. The current ``server.crt`` and ``server.key`` are first
    copied to ``server-<UTC time>.crt`` / ``.key`` beside them (never overwriting a file);
    then the new pair replaces them atomically. The SuperLink reads them when it starts.

    Parameters
    ----------
    pki
        The consortium's files; ``pki.ca_key`` is used unless ``ca_key`` is given.
    days
        Lifetime of the new certificate, capped at the CA's own expiry.
    ca_key
        The CA's private key when it is kept elsewhere (offline media).

    Raises
    ------
    ConfigError
        Naming the file: a missing or unreadable certificate or key, a CA key that is not
        the key of ``ca.crt``, or a CA that has expired.
    """
    if days < 1:
        raise UsageError(f"--days {days}: must be at least 1")
    now = now or dt.datetime.now(dt.UTC)
    ca_key_path = ca_key or pki.ca_key
    ca_cert = _load_certificate(pki.ca_cert, "CA certificate")
    current = _load_certificate(pki.server_cert, "SuperLink certificate")
    try:
        key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{ca_key_path}: CA private key not found (kept offline? pass --ca-key PATH)"
        ) from exc
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{ca_key_path}: not a readable PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(
        ca_cert.public_key()
    ):
        raise ConfigError(f"{ca_key_path}: not the private key of the CA in {pki.ca_cert}")
    if now >= ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"{pki.ca_cert}: the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
            "a new CA (and a new ca.crt at every site) is needed"
        )
    try:
        sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise ConfigError(f"{pki.server_cert}: has no SAN to carry over") from exc
    not_after = now + dt.timedelta(days=days)
    capped = not_after > ca_cert.not_valid_after_utc
    server_key = ec.generate_private_key(ec.SECP384R1())
    cert = _server_certificate(
        ca_cert,
        key,
        server_key,
        subject=current.subject,
        sans=list(sans),
        not_before=now - dt.timedelta(minutes=5),
        not_after=min(not_after, ca_cert.not_valid_after_utc),
    )
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    backup_cert = pki.server_cert.with_name(f"{pki.server_cert.stem}-{stamp}.crt")
    backup_key = pki.server_key.with_name(f"{pki.server_key.stem}-{stamp}.key")
    for backup in (backup_cert, backup_key):
        if backup.exists():
            raise UsageError(f"{backup}: already exists; refusing to overwrite a backup")
    backup_cert.write_bytes(pki.server_cert.read_bytes())
    write_private_key(backup_key, pki.server_key.read_bytes(), replace=False)
    _replace(pki.server_key, _pkcs8(server_key), private=True)
    _replace(pki.server_cert, cert.public_bytes(PEM), private=False)
    return RenewedCertificate(cert, backup_cert, backup_key, capped)


def _load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {what} not found") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a PEM {what}: {exc}") from exc


def _spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _replace(path: Path, data: bytes, *, private: bool) -> None:
    """Write beside ``path`` then rename over it: a reader sees the old or the new file."""
    with atomic_path(path) as tmp:
        if private:
            write_private_key(tmp, data, replace=False)
        else:
            tmp.write_bytes(data)


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def _server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    server_key: ec.EllipticCurvePrivateKey,
    *,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """The SuperLink's TLS certificate: SANs for the addresses sites dial, server auth only."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
