"""The 2D key-frame comparator: model, key-frame selection, patient-level DP, site rounds,
registration and ``busfed evaluate``'s three readings.

No Flower processes: a federated round is played by calling two real ``SiteClient.fit``
(real Opacus) and the server's strategy directly; a round over SuperLink and SuperNodes
costs minutes of polling on two cores (see tests/test_federation_e2e.py for WAUVE's).
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from opacus.validators import ModuleValidator
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from client.ingest import ingest
from client.site import SiteClient
from client.train import train_keyframe
from common.config import (
    SiteConfig,
    SiteIdentity,
    SitePrivacy,
    SiteTraining,
    load_site_config,
    render_site_config,
)
from common.data.keyframes import (
    KeyFrameUnit,
    build_keyframe_units,
    direction_difference,
    mode_scores,
    orthogonal_partner,
    read_sweep_directions,
)
from common.data.manifest import load_site
from common.data.video import read_video
from common.errors import ConfigError, DataError, TrackingError, UsageError
from common.geometry import crop_clip, crop_frames, key_frame, roi_frames
from common.keys import create_signing_key
from common.models.bundle import (
    KeyFrameBundle,
    WauveBundle,
    build_bundle,
    fingerprint,
    get_weights,
    set_weights,
)
from common.models.detector import group_norm
from common.models.keyframe import build_keyframe_model
from common.models.loading import load_bundle_dir, save_bundle_dir
from common.models.presets import get_preset
from common.privacy.ledger import LEDGER_FILE
from common.privacy.settings import DPSettings
from deploy.metrics_cli import metrics_app
from deploy.predict_cli import predict_app
from deploy.synth import generate_site
from server.app import INITIAL_SEED, chosen_model
from server.registry import load_model
from server.strategy import TrackedFedAvg
from server.tracking import Tracker, model_card

CPU = torch.device("cpu")
TINY = get_preset("tiny")
SIZE = TINY.keyframe.image_size
SECRET = b"keyframe-site-secret-0123456789"
RUN_CONFIG = {"preset": "tiny", "local-steps": 1, "learning-rate": 0.05, "seed": 0}
KEYFRAME_RUN = {**RUN_CONFIG, "model": "keyframe2d"}
runner = CliRunner()


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ model


def test_paper_model_is_torchvision_resnet50_trunk_with_groupnorm_and_one_logit():
    ours = build_keyframe_model(get_preset("paper").keyframe)
    reference = torchvision.models.resnet50(weights=None, norm_layer=group_norm(32))
    trunk = {k: v for k, v in _shapes(ours).items() if not k.startswith("fc.")}
    assert trunk == {k: v for k, v in _shapes(reference).items() if not k.startswith("fc.")}
    assert (_shapes(ours)["fc.weight"], _shapes(ours)["fc.bias"]) == ((1, 2048), (1,))
    # GroupNorm has BatchNorm's parameters: the trunk is torchvision's resnet50, count for count.
    resnet50 = torchvision.models.resnet50(weights=None)
    assert _n_params(ours) - _n_params(ours.fc) == _n_params(resnet50) - _n_params(resnet50.fc)
    assert _n_params(ours) == 23_510_081
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in ours.modules())


def test_tiny_model_contract_and_opacus_compatibility():
    model = build_keyframe_model(TINY.keyframe).train()
    assert 3e5 < _n_params(model) < 1.5e6
    images = torch.rand(2, 3, SIZE, SIZE)
    features = model.features(images)
    assert features.shape == (2, model.feature_channels, SIZE // 32, SIZE // 32)
    logits = model(images)
    assert logits.shape == (2,)
    torch.testing.assert_close(model.head(features), logits)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_bundles_exchange_and_store_weights_by_network(tmp_path):
    a = build_bundle("tiny", seed=0, model="keyframe2d")
    b = build_bundle("tiny", seed=1, model="keyframe2d")
    assert isinstance(a, KeyFrameBundle) and tuple(a.networks) == a.network_names == ("keyframe",)
    set_weights(b, get_weights(a))
    assert all(np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(b), strict=True))
    wauve = build_bundle("tiny", seed=0)
    assert isinstance(wauve, WauveBundle)
    assert tuple(wauve.networks) == wauve.network_names == ("detector", "classifier")
    with pytest.raises(UsageError, match="for model 'keyframe2d'"):
        set_weights(a, get_weights(wauve))
    with pytest.raises(UsageError, match="known models: detector, keyframe2d, wauve"):
        build_bundle("tiny", seed=0, model="resnet")

    card = model_card(a)
    assert card["model"] == "keyframe2d" and card["keyframe_params"] == _n_params(a.keyframe)
    assert card["keyframe_image_size"] == SIZE and "2D ResNet-50" in card["method"]
    save_bundle_dir(a, tmp_path / "v1", {**card, "round": 3})
    loaded, saved = load_bundle_dir(tmp_path / "v1")
    assert isinstance(loaded, KeyFrameBundle) and saved["round"] == 3
    assert all(
        np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(loaded), strict=True)
    )
    assert not loaded.keyframe.training


def test_the_run_config_chooses_the_model_and_its_registered_name():
    assert chosen_model({"model": "keyframe2d", "registered-model": ""}) == (
        "keyframe2d",
        "busfed-keyframe2d",
    )
    assert chosen_model({"registered-model": ""}) == ("wauve", "busfed-wauve")
    assert chosen_model({"model": "wauve", "registered-model": "mine"}) == ("wauve", "mine")
    with pytest.raises(UsageError, match="unknown model 'i3d'"):
        chosen_model({"model": "i3d"})


# ------------------------------------------------------------------ which frames


def test_key_frame_is_the_largest_box_and_a_still_image_is_its_own():
    boxes = {3: (0, 0, 4, 4), 5: (0, 0, 6, 6), 7: (10, 10, 16, 16), 9: (0, 0, 50, 50)}
    assert key_frame(boxes, 9) == 5  # 9 is past the end; 5 and 7 tie: the earlier
    assert key_frame(boxes, 10) == 9
    assert key_frame({}, 1) == 0 and roi_frames({}, 1) == [0]  # a still read whole
    assert key_frame({}, 30) is None and roi_frames({}, 30) == []  # a sweep without a lesion
    assert roi_frames(boxes, 9) == [3, 5, 7]


def test_two_views_take_the_most_orthogonal_sweep():
    assert direction_difference(10, 100) == 90
    assert direction_difference(170, 10) == 20  # directions are lines: 170 and -10 agree
    directions = {"a": 10.0, "b": 25.0, "c": 95.0}
    assert orthogonal_partner("a", ["a", "b", "c"], directions) == "c"
    assert orthogonal_partner("b", ["a", "b", "c"], directions) == "c"
    assert orthogonal_partner("c", ["a", "b", "c"], directions) == "a"  # 85 > 70
    assert orthogonal_partner("a", ["a", "b", "c"], {}) == "b"  # manifest order
    assert orthogonal_partner("a", ["a"], directions) is None


def test_mode_scores_one_two_and_all_frames():
    rows = [
        SimpleNamespace(video="p1", patient_id="P"),
        SimpleNamespace(video="p2", patient_id="P"),
        SimpleNamespace(video="q1", patient_id="Q"),  # a single sweep
        SimpleNamespace(video="n1", patient_id="Q"),  # normal tissue: no ROI
    ]
    keys = {"p1": 4, "p2": 1, "q1": 0, "n1": None}
    probabilities = {
        "p1": {3: 0.2, 4: 0.6, 5: 0.4},
        "p2": {1: 0.8, 2: 0.5},
        "q1": {0: 0.3},
        "n1": {},
    }
    scores = mode_scores(rows, keys, probabilities, {"p1": 0.0, "p2": 88.0})
    p1, p2, q1, n1 = (scores[v] for v in ("p1", "p2", "q1", "n1"))
    assert (p1.keyframe1, p1.keyframe2, p1.allframes) == pytest.approx((0.6, 0.7, 0.4))
    assert (p1.partner, p1.n_views, p1.n_roi_frames) == ("p2", 2, 3)
    assert (p2.keyframe1, p2.keyframe2, p2.allframes) == pytest.approx((0.8, 0.7, 0.65))
    # One sweep: the second view is missing, keyframe2 is the key frame alone.
    assert (q1.keyframe2, q1.partner, q1.n_views) == (q1.keyframe1, None, 1)
    assert (n1.keyframe1, n1.keyframe2, n1.allframes, n1.n_views) == (None, None, None, 0)


def test_crops_use_the_clip_margin_and_a_box_less_still_is_taken_whole():
    frames = np.full((2, 48, 64), 20, dtype=np.uint8)
    frames[:, 10:30, 20:36] = 230
    box = (20.0, 10.0, 36.0, 30.0)
    crops = crop_frames(frames, [0, 1], {0: box}, SIZE)
    assert crops.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(crops[0, 0], crop_clip(frames, [0], [box], SIZE)[0, 0])
    assert float(crops[0, 0, SIZE // 2, SIZE // 2]) > 0.8 and float(crops[0, 0, 0, 0]) < 0.2
    whole = F.interpolate(
        torch.from_numpy(frames[1:2]).float().div(255)[None],
        size=(SIZE, SIZE),
        mode="bilinear",
        antialias=True,
    )
    torch.testing.assert_close(crops[1, 0], whole[0, 0].clamp(0, 1))


@pytest.fixture(scope="module")
def video_site(tmp_path_factory) -> Path:
    """A synthetic video site; some patients have two sweeps, some none annotated."""
    root = tmp_path_factory.mktemp("kf") / "video-site"
    generate_site(root, site="kf", patients=8, seed=0, vendor="vendor-a", frames=16, size=64)
    return root


def test_key_frames_on_a_synthetic_site(video_site):
    site = load_site(video_site)
    directions = read_sweep_directions(video_site)
    assert set(directions) == {row.video for row in site.rows}  # synth writes every sweep's
    two_sweeps = [rows for rows in site.patients().values() if len(rows) == 2]
    assert two_sweeps, "the synthetic site should have a patient with two sweeps"
    for first, second in two_sweeps:
        assert direction_difference(directions[first.video], directions[second.video]) > 70
    for row in site.rows:
        boxes = site.boxes.get(row.video, {})
        if boxes:
            areas = {f: (b[2] - b[0]) * (b[3] - b[1]) for f, b in boxes.items()}
            assert areas[key_frame(boxes, 16)] == max(areas.values())
    for split in ("train", "val", "test"):
        units = build_keyframe_units(site, TINY, split=split).keyframe
        patients = site.patients(split)
        assert [u.patient_id for u in units] == sorted(patients)
        for unit in units:
            boxed = [r for r in patients[unit.patient_id] if site.boxes.get(r.video)]
            assert unit.images.shape == (len(boxed), 3, SIZE, SIZE)
            assert unit.labels.tolist() == [float(r.label == "malignant") for r in boxed]
            for image, row in zip(unit.images, boxed, strict=True):
                boxes = site.boxes[row.video]
                key = key_frame(boxes, 16)
                frames = read_video(site.path(row))
                expected = crop_clip(frames, [key], [boxes[key]], SIZE)[0, 0]
                torch.testing.assert_close(image[0], expected)


# ------------------------------------------------------------------ patient-level DP


def _units(images_per_patient: list[int]) -> list[KeyFrameUnit]:
    g = torch.Generator().manual_seed(2)
    return [
        KeyFrameUnit(
            f"p{i}",
            images=torch.rand(k, 3, SIZE, SIZE, generator=g),
            labels=torch.full((k,), float(i % 2)),
        )
        for i, k in enumerate(images_per_patient)
    ]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dp_step_at_zero_noise_is_the_mean_of_clipped_patient_gradients():
    torch.manual_seed(0)
    model = build_keyframe_model(TINY.keyframe).train()
    units = _units([1, 2, 3, 0])  # the last patient has no key frame: left out
    grads = []
    for unit in units[:3]:
        reference = copy.deepcopy(model)
        F.binary_cross_entropy_with_logits(reference(unit.images), unit.labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    c = sorted(float(g.norm()) for g in grads)[1]  # the largest is clipped, the smallest not
    before = _flat(model)
    dp = DPSettings.allowing_noise_off(noise_multiplier=0.0, max_grad_norm=c, sample_rate=1.0)
    # Four images per pass: the third patient's images straddle two passes.
    record = train_keyframe(
        model, units, dp=dp, steps=1, lr=1.0, device=CPU,
        generator=torch.Generator().manual_seed(0), secure_rng=False, images_per_pass=4,
    )  # fmt: skip
    expected = -sum(g * min(1.0, c / float(g.norm())) for g in grads) / 3
    torch.testing.assert_close(_flat(model) - before, expected, atol=1e-5, rtol=1e-4)
    assert (record.model, record.privacy_unit, record.n_units, record.steps) == (
        "keyframe", "patient", 3, 1,
    )  # fmt: skip
    assert math.isfinite(record.mean_loss)
    for p in model.parameters():  # Opacus leaves nothing behind
        assert p.grad is None and not hasattr(p, "grad_sample")
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


# ------------------------------------------------------------------ sites


def _png(path: Path, *, lesion: tuple[int, int, int, int] | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = rng.normal(90, 20, (64, 64)).clip(0, 255)
    if lesion is not None:
        x1, y1, x2, y2 = lesion
        image[y1:y2, x1:x2] = 25  # hypoechoic
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def image_site(tmp_path_factory) -> Path:
    """Still key frames sorted by label (BUSI's layout), ingested into a site dataset.

    Patient A has two images; the normal image has no box and is read whole.
    """
    tmp = tmp_path_factory.mktemp("stills")
    src = tmp / "export"
    images = [
        ("malignant/a1.png", "A", "train", (20, 20, 44, 40)),
        ("malignant/a2.png", "A", "train", (16, 24, 40, 44)),
        ("benign/b1.png", "B", "train", (24, 16, 40, 32)),
        ("normal/c1.png", "C", "train", None),
        ("malignant/d1.png", "D", "train", (10, 10, 40, 40)),
        ("benign/e1.png", "E", "val", (20, 20, 30, 36)),
        ("malignant/f1.png", "F", "val", (12, 20, 50, 44)),
    ]
    annotations = [("file", "patient_id", "split")]
    boxes = [("file", "frame", "x1", "y1", "x2", "y2")]
    for seed, (file, patient, split, lesion) in enumerate(images):
        _png(src / file, lesion=lesion, seed=seed)
        annotations.append((file, patient, split))
        if lesion is not None:
            boxes.append((file, "0", *map(str, lesion)))
    for name, rows in (("annotations.csv", annotations), ("boxes.csv", boxes)):
        with (tmp / name).open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    report = ingest(
        src, tmp / "site", secret=SECRET, annotations=tmp / "annotations.csv",
        boxes=tmp / "boxes.csv", key_frames=True,
    )  # fmt: skip
    assert report.rejected == [] and report.videos == len(images)
    return tmp / "site"


def _site_config(folder: Path, data: Path, name: str, *, keyframe: bool = True) -> Path:
    """A site config with every privacy value stated; a [privacy.keyframe] section or not."""
    folder.mkdir(parents=True, exist_ok=True)
    create_signing_key(folder / "keys", site=name)
    model = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    config = SiteConfig(
        site=SiteIdentity(name=name, data=data, state=Path("state"), device="cpu", threads=1),
        privacy=SitePrivacy(
            epsilon_budget=50.0, delta=1e-5, accountant="rdp", require_secure_aggregation=False,
            detector=model, classifier=model, keyframe=model if keyframe else None,
        ),
        training=SiteTraining(frame_stride=4, max_frames_per_video=4, max_local_steps=2),
    )  # fmt: skip
    path = folder / "site.toml"
    path.write_text(render_site_config(config))
    return path


def _ledger(config: Path) -> list[dict[str, object]]:
    path = config.parent / "state" / LEDGER_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_site_init_states_the_comparator_privacy_only_when_asked(tmp_path):
    from client.cli import site_app

    base = [
        "--name", "s", "--data", str(tmp_path), "--epsilon-budget", "8", "--delta", "1e-5",
        "--noise-multiplier", "1.5", "--max-grad-norm", "1.0", "--sample-rate", "0.3",
    ]  # fmt: skip
    for folder, extra in (("plain", []), ("both", ["--keyframe"])):
        result = runner.invoke(site_app, ["init", str(tmp_path / folder), *base, *extra])
        assert result.exit_code == 0, result.output
    assert load_site_config(tmp_path / "plain" / "site.toml").privacy.keyframe is None
    both = load_site_config(tmp_path / "both" / "site.toml").privacy
    assert both.keyframe == both.detector == both.of("keyframe")
    with pytest.raises(ConfigError, match=r"\[privacy\.keyframe\]"):
        load_site_config(tmp_path / "plain" / "site.toml").privacy.of("keyframe")


def test_a_still_image_site_refuses_a_wauve_round(image_site, tmp_path):
    config = _site_config(tmp_path / "site", image_site, "stills")
    client = SiteClient(load_site_config(config), RUN_CONFIG)  # model: wauve by default
    weights = get_weights(build_bundle("tiny", seed=0))
    with pytest.raises(DataError, match=r"cannot train WAUVE .* trains only the keyframe2d"):
        client.fit(weights, {"round": 1, "run_id": "r1"})
    assert _ledger(config) == []  # nothing trained, nothing spent
    assert not (config.parent / "state" / "accountant.json").exists()
    events = (config.parent / "state" / "events.jsonl").read_text()
    assert "fit-refused" in events and "fit-start" not in events


def test_a_site_without_keyframe_privacy_refuses_the_comparator(image_site, tmp_path):
    config = _site_config(tmp_path / "site", image_site, "stills", keyframe=False)
    client = SiteClient(load_site_config(config), KEYFRAME_RUN)
    weights = get_weights(build_bundle("tiny", seed=0, model="keyframe2d"))
    with pytest.raises(ConfigError, match=r"no \[privacy\.keyframe\] section"):
        client.fit(weights, {"round": 1, "run_id": "r1"})
    assert _ledger(config) == []


BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi-dev"


def test_busi_still_images_without_boxes_train_the_comparator(tmp_path):
    """Real ultrasound texture: BUSI images have no boxes, so each is read whole."""
    if not BUSI.is_dir():
        pytest.skip(f"BUSI development images not found at {BUSI}")
    src = tmp_path / "busi"
    for label in ("benign", "malignant"):
        (src / label).mkdir(parents=True)
        for image in sorted((BUSI / label).glob("*.png"))[:3]:
            (src / label / image.name).symlink_to(image)  # read in place, never copied
    annotations = tmp_path / "annotations.csv"
    annotations.write_text("file,split\n" + "".join(
        f"{p.relative_to(src).as_posix()},train\n" for p in sorted(src.rglob("*.png"))
    ))  # fmt: skip
    ingest(
        src, tmp_path / "site", secret=SECRET, annotations=annotations, boxes=None,
        key_frames=True,
    )  # fmt: skip
    units = build_keyframe_units(load_site(tmp_path / "site"), TINY, split="train").keyframe
    assert len(units) == 6 and all(u.images.shape == (1, 3, SIZE, SIZE) for u in units)
    assert all(float(u.images.std()) > 0.05 for u in units)  # texture, not a blank crop
    torch.manual_seed(0)
    record = train_keyframe(
        build_keyframe_model(TINY.keyframe), units, device=CPU, steps=1, lr=0.05,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5),
        generator=torch.Generator().manual_seed(0), secure_rng=True,
    )  # fmt: skip
    assert record.n_units == 6 and record.model == "keyframe"


class _Node(ClientProxy):
    """A node identity as the legacy strategy sees it (no transport behind it is used)."""

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def test_a_keyframe2d_round_of_a_still_image_site_and_a_video_site(
    image_site, video_site, tmp_path, monkeypatch
):
    """Both sites train the comparator from the server's model (real Opacus); the server
    averages and registers a keyframe2d version that ``busfed predict``'s loader reads back."""
    monkeypatch.chdir(tmp_path)  # MLflow may write next to the working directory
    model, registered = chosen_model({"model": "keyframe2d", "registered-model": ""})
    server_bundle = build_bundle("tiny", seed=INITIAL_SEED, model=model)
    initial = get_weights(server_bundle)
    start = fingerprint(initial)  # the campaign's initial model, named in every entry
    configs = {
        "stills": _site_config(tmp_path / "stills", image_site, "stills"),
        "sweeps": _site_config(tmp_path / "sweeps", video_site, "sweeps"),
    }
    results = []
    for name, config in configs.items():
        client = SiteClient(load_site_config(config), KEYFRAME_RUN)
        weights, n_patients, metrics = client.fit(
            initial, {"round": 1, "run_id": "r1", "initial-model": start}
        )
        assert len(weights) == len(initial)
        assert metrics["model"] == "keyframe2d" and math.isfinite(float(metrics["epsilon"]))
        assert "keyframe_loss" in metrics and "detector_loss" not in metrics
        assert [
            (e["model"], e["status"], e["steps"], e["initial_model"]) for e in _ledger(config)
        ] == [("keyframe", "trained", 1, start)]
        loss, n_val, val = client.evaluate(weights, {"round": 1})
        assert n_val >= 1 and "keyframe_val_loss" in val and math.isfinite(loss)
        results.append(
            (_Node(name), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights),
                                 n_patients, metrics))
        )  # fmt: skip
    assert results[0][1].num_examples == 4  # patients A-D: the box-less still of C trains too

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(
        tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"),
        registered_model=registered, run_name="keyframe",
    )  # fmt: skip
    strategy = TrackedFedAvg(
        bundle=server_bundle, tracker=tracker, rounds_log=tmp_path / "rounds.jsonl",
        secure_aggregation=False, campaign="kf",
        version_tags={"initial_model": "seeded", "initial_model_sha256": start},
    )  # fmt: skip
    parameters, _ = strategy.aggregate_fit(1, results, [])
    assert parameters is not None
    sizes = [res.num_examples for _, res in results]
    updates = [parameters_to_ndarrays(res.parameters) for _, res in results]
    mean = [sum(n * u[i] for n, u in zip(sizes, updates, strict=True)) / sum(sizes)
            for i in range(len(initial))]  # fmt: skip
    record = strategy._pending  # flushed when the round's evaluation comes in
    assert record is not None and record.model_version == "1"
    assert "keyframe_loss" in record.metrics

    bundle, info = load_model(f"models:/{registered}/1", tracking_uri=uri)
    assert isinstance(bundle, KeyFrameBundle) and info["card"]["model"] == "keyframe2d"
    assert info["card"]["initial_model_sha256"] == start
    assert info["card"]["keyframe_params"] == _n_params(bundle.keyframe)
    for got, want in zip(get_weights(bundle), mean, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # One registered model holds one model kind.
    with pytest.raises(TrackingError, match="holds keyframe2d versions"):
        tracker.register_round(build_bundle("tiny", seed=0), server_round=2, tags={})


# ------------------------------------------------------------------ busfed evaluate


@pytest.fixture(scope="module")
def keyframe_model_dir(tmp_path_factory) -> Path:
    bundle = build_bundle("tiny", seed=0, model="keyframe2d")
    folder = tmp_path_factory.mktemp("keyframe-model")
    save_bundle_dir(bundle, folder, {**model_card(bundle), "round": 0})
    return folder


def _evaluate(*args: str):
    return runner.invoke(predict_app, ["evaluate", *args])


def test_evaluate_a_keyframe_model_writes_the_three_readings(
    video_site, keyframe_model_dir, tmp_path
):
    site = load_site(video_site)
    wauve = tmp_path / "wauve.csv"  # what `busfed evaluate` of a WAUVE model writes
    with wauve.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "label", "score"])
        for i, row in enumerate(site.rows):
            writer.writerow([row.video, row.label, f"{0.1 + 0.8 * (i % 3) / 2:.3f}"])
    out = tmp_path / "eval"

    result = _evaluate(
        "--model", str(keyframe_model_dir), "--data", str(video_site), "--out", str(out),
        "--split", "all", "--wauve-scores", str(wauve),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["video"] for r in rows] == [row.video for row in site.rows]
    modes = ("score_keyframe1", "score_keyframe2", "score_allframes")
    for r in rows:
        roi = bool(site.boxes.get(r["video"]))
        assert r["no_roi"] == str(not roi)
        assert all((r[m] != "") == roi for m in modes)
        if roi:
            assert all(0.0 <= float(r[m]) <= 1.0 for m in modes)
            assert int(r["n_roi_frames"]) == len(site.boxes[r["video"]])
            if r["n_keyframe2_views"] == "1":
                assert r["score_keyframe2"] == r["score_keyframe1"]
            else:
                partner = next(p for p in rows if p["video"] == r["keyframe2_partner"])
                expected = (float(r["score_keyframe1"]) + float(partner["score_keyframe1"])) / 2
                assert float(r["score_keyframe2"]) == pytest.approx(expected, abs=1e-9)
        assert r["score_wauve"] != ""
    assert any(r["n_keyframe2_views"] == "2" for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"keyframe1", "keyframe2", "allframes"}
    assert metrics["boxes_source"] == "gt" and metrics["model"]["card"]["model"] == "keyframe2d"
    assert metrics["n_no_roi"] == sum(not site.boxes.get(row.video) for row in site.rows)
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # busfed metrics compares WAUVE's score with the three readings, DeLong on the same videos.
    compared = CliRunner().invoke(
        metrics_app,
        [str(out / "scores.csv"), "--label", "label", "--positive", "malignant", "--json",
         *(x for m in ("score_wauve", *modes) for x in ("--score", m))],
    )  # fmt: skip
    assert compared.exit_code == 0, compared.output
    report = json.loads(compared.output)
    assert [s["score"] for s in report["overall"]["scores"]] == ["score_wauve", *modes]
    assert len(report["overall"]["comparisons"]) == 6


def test_evaluate_on_still_images_and_the_refusals(image_site, keyframe_model_dir, tmp_path):
    result = _evaluate(
        "--model", str(keyframe_model_dir), "--data", str(image_site), "--out",
        str(tmp_path / "stills"), "--split", "all",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with (tmp_path / "stills" / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and all(r["no_roi"] == "False" for r in rows)  # the box-less still too
    assert sorted(r["n_keyframe2_views"] for r in rows) == ["1"] * 5 + ["2"] * 2  # patient A

    detector = _evaluate(
        "--model", str(keyframe_model_dir), "--data", str(image_site), "--out",
        str(tmp_path / "x"), "--split", "all", "--boxes", "detector",
    )  # fmt: skip
    assert detector.exit_code == 2 and "has no detector" in detector.stderr
    video = next(image_site.glob("videos/*.mp4"))
    predicted = runner.invoke(
        predict_app,
        ["predict", str(video), "--model", str(keyframe_model_dir), "--out", str(tmp_path / "p")],
    )
    assert predicted.exit_code == 2 and "keyframe2d model" in predicted.stderr
