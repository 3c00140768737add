"""Local patient-level DP-SGD training of the detector, the classifier and the key-frame model.

All use ``client.dp.run_dp_sgd``; they differ only in how a sampled patient's gradient
is computed:

* detector: Opacus cannot give per-sample gradients for Faster R-CNN (its RoI heads see
  one row per RoI, not per image), so each sampled patient gets its own backward pass;
* classifier and key-frame model (``train_per_sample``): one forward and backward over the
  sampled patients' clips or key-frame crops through Opacus' ``GradSampleModule`` gives
  per-sample gradients, summed per patient.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn
from torchvision.models.detection import FasterRCNN

from client.dp import MechanismRecord, run_dp_sgd
from common.data.keyframes import KeyFrameUnit
from common.data.units import ClassifierUnit, DetectorUnit
from common.errors import UsageError
from common.privacy.settings import DPSettings


def train_detector(
    model: FasterRCNN,
    units: list[DetectorUnit],
    *,
    dp: DPSettings,
    steps: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
    secure_rng: bool,
    frames_per_pass: int = 8,
) -> MechanismRecord:
    """Train the detector in place with ``steps`` DP-SGD steps, privacy unit = patient.

    A patient's loss is the mean over its frames of the sum of Faster R-CNN's four losses.
    Its frames go through the model ``frames_per_pass`` at a time (to bound memory), each
    pass weighted by its share of the frames; within a pass, Faster R-CNN normalises its
    losses over the pass' sampled anchors and RoIs, which equals the per-frame mean when
    every frame contributes as many samples (the usual case).

    Parameters
    ----------
    model : FasterRCNN
        From ``build_detector``; moved to ``device`` and left in train mode.
    units : list of DetectorUnit
        One per patient.
    dp : DPSettings
        sigma, C and the patient sampling rate q.
    steps : int
        Noisy steps to take.
    lr : float
        SGD learning rate (no momentum).
    device : torch.device
    generator : torch.Generator
        Without ``secure_rng``, the source of the Poisson draws and of the noise seed.
        Faster R-CNN's own anchor and RoI sampling uses torch's global RNG.
    secure_rng : bool
        Draw the patients and the noise from a CSPRNG (``client.dp.run_dp_sgd``); False
        only for tests and benchmarks.
    frames_per_pass : int
        Frames per forward pass; only memory and speed depend on it.

    Returns
    -------
    MechanismRecord
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def per_patient_gradients(sampled: list[int]) -> tuple[list[torch.Tensor], list[float]]:
        rows = [p.new_zeros((len(sampled), *p.shape)) for p in params]
        losses = []
        for row, index in enumerate(sampled):
            unit = units[index]
            n_frames = len(unit.images)
            loss_value = 0.0
            for start in range(0, n_frames, frames_per_pass):
                images = [im.to(device) for im in unit.images[start : start + frames_per_pass]]
                targets = [
                    {k: v.to(device) for k, v in t.items()}
                    for t in unit.targets[start : start + frames_per_pass]
                ]
                loss = sum(model(images, targets).values()) * (len(images) / n_frames)
                loss.backward()
                loss_value += float(loss.detach())
            for p, rows_p in zip(params, rows, strict=True):
                if p.grad is not None:
                    rows_p[row] = p.grad
                p.grad = None
            losses.append(loss_value)
        return rows, losses

    return run_dp_sgd(
        "detector",
        params,
        len(units),
        per_patient_gradients,
        dp=dp,
        steps=steps,
        lr=lr,
        device=device,
        generator=generator,
        secure_rng=secure_rng,
    )


