"""``busfed metrics``: tables, JSON, skipped rows and exit codes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from common.errors import DataError, UsageError
from common.metrics import (
    TABLE_MEASURES,
    auc_ci,
    delong_test,
    threshold_for_sensitivity,
    threshold_metrics,
)
from deploy.metrics_cli import METRICS_HELP, metrics_app

ASAH = Path("/work/shared/reference/asah.csv")
needs_asah = pytest.mark.skipif(
    not ASAH.is_file(), reason=f"pROC's aSAH data not found at {ASAH} (see its README)"
)

SCORES = """\
id,outcome,model,radiologist,site
1,malignant,0.91,0.8,A
2,benign,0.12,0.3,A
3,benign,0.40,0.6,B
4,malignant,0.75,0.9,B
5,benign,0.05,0.1,B
6,malignant,0.55,0.4,A
7,benign,0.60,0.7,A
8,malignant,0.35,0.5,B
"""


def _run(*args: str):
    # A wide terminal keeps each figure of the table on one line.
    return CliRunner().invoke(metrics_app, list(args), env={"COLUMNS": "200"})


def _write(tmp_path: Path, text: str, name: str = "scores.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _base(path: Path, *extra: str) -> list[str]:
    return [str(path), "--label", "outcome", "--positive", "malignant", "--score", "model", *extra]


@needs_asah
def test_table_shows_procs_figures_and_the_delong_test():
    result = _run(
        str(ASAH), "--label", "outcome", "--positive", "Poor",
        "--score", "wfns", "--score", "ndka", "--threshold", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # pROC: AUC 0.8237 (0.7485-0.8988) for wfns, 0.6120 (0.5012-0.7227) for ndka.
    assert "0.824" in result.stdout and "0.749-0.899" in result.stdout
    assert "0.612" in result.stdout and "0.501-0.723" in result.stdout
    assert "wfns vs ndka" in result.stdout and "2.80" in result.stdout  # pROC Z 2.7978
    assert "39/41" in result.stdout  # sensitivity of wfns >= 2
    assert "113 rows, 113 used (41 positive, 72 negative), 0 skipped" in result.stderr


@needs_asah
def test_json_matches_the_reference_and_the_matched_sensitivity():
    result = _run(
        str(ASAH), "--label", "outcome", "--positive", "Poor", "--negative", "Good",
        "--score", "wfns", "--score", "s100b", "--match-sensitivity", "0.9", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    wfns, s100b = report["overall"]["scores"]
    assert wfns["auc"] == pytest.approx(0.823678861788618, abs=1e-6)
    assert wfns["auc_ci"] == pytest.approx([0.748534887819453, 0.898822835757783], abs=1e-6)
    # pROC coords of s100b: the most specific point with sensitivity >= 0.9.
    point = s100b["operating_point"]
    assert point["sensitivity"]["estimate"] == pytest.approx(0.90243902439024393)
    assert point["specificity"]["estimate"] == pytest.approx(0.22222222222222221)
    assert point["positive_if"] == "score >= threshold"
    (comparison,) = report["overall"]["comparisons"]
    assert comparison["z"] == pytest.approx(2.20898359144091, abs=1e-6)
    assert comparison["p_value"] == pytest.approx(0.0271757822291882, abs=1e-6)
    assert report["rows"] == {"read": 113, "used": 113, "skipped": 0}


def test_json_has_every_figure_with_exact_intervals(tmp_path):
    path = _write(tmp_path, SCORES)
    result = _run(*_base(path, "--score", "radiologist", "--threshold", "0.5", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model = report["overall"]["scores"][0]
    point = model["operating_point"]
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (3, 1, 3, 1)
    assert point["sensitivity"] == {
        "estimate": 0.75, "ci": pytest.approx([0.19412, 0.99369], abs=1e-5),
        "successes": 3, "total": 4,
    }  # fmt: skip
    assert point["f1"] == pytest.approx(0.75)
    assert set(point) >= {"specificity", "ppv", "npv", "accuracy"}
    assert model["auc"] == pytest.approx(13 / 16)
    assert report["by"] is None


def test_skipped_rows_are_counted_and_named(tmp_path):
    text = SCORES + "9,benign,,0.2,A\n10,malignant,high,0.9,B\n11,benign,nan,0.1,A\n"
    path = _write(tmp_path, text)
    result = _run(*_base(path))
    assert result.exit_code == 0, result.output
    assert "11 rows, 8 used (4 positive, 4 negative), 3 skipped" in result.stderr
    assert "line 10, column 'model': missing score" in result.stderr
    assert "line 11, column 'model': not a finite number ('high')" in result.stderr
    assert "line 12" in result.stderr
    report = json.loads(_run(*_base(path, "--json")).stdout)
    assert report["rows"] == {"read": 11, "used": 8, "skipped": 3}
    assert [row["line"] for row in report["skipped"]] == [10, 11, 12]


def test_subgroups_are_reported_per_value(tmp_path):
    path = _write(tmp_path, SCORES)
    result = _run(*_base(path, "--by", "site", "--threshold", "0.5", "--json"))
    assert result.exit_code == 0, result.output
    by = json.loads(result.stdout)["by"]
    assert by["column"] == "site"
    assert [(g["group"], g["n_positive"], g["n_negative"]) for g in by["groups"]] == [
        ("A", 2, 2), ("B", 2, 2),
    ]  # fmt: skip
    table = _run(*_base(path, "--by", "site", "--threshold", "0.5"))
    assert table.exit_code == 0 and "site" in table.stdout


@pytest.mark.parametrize(
    ("text", "extra", "message"),
    [
        (SCORES, ["--score", "missing"], "scores.csv, line 1: no column 'missing'"),
        (SCORES, ["--score", "[risk]"], "no column '[risk]'"),  # printed as is, not markup
        (SCORES.replace("2,benign", "2,"), [], "scores.csv, line 3, column 'outcome': blank"),
        (
            SCORES.replace("2,benign", "2,bengin"),
            ["--negative", "benign"],
            "line 3, column 'outcome': label 'bengin' is neither",
        ),
        ("", [], "empty file"),
        ("outcome,model\n", [], "no data row"),
        ("outcome,model\nmalignant,x\nbenign,\n", [], "every row was skipped"),
    ],
)
def test_bad_input_is_exit_3_naming_file_line_and_column(tmp_path, text, extra, message):
    path = _write(tmp_path, text)
    result = _run(*_base(path, *extra))
    assert result.exit_code == DataError.exit_code == 3, result.output
    assert message in result.stderr


def test_unreadable_files_are_exit_3(tmp_path):
    assert _run(*_base(tmp_path / "absent.csv")).exit_code == 3
    binary = tmp_path / "latin1.csv"
    binary.write_bytes("outcome,model\nmalignant,0.5\nbénin,0.1\n".encode("latin-1"))
    result = _run(*_base(binary))
    assert result.exit_code == 3 and "not UTF-8" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "0.5", "--match-sensitivity", "0.9"], "not both"),
        (["--match-sensitivity", "1.2"], "must be in (0, 1]"),
        (["--score", "model"], "named twice"),
        (["--by", "outcome"], "different columns"),
        (["--table", "csv"], "needs an operating point"),
        (["--table", "markdown", "--threshold", "0.5", "--json"], "--table or --json"),
        (["--roc-plot", "/nonexistent-folder/roc.png"], "does not exist"),
    ],
)
def test_conflicting_options_are_exit_2(tmp_path, extra, message):
    result = _run(*_base(_write(tmp_path, SCORES), *extra))
    assert result.exit_code == UsageError.exit_code == 2, result.output
    assert message in result.stderr


def test_a_mistyped_positive_value_is_exit_2_listing_the_values(tmp_path):
    path = _write(tmp_path, SCORES)
    args = [str(path), "--label", "outcome", "--positive", "Malignant", "--score", "model"]
    result = _run(*args)
    assert result.exit_code == 2
    assert "values: 'benign', 'malignant'" in result.stderr


def test_missing_required_option_is_click_usage_exit_2(tmp_path):
    result = _run(str(_write(tmp_path, SCORES)), "--positive", "malignant", "--score", "model")
    assert result.exit_code == 2


def test_help_documents_every_exit_code():
    result = _run("--help")
    assert result.exit_code == 0
    for code in ("0", "2", "3"):
        assert f"\n{code}  " in METRICS_HELP
    assert "Exit codes" in result.stdout


# ---------------------------------------------------------------- Table 2 layout


@needs_asah
def test_table_figures_equal_the_individual_metrics_calls():
    markers = ("wfns", "s100b", "ndka")
    result = _run(
        str(ASAH), "--label", "outcome", "--positive", "Poor",
        *(arg for m in markers for arg in ("--score", m)),
        "--match-sensitivity", "0.9", "--table", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["score"] for row in rows] == list(markers)
    with ASAH.open(newline="") as handle:
        data = list(csv.DictReader(handle))
    labels = np.array([r["outcome"] == "Poor" for r in data])
    for row in rows:
        scores = np.array([float(r[row["score"]]) for r in data])
        auc = auc_ci(labels, scores, direction="<")
        assert [float(row[k]) for k in ("auc", "auc_ci_low", "auc_ci_high")] == [
            auc.auc, auc.ci_low, auc.ci_high,
        ]  # fmt: skip
        match = threshold_for_sensitivity(labels, scores, target=0.9)
        point = threshold_metrics(labels, scores, threshold=match.threshold)
        assert float(row["threshold"]) == match.threshold and row["positive_if"] == ">="
        assert [int(row[k]) for k in ("tp", "fp", "tn", "fn")] == [
            point.tp, point.fp, point.tn, point.fn,
        ]  # fmt: skip
        for measure in TABLE_MEASURES:
            expected = getattr(point, measure)
            figures = [float(row[measure + suffix]) for suffix in ("", "_ci_low", "_ci_high")]
            assert figures == [expected.estimate, expected.ci_low, expected.ci_high]
        if row["score"] == "wfns":
            assert row["versus"] == "" and row["delong_p"] == ""
        else:
            wfns = np.array([float(r["wfns"]) for r in data])
            test = delong_test(labels, wfns, scores, direction="<")
            assert row["versus"] == "wfns" and float(row["delong_p"]) == test.p_value
    # pROC: roc.test(wfns, s100b) p = 0.0271757822291882; s100b at sensitivity >= 0.9 has
    # specificity 0.2222 (coords).
    s100b = rows[1]
    assert float(s100b["delong_p"]) == pytest.approx(0.0271757822291882, abs=1e-6)
    assert float(s100b["specificity"]) == pytest.approx(0.22222222222222221, abs=1e-9)


def test_markdown_table_has_the_papers_columns(tmp_path):
    path = _write(tmp_path, SCORES)
    options = ["--score", "radiologist", "--threshold", "0.5", "--table", "markdown"]
    result = _run(*_base(path, *options))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| Score"))
    assert header == (
        "| Score | AUC (95% CI) | Threshold | Sensitivity, % (95% CI) | Specificity, % (95% CI) "
        "| Accuracy, % (95% CI) | PPV, % (95% CI) | NPV, % (95% CI) | P vs model |"
    )
    model = next(line for line in lines if line.startswith("| model "))
    # tp 3, fp 1, tn 3, fn 1 at 0.5 (see test_json_has_every_figure_with_exact_intervals).
    assert "| 0.812 (" in model and "| >= 0.5 |" in model and "75.0 (19.4-99.4), 3/4" in model
    assert model.endswith("| reference |")
    radiologist = next(line for line in lines if line.startswith("| radiologist "))
    assert radiologist.rsplit("|", 2)[-2].strip().replace(".", "", 1).isdigit()


def test_table_by_group_and_the_roc_plot(tmp_path):
    path = _write(tmp_path, SCORES)
    png = tmp_path / "roc.png"
    options = ["--score", "radiologist", "--match-sensitivity", "0.75", "--by", "site"]
    result = _run(*_base(path, *options, "--table", "csv", "--roc-plot", str(png)))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["group"], r["score"]) for r in rows] == [
        ("all", "model"), ("all", "radiologist"), ("A", "model"), ("A", "radiologist"),
        ("B", "model"), ("B", "radiologist"),
    ]  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"ROC curves -> {png}" in result.stderr
