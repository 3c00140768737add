"""The auditor's tooling: verify sites' privacy ledgers and render a static HTML report.

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

import base64
import contextlib
import datetime as dt
import functools
import html
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from pydantic import ValidationError

from common.errors import ConfigError, UsageError, validation_problems
from common.keys import load_verify_key, signing_key_paths
from common.privacy.empirical import EmpiricalAudit
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
    return dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )


def _new_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
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


# ---------------------------------------------------------------------------- report


def load_versions(path: Path) -> dict[int, str]:
    """Read ``{"<round>": "<registered model version>", ...}`` (JSON) for the report.

    Raises
    ------
    UsageError
        The file is missing or not such a mapping.
    """
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return {int(round_): str(version) for round_, version in raw.items()}
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: no such versions file") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a JSON object of round -> model version: {exc}") from exc


def write_report(
    result: AuditResult,
    out: Path,
    *,
    versions: Mapping[int, str] | None = None,
    empirical: EmpiricalAudit | None = None,
) -> list[Path]:
    """Write a self-contained HTML report to ``out`` and one PNG plot per ledger beside it.

    The page needs no network: plots are inlined as base64 PNG and the style is inline.
    Ledgers with no verified entry get no plot. ``empirical`` (from ``busfed audit
    empirical``) adds a section with its bound next to the ledgers' epsilons.

    Returns
    -------
    list of Path
        ``out`` first, then the PNG files.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    sections = []
    for ledger in result.ledgers:
        name = ledger.site or ledger.file.stem
        if ledger.entries:
            png = _unique(out.with_name(f"{out.stem}-{name}.png"), pngs)
            image = _plot(ledger)
            png.write_bytes(image)
            pngs.append(png)
            encoded = base64.b64encode(image).decode("ascii")
            body = (
                f'<img src="data:image/png;base64,{encoded}" '
                f'alt="epsilon over rounds for {_e(name)}">'
            )
        else:
            body = "<p>No verified entry to plot.</p>"
        sections.append(f"<section><h3>{_e(name)}</h3>{body}</section>")
    page = _PAGE.format(
        style=_STYLE,
        generated=_e(dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        verdict=_verdict_html(result),
        summary=_summary_html(result),
        plots="\n".join(sections),
        refusals=_refusals_html(result),
        entries=_entries_html(result, versions),
        empirical="" if empirical is None else _empirical_html(empirical, result),
        rel=EPSILON_REL_TOLERANCE * 100,
        abs=EPSILON_ABS_TOLERANCE,
    )
    out.write_text(page, encoding="utf-8")
    return [out, *pngs]


def _unique(path: Path, taken: list[Path]) -> Path:
    n, candidate = 2, path
    while candidate in taken:
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def _plot(ledger: LedgerVerdict) -> bytes:
    """PNG: the site's epsilon after each round (recorded and recomputed) against its budget."""
    # Imported here: `verify` needs no plotting stack.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The epsilon a round ends with is its last entry's; one point per (run, round).
    rounds: dict[tuple[str, int], CheckedEntry] = {}
    refused: dict[tuple[str, int], bool] = {}
    for checked in ledger.entries:
        key = (checked.entry.run_id, checked.entry.round)
        rounds[key] = checked
        refused[key] = refused.get(key, False) or checked.entry.status == "refused"
    runs = list(dict.fromkeys(run for run, _ in rounds))
    labels = [str(r) if len(runs) == 1 else f"{runs.index(run) + 1}.{r}" for run, r in rounds]
    x = list(range(len(rounds)))
    points = list(rounds.values())

    fig = Figure(figsize=(7.5, 3.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(
        x,
        [c.entry.epsilon_total for c in points],
        "o-",
        color="#1f5fa8",
        label="epsilon_total (site's ledger)",
    )
    ax.plot(
        x,
        [c.epsilon_total for c in points],
        "+",
        color="#111111",
        markersize=11,
        label="recomputed by the auditor (dp-accounting)",
    )
    ax.step(
        x,
        [c.entry.budget for c in points],
        where="mid",
        color="#b22222",
        linestyle="--",
        label="budget",
    )
    refused_x = [i for i, key in enumerate(rounds) if refused[key]]
    if refused_x:
        ax.plot(
            refused_x,
            [points[i].entry.epsilon_total for i in refused_x],
            "X",
            color="#b22222",
            markersize=10,
            linestyle="none",
            label="refused",
        )
    last = points[-1].entry
    ax.set_title(
        f"{ledger.site}: epsilon at delta {last.delta:g} ({last.accountant}), patient-level"
    )
    ax.set_xticks(x, labels)
    ax.set_xlabel("round" if len(runs) == 1 else "run.round")
    ax.set_ylabel("epsilon")
    top = max(max(c.entry.budget, c.entry.epsilon_total, c.epsilon_total) for c in points)
    ax.set_ylim(bottom=0, top=top * 1.15)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(head: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already escaped."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _verdict_html(result: AuditResult) -> str:
    n = sum(len(ledger.entries) for ledger in result.ledgers)
    if result.ok:
        return (
            f'<div class="verdict pass"><strong>VERIFIED</strong>: {len(result.ledgers)} '
            f"ledger(s), {n} entries; every signature, hash link and epsilon checks out and "
            "every site stayed inside its budget.</div>"
        )
    problems = "".join(
        f"<li>{_e(ledger.problem)}</li>" for ledger in result.ledgers if ledger.problem
    )
    return (
        '<div class="verdict fail"><strong>VERIFICATION FAILED</strong>: the first bad entry '
        f"of each failing ledger (entries after it are not shown):<ul>{problems}</ul></div>"
    )


def _summary_html(result: AuditResult) -> str:
    rows = []
    for ledger in result.ledgers:
        last = ledger.entries[-1] if ledger.entries else None
        rows.append(
            [
                _e(ledger.site or "?"),
                _e(ledger.file),
                f"{len(ledger.entries)} / {ledger.lines}",
                "" if last is None else f"{last.entry.epsilon_total:.4f}",
                "" if last is None else f"{last.epsilon_total:.4f}",
                "" if last is None else f"{last.entry.budget:g}",
                "" if last is None else f"{last.entry.delta:g}",
                '<span class="ok">ok</span>'
                if ledger.problem is None
                else f'<span class="bad">bad line {ledger.problem.line}</span>',
            ]
        )
    head = [
        "site",
        "ledger",
        "verified / lines",
        "epsilon_total",
        "recomputed",
        "budget",
        "delta",
        "verdict",
    ]
    return _table(head, rows)


def _refusals_html(result: AuditResult) -> str:
    rows = [
        [
            _e(c.entry.site),
            _e(c.entry.run_id),
            str(c.entry.round),
            _e(c.entry.model),
            f"{c.entry.epsilon_total:.4f}",
            f"{c.entry.budget:g}",
            _e(c.entry.time),
        ]
        for ledger in result.ledgers
        for c in ledger.entries
        if c.entry.status == "refused"
    ]
    if not rows:
        return "<p>No round was refused.</p>"
    return _table(["site", "run", "round", "model", "epsilon_total", "budget", "time"], rows)


def _entries_html(result: AuditResult, versions: Mapping[int, str] | None) -> str:
    head = [
        "site",
        "run",
        "round",
        "model",
        "n_units",
        "q",
        "sigma",
        "C",
        "steps",
        "delta",
        "epsilon_round",
        "epsilon_total",
        "recomputed",
        "status",
        "noise source",
    ]
    if versions is not None:
        head.append("model version")
    rows = []
    for ledger in result.ledgers:
        for c in ledger.entries:
            e = c.entry
            row = [
                _e(e.site),
                _e(e.run_id),
                str(e.round),
                _e(e.model),
                str(e.n_units),
                f"{e.sample_rate:g}",
                f"{e.noise_multiplier:g}",
                f"{e.max_grad_norm:g}",
                str(e.steps),
                f"{e.delta:g}",
                f"{e.epsilon_round:.4f}",
                f"{e.epsilon_total:.4f}",
                f"{c.epsilon_total:.4f}",
                f'<span class="{e.status}">{e.status}</span>',
                _noise_source_html(e.noise_source),
            ]
            if versions is not None:
                row.append(_e(versions.get(e.round, "")))
            rows.append(row)
    return _table(head, rows)


def _noise_source_html(source: str | None) -> str:
    """The entry's randomness; predictable noise in red (a test setting, not a site's)."""
    if source is None:
        return "not recorded"
    return f'<span class="bad">{_e(source)}</span>' if "insecure" in source else _e(source)


def _empirical_html(audit: EmpiricalAudit, result: AuditResult) -> str:
    claimed = (
        "inf (noise off: the power check)"
        if audit.epsilon_claimed is None
        else f"{audit.epsilon_claimed:.4f} ({_e(audit.accountant)})"
    )
    verdict = (
        '<span class="ok">consistent</span>'
        if audit.consistent
        else '<span class="bad">VIOLATION: the bound exceeds the claimed epsilon</span>'
    )
    head = [
        "model", "noise source", "sigma", "C", "q", "steps", "canaries (in)", "guesses",
        "correct", "delta",
        f"epsilon lower bound ({audit.confidence:.0%} confidence)", "claimed epsilon of the run",
        "verdict",
    ]  # fmt: skip
    row = [
        _e(audit.model), _noise_source_html(audit.noise_source),
        f"{audit.noise_multiplier:g}", f"{audit.max_grad_norm:g}",
        f"{audit.sample_rate:g}", str(audit.steps), f"{audit.canaries} ({audit.canaries_in})",
        str(audit.guesses), str(audit.correct), f"{audit.delta:g}",
        f"{audit.epsilon_lower_bound:.4f}", claimed, verdict,
    ]  # fmt: skip
    ledgers = "; ".join(
        f"{_e(ledger.site or ledger.file.name)} {ledger.entries[-1].epsilon_total:.4f} at delta "
        f"{ledger.entries[-1].entry.delta:g}"
        for ledger in result.ledgers
        if ledger.entries
    )
    return (
        "<h2>Empirical audit</h2>\n<p>One training run of the sites' DP-SGD on a rehearsal "
        "site with canary patients (Steinke, Nasr and Jagielski 2023): a lower bound on the "
        "epsilon the training code actually has, next to the accountant's epsilon of that "
        "run. One-run bounds are loose, so a bound below the claim does not prove the claim; "
        "a bound above it shows that the code leaks more than its accounting says.</p>\n"
        # One row per figure: the auditor reads it on one screen, without scrolling.
        + _table(["", "value"], [[name, value] for name, value in zip(head, row, strict=True)])
        + f"<p>The ledgers' epsilon_total (recomputed): {ledgers or 'none verified'}.</p>"
    )


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1b1b1b; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
.verdict { padding: 0.9em 1.2em; border-radius: 6px; font-size: 1.1em; margin: 1em 0; }
.pass { background: #e3f4e6; border: 2px solid #2e7d32; }
.fail { background: #fde7e7; border: 2px solid #b22222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
.ok, .trained { color: #2e7d32; } .bad, .refused { color: #b22222; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>busfed privacy audit</title>
<style>{style}</style>
</head>
<body>
<h1>busfed privacy audit</h1>
<p class="meta">Generated {generated}. Privacy unit: patient. Epsilons recomputed with Google's
dp-accounting from the recorded parameters; tolerance {rel:g}% + {abs:g}.</p>
{verdict}
<h2>Ledgers</h2>
{summary}
<h2>Epsilon over rounds</h2>
{plots}
<h2>Refusals</h2>
{refusals}
<h2>Every entry</h2>
{entries}
{empirical}
</body>
</html>
"""
