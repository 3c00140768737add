"""The auditor's HTML report: a verified audit as one self-contained page and PNG plots.

``write_report`` turns an ``AuditResult`` (``deploy.audit.verify``) into a page that needs no
network: the verdict, each site's epsilon over rounds against its budget, the refusals, every
entry's parameters and, when given, the empirical audit's bound next to the ledgers' epsilons.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path

from common.errors import UsageError
from common.privacy.empirical import EmpiricalAudit
from deploy.audit.verify import (
    EPSILON_ABS_TOLERANCE,
    EPSILON_REL_TOLERANCE,
    AuditResult,
    CheckedEntry,
    LedgerVerdict,
)


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


def budget_steps(budgets: list[float]) -> tuple[list[float], list[float]]:
    """The budget line: each round's budget over its whole slot, round i from i - 0.5 to
    i + 0.5, so that one round still draws a line (a step through its point alone drew
    none, while the legend listed it)."""
    xs = [i - 0.5 for i in range(len(budgets))] + [len(budgets) - 0.5]
    return xs, [*budgets, *budgets[-1:]]


def _plot(ledger: LedgerVerdict) -> bytes:
    """PNG: the site's epsilon after each round (recorded and recomputed) against its budget."""
    # Imported here: `busfed audit verify` needs no plotting stack.
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
        *budget_steps([c.entry.budget for c in points]),
        where="post",
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
    ax.set_xlim(-0.5, len(x) - 0.5)
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