def train_classifier(
    model: nn.Module,
    units: list[ClassifierUnit],
    *,
    dp: DPSettings,
    steps: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
    secure_rng: bool,
    clips_per_pass: int = 32,
    views: int = 1,
) -> MechanismRecord:
    """Train the classifier in place with ``steps`` DP-SGD steps, privacy unit = patient.

    A patient's loss is the mean binary cross-entropy over its clips. Patients without
    clips are left out: they cannot change the gradient, and dropping them only changes
    ``n_units`` (and so the divisor q N), not the privacy guarantee.

    The model is wrapped in Opacus' ``GradSampleModule`` ("hooks" mode) for the training
    and unwrapped at the end: its hooks are removed, its state_dict keys are unchanged.

    Parameters
    ----------
    model : nn.Module
        From ``build_classifier``: FloatTensor[B, 3, T, H, W] -> logits FloatTensor[B].
        Moved to ``device``.
    units : list of ClassifierUnit
        One per patient.
    dp, steps, lr, device, generator, secure_rng
        As for ``train_detector``.
    clips_per_pass : int
        Clips per forward pass; only memory and speed depend on it.
    views : int
        Augmentation multiplicity (``train_per_sample``); 1: the clips as cut.

    Returns
    -------
    MechanismRecord
        ``n_units`` counts the patients with at least one clip.
    """
    return train_per_sample(
        "classifier",
        model,
        [(u.clips, u.labels) for u in units],
        dp=dp,
        steps=steps,
        lr=lr,
        device=device,
        generator=generator,
        secure_rng=secure_rng,
        samples_per_pass=clips_per_pass,
        views=views,
    )


def train_keyframe(
    model: nn.Module,
    units: list[KeyFrameUnit],
    *,
    dp: DPSettings,
    steps: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
    secure_rng: bool,
    images_per_pass: int = 64,
    views: int = 1,
) -> MechanismRecord:
    """Train the key-frame model in place with ``steps`` DP-SGD steps, privacy unit = patient.

    As ``train_classifier``, with a patient's key-frame crops in place of its clips: a
    patient's loss is the mean binary cross-entropy over its images, and patients without
    a key frame are left out.

    Parameters
    ----------
    model : nn.Module
        From ``build_keyframe_model``: FloatTensor[B, 3, S, S] -> logits FloatTensor[B].
    units : list of KeyFrameUnit
        One per patient.
    dp, steps, lr, device, generator, secure_rng
        As for ``train_detector``.
    images_per_pass : int
        Images per forward pass; only memory and speed depend on it.
    views : int
        Augmentation multiplicity (``train_per_sample``); 1: the crops as cut.
    """
    return train_per_sample(
        "keyframe",
        model,
        [(u.images, u.labels) for u in units],
        dp=dp,
        steps=steps,
        lr=lr,
        device=device,
        generator=generator,
        secure_rng=secure_rng,
        samples_per_pass=images_per_pass,
        views=views,
    )


