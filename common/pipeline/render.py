"""What a radiologist gets from a prediction: a JSON report, an annotated video, a heatmap.

Colours follow the WAUVE paper's figure 6 throughout: red towards malignant, blue towards
benign (matplotlib's diverging ``coolwarm``), for both clip boxes (by probability) and
class activation maps (by sign).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize
from PIL import Image, ImageDraw, ImageFont

from common.geometry import Box
from common.pipeline.explain import project_cam
from common.pipeline.run import ClipResult, VideoResult

COLORMAP = matplotlib.colormaps["coolwarm"]
TRACK_ONLY = (255, 210, 0)  # a tracked frame that is in no clip (short track or tail)
HEATMAP_PANELS = 4


def report_dict(result: VideoResult, *, video: str, model: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of one prediction.

    Boxes and regions are x1y1x2y2 in video pixels; frame indices are 0-based and frame
    ranges inclusive; probabilities and the score are in [0, 1].

    Parameters
    ----------
    result : VideoResult
    video : str
        The video's path, as given.
    model : dict
        Where the model came from (path, or registry name and version) and its card.
    """
    return {
        "video": video,
        "model": model,
        "score": result.score,
        "category": result.category,
        "no_lesion_tracked": result.no_lesion_tracked,
        "n_frames": result.n_frames,
        "frame_size": {"height": result.frame_shape[0], "width": result.frame_shape[1]},
        "n_tracks": len(result.tracks),
        "n_clips": len(result.clips),
        "tracks": [
            {
                "track_id": track.track_id,
                "first_frame": track.first,
                "last_frame": track.last,
                "n_boxes": len(track.boxes),
            }
            for track in result.tracks
        ],
        "clips": [
            {
                "track_id": clip.plan.track_id,
                "first_frame": clip.first_frame,
                "last_frame": clip.last_frame,
                # Consecutive, or a short track's frames resampled (some repeated).
                "frames": list(clip.plan.frames),
                "probability": clip.probability,
                "boxes": [list(box) for box in clip.plan.boxes],
                "interpolated": list(clip.plan.interpolated),
                "crop_region": list(clip.plan.region),
            }
            for clip in result.clips
        ],
        "pipeline": result.config.to_dict(),
    }


def probability_colour(p: float) -> tuple[int, int, int]:
    """RGB of a probability on the blue (benign) to red (malignant) scale."""
    r, g, b, _ = COLORMAP(float(p))
    return round(r * 255), round(g * 255), round(b * 255)


def annotate_frames(frames: np.ndarray, result: VideoResult) -> np.ndarray:
    """Draw tracks, clip probabilities and the verdict on every frame.

    A box in a clip is coloured by the clip's probability and labelled with it; a tracked
    box outside any clip is yellow. Interpolated boxes are drawn thin. The top line gives
    the risk score and category, or says that no lesion was tracked.

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]`` grayscale video.
    result : VideoResult
        The pipeline's result for it.

    Returns
    -------
    np.ndarray
        ``uint8 [T, H', W', 3]`` RGB, H' and W' rounded up to even (edge-padded) so that
        the frames can be written as yuv420p.
    """
    _, height, width = frames.shape
    padded = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2)), mode="edge")
    font_size = max(8, min(height, width) // 14)
    font = ImageFont.load_default(size=font_size)
    in_clip: dict[int, list[ClipResult]] = {}
    for clip in result.clips:
        for f in clip.plan.frames:
            in_clip.setdefault(f, []).append(clip)
    if result.no_lesion_tracked:
        verdict = "no lesion tracked"
    else:
        verdict = f"risk {result.score:.2f}  BI-RADS {result.category}"

    out = np.empty((*padded.shape, 3), dtype=np.uint8)
    for f, frame in enumerate(padded):
        image = Image.fromarray(frame).convert("RGB")
        draw = ImageDraw.Draw(image)
        for clip in in_clip.get(f, []):
            i = clip.plan.frames.index(f)
            colour = probability_colour(clip.probability)
            draw.rectangle(
                _pixels(clip.plan.boxes[i]),
                outline=colour,
                width=1 if clip.plan.interpolated[i] else 2,
            )
            x1, y1 = clip.plan.boxes[i][:2]
            draw.text(
                (x1, max(0.0, y1 - font_size - 2)),
                f"{clip.probability:.2f}",
                fill=colour,
                font=font,
            )
        clipped = {c.plan.track_id for c in in_clip.get(f, [])}
        for track in result.tracks:
            if track.track_id not in clipped and f in track.boxes:
                draw.rectangle(_pixels(track.boxes[f]), outline=TRACK_ONLY, width=1)
        draw.text(
            (2, 1), verdict, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0)
        )
        out[f] = np.asarray(image)
    return out


