"""``busfed pretrain``: a version 0 trained on public data, and campaigns that start from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from common.errors import FederationError
from common.models.bundle import build_bundle, fingerprint, get_weights
from common.models.loading import load_bundle_dir, save_bundle_dir
from deploy.cli import app
from deploy.pretrain import PRIVACY_NOTE, folder_sha256
from deploy.synth import generate_site
from server.app import INITIAL_SEED, ResumePoint, initial_model
from server.registry import load_model
from server.tracking import model_card

runner = CliRunner()


@pytest.fixture(scope="module")
def public_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small public data set in the site layout (sweeps with boxes, both classes)."""
    root = tmp_path_factory.mktemp("public") / "atlas"
    generate_site(root, site="atlas", patients=14, seed=3, vendor="vendor-b", frames=12,
                  size=96, min_per_class=3)  # fmt: skip
    return root


def _pretrain(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["pretrain", *args])
    return result.exit_code, result.output


def test_folder_hash_names_the_files_not_the_place(tmp_path: Path, public_site: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(public_site, copy)
    assert folder_sha256(copy) == folder_sha256(public_site)
    manifest = copy / "manifest.csv"
    manifest.write_text(manifest.read_text() + "\n")
    assert folder_sha256(copy) != folder_sha256(public_site)


def test_pretrain_writes_and_registers_a_version_0_that_learned(
    tmp_path: Path, public_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, output = _pretrain(
        "--out", str(tmp_path / "pt"), "--public", str(public_site), "--synthetic", "10",
        "--steps", "40", "--batch-size", "16", "--threads", "1", "--tracking-uri", uri,
        "--campaign", "spring",
    )  # fmt: skip
    assert code == 0, output
    assert PRIVACY_NOTE in " ".join(output.split())  # rich wraps at 80 columns
    bundle, card = load_bundle_dir(tmp_path / "pt" / "model")
    section = card["pretraining"]
    assert card["round"] == 0 and card["campaign"] == "spring" and card["model"] == "keyframe2d"
    assert section["privacy"] == PRIVACY_NOTE
    names = [(d["name"], d["kind"]) for d in section["data_sets"]]
    # The synthetic patients are spread over the generator's three scanner presets.
    assert names == [
        ("synthetic-vendor-a", "synthetic"), ("synthetic-vendor-b", "synthetic"),
        ("synthetic-vendor-c", "synthetic"), ("atlas", "public"),
    ]  # fmt: skip
    assert [d["patients"] for d in section["data_sets"][:3]] == [4, 3, 3]
    assert section["data_sets"][3]["sha256"] == folder_sha256(public_site)
    assert section["settings"] == {
        "steps": 40, "batch_size": 16, "lr": 1e-3, "weight_decay": 1e-4, "seed": 0,
        "detector_steps": None, "detector_lr": None,
    }  # fmt: skip
    result = section["networks"]["keyframe"]
    assert result["samples"] > 10 and result["loss_last_tenth"] < result["loss_first"]
    assert section["weights_sha256"] == fingerprint(get_weights(bundle))
    seeded = build_bundle("tiny", seed=0, model="keyframe2d")
    assert fingerprint(get_weights(seeded)) != section["weights_sha256"]

    registered, info = load_model("models:/busfed-keyframe2d/1", tracking_uri=uri)
    assert info["card"]["campaign"] == "spring" and info["card"]["round"] == 0
    assert json.loads(info["card"]["pretraining"])["weights_sha256"] == section["weights_sha256"]
    for got, want in zip(get_weights(registered), get_weights(bundle), strict=True):
        np.testing.assert_array_equal(got, want)


def test_pretrain_refuses_no_data_and_names_an_unreadable_data_set(tmp_path: Path) -> None:
    code, output = _pretrain("--out", str(tmp_path / "a"))
    assert code == 2 and "nothing to train on" in output
    (tmp_path / "empty").mkdir()
    code, output = _pretrain("--out", str(tmp_path / "b"), "--public", str(tmp_path / "empty"))
    assert code == 3 and "empty" in output
    (tmp_path / "a" / "x").mkdir(parents=True)
    code, output = _pretrain("--out", str(tmp_path / "a"), "--synthetic", "4")
    assert code == 2 and "--replace" in output


def test_a_campaign_starts_from_the_init_model_and_names_it(tmp_path: Path) -> None:
    pretrained = build_bundle("tiny", seed=123, model="keyframe2d")
    folder = tmp_path / "v0"
    save_bundle_dir(pretrained, folder, {**model_card(pretrained), "round": 0})
    config = {"init-model": str(folder), "model": "keyframe2d", "mlflow-tracking-uri": ""}

    initial = initial_model(config, ResumePoint())

    assert initial.bundle is not None and initial.source == str(folder)
    for got, want in zip(get_weights(initial.bundle), get_weights(pretrained), strict=True):
        np.testing.assert_array_equal(got, want)
    # Without init-model: the seeded weights, said so.
    seeded = initial_model({"model": "keyframe2d"}, ResumePoint())
    assert seeded.bundle is None and f"seed {INITIAL_SEED}" in seeded.source
    # A resumed campaign keeps the initial model its versions name.
    resumed = initial_model(
        config,
        ResumePoint(round=2, model_version="2", bundle=pretrained,
                    initial_tags={"initial_model": "v0", "initial_model_sha256": "ab" * 32}),
    )  # fmt: skip
    assert (resumed.source, resumed.sha256, resumed.bundle) == ("v0", "ab" * 32, None)
    with pytest.raises(FederationError, match="is a keyframe2d model, not wauve"):
        initial_model({**config, "model": "wauve"}, ResumePoint())
    with pytest.raises(FederationError, match=r"init-model .*missing.*not found"):
        initial_model({**config, "init-model": str(tmp_path / "missing")}, ResumePoint())


def test_pretrain_packs_imagenet_weights_as_a_frozen_bn_version_0(tmp_path: Path) -> None:
    """--steps 0 with a backbone file: the ImageNet trunk as is, a version 0 naming it."""
    import hashlib

    import torch
    import torchvision

    resnet = torchvision.models.resnet50(weights=None)  # torchvision's key names and shapes
    path = tmp_path / "resnet50-test.pth"
    torch.save(resnet.state_dict(), path)

    code, output = _pretrain(
        "--out", str(tmp_path / "pt"), "--preset", "paper", "--steps", "0",
        "--backbone-weights", str(path), "--threads", "1",
    )  # fmt: skip

    assert code == 0, output
    bundle, card = load_bundle_dir(tmp_path / "pt" / "model")
    assert bundle.trunk == card["trunk"] == "frozen-bn"
    (backbone,) = card["pretraining"]["backbones"]
    assert backbone["backbone_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone["backbone_arch"] == "resnet50" and card["pretraining"]["data_sets"] == []
    torch.testing.assert_close(
        bundle.networks["keyframe"].state_dict()["layer1.0.conv1.weight"],
        resnet.state_dict()["layer1.0.conv1.weight"],
    )
    code, output = _pretrain("--out", str(tmp_path / "none"), "--steps", "0")
    assert code == 2 and "nothing to train on" in output
