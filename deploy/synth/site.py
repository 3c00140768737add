"""Writing a synthetic site: patients drawn from ``(seed, site)``, their sweeps rendered,
and the files a site dataset holds.

``generate_site`` writes ``videos/*.mp4``, ``manifest.csv`` and ``boxes.csv`` (through
``common.data.manifest.write_manifest``, the writer ``busfed site ingest`` uses) and
``lesions.csv``: the lexicon features and ``p_malignant`` behind each label, and each
sweep's direction, skew, speed and rib. Every draw comes from a ``numpy.random``
stream derived from ``(seed, site)`` by ``numpy.random.SeedSequence``, so the same
arguments give the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.manifest import NORMAL_BIRADS, write_csv, write_manifest
from common.data.video import write_video
from common.errors import UsageError
from deploy.synth.anatomy import Anatomy, sample_anatomy
from deploy.synth.lesion import Lesion, sample_age, sample_lesion
from deploy.synth.scanner import PatientIdentity, fake_identity, vendor_preset
from deploy.synth.sweep import check_frames, render_sweep


@dataclass(frozen=True)
class SiteSummary:
    """What ``generate_site`` wrote; ``n_malignant`` and ``n_normal`` count patients."""

    site: str
    n_patients: int
    n_videos: int
    n_malignant: int
    vendor: str
    n_normal: int


LESION_COLUMNS = (
    "video",
    "shape",
    "orientation",
    "margin",
    "echo",
    "posterior",
    "p_malignant",
    "sweep_direction_deg",
    "sweep_skew_deg",
    "sweep_speed_mm_s",
    "rib",
)


@dataclass(frozen=True)
class _Patient:
    """Everything drawn once per patient; each sweep draws the rest from its own stream."""

    patient_id: str
    age: int
    lesion: Lesion | None
    anatomy: Anatomy
    identity: PatientIdentity
    geometry_seq: np.random.SeedSequence
    sweeps: list[tuple[float, np.random.SeedSequence]]  # image-plane direction, stream


def generate_site(
    out: Path,
    *,
    site: str,
    patients: int,
    seed: int,
    vendor: str,
    frames: int = 32,
    size: int = 128,
    fps: int = 10,
    progress: Callable[[int, int], None] | None = None,
    normal_fraction: float = 0.15,
    min_per_class: int = 0,
) -> SiteSummary:
    """Write a synthetic site dataset into ``out``.

    Parameters
    ----------
    out : Path
        Folder to create; it must not exist or be empty. Receives ``videos/<id>.mp4``
        (``<id>`` is ``<site>-p<NNNN>-v<k>``), ``manifest.csv``, ``boxes.csv`` and
        ``lesions.csv``.
    site : str
        Site name; prefixes patient ids and, with ``seed``, seeds every draw.
    patients : int
        Number of patients (>= 1); each has 1 or 2 sweeps, the second in the orthogonal
        view (radial, then antiradial). Patients are split about 70/15/15 into
        train/val/test (at least one each from 3 patients).
    seed : int
        Non-negative seed; the same arguments give byte-identical files.
    vendor : str
        A key of ``VENDORS``.
    frames, size, fps : int
        Frames per video, frame height and width in pixels, frame rate.
    progress : callable, optional
        Called as ``progress(done, total)`` after each video is written.
    normal_fraction : float
        Share of patients, in expectation, with no lesion: their sweeps show normal tissue,
        have no boxes, and are labelled ``benign`` with BI-RADS ``1``; their rows of
        ``lesions.csv`` leave the lesion columns empty, as ``manifest.csv`` leaves
        ``lesion_size_mm``.
    min_per_class : int
        At least this many malignant and this many benign patients (0: whatever the draws
        give; 16 patients gave no malignant one at some seeds); with 1 or more, the
        validation split also holds a patient of each class, so a site's validation AUC is
        defined. Patients are redrawn, in a seeded order, until it holds.

    Returns
    -------
    SiteSummary

    Raises
    ------
    UsageError
        Unknown vendor, a bad count, size or fraction, or a non-empty ``out``.
    """
    preset = vendor_preset(vendor)
    if patients < 1 or seed < 0 or fps < 1 or not 0 <= normal_fraction <= 1:
        raise UsageError(
            f"need patients >= 1, seed >= 0, fps >= 1 and 0 <= normal_fraction <= 1, "
            f"got {patients}, {seed}, {fps} and {normal_fraction}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder")
    if min_per_class < 0 or 2 * min_per_class > patients:
        raise UsageError(f"need 0 <= 2 * min_per_class <= patients, got {min_per_class}")
    check_frames(frames, size)

    # Python's hash() is salted per process; a digest of the name is stable.
    site_key = int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "little")
    streams = np.random.SeedSequence([seed, site_key]).spawn(patients + 1)
    splits = _assign_splits(patients, np.random.default_rng(streams[-1]))
    plans = [
        _plan_patient(f"{site}-p{index:04d}", stream, normal_fraction)
        for index, stream in enumerate(streams[:-1])
    ]
    if min_per_class:
        redraws = np.random.SeedSequence([seed, site_key, 1])
        plans = _balance_classes(plans, min_per_class, redraws, normal_fraction)
        splits = _val_holds_both(splits, [_is_malignant(p) for p in plans])
    total = sum(len(plan.sweeps) for plan in plans)

    (out / "videos").mkdir(parents=True, exist_ok=True)
    manifest: list[tuple] = []
    box_rows: list[tuple] = []
    lesion_rows: list[tuple] = []
    for plan, split in zip(plans, splits, strict=True):
        lesion = plan.lesion
        for k, (direction, sweep_seq) in enumerate(plan.sweeps, start=1):
            video = f"videos/{plan.patient_id}-v{k}.mp4"
            sweep = render_sweep(
                lesion,
                preset,
                frames=frames,
                size=size,
                rng=np.random.default_rng(sweep_seq),
                geometry_rng=np.random.default_rng(plan.geometry_seq),
                anatomy=plan.anatomy,
                identity=plan.identity,
                direction_deg=direction,
            )
            write_video(out / video, sweep.frames, fps=fps)
            manifest.append(
                (
                    video,
                    plan.patient_id,
                    "malignant" if lesion is not None and lesion.malignant else "benign",
                    lesion.birads if lesion is not None else NORMAL_BIRADS,
                    plan.age,
                    f"{lesion.size_mm:.1f}" if lesion is not None else "",
                    vendor,
                    split,
                )
            )
            box_rows.extend((video, t, *box) for t, box in sorted(sweep.boxes.items()))
            features = (
                (
                    lesion.shape,
                    lesion.orientation,
                    lesion.margin,
                    lesion.echo,
                    lesion.posterior,
                    f"{lesion.p_malignant:.6f}",
                )
                if lesion is not None
                else ("",) * 6
            )
            path = sweep.path
            lesion_rows.append(
                (
                    video,
                    *features,
                    f"{path.direction_deg:.1f}",
                    f"{path.skew_deg:.1f}",
                    f"{path.step_mm * fps:.2f}",
                    int(path.rib),
                )
            )
            if progress is not None:
                progress(len(manifest), total)

    write_manifest(out, manifest, box_rows)
    write_csv(out / "lesions.csv", LESION_COLUMNS, lesion_rows)
    return SiteSummary(
        site=site,
        n_patients=patients,
        n_videos=total,
        n_malignant=sum(p.lesion is not None and p.lesion.malignant for p in plans),
        vendor=vendor,
        n_normal=sum(p.lesion is None for p in plans),
    )


def _plan_patient(
    patient_id: str, stream: np.random.SeedSequence, normal_fraction: float
) -> _Patient:
    """Draw a patient: lesion or none, anatomy, identity, and the directions of her sweeps."""
    patient_seq, geometry_seq, anatomy_seq, identity_seq, *sweep_seqs = stream.spawn(6)
    rng = np.random.default_rng(patient_seq)
    lesion = None if rng.random() < normal_fraction else sample_lesion(rng)
    age = lesion.age if lesion is not None else sample_age(rng)
    n_sweeps = 1 + int(rng.random() < 0.5)
    # A second sweep takes the orthogonal view, as in the clinic (radial then antiradial,
    # or transverse then sagittal), held within a few degrees.
    first = rng.uniform(0, 180)
    directions = [first + 90 * k + rng.normal(0, 5) for k in range(n_sweeps)]
    return _Patient(
        patient_id=patient_id,
        age=age,
        lesion=lesion,
        anatomy=sample_anatomy(np.random.default_rng(anatomy_seq), age=age),
        identity=fake_identity(np.random.default_rng(identity_seq)),
        geometry_seq=geometry_seq,
        sweeps=list(zip(directions, sweep_seqs[:n_sweeps], strict=True)),
    )


def _is_malignant(plan: _Patient) -> bool:
    return plan.lesion is not None and plan.lesion.malignant


def _balance_classes(
    plans: list[_Patient], need: int, redraws: np.random.SeedSequence, normal_fraction: float
) -> list[_Patient]:
    """Redraw patients of the larger class, from the last one back, until each class has
    ``need`` patients; each redraw takes the next stream of ``redraws``."""
    plans = list(plans)
    for wanted in (True, False):
        for index in reversed(range(len(plans))):
            if sum(_is_malignant(p) == wanted for p in plans) >= need:
                break
            if _is_malignant(plans[index]) == wanted:
                continue
            for _ in range(10_000):  # about one draw in three is malignant
                (stream,) = redraws.spawn(1)
                plan = _plan_patient(plans[index].patient_id, stream, normal_fraction)
                if _is_malignant(plan) == wanted:
                    plans[index] = plan
                    break
    return plans


def _val_holds_both(splits: list[str], malignant: list[bool]) -> list[str]:
    """Swap a training patient into validation for any class validation lacks."""
    splits = list(splits)
    for wanted in (True, False):
        val = [i for i, s in enumerate(splits) if s == "val"]
        if not val or any(malignant[i] == wanted for i in val):
            continue
        train = [i for i, s in enumerate(splits) if s == "train" and malignant[i] == wanted]
        if train:
            # The validation patient swapped out is of the other class; keep one of it.
            splits[train[0]], splits[val[-1]] = "val", "train"
    return splits


def _assign_splits(patients: int, rng: np.random.Generator) -> list[str]:
    """Patient-level train/val/test split, about 70/15/15, shuffled."""
    n_val = n_test = max(1, round(0.15 * patients)) if patients >= 3 else 0
    splits = ["val"] * n_val + ["test"] * n_test
    splits += ["train"] * (patients - len(splits))
    return [splits[i] for i in rng.permutation(patients)]
