"""The auditor's verification of sites' privacy ledgers (the HTML report is ``report``).

Verification of one ledger file reads it line by line and stops at the first bad entry,
because nothing after a broken link can be trusted. Each line must

1. be a complete, canonical-JSON ``LedgerEntry`` of the same site as the first line;
2. carry an Ed25519 signature that verifies with the enrolled key ``KEYS/<site>.ledger.pub``;
3. chain: ``prev_hash`` is the SHA-256 of the previous line (64 zeros for the first);
4. keep order: within a run, rounds never decrease and (round, model) is never repeated,
   and a run never reappears once a later one has started (the site's accountant, and so
   its ledger, spans every run);
5. state the epsilons an independent accountant gets from the recorded parameters: Google's
   dp-accounting (``RdpAccountant`` for "rdp", ``PLDAccountant`` for "prv"), composing the
   Poisson-subsampled Gaussian of every trained entry so far, never Opacus (the site's);
6. stay inside its budget: a trained entry's ``epsilon_total`` is at most ``budget``.

What this cannot see: lines cut from the *end* of a file leave a valid chain; compare the
entry count with the server's copies in MLflow for that.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

if TYPE_CHECKING:
    import dp_accounting

from common.errors import ConfigError, UsageError, validation_problems
from common.keys import load_verify_key, signing_key_paths
from common.privacy.ledger import (
    GENESIS_HASH,
    LedgerEntry,
    canonical_json,
    line_hash,
    signature_valid,
)

# A recorded epsilon fails when it differs from the independent recomputation by more than
# EPSILON_REL_TOLERANCE * recomputed + EPSILON_ABS_TOLERANCE. The absolute part exists for
# "prv": Opacus' PRV accountant reports an upper bound about 0.01 above dp-accounting's PLD
# estimate at every epsilon (its eps_error), which is over 1% below epsilon ~1.
EPSILON_REL_TOLERANCE = 0.01
EPSILON_ABS_TOLERANCE = 0.02


@dataclass(frozen=True)
class Problem:
    """The first bad entry of a ledger file; ``line`` is 1-based."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.file), "line": self.line, "reason": self.reason}


@dataclass(frozen=True)
class CheckedEntry:
    """An entry that passed every check, with the auditor's own epsilons (at its delta)."""

    line: int
    entry: LedgerEntry
    epsilon_round: float
    epsilon_total: float


