"""Model presets: the architecture knobs of the detector, the video classifier and the
key-frame comparator.

``paper`` is the WAUVE architecture (Faster R-CNN ResNet-34 + FPN, I3D ResNet-50 at
224 px, 8-frame clips) and the paper's comparator (2D ResNet-50 at 224 px). ``tiny`` keeps
the same depths and layer types at width 8 so that a patient-level DP step runs in about
a second on a laptop CPU; it exists for tests, benchmarks and the end-to-end federation on
loopback, not for accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import UsageError

RESNET34_LAYERS = (3, 4, 6, 3)
RESNET50_LAYERS = (3, 4, 6, 3)


@dataclass(frozen=True)
class DetectorPreset:
    """Faster R-CNN with a ResNet-34 + FPN backbone.

    Attributes
    ----------
    width : int
        Channels of the ResNet stem; stage ``i`` has ``width * 2**i`` (64 is ResNet-34).
    layers : tuple of int
        BasicBlocks per stage.
    num_groups : int
        GroupNorm groups (clamped to a divisor of each layer's channels).
    fpn_channels : int
        FPN output channels.
    image_size : int
        Side in pixels of the square frames fed to the detector; also ``min_size`` and
        ``max_size`` of the internal transform, so frames are not resized again.
    anchor_sizes : tuple of int
        One anchor size in pixels per FPN level (P2..P6).
    rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train,
    rpn_post_nms_top_n_test : int
        Proposals kept per image before and after the RPN's NMS.
    box_batch_size_per_image : int
        RoIs sampled per image for the box-head losses.
    representation_size : int
        Hidden width of the two-layer MLP box head.
    """

    width: int
    layers: tuple[int, int, int, int]
    num_groups: int
    fpn_channels: int
    image_size: int
    anchor_sizes: tuple[int, int, int, int, int]
    rpn_pre_nms_top_n_train: int
    rpn_pre_nms_top_n_test: int
    rpn_post_nms_top_n_train: int
    rpn_post_nms_top_n_test: int
    box_batch_size_per_image: int
    representation_size: int


@dataclass(frozen=True)
class ClassifierPreset:
    """I3D inflated from ResNet-50.

    Attributes
    ----------
    width : int
        Channels of the stem; stage ``i`` has bottleneck width ``width * 2**i`` and
        output ``4 * width * 2**i`` channels (64 is ResNet-50).
    layers : tuple of int
        Bottleneck blocks per stage.
    num_groups : int
        GroupNorm groups (clamped to a divisor of each layer's channels).
    clip_len : int
        Frames per clip (T).
    clip_size : int
        Side in pixels of the square lesion crop.
    """

    width: int
    layers: tuple[int, int, int, int]
    num_groups: int
    clip_len: int
    clip_size: int


@dataclass(frozen=True)
class KeyFramePreset:
    """2D ResNet-50 on lesion crops of key frames (the WAUVE paper's comparator).

    Attributes
    ----------
    width : int
        Channels of the stem, as in ``ClassifierPreset`` (64 is ResNet-50).
    layers : tuple of int
        Bottleneck blocks per stage.
    num_groups : int
        GroupNorm groups (clamped to a divisor of each layer's channels).
    image_size : int
        Side in pixels of the square lesion crop.
    """

    width: int
    layers: tuple[int, int, int, int]
    num_groups: int
    image_size: int


@dataclass(frozen=True)
class Preset:
    """A named set of presets: WAUVE's detector and classifier, and the key-frame model."""

    name: str
    detector: DetectorPreset
    classifier: ClassifierPreset
    keyframe: KeyFramePreset


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        detector=DetectorPreset(
            width=8,
            layers=RESNET34_LAYERS,
            num_groups=4,
            fpn_channels=32,
            image_size=128,
            # Lesions in a 128 px frame are 10-60 px; torchvision's 32-512 would miss them.
            anchor_sizes=(8, 16, 32, 64, 128),
            rpn_pre_nms_top_n_train=200,
            rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_train=50,
            rpn_post_nms_top_n_test=50,
            box_batch_size_per_image=32,
            representation_size=64,
        ),
        classifier=ClassifierPreset(
            width=8, layers=RESNET50_LAYERS, num_groups=4, clip_len=8, clip_size=64
        ),
        keyframe=KeyFramePreset(width=8, layers=RESNET50_LAYERS, num_groups=4, image_size=64),
    ),
    "paper": Preset(
        name="paper",
        detector=DetectorPreset(
            width=64,
            layers=RESNET34_LAYERS,
            num_groups=32,
            fpn_channels=256,
            image_size=512,
            anchor_sizes=(32, 64, 128, 256, 512),
            # torchvision's Faster R-CNN defaults.
            rpn_pre_nms_top_n_train=2000,
            rpn_pre_nms_top_n_test=1000,
            rpn_post_nms_top_n_train=2000,
            rpn_post_nms_top_n_test=1000,
            box_batch_size_per_image=512,
            representation_size=1024,
        ),
        classifier=ClassifierPreset(
            width=64, layers=RESNET50_LAYERS, num_groups=32, clip_len=8, clip_size=224
        ),
        keyframe=KeyFramePreset(width=64, layers=RESNET50_LAYERS, num_groups=32, image_size=224),
    ),
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; raise ``UsageError`` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise UsageError(f"unknown model preset {name!r}; known presets: {known}") from None
