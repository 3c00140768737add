"""The ``detector`` model: WAUVE's detector alone, trained at key-frame and video sites."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Scalar

from client.ingest import ingest
from client.site import SiteClient
from common.config import load_site_config
from common.models.bundle import (
    DetectorBundle,
    WauveBundle,
    build_bundle,
    get_weights,
    set_weights,
    weight_names,
)
from common.models.loading import load_bundle_dir, save_bundle_dir
from server.tracking import model_card
from tests.test_keyframe import SECRET, _ledger, _site_config

BUSBRA = Path(__file__).parent / "data" / "busbra-sample"
DETECTOR_RUN: dict[str, Scalar] = {
    "preset": "tiny",
    "local-steps": 1,
    "learning-rate": 0.05,
    "seed": 0,
    "model": "detector",
}


def test_detector_weights_are_wauves_detector(tmp_path: Path) -> None:
    alone = build_bundle("tiny", seed=3, model="detector")
    wauve = build_bundle("tiny", seed=0)
    assert isinstance(alone, DetectorBundle) and isinstance(wauve, WauveBundle)
    assert tuple(alone.networks) == alone.network_names == ("detector",)
    # The same tensors under the same names as WAUVE's detector, in the same order.
    names = weight_names(wauve)
    assert weight_names(alone) == [n for n in names if n.startswith("detector.")]
    save_bundle_dir(alone, tmp_path / "v1", {**model_card(alone), "round": 1})
    loaded, card = load_bundle_dir(tmp_path / "v1")
    assert isinstance(loaded, DetectorBundle) and card["model"] == "detector"
    assert card["detector_params"] == sum(p.numel() for p in alone.detector.parameters())
    # A trained detector goes into a WAUVE model, whose classifier is untouched.
    classifier = [w for n, w in zip(names, get_weights(wauve), strict=True) if "classifier." in n]
    state = torch.load(tmp_path / "v1" / "weights.pt", weights_only=True)
    wauve.detector.load_state_dict(state["detector"])
    got = get_weights(wauve)
    for want, have in zip(get_weights(alone), got[: len(weight_names(alone))], strict=True):
        np.testing.assert_array_equal(want, have)
    for want, have in zip(classifier, got[len(weight_names(alone)) :], strict=True):
        np.testing.assert_array_equal(want, have)
    # And back: WAUVE's detector weights are a detector model's.
    set_weights(loaded, got[: len(weight_names(alone))])
    assert all(
        np.array_equal(a, b) for a, b in zip(get_weights(loaded), get_weights(alone), strict=True)
    )


@pytest.fixture(scope="module")
def busbra_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight BUS-BRA patients (the repository's sample) ingested as still key frames with
    their boxes; fold 5 is the validation split."""
    tmp = tmp_path_factory.mktemp("busbra")
    with (BUSBRA / "bus_data.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (BUSBRA / "5-fold-cv.csv").open(newline="") as handle:
        folds = {r["ID"]: r["kFold"] for r in csv.DictReader(handle)}
    cases = sorted({r["Case"] for r in rows}, key=int)
    val_cases = [c for c in cases if any(folds[r["ID"]] == "5" for r in rows if r["Case"] == c)]
    keep = set(val_cases[:3]) | set([c for c in cases if c not in val_cases][:5])
    annotations = [("file", "patient_id", "split")]
    boxes = [("file", "frame", "x1", "y1", "x2", "y2")]
    for r in rows:
        if r["Case"] not in keep:
            continue
        file = f"{r['Pathology']}/{r['ID']}.png"
        (tmp / "export" / r["Pathology"]).mkdir(parents=True, exist_ok=True)
        (tmp / "export" / file).symlink_to((BUSBRA / "Images" / f"{r['ID']}.png").resolve())
        split = "val" if r["Case"] in val_cases else "train"
        annotations.append((file, f"P{r['Case']}", split))
        x, y, w, h = json.loads(r["BBOX"])
        boxes.append((file, "0", str(x), str(y), str(x + w), str(y + h)))
    for name, table in (("annotations.csv", annotations), ("boxes.csv", boxes)):
        with (tmp / name).open("w", newline="") as handle:
            csv.writer(handle).writerows(table)
    report = ingest(
        tmp / "export", tmp / "site", secret=SECRET, annotations=tmp / "annotations.csv",
        boxes=tmp / "boxes.csv", key_frames=True,
    )  # fmt: skip
    assert report.rejected == [] and report.videos == len(annotations) - 1
    return tmp / "site"


def test_a_key_frame_site_trains_and_validates_the_detector(
    busbra_site: Path, tmp_path: Path
) -> None:
    config = _site_config(tmp_path / "site", busbra_site, "busbra", keyframe=False)
    client = SiteClient(load_site_config(config), DETECTOR_RUN)
    initial = get_weights(build_bundle("tiny", seed=0, model="detector"))
    weights, n_patients, metrics = client.fit(initial, {"round": 1, "run_id": "r1"})
    assert n_patients == 5 and metrics["model"] == "detector"
    assert math.isfinite(float(metrics["detector_loss"])) and "classifier_loss" not in metrics
    assert math.isfinite(float(metrics["epsilon"]))
    assert [(e["model"], e["status"], e["steps"]) for e in _ledger(config)] == [
        ("detector", "trained", 1)
    ]
    assert any(not np.array_equal(a, b) for a, b in zip(initial, weights, strict=True))

    loss, n_images, val = client.evaluate(weights, {"round": 1})
    assert math.isfinite(loss)
    assert val["val_patients"] == 3 and n_images == val["val_images"] and n_images >= 3
    assert val["val_boxes"] == val["val_images"]  # one lesion per BUS-BRA image
    recall, ap = float(val["detector_val_recall50"]), float(val["detector_val_ap50"])
    assert 0.0 <= ap <= recall <= 1.0


def test_busfed_evaluate_a_detector_model(busbra_site: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deploy.predict_cli import predict_app

    bundle = build_bundle("tiny", seed=0, model="detector")
    save_bundle_dir(bundle, tmp_path / "model", {**model_card(bundle), "round": 1})
    args = ["evaluate", "--model", str(tmp_path / "model"), "--data", str(busbra_site)]
    result = CliRunner().invoke(
        predict_app, [*args, "--out", str(tmp_path / "out"), "--split", "val"]
    )
    assert result.exit_code == 0, result.output
    assert "recall@0.5" in result.output and "AP@0.5" in result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_patients"] == 3 and metrics["n_boxes"] == metrics["n_images"] >= 3
    assert metrics["bootstrap"] == {"unit": "patient", "resamples": 1000, "seed": 0}
    low, high = metrics["recall_ci95"]
    assert low <= metrics["recall"] <= high
    assert metrics["model"]["card"]["model"] == "detector"
    # The same seed, the same interval.
    again = CliRunner().invoke(
        predict_app, [*args, "--out", str(tmp_path / "again"), "--split", "val"]
    )
    assert again.exit_code == 0
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["recall_ci95"] == [
        low,
        high,
    ]
    refused = CliRunner().invoke(
        predict_app, [*args, "--out", str(tmp_path / "x"), "--split", "val", "--boxes", "gt"]
    )
    assert refused.exit_code != 0 and "not for a detector model" in refused.output


def test_a_video_site_trains_the_detector_on_its_frames(tmp_path: Path) -> None:
    from deploy.synth import generate_site

    data = tmp_path / "video-site"
    generate_site(data, site="v", patients=6, seed=0, vendor="vendor-a", frames=16, size=64)
    config = _site_config(tmp_path / "site", data, "sweeps", keyframe=False)
    client = SiteClient(load_site_config(config), DETECTOR_RUN)
    initial = get_weights(build_bundle("tiny", seed=0, model="detector"))
    weights, n_patients, metrics = client.fit(initial, {"round": 1, "run_id": "r1"})
    assert n_patients >= 1 and math.isfinite(float(metrics["detector_loss"]))
    assert [e["model"] for e in _ledger(config)] == ["detector"]
    _, n_images, val = client.evaluate(weights, {"round": 1})
    # Frames every 4th (the config's stride), at most 4 a video: boxed or not, all count.
    assert n_images == val["val_images"] > 0 and "detector_val_loss" in val