@dataclass(frozen=True)
class LedgerVerdict:
    """One ledger file: the entries verified before the first problem, and that problem."""

    file: Path
    site: str | None
    lines: int
    entries: list[CheckedEntry]
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class AuditResult:
    ledgers: list[LedgerVerdict]

    @property
    def ok(self) -> bool:
        return all(ledger.ok for ledger in self.ledgers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the verdict, the tolerance, and each file's first problem."""
        files = []
        for ledger in self.ledgers:
            last = ledger.entries[-1] if ledger.entries else None
            problem = ledger.problem
            files.append(
                {
                    "file": str(ledger.file),
                    "site": ledger.site,
                    "ok": ledger.ok,
                    "lines": ledger.lines,
                    "entries_verified": len(ledger.entries),
                    "problem": None if problem is None else problem.to_dict(),
                    "epsilon_total": None if last is None else last.entry.epsilon_total,
                    "epsilon_total_recomputed": None if last is None else last.epsilon_total,
                    "delta": None if last is None else last.entry.delta,
                    "budget": None if last is None else last.entry.budget,
                    "refusals": sum(c.entry.status == "refused" for c in ledger.entries),
                }
            )
        return {
            "ok": self.ok,
            "epsilon_rel_tolerance": EPSILON_REL_TOLERANCE,
            "epsilon_abs_tolerance": EPSILON_ABS_TOLERANCE,
            "ledgers": files,
        }


class ReferenceAccountant:
    """Google's dp-accounting over a ledger's trained entries: the auditor's accountant.

    Each trained entry is ``steps`` self-compositions of
    ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; all of them compose, whatever the
    model. One dp-accounting accountant per kind is kept and composed incrementally.
    """

    def __init__(self) -> None:
        self._events: list[tuple[dp_accounting.DpEvent, int]] = []
        self._accountants: dict[str, dp_accounting.PrivacyAccountant] = {}

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Compose ``steps`` steps with noise multiplier ``sigma`` and Poisson rate ``q``."""
        event = (_gaussian_step(noise_multiplier, sample_rate), steps)
        self._events.append(event)
        for accountant in self._accountants.values():
            _compose(accountant, [event])

    def epsilon(self, kind: str, delta: float) -> float:
        """Composed epsilon at ``delta`` with the ``kind`` ("rdp" or "prv") accountant."""
        if not self._events:
            return 0.0
        if kind not in self._accountants:
            self._accountants[kind] = _new_accountant(kind)
            _compose(self._accountants[kind], self._events)
        return float(self._accountants[kind].get_epsilon(delta))

    @staticmethod
    @functools.cache  # a site runs the same mechanism round after round
    def single(
        kind: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """Epsilon at ``delta`` of one mechanism alone."""
        accountant = _new_accountant(kind)
        _compose(accountant, [(_gaussian_step(noise_multiplier, sample_rate), steps)])
        return float(accountant.get_epsilon(delta))


def _gaussian_step(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    import dp_accounting  # imported where the epsilons are recomputed, not by the CLI's help

    return dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )


def _new_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant() if kind == "rdp" else PLDAccountant()


def _compose(
    accountant: dp_accounting.PrivacyAccountant, events: list[tuple[dp_accounting.DpEvent, int]]
) -> None:
    # dp-accounting warns when it drops an RDP order whose series does not converge (low
    # fractional orders at large q). Dropping an order only loosens the bound, so it is noise
    # for an auditor; everything else it logs still shows.
    with _quiet("absl"):
        for event, steps in events:
            accountant.compose(event, steps)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _close(recorded: float, recomputed: float) -> bool:
    return abs(recorded - recomputed) <= EPSILON_REL_TOLERANCE * recomputed + EPSILON_ABS_TOLERANCE


class _Bad(Exception):
    """A check failed; the message is the reason shown to the auditor."""


class _Order:
    """Rounds never decrease within a run, (round, model) never repeats, runs never return."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.last_round = -1
        self.seen: set[tuple[str, int, str]] = set()

    def check(self, entry: LedgerEntry) -> None:
        if not self.runs or entry.run_id != self.runs[-1]:
            if entry.run_id in self.runs:
                raise _Bad(f"run {entry.run_id!r} reappears after run {self.runs[-1]!r} started")
            self.runs.append(entry.run_id)
            self.last_round = -1
        if entry.round < self.last_round:
            raise _Bad(
                f"round decreases from {self.last_round} to {entry.round} in run {entry.run_id!r}"
            )
        key = (entry.run_id, entry.round, entry.model)
        if key in self.seen:
            raise _Bad(
                f"a second entry for round {entry.round}, model {entry.model!r} "
                f"in run {entry.run_id!r}"
            )
        self.seen.add(key)
        self.last_round = entry.round


def verify_ledger(path: Path, keys_dir: Path) -> LedgerVerdict:
    """Verify one ledger file against the enrolled public keys in ``keys_dir``.

    Returns
    -------
    LedgerVerdict
        The entries verified before the first problem, and that problem (None if none).

    Raises
    ------
    UsageError
        ``path`` is not a file or ``keys_dir`` not a folder.
    """
    if not path.is_file():
        raise UsageError(f"{path}: no such ledger file")
    if not keys_dir.is_dir():
        raise UsageError(f"{keys_dir}: no such keys folder")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""  # a complete file ends with a newline
    if not torn:
        lines.pop()

    site: str | None = None
    key: Ed25519PublicKey | None = None
    prev = GENESIS_HASH
    order = _Order()
    accountant = ReferenceAccountant()
    checked: list[CheckedEntry] = []
    for number, line in enumerate(lines, start=1):
        try:
            if torn and number == len(lines):
                raise _Bad("the last line is incomplete (no newline): a crash while writing it?")
            fields, entry = _parse(line)
            site = site or entry.site
            if entry.site != site:
                raise _Bad(f"site changes from {site!r} to {entry.site!r}")
            key = key or _enrolled_key(keys_dir, site)
            if not signature_valid(fields, key):
                raise _Bad(
                    f"signature does not verify with {signing_key_paths(keys_dir, site=site)[1]}"
                )
            if entry.prev_hash != prev:
                raise _Bad(
                    "prev_hash is not 64 zeros: lines are missing before this one"
                    if number == 1
                    else f"prev_hash is not the SHA-256 of line {number - 1}: a line was "
                    "removed, inserted, reordered or altered before this one"
                )
            order.check(entry)
            checked.append(_recompute(entry, number, accountant))
        except _Bad as bad:
            return LedgerVerdict(path, site, len(lines), checked, Problem(path, number, str(bad)))
        prev = line_hash(line)
    return LedgerVerdict(path, site, len(lines), checked, None)


def verify_ledgers(paths: Sequence[Path], keys_dir: Path) -> AuditResult:
    """Verify every ledger file (see ``verify_ledger``); usage errors come before any work."""
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: no such ledger file")
    return AuditResult([verify_ledger(path, keys_dir) for path in paths])


def _parse(line: bytes) -> tuple[dict[str, Any], LedgerEntry]:
    try:
        fields = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Bad(f"not a JSON line: {exc}") from exc
    if not isinstance(fields, dict):
        raise _Bad("not a JSON object")
    try:
        entry = LedgerEntry.model_validate(fields)
    except ValidationError as exc:
        errors = "; ".join(validation_problems(exc))
        raise _Bad(f"not a ledger entry: {errors}") from exc
    if canonical_json(fields) != line:
        raise _Bad("not canonical JSON (sorted keys, no spaces, UTF-8)")
    return fields, entry


def _enrolled_key(keys_dir: Path, site: str) -> Ed25519PublicKey:
    public = signing_key_paths(keys_dir, site=site)[1]
    if not public.exists():
        raise _Bad(f"site {site!r} is not enrolled: no {public}")
    try:
        return load_verify_key(public)
    except ConfigError as exc:
        raise _Bad(str(exc)) from exc


def _recompute(entry: LedgerEntry, number: int, accountant: ReferenceAccountant) -> CheckedEntry:
    kind, delta = entry.accountant, entry.delta
    epsilon_round = 0.0
    if entry.status == "trained":
        accountant.record(entry.noise_multiplier, entry.sample_rate, entry.steps)
        epsilon_round = ReferenceAccountant.single(
            kind,
            noise_multiplier=entry.noise_multiplier,
            sample_rate=entry.sample_rate,
            steps=entry.steps,
            delta=delta,
        )
        if not _close(entry.epsilon_round, epsilon_round):
            raise _Bad(
                f"epsilon_round {entry.epsilon_round:.6g} but dp-accounting ({kind}) gets "
                f"{epsilon_round:.6g} for sigma {entry.noise_multiplier}, q {entry.sample_rate}, "
                f"{entry.steps} steps at delta {delta:g}"
            )
    epsilon_total = accountant.epsilon(kind, delta)
    if not _close(entry.epsilon_total, epsilon_total):
        raise _Bad(
            f"epsilon_total {entry.epsilon_total:.6g} but dp-accounting ({kind}) composes the "
            f"ledger's trained entries to {epsilon_total:.6g} at delta {delta:g}"
        )
    if entry.status == "trained" and entry.epsilon_total > entry.budget:
        raise _Bad(f"epsilon_total {entry.epsilon_total:.6g} exceeds the budget {entry.budget:g}")
    return CheckedEntry(number, entry, epsilon_round, epsilon_total)
