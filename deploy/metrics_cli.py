"""``busfed metrics``: the WAUVE paper's evaluation of scores in a CSV file.

``metrics_command`` is the command; the top-level ``busfed`` app mounts it as ``metrics``
and maps the ``BusfedError`` it raises to the documented exit code. ``metrics_app`` wraps
the same command with that mapping on its own, for running it without ``busfed``.

The CSV is read and checked by ``common.evaluation.score_table`` (bad score cells are
skipped and listed), the figures come from ``common.metrics.build_report``; this module
checks the options and prints: rich tables, JSON, the paper's Table 2 as Markdown or CSV,
and the ROC figure (``deploy.plots``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import click
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from common.cli import reports_errors
from common.errors import UsageError
from common.evaluation.score_table import ScoreTable, load_score_table

if TYPE_CHECKING:  # common.metrics loads SciPy's stats (most of a second): not for --help
    from common.metrics import Direction, GroupReport, Proportion, ThresholdMetrics

CONF_LEVEL = 0.95
MAX_SKIPPED_SHOWN = 10

METRICS_HELP = (
    "AUC with DeLong 95% CI, the operating point (sensitivity, specificity, PPV, NPV, "
    "accuracy with exact Clopper-Pearson 95% CIs, F1) and DeLong's test between scores, as "
    "in the WAUVE paper; figures equal pROC's.\n\n"
    "Rows with a missing or non-numeric score are skipped and listed.\n\n"
    "--table prints the layout of the paper's Table 2 instead (one row per score: AUC, and "
    "at its operating point sensitivity, specificity, accuracy, PPV and NPV with 95% CIs, and "
    "DeLong's p against the first score); --roc-plot draws every score's ROC curve on one "
    "PNG with the operating points marked.\n\n"
    "Exit codes:\n"
    "0  success\n"
    "2  bad usage: conflicting options, a target sensitivity outside (0, 1], a positive "
    "value that no row has, --table without an operating point, or a --roc-plot path in a "
    "missing folder\n"
    "3  SCORES.csv unreadable: missing, not UTF-8 CSV, a column missing, or a label that is "
    "neither positive nor negative"
)


# ---------------------------------------------------------------- output


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity; an undefined figure is null."""
    return float(value) if math.isfinite(value) else None


def _proportion_json(proportion: Proportion) -> dict[str, Any]:
    return {
        "estimate": _finite(proportion.estimate),
        "ci": [_finite(proportion.ci_low), _finite(proportion.ci_high)],
        "successes": proportion.successes,
        "total": proportion.total,
    }


def _operating_point_json(metrics: ThresholdMetrics, direction: str) -> dict[str, Any]:
    return {
        "threshold": metrics.threshold,
        "positive_if": "score >= threshold" if direction == "<" else "score <= threshold",
        "tp": metrics.tp,
        "fp": metrics.fp,
        "tn": metrics.tn,
        "fn": metrics.fn,
        "sensitivity": _proportion_json(metrics.sensitivity),
        "specificity": _proportion_json(metrics.specificity),
        "ppv": _proportion_json(metrics.ppv),
        "npv": _proportion_json(metrics.npv),
        "accuracy": _proportion_json(metrics.accuracy),
        "f1": _finite(metrics.f1),
    }


def _group_json(report: GroupReport) -> dict[str, Any]:
    return {
        "group": report.group,
        "n_positive": report.n_pos,
        "n_negative": report.n_neg,
        "scores": [
            {
                "score": score.name,
                "direction": score.auc.direction,
                "auc": _finite(score.auc.auc),
                "auc_ci": [_finite(score.auc.ci_low), _finite(score.auc.ci_high)],
                "auc_variance": _finite(score.auc.variance),
                "operating_point": (
                    _operating_point_json(score.at_threshold, score.auc.direction)
                    if score.at_threshold
                    else None
                ),
            }
            for score in report.scores
        ],
        "comparisons": [
            {
                "score_a": c.score_a,
                "score_b": c.score_b,
                "auc_a": _finite(c.test.auc_a),
                "auc_b": _finite(c.test.auc_b),
                "difference": _finite(c.test.difference),
                "difference_ci": [_finite(c.test.ci_low), _finite(c.test.ci_high)],
                "z": _finite(c.test.z),
                "p_value": _finite(c.test.p_value),
            }
            for c in report.comparisons
        ],
    }


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _percent_cell(proportion: Proportion) -> str:
    """Estimate, exact interval and counts on three lines, in percent."""
    if proportion.total == 0:
        return "n/a\n\n0/0"
    estimate, low, high = (
        100 * v for v in (proportion.estimate, proportion.ci_low, proportion.ci_high)
    )
    return f"{estimate:.1f}\n{low:.1f}-{high:.1f}\n{proportion.successes}/{proportion.total}"


