"""A scores CSV read for ``busfed metrics``: labels, score columns and subgroups, checked once.

Each row's label must be the positive value, the negative value (when ``negative`` is
given) or, without ``negative``, any other non-blank value. A row whose score is missing or
not a finite number is skipped and reported with its line and column, never dropped in
silence.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError, UsageError


@dataclass(frozen=True)
class SkippedRow:
    """A row left out of the evaluation: 1-based ``line`` (the header is line 1)."""

    line: int
    column: str
    value: str
    reason: str


@dataclass(frozen=True)
class ScoreTable:
    """The usable rows of a scores file, column by column.

    Attributes
    ----------
    labels : bool array [N]
        True for the positive value.
    scores : dict of name to float array [N]
    groups : list of N strings, or None without ``by``
    rows_read : int
        Data rows in the file (the header not counted).
    skipped : list[SkippedRow]
        One entry per bad score cell; a row with several appears several times.
    """

    labels: np.ndarray
    scores: dict[str, np.ndarray]
    groups: list[str] | None
    rows_read: int
    skipped: list[SkippedRow]

    @property
    def rows_skipped(self) -> int:
        return len({row.line for row in self.skipped})


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    """The header and ``(line, row)`` of each data row; ``DataError`` names file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[tuple[int, dict[str, str | None]]] = []
    line = 1
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            # Spreadsheets often leave blanks around header names.
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            for row in reader:
                line = reader.line_num
                rows.append((line, row))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except csv.Error as error:
        raise DataError(f"{path}, line {line + 1}: not valid CSV ({error})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from error
    if not header:
        raise DataError(f"{path}: empty file, no header line")
    return header, rows


def load_score_table(
    path: Path,
    *,
    label: str,
    positive: str,
    negative: str | None,
    score_columns: Sequence[str],
    by: str | None,
) -> ScoreTable:
    """Read and check ``path``; see the module docstring for the rules.

    Raises
    ------
    DataError
        The file is missing, empty or not UTF-8 CSV, a named column is absent, or a label
        is blank or (with ``negative``) neither value.
    UsageError
        No row has the positive label (a mistyped ``--positive``).
    """
    header, rows = _read_rows(path)
    missing = [c for c in (label, *score_columns, *([by] if by else [])) if c not in header]
    if missing:
        raise DataError(
            f"{path}, line 1: no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(repr(c) for c in header)})"
        )
    if not rows:
        raise DataError(f"{path}: no data row, only a header")
    labels: list[bool] = []
    scores: dict[str, list[float]] = {name: [] for name in score_columns}
    groups: list[str] = []
    skipped: list[SkippedRow] = []
    label_values: set[str] = set()
    for line, row in rows:
        value = (row[label] or "").strip()
        if not value:
            raise DataError(
                f"{path}, line {line}, column {label!r}: blank label, neither the positive "
                f"{positive!r} nor any other value"
            )
        if negative is not None and value not in (positive, negative):
            raise DataError(
                f"{path}, line {line}, column {label!r}: label {value!r} is neither the "
                f"positive {positive!r} nor the negative {negative!r}"
            )
        label_values.add(value)
        parsed, bad = _parse_scores(line, row, score_columns)
        if bad:
            skipped.extend(bad)
            continue
        labels.append(value == positive)
        for name, number in parsed.items():
            scores[name].append(number)
        if by:
            groups.append((row[by] or "").strip())
    if positive not in label_values:
        seen = ", ".join(repr(v) for v in sorted(label_values))
        raise UsageError(
            f"--positive {positive!r}: no row of {path} has that value in column {label!r} "
            f"(values: {seen})"
        )
    if not labels:
        raise DataError(f"{path}: every row was skipped, no score left to evaluate")
    return ScoreTable(
        labels=np.array(labels, dtype=bool),
        scores={name: np.array(values, dtype=float) for name, values in scores.items()},
        groups=groups if by else None,
        rows_read=len(rows),
        skipped=skipped,
    )


def _parse_scores(
    line: int, row: dict[str, str | None], score_columns: Sequence[str]
) -> tuple[dict[str, float], list[SkippedRow]]:
    parsed: dict[str, float] = {}
    bad: list[SkippedRow] = []
    for name in score_columns:
        text = (row[name] or "").strip()
        if not text:
            bad.append(SkippedRow(line, name, text, "missing score"))
            continue
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            bad.append(SkippedRow(line, name, text, "not a finite number"))
        else:
            parsed[name] = number
    return parsed, bad
