"""``busfed site ingest``: a hospital export becomes a valid, de-identified, incremental site."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from client.cli import site_app
from client.deid import DARK_LEVEL, pseudonymise
from client.ingest import STATE_FILE, IngestReport, ingest
from common.data.manifest import load_site
from common.data.video import probe_video, read_video
from common.errors import UsageError
from deploy.synth import VENDORS, generate_site

SECRET = b"site-secret-0123456789abcdef"
HEADER_ROWS = VENDORS["vendor-b"].header_rows(64)
BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi-dev"
ANNOTATION_HEADER = (
    "file", "patient_id", "label", "birads", "age", "lesion_size_mm", "vendor", "split",
)  # fmt: skip


def write_avi(path: Path, frames: np.ndarray, **tags: str) -> None:
    """MJPEG AVI, as scanners export, with container metadata ``tags``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        container.metadata.update(tags)
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(frame, format="gray").reformat(format="yuvj420p")
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))


def write_mp4(path: Path, frames: np.ndarray, **tags: str) -> None:
    """MPEG-4 Part 2 in MP4 with container metadata ``tags``."""
    with av.open(str(path), "w", format="mp4") as container:
        container.metadata.update(tags)
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(frame, format="gray").reformat(format="yuv420p")
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))


def write_csv(path: Path, rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def checksums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "site"
    generate_site(out, site="h", patients=4, seed=7, vendor="vendor-b", frames=8, size=64)
    return out


@pytest.fixture
def export(tmp_path: Path, synth: Path) -> dict[str, Path]:
    """A hospital export built from the synthetic site, with names in files and metadata.

    Good files: every synthetic video (MJPEG AVI; one as MP4). Bad: an unreadable file, a
    video without an annotation row, a row with a label outside the schema, a box outside
    the frame, and a row naming a file that is not there.
    """
    src = tmp_path / "export"
    rows = list(csv.DictReader((synth / "manifest.csv").open()))
    boxes = list(csv.DictReader((synth / "boxes.csv").open()))
    annotations: list[tuple] = [ANNOTATION_HEADER]
    box_rows: list[tuple] = [("file", "frame", "x1", "y1", "x2", "y2")]
    for i, row in enumerate(rows):
        frames = read_video(synth / row["video"])
        name = f"2023/DOE_JANE_{i}.avi" if i else "2023/DOE_JANE_0.mp4"
        (write_mp4 if i == 0 else write_avi)(
            src / name if i else _mkdir(src / name),
            frames,
            title="Jane Doe",
            comment="MRN 1234567 born 1970-01-01",
        )
        annotations.append(
            (name, "MRN-" + row["patient_id"], row["label"], row["birads"], row["age"],
             row["lesion_size_mm"], row["vendor"], row["split"])
        )  # fmt: skip
        box_rows += [
            (name, b["frame"], b["x1"], b["y1"], b["x2"], b["y2"])
            for b in boxes
            if b["video"] == row["video"]
        ]
    frames = read_video(synth / rows[0]["video"])
    (src / "2023" / "broken.avi").write_bytes(b"not a video at all")
    annotations.append(("2023/broken.avi", "MRN-9", "benign", "", "", "", "", "train"))
    write_avi(src / "2023" / "unannotated.avi", frames)
    write_avi(src / "2023" / "maybe.avi", frames)
    annotations.append(("2023/maybe.avi", "MRN-8", "maybe", "", "", "", "", "train"))
    write_avi(src / "2023" / "bad_box.avi", frames)
    annotations.append(("2023/bad_box.avi", "MRN-7", "benign", "", "", "", "", "train"))
    box_rows.append(("2023/bad_box.avi", 2, 10, 10, 80, 20))  # x2 = 80 > 64
    annotations.append(("2023/gone.avi", "MRN-6", "benign", "", "", "", "", "train"))
    write_csv(tmp_path / "annotations.csv", annotations)
    write_csv(tmp_path / "boxes.csv", box_rows)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    return {
        "src": src,
        "annotations": tmp_path / "annotations.csv",
        "out": tmp_path / "site",
        "secret": secret,
        "synth": synth,
    }


def _mkdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def good_videos(export: dict[str, Path]) -> int:
    return len(list(csv.DictReader((export["synth"] / "manifest.csv").open())))


def run(export: dict[str, Path], **changes: Any) -> IngestReport:
    options: dict[str, Any] = {
        "secret": SECRET,
        "annotations": export["annotations"],
        "boxes": None,
    }
    options.update(changes)
    return ingest(export["src"], export["out"], key_frames=False, **options)


def test_ingest_writes_a_valid_site_and_lists_every_rejected_file(export):
    report = run(export)

    site = load_site(export["out"])
    assert site.problems == []
    assert len(site.rows) == report.videos == len(report.processed) == good_videos(export)
    reasons = {r.file: r.reason for r in report.rejected}
    assert set(reasons) == {
        "2023/broken.avi",
        "2023/unannotated.avi",
        "2023/maybe.avi",
        "2023/bad_box.avi",
        "2023/gone.avi",
    }
    assert len(report.masks) == report.videos
    assert all(mask.top_rows >= HEADER_ROWS - 3 for mask in report.masks)
    assert reasons["2023/broken.avi"].startswith("unreadable video")
    assert "no row for this file" in reasons["2023/unannotated.avi"]
    assert "annotations.csv line" in reasons["2023/maybe.avi"]
    assert "field label" in reasons["2023/maybe.avi"]
    assert "boxes.csv line" in reasons["2023/bad_box.avi"]
    assert "outside the frame" in reasons["2023/bad_box.avi"]
    assert "not found in SRC" in reasons["2023/gone.avi"]
    # The boxes survived, on the same frames.
    synth = load_site(export["synth"])
    assert sum(map(len, site.boxes.values())) == sum(map(len, synth.boxes.values()))


def test_output_is_deidentified_and_the_sources_untouched(export):
    before = checksums(export["src"])
    run(export)
    assert checksums(export["src"]) == before

    out = export["out"]
    manifest = (out / "manifest.csv").read_text()
    assert "MRN" not in manifest and "DOE" not in manifest and "h-p0" not in manifest
    site = load_site(out)
    assert all(row.patient_id.startswith("pt-") for row in site.rows)
    for path in (out / "videos").iterdir():
        data = path.read_bytes()
        for secret_text in (b"Jane", b"Doe", b"DOE", b"1234567", b"1970"):
            assert secret_text not in data, (path, secret_text)
        with av.open(str(path)) as container:
            assert not {"title", "comment"} & set(container.metadata)
        frames = read_video(path)
        # No stroke of the scanner header (name, ID, date at gray level 210) is left; the
        # codec may bleed a little of the image into the band's last row.
        assert frames[:, : HEADER_ROWS - 2].max() <= DARK_LEVEL
        assert frames[:, :HEADER_ROWS].max() < 100
        assert frames[:, HEADER_ROWS:].mean() > 20
    state = (out / STATE_FILE).read_text()
    assert "DOE" not in state and "MRN" not in state


def test_a_patient_keeps_one_pseudonym_at_a_site_only(export, tmp_path):
    annotations = list(csv.reader(export["annotations"].open()))
    annotations[2][1] = annotations[1][1]  # (another) video of the first patient
    annotations[2][7] = annotations[1][7]
    write_csv(export["annotations"], [tuple(r) for r in annotations])
    run(export)
    rows = load_site(export["out"]).rows
    ours = {row.patient_id for row in rows}
    patients = {r[1] for r in annotations[1:] if "DOE_JANE" in r[0]}
    assert ours == {pseudonymise(patient, SECRET) for patient in patients}

    other = dict(export, out=tmp_path / "other-site")
    run(other, secret=b"another-site-secret-0123456789")
    theirs = {row.patient_id for row in load_site(other["out"]).rows}
    assert not ours & theirs


def test_rerun_processes_only_what_changed(export):
    videos = good_videos(export)
    first = run(export)
    assert len(first.processed) == videos

    again = run(export)
    assert again.processed == [] and again.unchanged == videos
    assert len(again.rejected) == len(first.rejected)

    # Same content, new modification time: re-hashed, not re-processed.
    os.utime(export["src"] / "2023" / "DOE_JANE_1.avi", ns=(1, 1))
    assert run(export).processed == []

    # A box row added above the others shifts their lines, not their content.
    boxes = export["annotations"].parent / "boxes.csv"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join([lines[0], "2023/elsewhere.avi,0,1,1,2,2", *lines[1:]]) + "\n")
    shifted = run(export)
    assert shifted.processed == [] and "not in SRC" in shifted.warnings[0]

    # New content in one video: that one only.
    frames = read_video(export["src"] / "2023" / "DOE_JANE_1.avi")
    write_avi(export["src"] / "2023" / "DOE_JANE_1.avi", frames[::-1].copy())
    changed = run(export)
    assert [p.file for p in changed.processed] == ["2023/DOE_JANE_1.avi"]
    assert changed.unchanged == videos - 1

    # A changed annotation: that file only.
    annotations = list(csv.reader(export["annotations"].open()))
    annotations[3][4] = "93"  # age, written as 90 (HIPAA)
    write_csv(export["annotations"], [tuple(r) for r in annotations])
    changed = run(export)
    assert [p.file for p in changed.processed] == [annotations[3][0]]
    assert 90 in {row.age for row in load_site(export["out"]).rows}

    # A source that left the export: its output goes, nothing is re-processed.
    (export["src"] / annotations[3][0]).unlink()
    gone = run(export)
    assert gone.processed == [] and gone.removed == 1
    assert len(list((export["out"] / "videos").iterdir())) == gone.videos == videos - 1

    # A new secret re-does every file (the pseudonyms change).
    redone = run(export, secret=b"rotated-secret-0123456789abcdef")
    assert len(redone.processed) == videos - 1 and redone.removed == videos - 1


