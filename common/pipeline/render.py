"""What a radiologist gets from a prediction: a JSON report, an annotated video, a heatmap.

Colours follow the WAUVE paper's figure 6 throughout: red towards malignant, blue towards
benign (matplotlib's diverging ``coolwarm``), for both clip boxes (by probability) and
class activation maps (by sign).

The annotated video keeps the image clean: a scanner burns its header (patient, date,
settings) into the frame, so text drawn on the image hides it or is hidden by it. Only the
lesion boxes go on the image; the verdict, the colour scale, the boxes' probabilities and
the per-frame risk strip go in a panel beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw, ImageFont

from common.geometry import Box
from common.pipeline.explain import project_cam
from common.pipeline.run import ClipResult, VideoResult

COLORMAP = matplotlib.colormaps["coolwarm"]
TRACK_ONLY = (255, 210, 0)  # a tracked frame that is in no clip (short track or tail)
HEATMAP_PANELS = 4
MIN_IMAGE_HEIGHT = 512  # the annotated video's image area, at least: readable boxes
NO_CLIP = (96, 96, 96)  # the risk strip where no clip covers a frame
PANEL_BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
MUTED = (165, 165, 165)
_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


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


# ------------------------------------------------------------------ annotated video


@dataclass(frozen=True)
class FrameLayout:
    """Where the parts of an annotated frame go, in output pixels.

    The video frame, scaled, fills the image area at the top left and nothing but the boxes
    is drawn on it. The panel to its right holds the verdict, the colour scale and this
    frame's boxes; the band below both holds the per-frame risk strip. Both dimensions of
    the whole frame are even (yuv420p): the panel and the band absorb the parity, so the
    image area keeps the video's aspect ratio.

    Attributes
    ----------
    scale_x, scale_y : float
        Output pixels per video pixel (1.0 at or above ``MIN_IMAGE_HEIGHT``).
    image_width, image_height : int
        The image area.
    panel_width : int
        The panel, right of the image area, ``image_height`` high.
    band_height : int
        The band below image and panel, the full width.
    unit : float
        ``image_height / MIN_IMAGE_HEIGHT``: fonts, lines and margins scale with it.
    """

    scale_x: float
    scale_y: float
    image_width: int
    image_height: int
    panel_width: int
    band_height: int
    unit: float

    @property
    def width(self) -> int:
        return self.image_width + self.panel_width

    @property
    def height(self) -> int:
        return self.image_height + self.band_height

    def px(self, size: float) -> int:
        """A size given at a 512-pixel-high image, at this one (at least 1 pixel)."""
        return max(1, round(size * self.unit))

    @property
    def strip_box(self) -> tuple[int, int, int, int]:
        """The risk strip's cells, x0, y0, x1, y1 (exclusive ends)."""
        y0 = self.image_height + self.px(40)
        return self.px(12), y0, self.width - self.px(12), y0 + self.px(22)

    def frame_cell(self, frame: int, n_frames: int) -> tuple[int, int]:
        """Columns x0, x1 (exclusive) of a frame's cell in the risk strip; at least one."""
        x0, _, x1, _ = self.strip_box
        step = (x1 - x0) / n_frames
        left = x0 + int(frame * step)
        return left, max(left + 1, x0 + int((frame + 1) * step))


def frame_layout(frame_shape: tuple[int, int]) -> FrameLayout:
    """The annotated frame of a video of ``frame_shape`` (H, W) pixels.

    A video under ``MIN_IMAGE_HEIGHT`` pixels high is scaled up to that height, aspect ratio
    kept; a larger one is shown at its own resolution.
    """
    height, width = frame_shape
    if height >= MIN_IMAGE_HEIGHT:
        image_height, image_width = height, width
    else:
        image_height = MIN_IMAGE_HEIGHT
        image_width = max(1, round(width * MIN_IMAGE_HEIGHT / height))
    unit = image_height / MIN_IMAGE_HEIGHT
    panel_width = round(360 * unit)
    panel_width += (image_width + panel_width) % 2
    band_height = round(84 * unit)
    band_height += (image_height + band_height) % 2
    return FrameLayout(
        scale_x=image_width / width,
        scale_y=image_height / height,
        image_width=image_width,
        image_height=image_height,
        panel_width=panel_width,
        band_height=band_height,
        unit=unit,
    )


