"""A site's privacy ledger: one signed, hash-chained JSON line per privacy decision.

Format (one UTF-8 line per entry, ``\\n``-terminated):

- every line is the *canonical JSON* of a ``LedgerEntry``: ``json.dumps(fields,
  sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8;
- ``prev_hash`` is the SHA-256 hex digest of the previous line's bytes without its newline;
  the first entry has 64 zeros (``GENESIS_HASH``);
- ``signature`` is the Ed25519 signature by the site's ledger key (``common.keys``) over the
  canonical JSON of the entry *without* the ``signature`` field, encoded as standard base64
  with padding (RFC 4648, 88 characters).
- an optional field is absent, never ``null``: ``noise_source`` (which randomness drew the
  noise and the patient samples) came after the first ledgers were written, whose entries
  lack it and still verify; so is ``initial_model`` (the SHA-256 fingerprint of the model
  the campaign started from, e.g. a ``busfed pretrain`` version 0).

One entry is written per mechanism application (one model in one round) and per refusal.
The file is append-only: lines are never rewritten. Each line goes to disk with a single
``os.write`` on an ``O_APPEND`` descriptor followed by ``fsync``, under an exclusive
``flock`` so that two processes of one site cannot fork the chain.

Crash policy: if the file's last line is incomplete (no final newline) or is not a valid
entry, ``PrivacyLedger`` refuses to append and raises ``DataError`` naming the file and the
byte offset. It does not truncate by itself: the torn line records privacy that was probably
spent (the accountant is saved before the ledger line is written), so a person must decide,
comparing with ``accountant.json`` and the server's copy of the entries in MLflow.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import DataError, PrivacyError, validation_problems
from common.privacy.settings import ClipNorm, DPSettings, NoiseMultiplier, SampleRate

LEDGER_FILE = "privacy-ledger.jsonl"
# The fit metric that carries a round's entries (a JSON list) from the site to the server.
LEDGER_METRIC = "ledger_entries"
GENESIS_HASH = "0" * 64
# The tail is read backwards in chunks this big; a line is ~600 bytes.
_TAIL_CHUNK = 4096
# Which randomness drew a mechanism's noise and patient samples: a CSPRNG (the production
# setting), or a seeded torch generator that an observer of the seed can predict.
NoiseSource = Literal["chacha20-csprng", "torch-prng-insecure"]


class UnsignedEntry(BaseModel):
    """Every ledger field except ``signature``: what the site signs.

    Epsilons are at ``delta``, for privacy unit = patient. A refusal has ``steps == 0``,
    ``epsilon_round == 0`` and the unchanged ``epsilon_total``.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    site: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    run_id: str = Field(
        min_length=1,
        description="the training campaign this round belongs to (it outlives server restarts)",
    )
    round: int = Field(ge=0, description="the server's round number within the run")
    model: str = Field(
        min_length=1, description="'detector', 'classifier', or 'round' for a round refusal"
    )
    privacy_unit: Literal["patient"]
    n_units: int = Field(ge=0, description="privacy units (patients) in the training set")
    # One rule for sigma, C and q, the site config's (``common.privacy.settings``).
    sample_rate: SampleRate
    noise_multiplier: NoiseMultiplier
    max_grad_norm: ClipNorm
    steps: int = Field(ge=0, description="noisy steps run with this q and sigma")
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "prv"]
    epsilon_round: float = Field(ge=0, description="this mechanism alone, at delta")
    epsilon_total: float = Field(ge=0, description="the site's composed epsilon after this entry")
    budget: float = Field(gt=0, description="the site's epsilon budget at delta")
    status: Literal["trained", "refused"]
    time: str = Field(description="ISO 8601 with a UTC offset, when the entry was written")
    prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    initial_model: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="fingerprint of the model the campaign started from; absent in entries "
        "written before it was recorded",
    )
    noise_source: NoiseSource | None = Field(
        default=None,
        description="the randomness of the noise and the patient draws; absent (None) only "
        "in entries written before it was recorded",
    )

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError("not an ISO 8601 time") from exc
        if parsed.tzinfo is None:
            raise ValueError("must carry a UTC offset")
        return value

    @model_validator(mode="after")
    def _status(self) -> UnsignedEntry:
        if self.status == "refused" and (self.steps != 0 or self.epsilon_round != 0):
            raise ValueError("a refusal has steps 0 and epsilon_round 0")
        if self.status == "trained" and self.steps == 0:
            raise ValueError("a trained entry has steps >= 1")
        return self