def _pixels(box: Box) -> Box:
    """A box in pixel edges as the first and last pixel PIL draws (inclusive)."""
    x1, y1, x2, y2 = box
    return (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))


def save_heatmap(path: Path, frames: np.ndarray, result: VideoResult) -> None:
    """Write a PNG of representative frames with their class activation maps.

    The panels are the middle frames of the (at most four) clips with the highest
    probability, in frame order: the evidence behind the score. Each shows the grayscale
    frame, the clip's CAM projected through its crop (red towards malignant, blue towards
    benign, opacity by strength) and the clip's box. Without a clip, the video's middle
    frame and "no lesion tracked".

    Parameters
    ----------
    path : Path
        Output PNG.
    frames : np.ndarray
        ``uint8 [T, H, W]`` grayscale video.
    result : VideoResult
        Computed with ``PipelineConfig(cams=True)`` for the overlays.
    """
    chosen = sorted(result.clips, key=lambda c: c.probability, reverse=True)[:HEATMAP_PANELS]
    chosen.sort(key=lambda c: c.first_frame)
    panels = max(1, len(chosen))
    figure, axes = plt.subplots(
        1, panels, figsize=(3.2 * panels + 1, 3.8), squeeze=False, layout="constrained"
    )
    norm = Normalize(vmin=-1.0, vmax=1.0)
    if not chosen:
        ax = axes[0, 0]
        ax.imshow(frames[len(frames) // 2], cmap="gray", vmin=0, vmax=255)
        ax.set_title("no lesion tracked")
        ax.axis("off")
    for ax, clip in zip(axes[0], chosen, strict=False):
        i = len(clip.plan.frames) // 2
        f = clip.plan.frames[i]
        ax.imshow(frames[f], cmap="gray", vmin=0, vmax=255)
        if clip.cam is not None:
            heat = project_cam(clip.cam[i : i + 1], clip.plan.region, result.frame_shape)[0]
            overlay = COLORMAP(norm(heat))
            overlay[..., 3] = 0.6 * np.abs(heat)
            ax.imshow(overlay)
        x1, y1, x2, y2 = clip.plan.boxes[i]
        # imshow centres pixel i on i; box coordinates are pixel edges.
        ax.add_patch(
            plt.Rectangle(
                (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.2,
                ec=COLORMAP(clip.probability),
            )
        )  # fmt: skip
        ax.set_title(
            f"frame {f}, clip {clip.first_frame}-{clip.last_frame}\np = {clip.probability:.2f}",
            fontsize=9,
        )
        ax.axis("off")
    if result.no_lesion_tracked:
        figure.suptitle("no lesion tracked")
    else:
        figure.suptitle(f"risk score {result.score:.2f}, BI-RADS {result.category}")
        mappable = plt.cm.ScalarMappable(norm=norm, cmap=COLORMAP)
        bar = figure.colorbar(mappable, ax=axes[0].tolist(), shrink=0.8, ticks=[-1, 0, 1])
        bar.ax.set_yticklabels(["benign", "0", "malignant"])
    figure.savefig(path, dpi=100)
    plt.close(figure)