def _group_label(group: str | None) -> str:
    if group is None:
        return "all"
    return group or "(blank)"


def _print_tables(console: Console, reports: list[GroupReport], *, by: str | None) -> None:
    table = Table(
        title="AUC with DeLong 95% CI; operating point in % with exact 95% CI and counts",
        box=box.SIMPLE_HEAD,
        show_lines=True,
        pad_edge=False,
    )
    if by:
        table.add_column(by)
    # A narrow terminal folds a figure onto the next line rather than cut it short.
    for column in ("score", "AUC", "threshold"):
        table.add_column(column, overflow="fold")
    for column in ("sens.", "spec.", "PPV", "NPV", "accuracy", "F1"):
        table.add_column(column, justify="right", overflow="fold")
    for report in reports:
        for score in report.scores:
            auc = score.auc
            cells = [
                f"{score.name}\n{report.n_pos} pos\n{report.n_neg} neg",
                f"{_fmt(auc.auc)}\n{_fmt(auc.ci_low)}-{_fmt(auc.ci_high)}",
            ]
            point = score.at_threshold
            if point is None:
                cells += [""] * 7
            else:
                side = ">=" if auc.direction == "<" else "<="
                cells.append(f"{side} {point.threshold:.6g}")
                cells += [
                    _percent_cell(p)
                    for p in (point.sensitivity, point.specificity, point.ppv, point.npv)
                ]
                cells += [_percent_cell(point.accuracy), _fmt(point.f1)]
            table.add_row(*([_group_label(report.group)] if by else []), *cells)
    console.print(table)
    if any(report.comparisons for report in reports):
        tests = Table(title="DeLong's test for two correlated ROC curves (two-sided)")
        if by:
            tests.add_column(by)
        for column in ("comparison", "AUC difference (95% CI)", "Z", "p"):
            tests.add_column(column, justify="left" if column == "comparison" else "right")
        for report in reports:
            for c in report.comparisons:
                t = c.test
                tests.add_row(
                    *([_group_label(report.group)] if by else []),
                    f"{c.score_a} vs {c.score_b}",
                    f"{_fmt(t.difference)} ({_fmt(t.ci_low)} to {_fmt(t.ci_high)})",
                    _fmt(t.z, 2),
                    f"{t.p_value:.3g}" if math.isfinite(t.p_value) else "n/a",
                )
        console.print(tests)


def _print_skipped(console: Console, table: ScoreTable, path: Path) -> None:
    console.print(
        f"{path}: {table.rows_read} rows, {len(table.labels)} used "
        f"({int(table.labels.sum())} positive, {int((~table.labels).sum())} negative), "
        f"{table.rows_skipped} skipped",
        soft_wrap=True,
    )
    for row in table.skipped[:MAX_SKIPPED_SHOWN]:
        console.print(
            f"  skipped line {row.line}, column {row.column!r}: {row.reason} ({row.value!r})",
            soft_wrap=True,
        )
    if len(table.skipped) > MAX_SKIPPED_SHOWN:
        console.print(f"  ... and {len(table.skipped) - MAX_SKIPPED_SHOWN} more (see --json)")


# ---------------------------------------------------------------- the paper's Table 2


class TableFormat(StrEnum):
    markdown = "markdown"
    csv = "csv"


TABLE_HEADINGS = {
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "accuracy": "Accuracy",
    "ppv": "PPV",
    "npv": "NPV",
}


def _table_caption(
    report: GroupReport, *, threshold: float | None, match_sensitivity: float | None
) -> str:
    if match_sensitivity is not None:
        point = (
            f"each score's highest threshold reaching sensitivity {match_sensitivity:g} on "
            "these cases"
        )
    else:
        point = f"threshold {threshold:g} for every score"
    return (
        f"{report.n_pos} positive and {report.n_neg} negative cases. AUC with DeLong 95% CI; "
        "sensitivity, specificity, accuracy, PPV and NPV in % with exact (Clopper-Pearson) "
        f"95% CI and counts, at {point}; P: DeLong's two-sided test of the AUC against "
        f"{report.scores[0].name}'s."
    )


