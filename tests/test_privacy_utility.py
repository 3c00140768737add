"""The privacy-utility harness on the BUS-BRA sample: every output, and its epsilon arithmetic."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.models.bundle import build_bundle
from common.models.loading import save_bundle_dir
from common.privacy.accountant import SiteAccountant

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "benchmarks" / "privacy_utility.py"
SAMPLE = ROOT / "tests" / "data" / "busbra-sample"


def _harness():
    sys.path.insert(0, str(HARNESS.parent))
    try:
        spec = importlib.util.spec_from_file_location("privacy_utility", HARNESS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["privacy_utility"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(HARNESS.parent))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    ("epsilon", "delta", "q", "steps"), [(1.0, 1 / 86, 0.1, 20), (8.0, 1 / 490, 0.05, 40)]
)
def test_the_calibrated_sigma_spends_the_epsilon_asked_for(epsilon, delta, q, steps):
    sigma = _harness().calibrated_sigma(epsilon=epsilon, delta=delta, sample_rate=q, steps=steps)
    spent = SiteAccountant().epsilon_if(delta, [(sigma, q, steps)])
    assert spent <= epsilon
    # the smallest such sigma: 1 % less noise spends more than asked
    assert SiteAccountant().epsilon_if(delta, [(sigma * 0.99, q, steps)]) > epsilon


def test_the_sample_gives_the_table_the_csv_and_the_plot(tmp_path):
    arrays = tmp_path / "busbra.npz"
    result = run(
        "--busbra", str(SAMPLE), "--size", "64", "--save-arrays", str(arrays),
        "--folds", "1,2", "--arms", "central,dp-eps8", "--models", "keyframe-crop,detector",
        "--out", str(tmp_path / "a"), "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # each arm's time is printed as it ends, so that runs can be sized
    assert result.stdout.count("fold 1 ") == 4 and result.stdout.count("fold 2 ") == 4
    with (tmp_path / "a" / "privacy_utility.csv").open() as handle:
        rows = {(r["model"], r["arm"]): r for r in csv.DictReader(handle)}
    assert len(rows) == 4
    with (SAMPLE / "5-fold-cv.csv").open() as handle:
        fold_images = sum(1 for r in csv.DictReader(handle) if r["kFold"] in ("1", "2"))
    for (model, arm), row in rows.items():
        assert int(row["n"]) == fold_images and row["folds"] == "2"  # both test folds, pooled
        sites = ("logiq7", "logiq5", "toshiba-usystems")
        epsilons = [float(row[f"eps_{site}"]) for site in sites]
        if arm == "dp-eps8":
            assert all(7.5 < e <= 8.0 for e in epsilons), row  # sigma to 0.5 %
        else:
            assert all(np.isinf(epsilons)), row
        if model == "detector":
            assert 0 <= float(row["recall_iou50"]) <= 1 and 0 <= float(row["ap_iou50"]) <= 1
            assert row["auc"] == ""
        else:
            low, auc, high = (float(row[k]) for k in ("auc_low", "auc", "auc_high"))
            assert 0 <= low <= auc <= high <= 1
            assert float(row["sensitivity"]) >= 0.9
    table = (tmp_path / "a" / "privacy_utility.md").read_text()
    assert "preset tiny" in table and "| keyframe-crop | dp-eps8 |" in table
    assert (tmp_path / "a" / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the array file holds the same data: a second run reads it, not the folder
    again = run(
        "--arrays", str(arrays), "--folds", "1", "--arms", "federated",
        "--models", "keyframe-whole", "--out", str(tmp_path / "b"), "--threads", "1",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "44 images of 24 patients" in again.stdout
    assert "| keyframe-whole | federated |" in again.stdout

    # --init: every arm starts from a model version; "start" scores it untrained, at ε 0
    start = build_bundle("tiny", seed=5, model="keyframe2d")
    save_bundle_dir(start, tmp_path / "v0", {"preset": "tiny", "round": 0})
    init = run(
        "--arrays", str(arrays), "--folds", "1", "--arms", "start", "--models", "keyframe-crop",
        "--init", str(tmp_path / "v0"), "--out", str(tmp_path / "c"), "--threads", "1",
    )  # fmt: skip
    assert init.returncode == 0, init.stderr[-3000:]
    with (tmp_path / "c" / "privacy_utility.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["arm"] == "start" and float(row["eps_logiq7"]) == 0.0


def test_an_unknown_arm_is_refused_by_name(tmp_path):
    result = run("--busbra", str(SAMPLE), "--arms", "central,dp-eps2", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "dp-eps2" in result.stderr
