"""``busfed pretrain``: the consortium's version 0, trained on public data (no epsilon).

The work is in ``deploy.pretrain``; this module reads the options, makes the synthetic data
set, draws progress, writes the model version folder and registers it in MLflow.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from common.cli import reports_errors
from common.errors import UsageError

if TYPE_CHECKING:
    from deploy.pretrain import Progress

console = Console(highlight=False)

PRETRAIN_HELP = (
    "Train a model centrally on public data: the consortium's starting point (version 0) "
    "for private fine-tuning at the sites, with no privacy budget spent.\n\n"
    "Data: --synthetic N synthesises N patients (sweeps and key frames) into OUT/synthetic; "
    "each --public DIR is a public data set in the site layout (busfed site ingest, for "
    "images: --key-frames). Each data set's train and test splits train the model; its val "
    "split is held out and scored. OUT/model is a model version folder (weights.pt, "
    "model.json): its card names every data set with the SHA-256 of its files, the settings "
    "and the held-out scores. With --tracking-uri it is also registered in MLflow as version "
    "0 of --campaign. Start the federation from it with busfed federation start --init "
    "(or busfed demo --init)."
    "\n\nExit codes:\n0  success\n2  bad usage: a bad option, no data set\n"
    "3  unreadable input: a data set is not a readable site data set, or gives the model "
    "nothing to train on\n6  MLflow could not register the model"
)


@reports_errors
def pretrain_command(
    out: Annotated[Path, typer.Option(help="Folder to write (model/, synthetic/).")],
    model: Annotated[
        str, typer.Option(help="wauve, keyframe2d or detector (as the federation will train).")
    ] = "keyframe2d",
    preset: Annotated[str, typer.Option(help="Model size: tiny or paper.")] = "tiny",
    synthetic: Annotated[
        int, typer.Option(min=0, help="Synthetic patients to generate and train on (0: none).")
    ] = 0,
    public: Annotated[
        list[Path] | None,
        typer.Option(help="A public data set folder in the site layout; repeat for more."),
    ] = None,
    steps: Annotated[
        int,
        typer.Option(min=0, help="Optimiser steps per network (0: the backbone weights as is)."),
    ] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per step.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (peak of the schedule).")] = 1e-3,
    detector_steps: Annotated[
        int | None,
        typer.Option(min=0, help="The detector's own steps (default: --steps)."),
    ] = None,
    detector_lr: Annotated[
        float | None, typer.Option(help="The detector's own learning rate (default: --lr).")
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    seed: Annotated[int, typer.Option(min=0, help="Seeds the weights, batches and data.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 2,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI to register the model at (optional)."),
    ] = None,
    registered_model: Annotated[
        str, typer.Option(help="Registered model name; default busfed-<model>.")
    ] = "",
    campaign: Annotated[
        str, typer.Option(help="The campaign this version 0 starts (an MLflow tag).")
    ] = "",
    trunk: Annotated[
        str,
        typer.Option(
            help="groupnorm (from scratch) or frozen-bn (BatchNorm frozen; needed for, and "
            "implied by, --backbone-weights). The federation's run config trunk must match."
        ),
    ] = "groupnorm",
    backbone_weights: Annotated[
        list[Path] | None,
        typer.Option(
            help="A torchvision ImageNet ResNet-34 (detector) or ResNet-50 (classifiers) "
            "state-dict file, loaded before training; repeat for WAUVE's two networks. "
            "Needs a width-64 preset (paper)."
        ),
    ] = None,
    replace: Annotated[bool, typer.Option(help="Delete a previous OUT first.")] = False,
) -> None:
    import torch

    from common.models.backbone import load_backbone_weights
    from common.models.bundle import build_bundle, bundle_class
    from common.models.loading import save_bundle_dir
    from deploy.pretrain import DataSet, Settings, pretrain, synthesise_public
    from server.tracking import Tracker, model_card

    settings = Settings(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
        detector_steps=detector_steps, detector_lr=detector_lr,
    )  # fmt: skip
    kind = bundle_class(model).kind
    if out.exists() and any(out.iterdir()):
        if not replace:
            raise UsageError(f"{out} is not empty: pass --replace to start again")
        shutil.rmtree(out)
    data_sets = [DataSet(path.name, path, "public") for path in public or []]
    if synthetic:
        with console.status(f"synthesising {synthetic} public patients"):
            generated = synthesise_public(out / "synthetic", patients=synthetic, seed=seed)
        data_sets = generated + data_sets
    if not data_sets and (steps or not backbone_weights):
        raise UsageError("nothing to train on: pass --synthetic N and/or --public DIR")
    if backbone_weights:
        trunk = "frozen-bn"
    torch.set_num_threads(threads)
    bundle = build_bundle(preset, seed=seed, model=kind, trunk=trunk)
    backbones = [load_backbone_weights(bundle, path) for path in backbone_weights or []]
    for backbone in backbones:
        console.print(
            f"  {backbone.arch} weights from {backbone.file} (sha256 {backbone.sha256[:16]}…) "
            f"into {', '.join(backbone.networks)}"
        )
    with pretraining_progress(console) as progress:
        section = pretrain(bundle, data_sets, settings, progress=progress)
    section["backbones"] = [backbone.card() for backbone in backbones]
    card = {**model_card(bundle), "round": 0, "pretraining": section}
    if campaign:
        card["campaign"] = campaign
    save_bundle_dir(bundle, out / "model", card)
    print_pretraining(section, out / "model", console)
    if tracking_uri:
        tracker = Tracker(
            tracking_uri=tracking_uri, artifact_location="",
            registered_model=registered_model or f"busfed-{kind}", run_name="pretrain",
        )  # fmt: skip
        tracker.log_params({"pretrain-" + k: v for k, v in section["settings"].items()})
        tags = {"pretraining": json.dumps(section), "privacy": section["privacy"]}
        if campaign:
            tags["campaign"] = campaign
        version = tracker.register_round(bundle, server_round=0, tags=tags)
        tracker.finish()
        console.print(f"Registered as models:/{version.name}/{version.version}")


@contextmanager
def pretraining_progress(console: Console) -> Iterator[Progress]:
    """A bar per network, with its step loss: the ``progress`` that ``pretrain`` calls."""
    with RichProgress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console,
    ) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def progress(name: str, step: int, total: int, loss: float) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"pretraining {name}", total=total, loss=loss)
            bar.update(tasks[name], completed=step, loss=loss)

        yield progress


def print_pretraining(section: dict[str, Any], folder: Path, console: Console) -> None:
    """What version 0 saw and how it scored on the data sets' held-out splits."""
    for data_set in section["data_sets"]:
        console.print(
            f"  {data_set['kind']} data set {data_set['name']}: {data_set['patients']} patients, "
            f"samples {data_set['samples']}, sha256 {data_set['sha256'][:16]}…"
        )
    for name, result in section["networks"].items():
        held = result["held_out"]
        if "auc" in held:
            low, high = (f"{b:.3f}" if b is not None else "?" for b in held["auc_ci"])
            score = f"held-out AUC {held['auc']:.3f} ({low}-{high}), n={held['n']}"
        elif "recall@0.5" in held:
            score = f"held-out recall@0.5 {held['recall@0.5']:.3f}, AP {held['ap@0.5']:.3f}"
        else:
            score = "no held-out score (no val split with both classes)"
        console.print(
            f"  {name}: {result['samples']} samples, loss {result['loss_first']:.3f} -> "
            f"{result['loss_last_tenth']:.3f}; {score}"
        )
    console.print(
        f"Model version 0 in {folder} ({section['privacy']}); weights "
        f"{section['weights_sha256'][:16]}…"
    )