def frame_risk(result: VideoResult) -> np.ndarray:
    """Per frame, the highest probability of the clips that cover it.

    The maximum, not the mean, so that a frame where any clip looks malignant shows red.

    Returns
    -------
    np.ndarray
        ``float64 [n_frames]``; NaN where no clip covers the frame.
    """
    risk = np.full(result.n_frames, np.nan)
    for clip in result.clips:
        for f in set(clip.plan.frames):
            risk[f] = np.fmax(risk[f], clip.probability)
    return risk


def annotate_frames(frames: np.ndarray, result: VideoResult) -> np.ndarray:
    """The video as a radiologist reads it: boxes on the image, everything else beside it.

    Each output frame (``frame_layout``) is the video frame, scaled up smoothly (bicubic)
    to at least ``MIN_IMAGE_HEIGHT`` pixels high, with only the lesion boxes drawn on it: a
    box in a clip coloured by the clip's probability (blue benign to red malignant), a
    tracked box in no clip yellow, interpolated boxes thin. The panel to the right gives
    the verdict (risk score and BI-RADS category, or "no lesion tracked"), the colour
    scale with the score marked on it, and this frame's boxes with their probabilities.
    The band below is the risk strip: one cell per frame coloured by ``frame_risk`` (grey
    where no clip covers the frame), the current frame marked.

    Parameters
    ----------
    frames : np.ndarray
        ``uint8 [T, H, W]`` grayscale video, the frames ``result`` was computed from (boxes
        are in their pixels).
    result : VideoResult
        The pipeline's result for it.

    Returns
    -------
    np.ndarray
        ``uint8 [T, H', W', 3]`` RGB, ``H' = frame_layout(...).height`` and
        ``W' = frame_layout(...).width``, both even.
    """
    layout = frame_layout((frames.shape[1], frames.shape[2]))
    fonts = _Fonts(layout)
    risk = frame_risk(result)
    in_clip: dict[int, list[tuple[ClipResult, int]]] = {}
    for clip in result.clips:
        for i, f in enumerate(clip.plan.frames):
            clips_here = in_clip.setdefault(f, [])
            if all(other is not clip for other, _ in clips_here):  # resampled: repeated
                clips_here.append((clip, i))

    base = Image.new("RGB", (layout.width, layout.height), PANEL_BACKGROUND)
    boxes_top = _draw_verdict_and_scale(ImageDraw.Draw(base), layout, fonts, result)
    _draw_box_key(ImageDraw.Draw(base), layout, fonts)
    _draw_risk_strip(ImageDraw.Draw(base), layout, fonts, risk)

    out = np.empty((len(frames), layout.height, layout.width, 3), dtype=np.uint8)
    for f, frame in enumerate(frames):
        canvas = base.copy()
        image = Image.fromarray(frame).convert("RGB")
        if image.size != (layout.image_width, layout.image_height):
            image = image.resize(
                (layout.image_width, layout.image_height), Image.Resampling.BICUBIC
            )
        canvas.paste(image, (0, 0))
        draw = ImageDraw.Draw(canvas)
        entries = _draw_boxes(draw, layout, result, in_clip.get(f, []), f)
        _draw_frame_entries(draw, layout, fonts, boxes_top, f, result.n_frames, entries)
        _mark_frame(draw, layout, f, result.n_frames)
        out[f] = np.asarray(canvas)
    return out


class _Fonts:
    """DejaVu Sans (shipped with matplotlib, as in heatmap.png) at sizes for a layout."""

    def __init__(self, layout: FrameLayout) -> None:
        regular, bold = _FONT_DIR / "DejaVuSans.ttf", _FONT_DIR / "DejaVuSans-Bold.ttf"
        self.verdict = ImageFont.truetype(bold, layout.px(30))
        self.heading = ImageFont.truetype(bold, layout.px(16))
        self.text = ImageFont.truetype(regular, layout.px(16))
        self.small = ImageFont.truetype(regular, layout.px(13))


