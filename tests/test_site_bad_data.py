"""A site with damaged data still trains: bad rows and videos are named, skipped, counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Scalar
from rich.console import Console

from client.site import SiteClient
from common.config import load_site_config
from common.data.manifest import load_site
from common.data.units import build_units
from common.models.bundle import build_bundle, get_weights
from common.models.presets import get_preset
from common.privacy.ledger import LEDGER_FILE
from deploy.demo import DemoSettings, prepare_sites
from tests.faults import damage_site

RUN_CONFIG: dict[str, Scalar] = {
    "preset": "tiny",
    "local-steps": 1,
    "learning-rate": 0.05,
    "seed": 0,
}


@pytest.fixture
def site_config(tmp_path: Path) -> Path:
    settings = DemoSettings(sites=1, patients=4, frames=16, size=64)
    return prepare_sites(tmp_path, settings, Console(quiet=True))[0]


def test_a_site_trains_and_validates_around_damaged_files(site_config: Path) -> None:
    data = site_config.parent / "data"
    clean = load_site(data)
    train_patients = len(clean.patients("train"))
    val_patients = len(clean.patients("val"))
    damage = damage_site(data)

    client = SiteClient(load_site_config(site_config), RUN_CONFIG)
    weights = get_weights(build_bundle("tiny", seed=0))
    update, n, metrics = client.fit(weights, {"round": 1, "campaign": "c1", "run_id": "1"})

    # The round went on with every patient (each kept one readable video): a DP-SGD step
    # per network, spent and signed. (The losses may be NaN: a Poisson-sampled step can
    # draw no patient, and the update is then noise alone.)
    assert n == metrics["n_patients"] == train_patients
    assert metrics["steps"] == 1 and 0 < float(metrics["epsilon"]) < float(
        metrics["epsilon_budget"]
    )
    trained = [json.loads(x) for x in (site_config.parent / "state" / LEDGER_FILE).open()]
    assert [(e["model"], e["status"], e["steps"]) for e in trained] == [
        ("detector", "trained", 1),
        ("classifier", "trained", 1),
    ]
    assert any(not np.array_equal(a, b) for a, b in zip(update, weights, strict=True))
    # Counted: the bad-label row; the cut box row and the box rows of the rejected video;
    # the truncated train video (the val one is not read for training).
    assert (metrics["skipped_rows"], metrics["box_problems"], metrics["skipped_videos"]) == (
        1,
        2,
        1,
    )

    # Named, in the site's activity log, before training started.
    events = [json.loads(line) for line in (site_config.parent / "state" / "events.jsonl").open()]
    assert [e["event"] for e in events] == ["data-skipped", "fit-start", "fit-end"]
    skipped = events[0]
    assert skipped["split"] == "train" and skipped["skipped_videos"] == 1
    problems = "\n".join(skipped["problems"])
    assert f"{damage.train_video} video: not a readable video" in problems
    assert f"manifest.csv:{damage.bad_label_line} label: Input should be" in problems
    assert f"boxes.csv:{damage.cut_box_line} row: 3 fields, the header has 6" in problems
    assert damage.val_video not in problems

    loss, n_val, eval_metrics = client.evaluate(update, {"round": 1})
    assert n_val == val_patients and math.isfinite(loss)
    assert eval_metrics["skipped_videos"] == 1 and eval_metrics["skipped_rows"] == 1
    assert "detector_val_loss" in eval_metrics
    last = json.loads((site_config.parent / "state" / "events.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "data-skipped" and last["split"] == "val"
    assert any(p.startswith(f"{damage.val_video} video:") for p in last["problems"])


def test_a_patient_without_a_readable_video_has_no_unit(site_config: Path) -> None:
    data = site_config.parent / "data"
    site = load_site(data)
    # The demo's first site has one test patient, with one video.
    [[row]] = site.patients("test").values()
    (data / row.video).write_bytes(b"\x00\x00\x00\x18ftypmp42")  # a header, then nothing

    units = build_units(
        site, get_preset("tiny"), split="test", frame_stride=2, max_frames_per_video=4
    )
    assert units.detector == [] and units.classifier == []
    assert [(p.file, p.line, p.field) for p in units.skipped] == [(row.video, 0, "video")]