def _p_cell(p_value: float) -> str:
    if not math.isfinite(p_value):
        return "n/a"
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"


def _markdown_table(
    reports: list[GroupReport],
    *,
    by: str | None,
    threshold: float | None,
    match_sensitivity: float | None,
) -> str:
    from common.metrics import TABLE_MEASURES, comparison_rows

    first = reports[0].scores[0].name
    headings = [
        *([by] if by else []),
        "Score",
        "AUC (95% CI)",
        "Threshold",
        *(f"{TABLE_HEADINGS[m]}, % (95% CI)" for m in TABLE_MEASURES),
        f"P vs {first}",
    ]
    lines = [
        _table_caption(reports[0], threshold=threshold, match_sensitivity=match_sensitivity),
        "",
        "| " + " | ".join(headings) + " |",
        "|" + "|".join("---" for _ in headings) + "|",
    ]
    for report in reports:
        for score, row in zip(report.scores, comparison_rows(report), strict=True):
            cells = [
                *([_group_label(report.group)] if by else []),
                row["score"],
                f"{_fmt(row['auc'])} ({_fmt(row['auc_ci_low'])}-{_fmt(row['auc_ci_high'])})",
                f"{row['positive_if']} {row['threshold']:.6g}",
                *(_percent_inline(getattr(score.at_threshold, m)) for m in TABLE_MEASURES),
            ]
            cells.append(_p_cell(row["delong_p"]) if row["versus"] else "reference")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent_inline(proportion: Proportion) -> str:
    """``90.2 (76.9-97.3), 37/41``: estimate and exact interval in percent, and counts."""
    if proportion.total == 0:
        return "n/a, 0/0"
    estimate, low, high = (
        100 * v for v in (proportion.estimate, proportion.ci_low, proportion.ci_high)
    )
    return f"{estimate:.1f} ({low:.1f}-{high:.1f}), {proportion.successes}/{proportion.total}"