def test_refuses_to_write_into_a_folder_it_does_not_own_or_into_src(export):
    export["out"].mkdir()
    (export["out"] / "manifest.csv").write_text("video\n")
    with pytest.raises(UsageError, match="not written by"):
        run(export)
    with pytest.raises(UsageError, match="overlap"):
        ingest(
            export["src"], export["src"] / "site", secret=SECRET,
            annotations=export["annotations"], boxes=None, key_frames=False,
        )  # fmt: skip


def test_cli_prints_rejections_and_exits_1(export):
    args = [
        "ingest", str(export["src"]), "--out", str(export["out"]),
        "--annotations", str(export["annotations"]), "--secret-file", str(export["secret"]),
    ]  # fmt: skip
    result = CliRunner().invoke(site_app, args, terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "Rejected files" in result.output and "2023/broken.avi" in result.output
    assert "videos in the manifest" in result.output

    export["secret"].chmod(0o644)
    result = CliRunner().invoke(site_app, args, terminal_width=200)
    assert result.exit_code == 2 and "chmod 600" in result.output


def _key_frames(src: Path, synth: Path) -> None:
    """Label folders of PNG key frames, one of odd size, and one image out of place."""
    frames = [read_video(p)[3] for p in sorted((synth / "videos").glob("*.mp4"))]
    for label, frame in zip(("benign", "benign", "malignant", "normal"), frames, strict=False):
        (src / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).convert("RGB").save(src / label / f"{label} ({len(frame)}).png")
    Image.fromarray(frames[0][:63, :63]).save(src / "benign" / "odd.png")
    Image.fromarray(frames[1]).save(src / "stray.png")


def test_key_frames_become_one_frame_videos(tmp_path, synth):
    src = tmp_path / "frames"
    _key_frames(src, synth)
    annotations = tmp_path / "annotations.csv"
    write_csv(annotations, [("file", "patient_id", "age"), ("benign/odd.png", "MRN-5", "40")])

    report = ingest(
        src, tmp_path / "site", secret=SECRET, annotations=annotations, boxes=None,
        key_frames=True,
    )  # fmt: skip

    site = load_site(tmp_path / "site")
    assert site.problems == [] and len(site.rows) == report.videos == 4
    # The annotations list the loose images: stray.png is not one, and is counted.
    assert report.rejected == []
    assert any("1 image(s)" in w and "stray.png" in w for w in report.warnings)
    assert {row.label for row in site.rows} == {"benign", "malignant"}
    assert {row.birads for row in site.rows if row.label == "benign"} >= {"1"}
    for row in site.rows:
        info = probe_video(site.path(row))
        assert info.frames == 1 and info.height % 2 == 0 and info.width % 2 == 0
        assert read_video(site.path(row))[0, :HEADER_ROWS].max() <= DARK_LEVEL
    assert any("count as one patient each" in w for w in report.warnings)


def test_busi_key_frames(tmp_path):
    if not BUSI.is_dir():
        pytest.skip(f"BUSI development images not found at {BUSI}")
    src = tmp_path / "busi"
    for label, count in (("benign", 3), ("malignant", 2), ("normal", 1)):
        (src / label).mkdir(parents=True)
        for image in sorted((BUSI / label).glob("*.png"))[:count]:
            (src / label / image.name).symlink_to(image)  # read in place, never copied
    before = checksums(BUSI / "normal")

    report = ingest(
        src, tmp_path / "site", secret=SECRET, annotations=None, boxes=None, key_frames=True
    )

    site = load_site(tmp_path / "site")
    assert report.rejected == [] and site.problems == [] and len(site.rows) == 6
    assert sorted(row.label for row in site.rows).count("malignant") == 2
    assert [row.birads for row in site.rows].count("1") == 1
    for row in site.rows:
        frames = read_video(site.path(row))
        assert frames.shape[0] == 1 and frames.mean() > 20  # real texture, not blacked out
    assert checksums(BUSI / "normal") == before


def test_key_frames_labelled_by_their_rows_and_each_bad_row_named(tmp_path, synth):
    """Images in one folder, labels in the table; each bad row costs its file(s) only."""
    frame = read_video(sorted((synth / "videos").glob("*.mp4"))[0])[3]  # 64 x 64
    src = tmp_path / "export"
    for name in ("a", "b", "c", "d", "e", "f", "g", "h", "loose", "benign/i", "normal/j"):
        path = src / ("" if "/" in name else "Images") / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(path)
    rows = [
        ("file", "patient_id", "label", "birads", "vendor", "split"),
        ("Images/a.png", "MRN-1", "benign", "3", "ge-logiq7", "train"),  # line 2
        ("Images/b.png", "MRN-1", "malignant", "5", "ge-logiq7", "train"),
        ("Images/c.png", "MRN-2", "maybe", "", "", "train"),  # line 4: unknown label
        ("Images/d.png", "MRN-3", "benign", "", "", "train"),  # box outside the image
        ("Images/e.png", "MRN-4", "benign", "", "", "train"),  # line 6: MRN-4 in two splits
        ("Images/f.png", "MRN-4", "benign", "", "", "test"),  # line 7
        ("Images/g.png", "MRN-5", "benign", "", "", "train"),  # line 8
        ("Images/g.png", "MRN-5", "benign", "", "", "train"),  # line 9: duplicated
        ("Images/h.png", "MRN-6", "", "", "", "train"),  # line 10: no label, no folder
        ("benign/i.png", "MRN-7", "malignant", "", "", "train"),  # line 11: not its folder
        ("normal/j.png", "MRN-8", "normal", "", "", "val"),
    ]
    write_csv(tmp_path / "annotations.csv", rows)
    write_csv(
        tmp_path / "boxes.csv",
        [
            ("file", "frame", "x1", "y1", "x2", "y2"),
            ("Images/a.png", 0, 40, 30, 64, 64),  # touches the border: valid
            ("Images/b.png", 0, 10, 12, 30, 40),
            ("Images/d.png", 0, 10, 10, 65, 20),  # line 4: x2 > width
        ],
    )

    report = ingest(
        src, tmp_path / "site", secret=SECRET, annotations=tmp_path / "annotations.csv",
        boxes=tmp_path / "boxes.csv", key_frames=True,
    )  # fmt: skip

    reasons = {r.file: r.reason for r in report.rejected}
    assert reasons == {
        "Images/c.png": reasons["Images/c.png"],
        "Images/d.png": "boxes.csv line 4, field x2: box outside the frame (x2 = 65, frame "
        "is 64 x 64)",
        "Images/e.png": reasons["Images/e.png"],
        "Images/f.png": reasons["Images/f.png"],
        "Images/g.png": "annotations.csv line 9, field file: annotated twice (lines 8 and 9); "
        "keep one row",
        "Images/h.png": reasons["Images/h.png"],
        "benign/i.png": reasons["benign/i.png"],
    }
    assert reasons["Images/c.png"].startswith("annotations.csv line 4, field label:")
    assert "'maybe'" in reasons["Images/c.png"]
    assert reasons["Images/e.png"].startswith("annotations.csv line 6, field split:")
    assert reasons["Images/f.png"].startswith("annotations.csv line 7, field split:")
    assert reasons["Images/h.png"].startswith("annotations.csv line 10, field label: empty")
    assert reasons["benign/i.png"].startswith("annotations.csv line 11, field label:")
    assert any("Images/loose.png" in w for w in report.warnings)

    site = load_site(tmp_path / "site")
    assert site.problems == [] and len(site.rows) == report.videos == 3
    by_patient = site.patients()
    assert set(by_patient) == {pseudonymise(p, SECRET) for p in ("MRN-1", "MRN-8")}
    one = by_patient[pseudonymise("MRN-1", SECRET)]
    assert sorted((r.label, r.birads, r.vendor) for r in one) == [
        ("benign", "3", "ge-logiq7"),
        ("malignant", "5", "ge-logiq7"),
    ]
    normal = by_patient[pseudonymise("MRN-8", SECRET)][0]
    assert (normal.label, normal.birads, normal.split) == ("benign", "1", "val")
    boxes = sorted(tuple(b[0]) for b in site.boxes.values())
    assert boxes == [(10, 12, 30, 40), (40, 30, 64, 64)]

    # Without annotations, a loose image has nothing to label it: rejected, named.
    alone = ingest(
        src, tmp_path / "alone", secret=SECRET, annotations=None, boxes=None, key_frames=True
    )
    loose = {r.file: r.reason for r in alone.rejected}
    assert alone.videos == 2 and len(loose) == 9
    assert "not in a label folder" in loose["Images/loose.png"]