def train_per_sample(
    model_name: str,
    model: nn.Module,
    units: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    dp: DPSettings,
    steps: int,
    lr: float,
    device: torch.device,
    generator: torch.Generator,
    secure_rng: bool,
    samples_per_pass: int,
    views: int = 1,
) -> MechanismRecord:
    """Patient-level DP-SGD of a one-logit network through Opacus' per-sample gradients.

    One forward and backward pass over the sampled patients' samples through
    ``GradSampleModule`` ("hooks" mode) gives one gradient per sample; each is weighted by
    1 / (its patient's sample count) and summed per patient, so a patient's gradient is
    that of its mean binary cross-entropy. Patients without samples are left out.

    With ``views`` > 1 (augmentation multiplicity, De et al. 2022), every sample enters
    the patient's mean as ``views`` randomly augmented copies (``augment``): the
    patient's gradient is averaged over augmentations before it is clipped, so the noise
    stays that of one patient while the gradient varies less. The augmentations' own
    randomness needs no secrecy: clipping bounds a patient's gradient whatever it is.

    Parameters
    ----------
    model_name : str
        Name for the record and the ledger.
    model : nn.Module
        FloatTensor[B, ...] -> logits FloatTensor[B]; moved to ``device``, wrapped for the
        training and unwrapped at the end (hooks removed, state_dict keys unchanged).
    units : list of (Tensor, Tensor)
        Per patient, its samples FloatTensor[K, ...] and labels FloatTensor[K].
    dp, steps, lr, device, generator, secure_rng
        As for ``train_detector``.
    samples_per_pass : int
        Samples per forward pass; only memory and speed depend on it.
    views : int
        Augmented copies of each sample per step (>= 1); 1: the samples as they are.
    """
    if views < 1:
        raise UsageError(f"{model_name}: views must be >= 1, got {views}")
    units = [u for u in units if len(u[0])]
    # Their own stream, drawn only when asked for: with views 1 the DP mechanism's draws
    # are what they were.
    augmentations = torch.Generator()
    if views > 1:
        seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
        augmentations.manual_seed(int(seed))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # "sum": the hooks then return each sample's gradient of the loss as written; with
    # "mean" they would multiply by the batch size to undo a mean we do not take.
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)

    def per_patient_gradients(sampled: list[int]) -> tuple[list[torch.Tensor], list[float]]:
        # (row of the sampled patient, sample index) for every view of every sample of the
        # sampled patients
        pieces = [
            (row, k)
            for row, i in enumerate(sampled)
            for k in range(len(units[i][0]))
            for _ in range(views)
        ]
        rows = [p.new_zeros((len(sampled), *p.shape)) for p in params]
        losses = torch.zeros(len(sampled), device=device)
        for start in range(0, len(pieces), samples_per_pass):
            chunk = pieces[start : start + samples_per_pass]
            inputs = torch.stack([units[sampled[r]][0][k] for r, k in chunk])
            if views > 1:
                inputs = augment(inputs, augmentations)
            inputs = inputs.to(device)
            labels = torch.stack([units[sampled[r]][1][k] for r, k in chunk]).to(device)
            owner = torch.tensor([r for r, _ in chunk], device=device)
            weight = 1.0 / torch.tensor(
                [len(units[sampled[r]][0]) * views for r, _ in chunk], device=device
            )
            per_sample = F.binary_cross_entropy_with_logits(
                wrapped(inputs), labels, reduction="none"
            )
            with warnings.catch_warnings():
                # The stem's input needs no gradient; torch warns that the hook fires anyway.
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                (per_sample * weight).sum().backward()
            losses.index_add_(0, owner, (per_sample * weight).detach())
            for p, rows_p in zip(params, rows, strict=True):
                # Opacus' hooks leave one gradient per sample in p.grad_sample.
                rows_p.index_add_(0, owner, p.grad_sample)  # type: ignore[attr-defined]
                p.grad_sample = None  # type: ignore[attr-defined]
                p.grad = None
        return rows, losses.tolist()

    try:
        return run_dp_sgd(
            model_name,
            params,
            len(units),
            per_patient_gradients,
            dp=dp,
            steps=steps,
            lr=lr,
            device=device,
            generator=generator,
            secure_rng=secure_rng,
        )
    finally:
        wrapped.to_standard_module()
        # Opacus leaves an empty activation list on every hooked layer.
        for module in model.modules():
            if hasattr(module, "activations"):
                del module.activations


AUGMENT_GAIN = 0.2  # intensity gain drawn from [1 - g, 1 + g]


def augment(samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each sample flipped left-right with probability 1/2 and its intensity scaled.

    ``samples``: FloatTensor[B, C, ..., H, W] in [0, 1] (clips or key-frame crops). A
    breast's lesion seen in the mirror is still that lesion, and the gain stands for the
    scanners' gain settings; the result is clamped to [0, 1]. Returns a new tensor.
    """
    b = len(samples)
    flip = torch.rand(b, generator=generator) < 0.5
    gain = 1 + AUGMENT_GAIN * (2 * torch.rand(b, generator=generator) - 1)
    out = torch.where(flip.view(-1, *[1] * (samples.dim() - 1)), samples.flip(-1), samples)
    return (out * gain.view(-1, *[1] * (samples.dim() - 1))).clamp_(0, 1)