def _csv_table(reports: list[GroupReport], *, by: str | None) -> str:
    """Every figure of Table 2 at full precision, proportions as fractions; NaN is blank."""
    from common.metrics import comparison_rows

    rows = [row for report in reports for row in comparison_rows(report)]
    columns = [c for c in rows[0] if c != "group" or by]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        if by:
            row["group"] = _group_label(row["group"])
        writer.writerow(
            {k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        )
    return buffer.getvalue().rstrip("\n")


def plot_rocs(
    path: Path,
    table: ScoreTable,
    report: GroupReport,
    *,
    directions: dict[str, Any],
    title: str,
) -> None:
    """Every score's ROC curve on one PNG, each operating point marked on its curve."""
    from common.metrics import roc_curve
    from deploy.plots import RocLine, write_roc_png

    lines = []
    for score in report.scores:
        auc = score.auc
        point = score.at_threshold
        lines.append(
            RocLine(
                label=f"{score.name}: AUC {_fmt(auc.auc)} ({_fmt(auc.ci_low)}-{_fmt(auc.ci_high)})",
                curve=roc_curve(
                    table.labels, table.scores[score.name], direction=directions[score.name]
                ),
                point=None
                if point is None
                else (1 - point.specificity.estimate, point.sensitivity.estimate),
            )
        )
    write_roc_png(path, lines, title=title, size=5.5)


# ---------------------------------------------------------------- command


def metrics_command(
    scores_csv: Annotated[
        Path, typer.Argument(metavar="SCORES.csv", help="CSV with a header line.")
    ],
    label: Annotated[str, typer.Option(help="Column with the reference outcome.")],
    positive: Annotated[str, typer.Option(help="Value of --label that marks a positive case.")],
    score: Annotated[
        list[str], typer.Option(help="Score column (repeat for several; each pair is tested).")
    ],
    negative: Annotated[
        str | None,
        typer.Option(
            help="Value of --label that marks a negative case; any other value is an error. "
            "Without it every non-blank value other than --positive is negative."
        ),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Operating threshold for every score.")
    ] = None,
    match_sensitivity: Annotated[
        float | None,
        typer.Option(
            help="Target sensitivity in (0, 1]: each score's operating threshold is the highest "
            "that reaches it (e.g. the radiologists' sensitivity)."
        ),
    ] = None,
    by: Annotated[str | None, typer.Option(help="Column to report subgroups by.")] = None,
    direction: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(["<", ">", "auto"]),
            help="'<': a higher score means positive (a risk score); '>': lower means "
            "positive; 'auto': chosen per score from the medians, as pROC's default.",
        ),
    ] = "<",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    table_format: Annotated[
        TableFormat | None,
        typer.Option(
            "--table",
            help="Print the paper's Table 2 layout instead: one row per --score (the first is "
            "the reference of the DeLong p-values); needs --match-sensitivity or --threshold.",
        ),
    ] = None,
    roc_plot: Annotated[
        Path | None,
        typer.Option(
            "--roc-plot",
            metavar="FILE.png",
            help="Also draw every score's ROC curve on one PNG, operating points marked.",
        ),
    ] = None,
) -> None:
    """AUC (DeLong), operating-point metrics (Clopper-Pearson) and DeLong tests of scores."""
    if threshold is not None and match_sensitivity is not None:
        raise UsageError("give --threshold or --match-sensitivity, not both")
    if table_format is not None and as_json:
        raise UsageError("give --table or --json, not both")
    if table_format is not None and threshold is None and match_sensitivity is None:
        raise UsageError("--table needs an operating point: --match-sensitivity or --threshold")
    if roc_plot is not None and not roc_plot.parent.is_dir():
        raise UsageError(f"--roc-plot {roc_plot}: folder {roc_plot.parent} does not exist")
    if match_sensitivity is not None and not 0 < match_sensitivity <= 1:
        raise UsageError(f"--match-sensitivity {match_sensitivity}: must be in (0, 1]")
    if len(set(score)) != len(score):
        raise UsageError("a --score column is named twice")
    if label in score or (by is not None and (by in score or by == label)):
        raise UsageError("--label, --score and --by must name different columns")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--threshold {threshold}: must be a finite number")
    from common.metrics import build_report

    table = load_score_table(
        scores_csv, label=label, positive=positive, negative=negative, score_columns=score, by=by
    )
    report = build_report(
        table.labels,
        table.scores,
        table.groups,
        direction=cast("Direction", direction),
        threshold=threshold,
        match_sensitivity=match_sensitivity,
        conf_level=CONF_LEVEL,
    )
    overall, groups = report.overall, report.groups
    if roc_plot is not None:
        if match_sensitivity is not None:
            title = f"operating points: sensitivity >= {match_sensitivity:g}"
        elif threshold is not None:
            title = f"operating points: threshold {threshold:g}"
        else:
            title = f"{overall.n_pos} positive, {overall.n_neg} negative"
        plot_rocs(roc_plot, table, overall, directions=report.directions, title=title)
    if as_json:
        result = {
            "file": str(scores_csv),
            "label": {"column": label, "positive": positive, "negative": negative},
            "rows": {
                "read": table.rows_read,
                "used": len(table.labels),
                "skipped": table.rows_skipped,
            },
            "skipped": [asdict(row) for row in table.skipped],
            "conf_level": CONF_LEVEL,
            "operating_point": {
                "threshold": threshold,
                "match_sensitivity": match_sensitivity,
            },
            "overall": _group_json(overall),
            "by": ({"column": by, "groups": [_group_json(g) for g in groups]} if by else None),
            "roc_plot": str(roc_plot) if roc_plot is not None else None,
        }
        typer.echo(json.dumps(result, indent=2, allow_nan=False))
        return
    if table_format is TableFormat.markdown:
        typer.echo(
            _markdown_table(
                [overall, *groups], by=by, threshold=threshold, match_sensitivity=match_sensitivity
            )
        )
    elif table_format is TableFormat.csv:
        typer.echo(_csv_table([overall, *groups], by=by))
    else:
        _print_tables(Console(highlight=False), [overall, *groups], by=by)
    stderr = Console(stderr=True, highlight=False)
    _print_skipped(stderr, table, scores_csv)
    if roc_plot is not None:
        stderr.print(f"ROC curves -> {roc_plot}", soft_wrap=True)


metrics_app = typer.Typer(pretty_exceptions_enable=False)
metrics_app.command(name="metrics", help=METRICS_HELP)(reports_errors(metrics_command))
