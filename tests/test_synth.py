"""Synthetic sites: determinism, file contracts, the risk model, and what the frames show:
lesions, normal tissue, the burned-in header, ribs, sweep speed and direction, TGC and focus,
and the contact sheet."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from common.data.manifest import BOX_COLUMNS
from common.data.video import read_video
from common.errors import UsageError
from common.pipeline.score import categorise
from deploy.cli import app
from deploy.synth import (
    LESION_COLUMNS,
    LOG_ODDS,
    VENDORS,
    Lesion,
    Psf,
    Sweep,
    fake_identity,
    focus_beam,
    generate_site,
    header_band,
    malignancy_probability,
    receive,
    render_sweep,
    sample_lesion,
    speckle_envelope,
    speckle_iq,
)
from deploy.synth.sheet import write_contact_sheet

SMALL: dict[str, Any] = {"patients": 6, "frames": 16, "size": 64}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC, ties counted half."""
    positive, negative = scores[labels], scores[~labels]
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "site-a"
    generate_site(out, site="site-a", seed=7, vendor="vendor-a", **SMALL)
    return out


# ------------------------------------------------------------------ site files


def test_same_seed_gives_identical_files(site: Path, tmp_path: Path) -> None:
    again = tmp_path / "site-a"
    generate_site(again, site="site-a", seed=7, vendor="vendor-a", **SMALL)

    names = sorted(p.relative_to(site) for p in site.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in names:
        assert (site / name).read_bytes() == (again / name).read_bytes(), name


def test_other_seed_or_site_gives_other_videos(site: Path, tmp_path: Path) -> None:
    other_seed = tmp_path / "seed"
    generate_site(other_seed, site="site-a", seed=8, vendor="vendor-a", **SMALL)
    other_site = tmp_path / "site"
    generate_site(other_site, site="site-b", seed=7, vendor="vendor-a", **SMALL)

    video = "site-a-p0000-v1.mp4"
    assert (other_seed / "videos" / video).read_bytes() != (site / "videos" / video).read_bytes()
    assert not np.array_equal(
        read_video(other_site / "videos" / "site-b-p0000-v1.mp4"),
        read_video(site / "videos" / video),
    )


def test_files_follow_the_contract(site: Path) -> None:
    manifest = _rows(site / "manifest.csv")
    boxes = _rows(site / "boxes.csv")
    lesions = _rows(site / "lesions.csv")

    header = (site / "manifest.csv").read_text().splitlines()[0]
    assert header == "video,patient_id,label,birads,age,lesion_size_mm,vendor,split"
    assert (site / "boxes.csv").read_text().splitlines()[0] == "video,frame,x1,y1,x2,y2"
    assert [row["video"] for row in lesions] == [row["video"] for row in manifest]

    per_patient: dict[str, list[dict[str, str]]] = {}
    for row in manifest:
        assert (site / row["video"]).is_file()
        assert row["video"].startswith(f"videos/{row['patient_id']}-v")
        assert row["patient_id"].startswith("site-a-p")
        assert row["label"] in ("benign", "malignant")
        assert row["vendor"] == "vendor-a"
        per_patient.setdefault(row["patient_id"], []).append(row)
    assert len(per_patient) == SMALL["patients"]
    for rows in per_patient.values():
        assert 1 <= len(rows) <= 2
        # Both sweeps of a patient share the lesion, its label and the patient's split.
        assert len({(r["label"], r["birads"], r["age"], r["split"]) for r in rows}) == 1
    splits = [rows[0]["split"] for rows in per_patient.values()]
    assert sorted(set(splits)) == ["test", "train", "val"]

    videos = {row["video"] for row in manifest}
    for box in boxes:
        assert box["video"] in videos
        x1, y1, x2, y2 = (int(box[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= SMALL["size"] and 0 <= y1 < y2 <= SMALL["size"]
        assert 0 <= int(box["frame"]) < SMALL["frames"]


def test_summary_and_progress_match_the_files(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    summary = generate_site(
        tmp_path / "s",
        site="s",
        seed=1,
        vendor="vendor-b",
        progress=lambda done, total: calls.append((done, total)),
        **SMALL,
    )
    manifest = _rows(tmp_path / "s" / "manifest.csv")

    assert summary.n_videos == len(manifest) == len(calls)
    assert calls == [(i + 1, len(manifest)) for i in range(len(manifest))]
    malignant = {row["patient_id"] for row in manifest if row["label"] == "malignant"}
    assert summary.n_malignant == len(malignant)
    assert (summary.site, summary.n_patients, summary.vendor) == ("s", 6, "vendor-b")


def test_videos_hold_the_frames_the_manifest_promises(site: Path) -> None:
    video = read_video(site / "videos" / "site-a-p0000-v1.mp4")

    assert video.shape == (SMALL["frames"], SMALL["size"], SMALL["size"])


def test_labels_agree_with_recorded_features(site: Path) -> None:
    for row, lesion in zip(_rows(site / "manifest.csv"), _rows(site / "lesions.csv"), strict=True):
        if not lesion["shape"]:  # normal tissue, checked in test_normal_sweeps_...
            continue
        features = {k: lesion[k] for k in ("shape", "orientation", "margin", "echo", "posterior")}
        p = float(lesion["p_malignant"])
        assert p == pytest.approx(malignancy_probability(**features), abs=1e-6)
        assert row["birads"] == categorise(p)


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="vendor-a, vendor-b, vendor-c"):
        generate_site(tmp_path / "x", site="x", patients=2, seed=0, vendor="acme")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("")
    with pytest.raises(UsageError, match="not an empty folder"):
        generate_site(tmp_path / "full", site="x", patients=2, seed=0, vendor="vendor-a")
    with pytest.raises(UsageError, match="even size"):
        generate_site(tmp_path / "y", site="x", patients=2, seed=0, vendor="vendor-a", size=63)


# ------------------------------------------------------------------ risk model


@pytest.fixture(scope="module")
def lesions() -> list[Lesion]:
    rng = np.random.default_rng(2024)
    return [sample_lesion(rng) for _ in range(2000)]


def test_suspicious_features_raise_the_malignant_rate(lesions: list[Lesion]) -> None:
    def rate(shape: str, margin: str) -> float:
        group = [x.malignant for x in lesions if x.shape == shape and x.margin == margin]
        assert len(group) >= 20
        return float(np.mean(group))

    assert rate("irregular", "spiculated") > rate("oval", "circumscribed") + 0.5
    assert LOG_ODDS["margin"]["spiculated"] == max(LOG_ODDS["margin"].values())


def test_probability_predicts_the_label(lesions: list[Lesion]) -> None:
    p = np.array([x.p_malignant for x in lesions])
    label = np.array([x.malignant for x in lesions])

    assert _auc(p, label) > 0.75
    assert 0.25 < label.mean() < 0.5
    # Calibrated: the mean probability is the malignant fraction, within sampling error.
    assert abs(p.mean() - label.mean()) < 0.03


def test_birads_category_matches_probability(lesions: list[Lesion]) -> None:
    bounds = {"3": (0, 0.02), "4A": (0.02, 0.10), "4B": (0.10, 0.50), "4C": (0.50, 0.95)}
    for lesion in lesions:
        low, high = bounds.get(lesion.birads, (0.95, 1.0))
        assert low <= lesion.p_malignant <= high
    assert {x.birads for x in lesions} == {"3", "4A", "4B", "4C", "5"}


def test_features_correlate_mildly_with_age_and_size(lesions: list[Lesion]) -> None:
    label = np.array([x.malignant for x in lesions], dtype=float)
    for covariate in ([x.age for x in lesions], [x.size_mm for x in lesions]):
        correlation = np.corrcoef(covariate, label)[0, 1]
        assert 0.05 < correlation < 0.4


# ------------------------------------------------------------------ image content


def _lesion(**features: str) -> Lesion:
    defaults = {
        "shape": "oval",
        "orientation": "parallel",
        "margin": "circumscribed",
        "echo": "hypoechoic",
        "posterior": "none",
    }
    defaults.update(features)
    return Lesion(age=50, size_mm=14.0, p_malignant=0.1, malignant=False, **defaults)


def _area(box: tuple[int, int, int, int]) -> int:
    x1, y1, x2, y2 = box
    return (x2 - x1) * (y2 - y1)


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_hypoechoic_lesion_is_darker_than_its_surroundings(vendor: str) -> None:
    sweep = render_sweep(
        _lesion(), VENDORS[vendor], frames=16, size=64, rng=np.random.default_rng(3)
    )
    widest = max(sweep.boxes, key=lambda t: _area(sweep.boxes[t]))
    x1, y1, x2, y2 = sweep.boxes[widest]
    frame = sweep.frames[widest].astype(float)
    ring = np.zeros(frame.shape, dtype=bool)
    ring[max(0, y1 - 6) : y2 + 6, max(0, x1 - 6) : x2 + 6] = True
    ring[y1:y2, x1:x2] = False

    assert frame[y1:y2, x1:x2].mean() < frame[ring].mean() - 15


def test_lesion_appears_mid_sweep_only() -> None:
    sweep = render_sweep(
        _lesion(), VENDORS["vendor-b"], frames=16, size=64, rng=np.random.default_rng(4)
    )
    visible = sorted(sweep.boxes)

    assert 0 not in sweep.boxes and 15 not in sweep.boxes
    assert 8 in sweep.boxes
    assert visible == list(range(visible[0], visible[-1] + 1))
    widths = [sweep.boxes[t][2] - sweep.boxes[t][0] for t in visible]
    assert max(widths) > widths[0] and max(widths) > widths[-1]


@pytest.mark.parametrize("seed", range(6))
def test_boxes_lie_inside_the_frame(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sweep = render_sweep(sample_lesion(rng), VENDORS["vendor-c"], frames=12, size=48, rng=rng)

    assert sweep.frames.shape == (12, 48, 48) and sweep.frames.dtype == np.uint8
    assert sweep.boxes
    for t, (x1, y1, x2, y2) in sweep.boxes.items():
        assert 0 <= t < 12
        assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48


@pytest.mark.parametrize(("posterior", "sign"), [("shadowing", -1), ("enhancement", 1)])
def test_posterior_features_change_the_column_below(posterior: str, sign: int) -> None:
    def below(features: dict[str, str]) -> float:
        """Mean pixel below the lesion's widest section."""
        sweep = render_sweep(
            _lesion(**features),
            VENDORS["vendor-a"],
            frames=16,
            size=64,
            rng=np.random.default_rng(5),
        )
        t = max(sweep.boxes, key=lambda t: _area(sweep.boxes[t]))
        x1, _, x2, y2 = sweep.boxes[t]
        frame = sweep.frames[t].astype(float)
        return frame[y2 + 2 :, x1:x2].mean()

    difference = below({"posterior": posterior}) - below({})
    assert sign * difference > 10


def test_speckle_envelope_is_rayleigh() -> None:
    psf = Psf.of(VENDORS["vendor-b"], spacing_mm=0.2, step_mm=0.5)
    envelope = speckle_envelope(
        np.ones((16, 96, 96), dtype=np.float32), psf, np.random.default_rng(0)
    ).astype(float)

    # Rayleigh: mean / std = sqrt(pi / (4 - pi)) = 1.913; mean power = amplitude**2.
    assert envelope.mean() / envelope.std() == pytest.approx(1.913, rel=0.05)
    assert (envelope**2).mean() == pytest.approx(1.0, rel=0.05)


def test_consecutive_frames_share_speckle() -> None:
    psf = Psf.of(VENDORS["vendor-a"], spacing_mm=0.3, step_mm=0.5)
    envelope = speckle_envelope(
        np.ones((16, 64, 64), dtype=np.float32), psf, np.random.default_rng(1)
    )

    def correlation(a: int, b: int) -> float:
        return float(np.corrcoef(envelope[a].ravel(), envelope[b].ravel())[0, 1])

    assert correlation(5, 6) > 0.3
    assert abs(correlation(0, 8)) < 0.1


# ------------------------------------------------------------------ normal tissue and files


@pytest.fixture(scope="module")
def mixed_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "mixed"
    generate_site(out, site="site-a", seed=7, vendor="vendor-b", normal_fraction=0.5, **SMALL)
    return out


def test_normal_sweeps_have_no_boxes_and_are_birads_1(mixed_site: Path) -> None:
    manifest = _rows(mixed_site / "manifest.csv")
    lesions = _rows(mixed_site / "lesions.csv")
    boxed = {row["video"] for row in _rows(mixed_site / "boxes.csv")}
    normal = {row["video"] for row in lesions if not row["shape"]}

    assert normal and len(normal) < len(manifest)
    assert boxed == {row["video"] for row in manifest} - normal
    for row, lesion in zip(manifest, lesions, strict=True):
        if row["video"] in normal:
            assert (row["label"], row["birads"], row["lesion_size_mm"]) == ("benign", "1", "")
            assert all(lesion[k] == "" for k in LESION_COLUMNS[1:7])
        else:
            assert row["birads"] != "1" and float(row["lesion_size_mm"]) > 0


def test_normal_fraction_is_honoured_and_checked(tmp_path: Path) -> None:
    summary = generate_site(
        tmp_path / "all", site="n", seed=2, vendor="vendor-c", normal_fraction=1.0, **SMALL
    )

    assert summary.n_normal == SMALL["patients"] and summary.n_malignant == 0
    assert (tmp_path / "all" / "boxes.csv").read_text() == ",".join(BOX_COLUMNS) + "\n"
    with pytest.raises(UsageError, match="normal_fraction"):
        generate_site(
            tmp_path / "x", site="n", patients=2, seed=2, vendor="vendor-c", normal_fraction=1.5
        )


def test_lesions_csv_records_each_sweep(mixed_site: Path) -> None:
    header = (mixed_site / "lesions.csv").read_text().splitlines()[0]
    assert header == ",".join(LESION_COLUMNS)

    directions: dict[str, list[float]] = {}
    for row in _rows(mixed_site / "lesions.csv"):
        assert 0 <= float(row["sweep_direction_deg"]) < 180
        assert abs(float(row["sweep_skew_deg"])) <= 12
        assert float(row["sweep_speed_mm_s"]) > 0
        assert row["rib"] in ("0", "1")
        patient = row["video"].rsplit("-v", 1)[0]
        directions.setdefault(patient, []).append(float(row["sweep_direction_deg"]))
    pairs = [d for d in directions.values() if len(d) == 2]
    assert pairs
    # A second sweep takes the orthogonal view.
    for first, second in pairs:
        assert abs((second - first) % 180 - 90) < 20


# ------------------------------------------------------------------ header band


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_header_band_holds_text_and_boxes_stay_below_it(vendor: str) -> None:
    preset = VENDORS[vendor]
    sweep = render_sweep(_lesion(), preset, frames=16, size=128, rng=np.random.default_rng(3))
    band = sweep.frames[:, : sweep.header_rows]

    assert sweep.header_rows == preset.header_rows(128) >= 22
    # Text at the vendor's level on black, the same in every frame.
    assert (band >= preset.header.level - 10).mean() > 0.05
    assert (band == 0).mean() > 0.5
    assert (band == band[0]).all()
    assert sweep.boxes
    assert all(y1 >= sweep.header_rows for _, y1, _, _ in sweep.boxes.values())


def test_header_prints_a_fake_patient_drawn_from_the_seed() -> None:
    preset = VENDORS["vendor-a"]
    first, again = (fake_identity(np.random.default_rng(5)) for _ in range(2))
    other = fake_identity(np.random.default_rng(6))

    assert first == again and first != other
    assert len(first.patient_id) == 7 and first.last.isalpha() and first.first.isalpha()
    band = header_band(preset, first, size=256)
    assert band.shape == (preset.header_rows(256), 256) and band.dtype == np.uint8
    assert np.array_equal(band, header_band(preset, again, size=256))
    assert not np.array_equal(band, header_band(preset, other, size=256))


def test_site_videos_keep_the_header_and_boxes_below_it(site: Path) -> None:
    rows = VENDORS["vendor-a"].header_rows(SMALL["size"])
    video = read_video(site / "videos" / "site-a-p0000-v1.mp4")

    # The codec blurs the text but keeps it bright on black.
    assert (video[:, :rows] > 180).mean() > 0.03 and (video[:, :rows] < 30).mean() > 0.4
    assert all(int(box["y1"]) >= rows for box in _rows(site / "boxes.csv"))


# ------------------------------------------------------------------ anatomy, sweeps, scanner


def _bottom_column_means(sweep: Sweep, t: int, share: float = 0.3) -> np.ndarray:
    image = sweep.frames[t, sweep.header_rows :].astype(float)
    return image[int((1 - share) * len(image)) :].mean(axis=0)


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_rib_shadow_darkens_the_region_below_the_rib(vendor: str) -> None:
    def sweep(rib: bool) -> Sweep:
        return render_sweep(
            None, VENDORS[vendor], frames=12, size=64, rng=np.random.default_rng(0), rib=rib
        )

    with_rib, without = sweep(True), sweep(False)

    assert with_rib.path.rib and not without.path.rib
    # The darkest columns of the deep field: almost black behind a rib.
    shadowed = np.percentile(_bottom_column_means(with_rib, 6), 10)
    assert shadowed < 15
    assert shadowed < np.percentile(_bottom_column_means(without, 6), 10) - 15


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_faster_sweeps_decorrelate_consecutive_frames(vendor: str) -> None:
    def correlation(step_mm: float) -> float:
        sweep = render_sweep(
            None,
            VENDORS[vendor],
            frames=12,
            size=64,
            rng=np.random.default_rng(1),
            step_mm=step_mm,
            skew_deg=0.0,
            rib=False,
        )
        f = sweep.frames[:, sweep.header_rows :].astype(float)
        return float(
            np.mean([np.corrcoef(f[t].ravel(), f[t + 1].ravel())[0, 1] for t in range(11)])
        )

    slow, medium, fast = (correlation(step) for step in (0.2, 0.6, 1.5))
    assert slow > medium > fast
    assert slow - fast > 0.1


def test_sweep_direction_changes_the_lesion_cross_section() -> None:
    # An oval whose elevation axis is 0.73 of its long axis (geometry seed 2).
    def boxes(direction_deg: float) -> dict[int, tuple[int, int, int, int]]:
        return render_sweep(
            _lesion(),
            VENDORS["vendor-a"],
            frames=24,
            size=64,
            rng=np.random.default_rng(1),
            geometry_rng=np.random.default_rng(2),
            direction_deg=direction_deg,
            step_mm=1.0,
            skew_deg=0.0,
            rib=False,
        ).boxes

    radial, antiradial = boxes(0.0), boxes(90.0)

    # Radial view: the plane holds the long axis, and the probe crosses the short one.
    assert max(b[2] - b[0] for b in radial.values()) > max(b[2] - b[0] for b in antiradial.values())
    assert len(radial) < len(antiradial)


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_tgc_flattens_the_depth_profile_and_the_focus_sharpens_the_beam(vendor: str) -> None:
    preset = VENDORS[vendor]
    rows = 96
    spacing = preset.depth_mm / rows
    iq = speckle_iq(
        np.ones((8, rows, 96), dtype=np.float32),
        Psf.of(preset, spacing_mm=spacing, step_mm=0.5),
        np.random.default_rng(0),
        lateral=False,
    )
    looks = focus_beam(iq, preset, spacing_mm=spacing)
    on, off = (
        receive(looks, preset, spacing_mm=spacing, rng=np.random.default_rng(1), tgc=tgc).astype(
            float
        )
        for tgc in (True, False)
    )
    profile_on, profile_off = on.mean(axis=(0, 2)), off.mean(axis=(0, 2))
    fifth = rows // 5

    # Uniform tissue: without TGC the image darkens with depth, with it it stays level.
    assert profile_off[:fifth].mean() - profile_off[-fifth:].mean() > 50
    assert abs(profile_on[:fifth].mean() - profile_on[-fifth:].mean()) < 25
    assert profile_on.std() < 0.5 * profile_off.std()

    depth = (np.arange(rows) + 0.5) * spacing
    focus = preset.focus_fraction * preset.depth_mm

    def band(centre_mm: float) -> np.ndarray:
        return np.abs(depth - centre_mm) < 2.0

    def lateral_correlation(rows_in: np.ndarray) -> float:
        a, b = on[:, rows_in, :-2].ravel(), on[:, rows_in, 2:].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    # Finer lateral speckle at the focus than near the skin or deep down, and a brighter band.
    at_focus = lateral_correlation(band(focus))
    assert at_focus < lateral_correlation(band(2.5)) - 0.15
    assert at_focus < lateral_correlation(band(preset.depth_mm - 2.5)) - 0.15
    far = focus + 2 * preset.focal_length_mm
    assert profile_on[band(focus)].mean() > profile_on[band(far)].mean() + 5


def test_render_sweep_is_deterministic() -> None:
    first, again = (
        render_sweep(None, VENDORS["vendor-c"], frames=8, size=48, rng=np.random.default_rng(4))
        for _ in range(2)
    )

    assert np.array_equal(first.frames, again.frames) and first.path == again.path


# ------------------------------------------------------------------ contact sheet


def test_contact_sheet_writes_a_png_of_the_expected_size(tmp_path: Path) -> None:
    out = write_contact_sheet(
        tmp_path / "sheet.png",
        seed=0,
        vendors=("vendor-a", "vendor-c"),
        frames_per_vendor=2,
        size=64,
    )

    with Image.open(out) as image:
        assert image.format == "PNG"
        # (frames + 1) * (size + 6) + 6 wide, vendors * (size + 50) + 6 high.
        assert image.size == (3 * 70 + 6, 2 * 114 + 6)
    with pytest.raises(UsageError, match="unknown vendor"):
        write_contact_sheet(tmp_path / "x.png", seed=0, vendors=("acme",))


def test_sheet_command_writes_the_sheet(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["synth-sheet", "--out", str(tmp_path / "s.png"), "--size", "48"]
    )

    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "s.png") as image:
        assert image.size == (7 * 54 + 6, 3 * 98 + 6)


def test_min_per_class_gives_each_class_and_a_defined_validation_auc(tmp_path):
    # hospital-b of the demo (seed 8, vendor-b, 16 patients) drew no malignant patient.
    plain = generate_site(
        tmp_path / "plain", site="hospital-b", patients=16, seed=8, vendor="vendor-b",
        frames=8, size=64,
    )  # fmt: skip
    assert plain.n_malignant == 0
    summary = generate_site(
        tmp_path / "b", site="hospital-b", patients=16, seed=8, vendor="vendor-b",
        frames=8, size=64, min_per_class=3,
    )  # fmt: skip
    assert summary.n_malignant >= 3 and summary.n_patients - summary.n_malignant >= 3
    with (tmp_path / "b" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    val = {r["label"] for r in rows if r["split"] == "val"}
    assert val == {"benign", "malignant"}
    generate_site(
        tmp_path / "b2", site="hospital-b", patients=16, seed=8, vendor="vendor-b",
        frames=8, size=64, min_per_class=3,
    )  # fmt: skip
    assert (tmp_path / "b" / "manifest.csv").read_bytes() == (
        tmp_path / "b2" / "manifest.csv"
    ).read_bytes()
