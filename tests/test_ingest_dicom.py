"""DICOM ultrasound exports through ``busfed site ingest``: real scanner files from
pydicom-data (GE, Philips, SonoSite, ALOKA; JPEG baseline and lossless, JPEG 2000, RLE,
little and big endian, implicit VR; palette colour, RGB, YBR, 8 and 16 bits), with PHI of
our own written into their headers and pixels.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from client.ingest import dicom, ingest
from client.ingest.run import DICOM_RECORDS
from common.data.manifest import load_site
from common.data.video import read_video

SECRET = b"s" * 32
# PHI written into every file: none of it may appear in any byte of the output.
PHI = {
    "PatientName": "Quixote^Dulcinea",
    "PatientBirthDate": "19610203",
    "InstitutionName": "Hospital Rocinante",
    "ReferringPhysicianName": "Panza^Sancho",
    "OperatorsName": "Carrasco^Sanson",
    "AccessionNumber": "ACC77123",
}
PATIENT = "MRN-4711-0815"
OTHER_PATIENT = "MRN-9090-1212"
# file in SRC -> (pydicom-data file, patient id, label); no suffix on some: the preamble
# is what makes a file DICOM.
GOOD = {
    "philips/ob_palette.dcm": ("OBXXXX1A.dcm", PATIENT, "benign"),
    "philips/ob_rle_2frame": ("OBXXXX1A_rle_2frame.dcm", PATIENT, "benign"),
    "philips/ob_big_endian.dcm": ("OBXXXX1A_expb.dcm", PATIENT, "benign"),
    "philips/jpeg_lossless.dcm": ("JPGLosslessP14SV1_1s_1f_8b.dcm", OTHER_PATIENT, "malignant"),
    "ge/j2k_lossless.dcm": ("US1_J2KR.dcm", OTHER_PATIENT, "malignant"),
    "ge/j2k_lossy.dcm": ("US1_J2KI.dcm", OTHER_PATIENT, "malignant"),
    "sonosite/cine_jpeg": ("color3d_jpeg_baseline.dcm", OTHER_PATIENT, "malignant"),
    "aloka/palette16.dcm": ("gdcm-US-ALOKA-16.dcm", PATIENT, "benign"),
}
BURN_BOX = (slice(2, 20), slice(2, 30))  # rows, columns: outside every tissue region


def _burn(ds: pydicom.Dataset) -> None:
    """Burn a bright block (a name, in a scanner's header) into every frame's corner."""
    pixels = ds.pixel_array.copy()
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels[:, *BURN_BOX] = pixels.max()
    else:
        pixels[BURN_BOX] = pixels.max()
    ds.PixelData = pixels.tobytes()


def _write(src: Path, file: str, name: str, patient: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientID = patient
    ds.add_new(0x00091010, "LO", f"private {PHI['PatientName']}")  # a private tag
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed and syntax.is_little_endian:  # native bytes = the array's
        _burn(ds)
    path = src / file
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom")
    src = root / "src"
    rows = ["file,patient_id,label"]
    for file, (name, patient, label) in GOOD.items():
        _write(src, file, name, patient)
        # The patient id comes from the header: the row leaves it blank.
        rows.append(f"{file},,{label}")
    # Bad files, each for its own reason.
    (src / "bad").mkdir()
    (src / "bad/notes.dcm").write_text(f"not DICOM, {PHI['PatientName']}\n")
    whole = (src / "ge/j2k_lossless.dcm").read_bytes()
    (src / "bad/truncated.dcm").write_bytes(whole[: len(whole) // 2])
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "bad/ct.dcm")
    ds = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"))
    ds.PatientID, ds.BurnedInAnnotation = PATIENT, "YES"  # and no ultrasound region
    ds.save_as(src / "bad/burned_in.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"))
    ds.PatientID = PATIENT
    # Cine loops stored as H.264 inside DICOM: pydicom has no decoder for them.
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(src / "bad/h264.dcm", enforce_file_format=True)
    for bad in ("notes.dcm", "truncated.dcm", "ct.dcm", "burned_in.dcm", "h264.dcm"):
        rows.append(f"bad/{bad},,benign")
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    return root


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ingested(export: Path) -> tuple[Path, object]:
    before = _digest(export / "src")
    out = export / "out"
    report = ingest(
        export / "src", out, secret=SECRET, annotations=export / "annotations.csv",
        boxes=None, key_frames=False,
    )  # fmt: skip
    assert _digest(export / "src") == before, "SRC was written"
    return out, report


def test_every_good_file_arrives_and_every_bad_one_is_named(ingested) -> None:
    out, report = ingested
    reasons = {r.file: r.reason for r in report.rejected}
    assert set(reasons) == {
        "bad/notes.dcm", "bad/truncated.dcm", "bad/ct.dcm", "bad/burned_in.dcm", "bad/h264.dcm"
    }, reasons  # fmt: skip
    assert "not a DICOM file" in reasons["bad/notes.dcm"]
    assert "modality CT is not ultrasound" in reasons["bad/ct.dcm"]
    assert "BurnedInAnnotation" in reasons["bad/burned_in.dcm"]
    assert "MPEG-4 AVC" in reasons["bad/h264.dcm"] or "decode" in reasons["bad/h264.dcm"]
    assert reasons["bad/truncated.dcm"]
    assert report.videos == report.dicom == len(GOOD)
    site = load_site(out)  # what training reads
    assert site.problems == []
    rows = site.rows
    # One pseudonym per PatientID; the vendor from Manufacturer.
    assert len({r.patient_id for r in rows}) == 2
    assert {r.vendor for r in rows} == {
        "Philips Medical Systems", "G.E. Medical Systems", "SonoSite, Inc.", "ALOKA CO., LTD."
    }  # fmt: skip
    frames = sorted(len(read_video(out / r.video)) for r in rows)
    assert frames == [1, 1, 1, 1, 1, 1, 2, 120]  # every frame of the cine and the loop


def test_no_phi_in_any_byte_of_the_output(ingested) -> None:
    out, _ = ingested
    needles = [v.encode() for v in PHI.values()] + [PATIENT.encode(), OTHER_PATIENT.encode()]
    needles += [n.split(b"^")[0] for n in needles if b"^" in n]  # each name alone
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".mp4" for p in files) and (out / DICOM_RECORDS) in files
    for path in files:
        data = path.read_bytes().lower()
        for needle in needles:
            assert needle.lower() not in data, f"{needle!r} in {path}"


def test_pixels_outside_the_tissue_regions_are_black(ingested) -> None:
    out, _ = ingested
    records = json.loads((out / DICOM_RECORDS).read_text())
    cleaned = 0
    for video, record in records.items():
        frames = read_video(out / video).astype(int)
        if not record["regions_kept"]:
            assert record["clean_pixels"].startswith("no ultrasound region")
            continue
        cleaned += 1
        keep = np.zeros(frames.shape[1:], bool)
        for x0, y0, x1, y1 in record["regions_kept"]:
            # A margin of 2 pixels: H.264 blurs the region's edge.
            keep[max(0, y0 - 2) : y1 + 3, max(0, x0 - 2) : x1 + 3] = True
        assert frames[:, ~keep].max() <= 2, (video, record)
        assert frames[:, keep].max() > 50, "the tissue image should be kept"
        assert frames[:, *BURN_BOX].max() <= 2  # the burned-in block is gone
    assert cleaned == 6  # the Philips, SonoSite and ALOKA files have regions; GE's not


def test_the_record_names_rules_regions_and_overlays(ingested) -> None:
    out, _ = ingested
    records = list(json.loads((out / DICOM_RECORDS).read_text()).values())
    by_syntax = {r["transfer_syntax"]: r for r in records}
    assert {
        "JPEG Baseline (Process 1)", "RLE Lossless", "Explicit VR Big Endian",
        "Implicit VR Little Endian", "JPEG 2000 Image Compression",
        "JPEG 2000 Image Compression (Lossless Only)", "Explicit VR Little Endian",
    } <= set(by_syntax)  # fmt: skip
    for record in records:
        assert "Annex E" in record["profile"] and "Clean Pixel Data" in record["profile"]
        assert record["header"].startswith("not written")
    aloka = by_syntax["Implicit VR Little Endian"]
    assert aloka["regions_kept"] == [[32, 24, 335, 415], [336, 24, 639, 415]]
    assert any("grey bar" in o for o in aloka["overlays"])
    ge = by_syntax["JPEG 2000 Image Compression (Lossless Only)"]
    assert any("colour pixels" in o for o in ge["overlays"])  # GE's power Doppler
    cine = by_syntax["JPEG Baseline (Process 1)"]
    assert cine["frames"] == 120 and cine["sop_class"] == "Ultrasound Multi-frame Image Storage"


def test_a_rerun_redoes_nothing(export: Path, ingested) -> None:
    out, _ = ingested
    again = ingest(
        export / "src", out, secret=SECRET, annotations=export / "annotations.csv",
        boxes=None, key_frames=False,
    )  # fmt: skip
    assert again.processed == [] and again.unchanged == len(GOOD)
    assert len(again.rejected) == 5


def test_a_site_can_allow_burned_in_annotation_without_regions(
    export: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(export / "src/bad/burned_in.dcm", src / "burned_in.dcm")
    (tmp_path / "a.csv").write_text("file,patient_id,label\nburned_in.dcm,,benign\n")
    settings = {"secret": SECRET, "annotations": tmp_path / "a.csv", "boxes": None}
    refused = ingest(src, tmp_path / "refused", key_frames=False, **settings)
    assert [r.file for r in refused.rejected] == ["burned_in.dcm"]
    allowed = ingest(src, tmp_path / "allowed", key_frames=False, allow_burned_in=True, **settings)
    assert allowed.rejected == [] and allowed.videos == 1


@pytest.mark.parametrize(
    ("little", "big"),
    [("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"), ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm")],
)
def test_big_and_little_endian_copies_give_the_same_grey_image(little: str, big: str) -> None:
    """The same image in both byte orders (palette colour, 8 and 16 bits) reads alike;
    Philips' big-endian copy holds 8-bit entries in a table that says 16 bits."""
    a, _, _ = dicom.load(Path(get_testdata_file(little)), allow_burned_in=False)
    b, _, _ = dicom.load(Path(get_testdata_file(big)), allow_burned_in=False)
    assert a.max() > 200
    assert np.abs(a.astype(int) - b).max() <= 1