def _draw_verdict_and_scale(
    draw: ImageDraw.ImageDraw, layout: FrameLayout, fonts: _Fonts, result: VideoResult
) -> int:
    """The panel's top: verdict and colour scale. Returns the y where the rest may start."""
    left = layout.image_width + layout.px(14)
    right = layout.width - layout.px(14)
    y = layout.px(12)
    if result.no_lesion_tracked or result.score is None:
        draw.text((left, y), "no lesion tracked", fill=TEXT, font=fonts.verdict)
        y += layout.px(40)
        draw.text((left, y), "nothing to score: not a benign result", fill=MUTED, font=fonts.small)
        y += layout.px(28)
    else:
        draw.text((left, y), f"risk {result.score:.2f}", fill=TEXT, font=fonts.verdict)
        y += layout.px(38)
        draw.text((left, y), f"BI-RADS {result.category}", fill=TEXT, font=fonts.verdict)
        y += layout.px(40)
        n = len(result.clips)
        mean_of = f"mean of {n} clip probabilities" if n > 1 else "probability of its one clip"
        draw.text((left, y), f"risk score: {mean_of}", fill=MUTED, font=fonts.small)
        y += layout.px(28)

    draw.text((left, y), "clip probability (box and strip colour)", fill=MUTED, font=fonts.small)
    y += layout.px(20)
    bar_height = layout.px(16)
    gradient = np.asarray(COLORMAP(np.linspace(0.0, 1.0, right - left))[:, :3] * 255)
    for x, colour in enumerate(gradient.round().astype(np.uint8)):
        draw.line([(left + x, y), (left + x, y + bar_height - 1)], fill=tuple(colour.tolist()))
    y += bar_height
    if result.score is not None:
        x = left + round(result.score * (right - left - 1))
        tip = layout.px(8)
        draw.polygon([(x, y), (x - tip, y + tip + 2), (x + tip, y + tip + 2)], fill=TEXT)
    y += layout.px(12)
    draw.text((left, y), "0 benign", fill=TEXT, font=fonts.small)
    draw.text(((left + right) // 2, y), "0.5", fill=TEXT, font=fonts.small, anchor="ma")
    draw.text((right, y), "malignant 1", fill=TEXT, font=fonts.small, anchor="ra")
    if result.score is not None:
        y += layout.px(17)
        draw.text((left, y), "\u25b2 the video's risk score", fill=MUTED, font=fonts.small)
    return y + layout.px(30)


_KEY = (
    ("box in a clip: colour = its probability", None, 3),
    ("tracked, in no clip", TRACK_ONLY, 3),
    ("thin: interpolated (missed detection)", None, 1),
)


def _draw_box_key(draw: ImageDraw.ImageDraw, layout: FrameLayout, fonts: _Fonts) -> None:
    """The panel's bottom: what the box styles mean."""
    left = layout.image_width + layout.px(14)
    line = layout.px(22)
    y = layout.image_height - layout.px(10) - line * len(_KEY)
    for label, colour, width in _KEY:
        swatch = (left, y + layout.px(2), left + layout.px(16), y + layout.px(16))
        draw.rectangle(swatch, outline=colour or probability_colour(0.75), width=layout.px(width))
        draw.text((left + layout.px(24), y), label, fill=MUTED, font=fonts.small)
        y += line


def _draw_risk_strip(
    draw: ImageDraw.ImageDraw, layout: FrameLayout, fonts: _Fonts, risk: np.ndarray
) -> None:
    """The band: one cell per frame, coloured by its clip risk, grey where no clip."""
    x0, y0, x1, y1 = layout.strip_box
    n = len(risk)
    draw.text(
        (x0, layout.image_height + layout.px(8)),
        "risk per frame: highest probability of the clips covering it (grey: no clip)",
        fill=MUTED,
        font=fonts.small,
    )
    for x in range(x0, x1):
        # The frames this pixel column covers: one, or several in a long video.
        first = (x - x0) * n // (x1 - x0)
        last = max(first + 1, -(-(x - x0 + 1) * n // (x1 - x0)))
        values = risk[first:last]
        colour = NO_CLIP if np.isnan(values).all() else probability_colour(np.nanmax(values))
        draw.line([(x, y0), (x, y1 - 1)], fill=colour)
    if (x1 - x0) / n >= 6:  # room to tell the frames apart
        for f in range(1, n):
            left, _ = layout.frame_cell(f, n)
            draw.line([(left, y0), (left, y1 - 1)], fill=PANEL_BACKGROUND)
    draw.text((x0, y1 + layout.px(4)), "frame 0", fill=MUTED, font=fonts.small)
    draw.text((x1, y1 + layout.px(4)), f"{n - 1}", fill=MUTED, font=fonts.small, anchor="ra")


def _mark_frame(draw: ImageDraw.ImageDraw, layout: FrameLayout, frame: int, n_frames: int) -> None:
    """Point at the current frame's cell in the risk strip."""
    left, right = layout.frame_cell(frame, n_frames)
    _, y0, _, y1 = layout.strip_box
    x = (left + right - 1) / 2
    tip = layout.px(7)
    draw.polygon([(x, y0 - 2), (x - tip, y0 - 2 - tip), (x + tip, y0 - 2 - tip)], fill=TEXT)
    if right - left >= 4:
        draw.rectangle((left, y0, right - 1, y1 - 1), outline=TEXT, width=1)


def _draw_boxes(
    draw: ImageDraw.ImageDraw,
    layout: FrameLayout,
    result: VideoResult,
    clips: list[tuple[ClipResult, int]],
    frame: int,
) -> list[tuple[tuple[int, int, int], str]]:
    """Draw one frame's boxes on the image; return their panel lines (colour, text)."""
    entries: list[tuple[tuple[int, int, int], str]] = []
    thick, thin = layout.px(3), layout.px(1)
    for clip, i in sorted(clips, key=lambda item: item[0].probability, reverse=True):
        colour = probability_colour(clip.probability)
        interpolated = clip.plan.interpolated[i]
        draw.rectangle(
            _pixels(_scaled(clip.plan.boxes[i], layout)),
            outline=colour,
            width=thin if interpolated else thick,
        )
        text = f"p {clip.probability:.2f}   clip {clip.first_frame}-{clip.last_frame}"
        entries.append((colour, text + ("  interpolated" if interpolated else "")))
    clipped = {clip.plan.track_id for clip, _ in clips}
    for track in result.tracks:
        if track.track_id not in clipped and frame in track.boxes:
            draw.rectangle(
                _pixels(_scaled(track.boxes[frame], layout)), outline=TRACK_ONLY, width=thick
            )
            entries.append((TRACK_ONLY, f"tracked, in no clip ({track.first}-{track.last})"))
    return entries


def _draw_frame_entries(
    draw: ImageDraw.ImageDraw,
    layout: FrameLayout,
    fonts: _Fonts,
    top: int,
    frame: int,
    n_frames: int,
    entries: list[tuple[tuple[int, int, int], str]],
) -> None:
    """The panel's middle: the frame number and a line per box in it."""
    left = layout.image_width + layout.px(14)
    draw.text((left, top), f"frame {frame} of 0-{n_frames - 1}", fill=TEXT, font=fonts.heading)
    y = top + layout.px(26)
    line = layout.px(22)
    room = (layout.image_height - layout.px(10) - line * (len(_KEY) + 1) - y) // line
    if not entries:
        draw.text((left, y), "no box in this frame", fill=MUTED, font=fonts.text)
    shown = entries if len(entries) <= room else entries[: max(0, room - 1)]
    for colour, text in shown:
        draw.rectangle(
            (left, y + layout.px(3), left + layout.px(15), y + layout.px(17)), fill=colour
        )
        draw.text((left + layout.px(24), y), text, fill=TEXT, font=fonts.text)
        y += line
    if len(shown) < len(entries):
        draw.text((left, y), f"+ {len(entries) - len(shown)} more", fill=MUTED, font=fonts.text)


def _scaled(box: Box, layout: FrameLayout) -> Box:
    """A box in video pixels, in the image area's pixels."""
    x1, y1, x2, y2 = box
    return (
        x1 * layout.scale_x,
        y1 * layout.scale_y,
        x2 * layout.scale_x,
        y2 * layout.scale_y,
    )


def _pixels(box: Box) -> Box:
    """A box in pixel edges as the first and last pixel PIL draws (inclusive)."""
    x1, y1, x2, y2 = box
    return (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))


# ------------------------------------------------------------------ heatmap


def heatmap_frames(
    result: VideoResult, *, panels: int = HEATMAP_PANELS
) -> list[tuple[int, ClipResult, int]]:
    """The frames ``save_heatmap`` shows: distinct, from the most suspicious clips.

    Clips are taken by probability, highest first; each gives the frame nearest its
    middle that no better clip has given already (clips of different tracks can cover the
    same frames). A clip whose frames are all taken gives none, and the next clip is tried.

    Returns
    -------
    list of (frame, clip, index)
        At most ``panels``, in frame order; ``index`` is the frame's position in
        ``clip.plan.frames`` (for its box and CAM).
    """
    chosen: list[tuple[int, ClipResult, int]] = []
    shown: set[int] = set()
    for clip in sorted(result.clips, key=lambda c: c.probability, reverse=True):
        if len(chosen) == panels:
            break
        middle = len(clip.plan.frames) // 2
        for i in sorted(range(len(clip.plan.frames)), key=lambda i: (abs(i - middle), i)):
            if clip.plan.frames[i] not in shown:
                shown.add(clip.plan.frames[i])
                chosen.append((clip.plan.frames[i], clip, i))
                break
    return sorted(chosen, key=lambda item: item[0])


def save_heatmap(path: Path, frames: np.ndarray, result: VideoResult) -> None:
    """Write a PNG of the evidence behind the score: frames with class activation maps.

    One panel per frame of ``heatmap_frames`` (distinct frames of the most suspicious
    clips, in frame order), titled with the frame index and the clip's probability: the
    grayscale frame, the clip's CAM projected through its crop (red towards malignant,
    blue towards benign, opacity by strength; the colour bar gives the scale) and the
    clip's box, coloured by its probability. Frames are drawn about 450 pixels high,
    smoothly scaled. Without a clip, the video's middle frame and "no lesion tracked".

    Parameters
    ----------
    path : Path
        Output PNG.
    frames : np.ndarray
        ``uint8 [T, H, W]`` grayscale video.
    result : VideoResult
        Computed with ``PipelineConfig(cams=True)`` for the overlays.
    """
    chosen = heatmap_frames(result)
    panels = max(1, len(chosen))
    height, width = result.frame_shape
    panel_inches = 4.0 * min(2.0, max(0.5, width / height))
    figure, axes = plt.subplots(
        1,
        panels,
        figsize=(panel_inches * panels + (2.4 if chosen else 0.4), 5.0),
        squeeze=False,
        layout="constrained",
    )
    norm = Normalize(vmin=-1.0, vmax=1.0)
    if not chosen:
        ax = axes[0, 0]
        ax.imshow(frames[len(frames) // 2], cmap="gray", vmin=0, vmax=255, interpolation="bicubic")
        ax.set_title(f"frame {len(frames) // 2}, the middle one", fontsize=11)
        ax.axis("off")
    for ax, (f, clip, i) in zip(axes[0], chosen, strict=False):
        ax.imshow(frames[f], cmap="gray", vmin=0, vmax=255, interpolation="bicubic")
        if clip.cam is not None:
            heat = project_cam(clip.cam[i : i + 1], clip.plan.region, result.frame_shape)[0]
            overlay = COLORMAP(norm(heat))
            overlay[..., 3] = 0.6 * np.abs(heat)
            ax.imshow(overlay, interpolation="bilinear")
        x1, y1, x2, y2 = clip.plan.boxes[i]
        # imshow centres pixel i on i; box coordinates are pixel edges.
        ax.add_patch(
            plt.Rectangle(
                (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.5,
                ec=COLORMAP(clip.probability),
            )
        )  # fmt: skip
        ax.set_title(
            f"frame {f}: p = {clip.probability:.2f}\n"
            f"clip of frames {clip.first_frame}-{clip.last_frame}",
            fontsize=11,
        )
        ax.axis("off")
    if result.no_lesion_tracked or result.score is None:
        figure.suptitle("no lesion tracked", fontsize=13)
    else:
        # Two lines: one panel's figure is too narrow for them on one ("… suspicious c").
        figure.suptitle(
            f"risk score {result.score:.2f}, BI-RADS {result.category}\n"
            + (
                "class activation maps of the most suspicious clips"
                if len(chosen) > 1
                else "class activation map of its clip"
            ),
            fontsize=13,
        )
        mappable = plt.cm.ScalarMappable(norm=norm, cmap=COLORMAP)
        bar = figure.colorbar(mappable, ax=axes[0].tolist(), shrink=0.85, ticks=[-1, 0, 1])
        bar.ax.set_yticklabels(["towards\nbenign", "no\nevidence", "towards\nmalignant"])
        bar.set_label("class activation (CAM)", fontsize=10)
        # The same colours give the boxes' clip probabilities (0 blue to 1 red).
        probability = bar.ax.secondary_yaxis(
            "left", functions=(_cam_to_probability, _probability_to_cam)
        )
        probability.set_ticks([0.0, 0.5, 1.0])
        probability.set_ylabel("box: clip probability", fontsize=10)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cam_to_probability(cam: ArrayLike) -> np.ndarray:
    """The probability whose colour is this CAM value's: [-1, 1] onto [0, 1]."""
    return (np.asarray(cam) + 1.0) / 2.0


def _probability_to_cam(probability: ArrayLike) -> np.ndarray:
    """The inverse of ``_cam_to_probability``."""
    return 2.0 * np.asarray(probability) - 1.0
