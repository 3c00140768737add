"""BUS-BRA into sites: ``benchmarks/busbra.py`` then ``busfed site ingest --key-frames``.

On the 44-image sample (``tests/data/busbra-sample``): the converter's CSVs, ingested through
the real CLI, give sites whose patients, labels, boxes and splits are BUS-BRA's own, and
whose boxes reach the detector's targets and the key-frame crops.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from client.cli import site_app
from client.deid import keyed_hash, pseudonymise
from client.ingest import ingest
from common.data.keyframes import build_keyframe_units
from common.data.manifest import load_site
from common.data.units import build_units
from common.data.video import probe_video, read_video
from common.geometry import crop_frames
from common.models.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "busbra-sample"
CONVERTER = ROOT / "benchmarks" / "busbra.py"
SECRET = b"busbra-site-secret-0123456789"
SITES = {"logiq7": ("GE Logiq 7",), "logiq5": ("GE Logiq 5",),
         "toshiba-usystems": ("Toshiba", "U-Systems")}  # fmt: skip
VENDORS = {"GE Logiq 7": "ge-logiq7", "GE Logiq 5": "ge-logiq5",
           "Toshiba Aplio 300": "toshiba-aplio300", "U-Systems": "u-systems"}  # fmt: skip
TEST_FOLD, VAL_FOLD = 1, 2
TINY = get_preset("tiny")


def convert(busbra: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CONVERTER), "--busbra", str(busbra), "--out", str(out), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def ingest_site(busbra: Path, csvs: Path, out: Path, secret: Path) -> tuple[int, str]:
    args = [
        "ingest", str(busbra), "--key-frames", "--out", str(out), "--secret-file", str(secret),
        "--annotations", str(csvs / "annotations.csv"), "--boxes", str(csvs / "boxes.csv"),
    ]  # fmt: skip
    result = CliRunner().invoke(site_app, args, terminal_width=200)
    return result.exit_code, result.output


def video_of(file: str) -> str:
    """The output name ingest gives a source file (a keyed hash of its path)."""
    return f"videos/{keyed_hash(SECRET, 'file', file)[:24]}.mp4"


def edges(bbox: str) -> tuple[int, int, int, int]:
    x, y, w, h = json.loads(bbox)
    return x - 1, y - 1, x + w, y + h


def busbra_rows(busbra: Path) -> list[dict[str, str]]:
    with (busbra / "5-fold-cv.csv").open() as handle:
        folds = {r["ID"]: r["kFold"] for r in csv.DictReader(handle)}
    with (busbra / "bus_data.csv").open() as handle:
        return [{**r, "kFold": folds[r["ID"]]} for r in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, secret: Path) -> dict[str, Path]:
    """The sample converted by scanner (fold 1 test, fold 2 val) and each site ingested."""
    tmp = tmp_path_factory.mktemp("busbra")
    args = ("--by-scanner", "--test-fold", str(TEST_FOLD), "--val-fold", str(VAL_FOLD))
    result = convert(SAMPLE, tmp / "csv", *args)
    assert result.returncode == 0, result.stderr
    assert "44/44 boxes equal the mask's bounding box within 1 px" in result.stdout
    out = {}
    for site in SITES:
        code, output = ingest_site(SAMPLE, tmp / "csv" / site, tmp / site, secret)
        # Images of the other scanners and the masks are not this site's: counted, not lost.
        assert code == 0 and "Rejected" not in output, output
        assert "in no label folder and not in annotations.csv" in output
        out[site] = tmp / site
    return out


def test_each_scanner_site_has_busbras_patients_labels_boxes_and_splits(sites):
    rows = busbra_rows(SAMPLE)
    for site, devices in SITES.items():
        expected = {video_of(f"Images/{r['ID']}.png"): r for r in rows
                    if r["Device"].startswith(devices)}  # fmt: skip
        data = load_site(sites[site])
        assert data.problems == []
        assert {row.video for row in data.rows} == set(expected)
        for row in data.rows:
            source = expected[row.video]
            split = {str(TEST_FOLD): "test", str(VAL_FOLD): "val"}.get(source["kFold"], "train")
            assert row.patient_id == pseudonymise(source["Case"], SECRET)
            assert (row.label, row.birads, row.split) == (
                source["Pathology"], source["BIRADS"], split,
            )  # fmt: skip
            assert row.vendor == next(
                v for d, v in VENDORS.items() if source["Device"].startswith(d)
            )
            assert data.boxes[row.video] == {0: edges(source["BBOX"])}
        assert len(data.patients()) == len({expected[v]["Case"] for v in expected})
    # Case 2 has images of both breasts: one patient, two images.
    logiq7 = load_site(sites["logiq7"]).patients()
    assert len(logiq7[pseudonymise("2", SECRET)]) == 2
    assert sum(len(load_site(path).rows) for path in sites.values()) == len(rows) == 44


def test_the_box_reaches_the_detector_targets_and_the_key_frame_crops(sites):
    data = load_site(sites["logiq7"])
    patient = pseudonymise("2", SECRET)
    ours = sorted(data.patients()[patient], key=lambda row: row.video)
    assert {row.split for row in ours} == {"train"}  # fold 5

    units = build_units(data, TINY, split="train", frame_stride=1, max_frames_per_video=1)
    detector = next(u for u in units.detector if u.patient_id == patient)
    size = TINY.detector.image_size
    for row, target in zip(ours, detector.targets, strict=True):
        info = probe_video(data.path(row))  # odd sizes were padded: the boxes did not move
        scale = np.array([size / info.width, size / info.height] * 2)
        expected = np.array(data.boxes[row.video][0]) * scale
        np.testing.assert_allclose(target["boxes"].numpy()[0], expected, rtol=1e-5)

    keyframes = build_keyframe_units(data, TINY, split="train")
    unit = next(u for u in keyframes.keyframe if u.patient_id == patient)
    assert unit.labels.tolist() == [0.0, 0.0]  # benign
    crop_size = TINY.keyframe.image_size
    for row, image in zip(ours, unit.images, strict=True):
        box = data.boxes[row.video][0]
        frames = read_video(data.path(row))
        torch.testing.assert_close(image, crop_frames(frames, [0], {0: box}, crop_size)[0])
        whole = crop_frames(frames, [0], {}, crop_size)[0]
        assert (image - whole).abs().max() > 0.1  # a crop around the lesion, not the image


def test_converter_takes_the_mask_box_reports_fold_splits_and_ingest_rejects_the_leak(
    tmp_path,
):
    """A BBOX its mask contradicts, and a patient across two folds (test and train)."""
    busbra = tmp_path / "BUSBRA"
    busbra.mkdir()
    for name in ("Images", "Masks"):
        shutil.copytree(SAMPLE / name, busbra / name)
    rows = busbra_rows(SAMPLE)
    data = [{k: v for k, v in r.items() if k != "kFold"} for r in rows]
    bad = next(i for i, r in enumerate(data) if r["ID"] == "bus_0002-l")
    data[bad]["BBOX"] = "[1,1,5,5]"
    with (busbra / "bus_data.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    with (SAMPLE / "5-fold-cv.csv").open() as handle:
        folds = list(csv.DictReader(handle))
    for fold in folds:
        if fold["ID"] == "bus_0002-r":
            fold["kFold"] = str(TEST_FOLD)  # bus_0002-l stays in fold 5: train
    with (busbra / "5-fold-cv.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(folds[0]))
        writer.writeheader()
        writer.writerows(folds)

    result = convert(busbra, tmp_path / "csv", "--test-fold", str(TEST_FOLD))
    assert result.returncode == 0, result.stderr
    assert f"bus_data.csv line {bad + 2}, field BBOX" in result.stdout
    assert "43/44 boxes equal" in result.stdout
    assert "Case 2: images in folds 1, 5" in result.stdout
    with Image.open(SAMPLE / "Masks" / "mask_0002-l.png") as mask:
        ys, xs = np.nonzero(np.asarray(mask.convert("L")))
    mask_box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    with (tmp_path / "csv" / "boxes.csv").open() as handle:
        written = next(r for r in csv.DictReader(handle) if r["file"].endswith("0002-l.png"))
    assert [int(written[c]) for c in ("x1", "y1", "x2", "y2")] == mask_box

    report = ingest(
        busbra, tmp_path / "site", secret=SECRET, key_frames=True,
        annotations=tmp_path / "csv" / "annotations.csv", boxes=tmp_path / "csv" / "boxes.csv",
    )  # fmt: skip
    # Both of the patient's images, named by their annotation rows; nothing else lost.
    assert {r.file: r.reason.split(":")[0] for r in report.rejected} == {
        "Images/bus_0002-l.png": f"annotations.csv line {bad + 2}, field split",
        "Images/bus_0002-r.png": f"annotations.csv line {bad + 3}, field split",
    }
    assert len(load_site(tmp_path / "site").rows) == report.videos == 42


def test_without_a_test_fold_the_split_is_left_to_ingest(tmp_path):
    result = convert(SAMPLE, tmp_path / "csv")
    assert result.returncode == 0, result.stderr
    with (tmp_path / "csv" / "annotations.csv").open() as handle:
        annotations = list(csv.DictReader(handle))
    assert len(annotations) == 44 and {r["split"] for r in annotations} == {""}
    assert {r["label"] for r in annotations} == {"benign", "malignant"}
    assert convert(SAMPLE, tmp_path / "x", "--val-fold", "2").returncode == 2


def test_the_demo_federates_ingested_sites_read_in_place(sites, tmp_path):
    """``busfed demo --data-from``: one hospital per ingested site, its data not copied."""
    from rich.console import Console

    from common.config import load_site_config
    from common.errors import UsageError
    from deploy.demo import DemoSettings, prepare_sites, real_sites

    root = next(iter(sites.values())).parent  # the three sites, beside the converter's csv/
    assert [p.name for p in real_sites(root)] == sorted(SITES)
    settings = DemoSettings(sites=3, data_from=root, model="keyframe2d")
    configs = prepare_sites(tmp_path / "demo", settings, Console(file=None, quiet=True))
    for path, name in zip(configs, sorted(SITES), strict=True):
        config = load_site_config(path)
        assert config.site.name == name
        assert config.site.data == sites[name].resolve()
        assert not (path.parent / "data").exists()  # read in place, nothing copied
    two = tmp_path / "two"
    for name in sorted(SITES)[:2]:
        shutil.copytree(sites[name], two / name)
    with pytest.raises(UsageError, match=r"needs 3 to 5 site datasets .* found 2"):
        real_sites(two)
