"""Stage 6, explain: class activation maps (CAM, Zhou et al. 2016) of the video classifier.

The I3D ends in global average pooling and one linear unit, so its logit is the spatial and
temporal mean of ``w . f(t, y, x)`` plus the bias, where ``f`` is the last feature map and
``w`` the linear unit's weights. That map, ``activation_volume``, says where the clip
pushed the logit up (towards malignant, positive) or down (towards benign, negative).
It is upsampled to the clip and projected back onto the video through the clip's crop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.geometry import Box
from common.pipeline.config import CamMode


def activation_volume(features: Tensor, fc: nn.Linear) -> Tensor:
    """Raw class activation: ``sum_c w_c f_c(t, y, x)``.

    Parameters
    ----------
    features : Tensor
        FloatTensor[K, C, T', H', W'], the classifier's ``features`` output.
    fc : nn.Linear
        The classifier's last layer, C inputs, 1 output.

    Returns
    -------
    Tensor
        FloatTensor[K, T', H', W'] in logit units; its mean over (T', H', W') plus
        ``fc.bias`` is the clip's logit.
    """
    weight = fc.weight.detach().to(features)[0]
    return torch.einsum("kcthw,c->kthw", features, weight)


def clip_cams(
    features: Tensor, fc: nn.Linear, *, clip_len: int, clip_size: int, mode: CamMode
) -> Tensor:
    """Class activation maps at the clip's resolution, normalised per clip.

    Parameters
    ----------
    features, fc
        As for ``activation_volume``.
    clip_len, clip_size : int
        The clip's T and side s.
    mode : {"signed", "relu"}
        ``signed`` keeps both directions, scaled by the clip's largest magnitude into
        [-1, 1] (positive: towards malignant, negative: towards benign); ``relu`` keeps the
        positive part only (the original CAM), scaled into [0, 1].

    Returns
    -------
    Tensor
        FloatTensor[K, clip_len, clip_size, clip_size], trilinear upsampling of the
        activation volume over time and space. A clip whose map is all zero stays zero.
    """
    volume = activation_volume(features, fc).unsqueeze(1)
    cams = F.interpolate(
        volume, size=(clip_len, clip_size, clip_size), mode="trilinear", align_corners=False
    ).squeeze(1)
    if mode == "relu":
        cams = cams.clamp(min=0)
    peak = cams.abs().amax(dim=(1, 2, 3), keepdim=True)
    return cams / peak.clamp(min=torch.finfo(cams.dtype).tiny)


def project_cam(cam: np.ndarray, region: Box, frame_shape: tuple[int, int]) -> np.ndarray:
    """Paste clip CAMs back into video frames, through the clip's square crop.

    The inverse of the crop (``roi_align`` with ``aligned=True``): crop pixel ``j`` of an
    ``s``-pixel side covers video coordinate ``x1 + (j + 0.5) * side / s``, with video pixel
    ``i`` centred on ``i + 0.5``. Video pixels whose centre lies in the region get the
    bilinearly sampled CAM value; all others are 0.

    Parameters
    ----------
    cam : np.ndarray
        ``float [T, s, s]``, one map per clip frame (``clip_cams`` of one clip).
    region : Box
        The clip's crop, x1y1x2y2 in video pixels (``ClipPlan.region``).
    frame_shape : tuple of int
        (H, W) of the video.

    Returns
    -------
    np.ndarray
        ``float32 [T, H, W]``.
    """
    height, width = frame_shape
    x1, y1, x2, y2 = region
    out = np.zeros((len(cam), height, width), dtype=np.float32)
    # First and one-past-last pixel whose centre is inside the region, within the frame.
    c0, c1 = max(0, int(np.ceil(x1 - 0.5))), min(width, int(np.floor(x2 - 0.5)) + 1)
    r0, r1 = max(0, int(np.ceil(y1 - 0.5))), min(height, int(np.floor(y2 - 0.5)) + 1)
    if c1 <= c0 or r1 <= r0:
        return out
    # grid_sample's normalised coordinates: -1 and 1 are the outer edges of the map.
    u = (np.arange(c0, c1) + 0.5 - x1) / (x2 - x1) * 2 - 1
    v = (np.arange(r0, r1) + 0.5 - y1) / (y2 - y1) * 2 - 1
    grid = torch.from_numpy(np.stack(np.meshgrid(u, v, indexing="xy"), axis=-1)).float()
    maps = torch.from_numpy(np.asarray(cam, dtype=np.float32)).unsqueeze(1)
    sampled = F.grid_sample(
        maps,
        grid.expand(len(maps), -1, -1, -1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    out[:, r0:r1, c0:c1] = sampled.squeeze(1).numpy()
    return out