class LedgerEntry(UnsignedEntry):
    """One ledger line: the signed fields plus the base64 Ed25519 ``signature``."""

    signature: str = Field(pattern=r"^[A-Za-z0-9+/]{86}==$")

    def unsigned(self) -> dict[str, Any]:
        """The fields the signature covers."""
        return self.model_dump(exclude={"signature"}, exclude_none=True)


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """The one byte form of ``fields`` that is hashed and signed (see the module docstring)."""
    return json.dumps(
        dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def line_hash(line: bytes) -> str:
    """SHA-256 hex of a ledger line's bytes (without its newline): the next ``prev_hash``."""
    return hashlib.sha256(line).hexdigest()


def sign(fields: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """Base64 Ed25519 signature over ``canonical_json(fields)``; ``fields`` lacks ``signature``."""
    return base64.b64encode(key.sign(canonical_json(fields))).decode("ascii")


def signature_valid(fields: Mapping[str, Any], key: Ed25519PublicKey) -> bool:
    """Whether ``fields["signature"]`` signs the other fields of ``fields`` under ``key``."""
    unsigned = {k: v for k, v in fields.items() if k != "signature"}
    try:
        signature = base64.b64decode(str(fields.get("signature", "")), validate=True)
        key.verify(signature, canonical_json(unsigned))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


class PrivacyLedger:
    """The append-only, signed privacy ledger of one site, in one JSON-lines file.

    Any number of ``PrivacyLedger`` objects, in any number of processes, may append to the
    same file: each append reads the current last line under an exclusive lock, so a
    restarted site continues the chain where the file ends.

    Parameters
    ----------
    path
        The ledger file; created on the first append.
    site
        The site's name; every entry carries it, and an existing file must be this site's.
    signing_key
        The site's Ed25519 ledger key (``common.keys.load_signing_key``).

    Raises
    ------
    DataError
        If the file exists and its last line is incomplete or not an entry (see the module
        docstring for why it is not repaired).
    """

    def __init__(self, path: Path, *, site: str, signing_key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self.site = site
        self._key = signing_key
        if self.path.exists():
            with self.path.open("rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                self._check_tail(f.fileno())

    def append(
        self,
        *,
        run_id: str,
        round: int,
        model: str,
        privacy_unit: Literal["patient"],
        n_units: int,
        dp: DPSettings,
        steps: int,
        delta: float,
        accountant: Literal["rdp", "prv"],
        epsilon_round: float,
        epsilon_total: float,
        budget: float,
        status: Literal["trained", "refused"],
        noise_source: NoiseSource,
        initial_model: str | None = None,
    ) -> LedgerEntry:
        """Sign and durably append one entry; ``site``, ``time`` and ``prev_hash`` are filled.

        ``dp`` (sigma, C, q) fills the entry's ``noise_multiplier``, ``max_grad_norm`` and
        ``sample_rate``. ``noise_source`` is the site's setting, also on a refusal (which
        draws nothing).

        The entry is on disk (fsynced) when this returns.

        Raises
        ------
        PrivacyError
            A field is invalid (names it); nothing is written.
        DataError
            The file's last line is torn or belongs to another site; nothing is written.
        """
        fields: dict[str, Any] = {
            "site": self.site, "run_id": run_id, "round": round, "model": model,
            "privacy_unit": privacy_unit, "n_units": n_units, **dp.model_dump(),
            "steps": steps, "delta": delta, "accountant": accountant,
            "epsilon_round": epsilon_round, "epsilon_total": epsilon_total, "budget": budget,
            "status": status, "noise_source": noise_source, "initial_model": initial_model,
        }  # fmt: skip
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = self._check_tail(fd)
            fields["time"] = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
            fields["prev_hash"] = GENESIS_HASH if last is None else line_hash(last)
            try:
                unsigned = UnsignedEntry.model_validate(fields).model_dump(exclude_none=True)
            except ValidationError as exc:
                raise PrivacyError(f"{self.path}: ledger entry refused: {_describe(exc)}") from exc
            entry = LedgerEntry.model_validate({**unsigned, "signature": sign(unsigned, self._key)})
            data = canonical_json(entry.model_dump(exclude_none=True)) + b"\n"
            written = os.write(fd, data)
            if written != len(data):
                raise DataError(
                    f"{self.path}: short write ({written} of {len(data)} bytes); the last line "
                    "is now incomplete and the ledger refuses further appends"
                )
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            # The new file's name must survive a crash too, not only its contents.
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return entry

    def entries(self) -> list[LedgerEntry]:
        """Every entry, in file order; ``[]`` when the file does not exist yet.

        Raises
        ------
        DataError
            Naming the file and 1-based line of the first line that is not an entry.
        """
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                out.append(LedgerEntry.model_validate_json(line))
            except ValidationError as exc:
                raise DataError(
                    f"{self.path}:{number}: not a ledger entry: {_describe(exc)}"
                ) from exc
        return out

    def last(self) -> LedgerEntry | None:
        """The newest entry, or None for an empty or missing ledger."""
        if not self.path.exists():
            return None
        with self.path.open("rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            line = self._check_tail(f.fileno())
        return None if line is None else LedgerEntry.model_validate_json(line)

    def _check_tail(self, fd: int) -> bytes | None:
        """The last line's bytes (no newline), None if the file is empty; DataError if torn."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        if os.pread(fd, 1, size - 1) != b"\n":
            start = _line_start(fd, size)
            raise DataError(
                f"{self.path}: the last line (from byte {start}) is incomplete, probably a "
                "crash while it was written. Nothing more is appended until a person compares "
                "it with accountant.json and the server's copy, then moves the file aside or "
                f"truncates it to {start} bytes."
            )
        start = _line_start(fd, size - 1)
        line = os.pread(fd, size - 1 - start, start)
        try:
            entry = LedgerEntry.model_validate_json(line)
        except ValidationError as exc:
            raise DataError(
                f"{self.path}: the last line (from byte {start}) is not a ledger entry "
                f"({_describe(exc)}); nothing more is appended until a person looks"
            ) from exc
        if entry.site != self.site:
            raise DataError(f"{self.path}: a ledger of site {entry.site!r}, not {self.site!r}")
        return line


def _line_start(fd: int, end: int) -> int:
    """Offset where the line ending at byte ``end`` (exclusive) starts."""
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        newline = os.pread(fd, pos - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0


def _describe(exc: ValidationError) -> str:
    return "; ".join(validation_problems(exc))
