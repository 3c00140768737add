"""Site validation: every bad row is reported with file, 1-based line and field, and skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import site_app
from common.data.manifest import Problem, Split, load_site
from common.errors import DataError
from deploy.synth import generate_site

SIZE, FRAMES = 64, 16


@pytest.fixture(scope="module")
def good_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "site"
    generate_site(
        out, site="site-m", patients=8, seed=3, vendor="vendor-c", frames=FRAMES, size=SIZE
    )
    return out


@pytest.fixture
def site(good_site: Path, tmp_path: Path) -> Path:
    """A copy of the good site that a test may damage."""
    return Path(shutil.copytree(good_site, tmp_path / "site"))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _set(lines: list[str], line: int, column: str, value: str) -> None:
    """Set one cell; ``line`` is the 1-based file line, as problems report it."""
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(column)] = value
    lines[line - 1] = ",".join(cells)


def _cell(lines: list[str], line: int, column: str) -> str:
    return lines[line - 1].split(",")[lines[0].split(",").index(column)]


def _where(problems: list[Problem]) -> set[tuple[str, int, str]]:
    return {(p.file, p.line, p.field) for p in problems}


def _validate(path: Path, *args: str):
    return CliRunner().invoke(site_app, ["validate", str(path), *args])


def test_good_site_loads_without_problems(good_site: Path) -> None:
    manifest = _lines(good_site / "manifest.csv")
    boxes = _lines(good_site / "boxes.csv")

    data = load_site(good_site)

    assert data.problems == []
    assert [row.video for row in data.rows] == [line.split(",")[0] for line in manifest[1:]]
    assert sum(len(frames) for frames in data.boxes.values()) == len(boxes) - 1
    assert all(info.frames == FRAMES and info.width == SIZE for info in data.videos.values())
    first = data.rows[0]
    assert data.path(first).is_file()
    assert first.label in ("benign", "malignant") and first.age is not None

    splits: tuple[Split, ...] = ("train", "val", "test")
    by_split = {split: data.patients(split) for split in splits}
    assert sum(len(p) for p in by_split.values()) == len(data.patients()) == 8
    assert all(row.split == split for split in splits for row in data.videos_of(split))


def test_good_site_cli_exits_0(good_site: Path) -> None:
    result = _validate(good_site)

    assert result.exit_code == 0, result.output
    assert "0 problems" in result.output


def test_every_corruption_is_reported_and_good_rows_still_load(site: Path) -> None:
    manifest_path, boxes_path = site / "manifest.csv", site / "boxes.csv"
    manifest, boxes = _lines(manifest_path), _lines(boxes_path)
    n_rows = len(manifest) - 1
    patients = [_cell(manifest, line, "patient_id") for line in range(2, n_rows + 2)]
    # A patient with two videos, to move one of them to another split.
    twin = next(p for p in patients if patients.count(p) == 2)
    twin_lines = [line for line in range(2, n_rows + 2) if patients[line - 2] == twin]
    label_line, missing_line, corrupt_line, age_line = [
        line for line in range(2, n_rows + 2) if line not in twin_lines
    ][:4]

    _set(manifest, label_line, "label", "cancer")
    _set(manifest, age_line, "age", "forty")
    split = _cell(manifest, twin_lines[1], "split")
    _set(manifest, twin_lines[1], "split", "test" if split != "test" else "train")
    _write(manifest_path, manifest)
    (site / _cell(manifest, missing_line, "video")).unlink()
    corrupt = site / _cell(manifest, corrupt_line, "video")
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    bad_videos = {
        _cell(manifest, line, "video")
        for line in (label_line, missing_line, corrupt_line, age_line, *twin_lines)
    }
    box_line = next(
        line for line in range(2, len(boxes) + 1) if _cell(boxes, line, "video") not in bad_videos
    )
    _set(boxes, box_line, "x2", str(SIZE + 10))
    _write(boxes_path, boxes)

    data = load_site(site)

    where = _where(data.problems)
    expected = {
        ("manifest.csv", label_line, "label"),
        ("manifest.csv", missing_line, "video"),
        ("manifest.csv", corrupt_line, "video"),
        ("manifest.csv", age_line, "age"),
        ("manifest.csv", twin_lines[0], "split"),
        ("manifest.csv", twin_lines[1], "split"),
        ("boxes.csv", box_line, "x2"),
    }
    assert expected <= where
    # Apart from those, only the summaries of skipped boxes of the rejected videos.
    assert all(
        p.field == "video" and "skipped" in p.reason
        for p in data.problems
        if (p.file, p.line, p.field) not in expected
    )
    reasons = {(p.line, p.field): p.reason for p in data.problems if p.file == "manifest.csv"}
    assert "cancer" in reasons[label_line, "label"]
    assert "file not found" in reasons[missing_line, "video"]
    assert "not a readable video" in reasons[corrupt_line, "video"]
    assert "forty" in reasons[age_line, "age"]
    assert twin in reasons[twin_lines[0], "split"]

    assert len(data.rows) == n_rows - len(bad_videos)
    assert {row.video for row in data.rows}.isdisjoint(bad_videos)
    # Every surviving video with box rows keeps its boxes (normal sweeps have none).
    boxed = {_cell(boxes, line, "video") for line in range(2, len(boxes) + 1)}
    assert set(data.boxes) == {row.video for row in data.rows} & boxed
    good_boxes = [
        line for line in range(2, len(boxes) + 1) if _cell(boxes, line, "video") not in bad_videos
    ]
    assert sum(len(frames) for frames in data.boxes.values()) == len(good_boxes) - 1

    result = _validate(site)
    assert result.exit_code == 1
    assert f"{n_rows - len(bad_videos)} rows ok, {len(data.problems)} problems" in result.output
    assert "manifest.csv" in result.output and "boxes.csv" in result.output
    assert "forty" in result.output and "cancer" in result.output

    result = _validate(site, "--json")
    assert result.exit_code == 1
    reported = json.loads(result.output)
    assert reported["rows_ok"] == n_rows - len(bad_videos)
    assert [Problem(**p) for p in reported["problems"]] == data.problems


def test_row_level_problems(site: Path) -> None:
    manifest_path = site / "manifest.csv"
    manifest = _lines(manifest_path)
    _set(manifest, 2, "birads", "7")
    _set(manifest, 3, "video", "../elsewhere.mp4")
    _set(manifest, 4, "split", "holdout")
    _set(manifest, 5, "patient_id", "")
    manifest.insert(5, "")  # a blank line: skipped, but it still counts as a line
    manifest.append(manifest[-1])  # the same video twice
    manifest.append("videos/x.mp4,p,benign")  # too few fields
    _write(manifest_path, manifest)

    data = load_site(site)

    n = len(manifest)
    assert {
        ("manifest.csv", 2, "birads"),
        ("manifest.csv", 3, "video"),
        ("manifest.csv", 4, "split"),
        ("manifest.csv", 5, "patient_id"),
        ("manifest.csv", n - 1, "video"),
        ("manifest.csv", n, "row"),
    } <= _where(data.problems)
    reasons = {(p.file, p.line): p.reason for p in data.problems}
    assert reasons["manifest.csv", 5] == "empty"
    assert f"line {n - 2}" in reasons["manifest.csv", n - 1]
    assert "3 fields" in reasons["manifest.csv", n]


def test_box_level_problems(site: Path) -> None:
    boxes_path = site / "boxes.csv"
    boxes = _lines(boxes_path)
    video = _cell(boxes, 2, "video")
    _set(boxes, 2, "x1", "99")  # x1 >= x2
    _set(boxes, 3, "y2", "abc")
    _set(boxes, 4, "frame", str(FRAMES))  # one past the last frame
    _set(boxes, 5, "y1", "-1")
    boxes.append(boxes[5])  # a second box for the frame of line 6
    boxes.append("videos/unknown.mp4,0,1,1,5,5")
    boxes.append("videos/unknown.mp4,1,1,1,5,5")
    _write(boxes_path, boxes)

    data = load_site(site)

    n = len(boxes)
    assert _where(data.problems) == {
        ("boxes.csv", 2, "x1"),
        ("boxes.csv", 3, "y2"),
        ("boxes.csv", 4, "frame"),
        ("boxes.csv", 5, "y1"),
        ("boxes.csv", n - 2, "frame"),
        ("boxes.csv", n - 1, "video"),
    }
    reasons = {p.line: p.reason for p in data.problems}
    assert "past the video's end" in reasons[4]
    assert "outside the frame" in reasons[5]
    assert "first on line 6" in reasons[n - 2]
    assert reasons[n - 1].startswith("2 box rows")
    assert video in data.boxes


def test_without_video_checks_only_existence_is_checked(site: Path) -> None:
    manifest = _lines(site / "manifest.csv")
    (site / _cell(manifest, 2, "video")).unlink()
    corrupt = site / _cell(manifest, 3, "video")
    corrupt.write_bytes(b"garbage")

    data = load_site(site, check_videos=False)

    assert _where(data.problems) >= {("manifest.csv", 2, "video")}
    assert ("manifest.csv", 3, "video") not in _where(data.problems)
    assert data.videos == {}


def test_missing_boxes_file_is_one_problem(site: Path) -> None:
    (site / "boxes.csv").unlink()

    data = load_site(site)

    assert data.problems == [
        Problem("boxes.csv", 0, "file", "not found: the videos have no lesion boxes")
    ]
    assert data.rows and data.boxes == {}


def test_unreadable_manifest_raises_and_cli_exits_3(site: Path) -> None:
    manifest = _lines(site / "manifest.csv")
    _write(site / "manifest.csv", [manifest[0].replace("label", "diagnosis"), *manifest[1:]])

    with pytest.raises(DataError, match=r"missing required column.*label"):
        load_site(site)
    assert _validate(site).exit_code == 3

    (site / "manifest.csv").write_bytes(b"video,patient_id,label,split\n\xff\xfe,x,y,z\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_site(site)

    (site / "manifest.csv").unlink()
    with pytest.raises(DataError, match="manifest not found"):
        load_site(site)
    result = _validate(site, "--json")
    assert result.exit_code == 3
    assert json.loads(result.output)["exit_code"] == 3


def test_cli_exits_2_for_a_missing_folder(tmp_path: Path) -> None:
    result = _validate(tmp_path / "nowhere")

    assert result.exit_code == 2
    assert "no such folder" in result.output


def test_cli_help_documents_exit_codes() -> None:
    result = CliRunner().invoke(site_app, ["validate", "--help"])

    assert result.exit_code == 0
    for code in ("0  no problems", "1  problems found", "2  bad usage", "3  the manifest"):
        assert code in result.output
