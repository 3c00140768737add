"""A site's two key pairs: SuperNode authentication (transport) and ledger signing (privacy).

Both live in ``common/`` because the site creates them (``busfed site init``) and the
consortium reads their public halves (enrolment, ``busfed audit``); ``client/`` may not
import ``deploy/`` or ``server/``.

Files, for a site called ``NAME`` in a keys folder:

========================  ===========================================  =================
file                      what                                         who holds it
========================  ===========================================  =================
``NAME.key``              SuperNode auth private key, ECDSA P-384,     the site only
                          OpenSSH format, mode 0600
``NAME.pub``              its public key, OpenSSH (``... NAME``)       sent to consortium
``NAME.ledger.key``       ledger signing key, Ed25519, PEM PKCS#8,     the site only
                          unencrypted, mode 0600
``NAME.ledger.pub``       its public key, PEM SubjectPublicKeyInfo     sent to consortium
========================  ===========================================  =================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import ConfigError, UsageError


@dataclass(frozen=True)
class NodeKeys:
    """A site's SuperNode authentication key pair (OpenSSH format, ECDSA P-384)."""

    private_key: Path
    public_key: Path


def write_private_key(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write key material readable by its owner only (mode 0600) from the moment it exists.

    With ``replace=False`` an existing file is never touched and ``UsageError`` names it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise UsageError(f"{path}: already exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def create_node_keys(out: Path, *, site: str) -> NodeKeys:
    """Create a site's SuperNode authentication key pair; the private key never leaves it."""
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(private_key=out / f"{site}.key", public_key=out / f"{site}.pub")
    write_private_key(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys.public_key.write_bytes(public + f" {site}\n".encode())
    return keys


def signing_key_paths(keys_dir: Path, *, site: str) -> tuple[Path, Path]:
    """``(private, public)`` paths of ``site``'s ledger signing key pair in ``keys_dir``."""
    return keys_dir / f"{site}.ledger.key", keys_dir / f"{site}.ledger.pub"


def create_signing_key(keys_dir: Path, *, site: str) -> tuple[Path, Path]:
    """Create ``site``'s Ed25519 ledger signing key pair; never overwrites one.

    Returns
    -------
    (private_path, public_path)
        ``<site>.ledger.key`` (PEM PKCS#8, mode 0600) and ``<site>.ledger.pub`` (PEM
        SubjectPublicKeyInfo) in ``keys_dir``.

    Raises
    ------
    UsageError
        If either file exists: a replaced key would orphan every entry it signed.
    """
    private_path, public_path = signing_key_paths(keys_dir, site=site)
    if public_path.exists():
        raise UsageError(f"{public_path}: already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    write_private_key(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        replace=False,
    )
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read a ledger signing key written by ``create_signing_key``.

    Raises
    ------
    ConfigError
        Naming the file: missing, unreadable, not PEM, or not an Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: ledger signing key not found") from exc
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a readable PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key (got {type(key).__name__})")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """Read a ledger public key (``<site>.ledger.pub``) written by ``create_signing_key``.

    Raises
    ------
    ConfigError
        Naming the file: missing, unreadable, not PEM, or not an Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: ledger public key not found") from exc
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a readable PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 key (got {type(key).__name__})")
    return key
