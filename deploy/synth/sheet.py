"""`busfed synth-sheet`: a contact sheet of synthetic frames, to look at the generator.

One row per vendor: frames across a sweep with a lesion, its ground-truth box drawn, and
one frame of a sweep of normal tissue over a rib. Row titles name the vendor, the lesion's
lexicon features, its label and the sweep's direction and speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from common.errors import UsageError
from deploy.synth.lesion import sample_lesion
from deploy.synth.scanner import vendor_preset
from deploy.synth.sweep import render_sweep

# Layout in pixels (the PNG is written at 100 dpi, so one point of layout is one pixel).
_PAD = 6
_TITLE = 30  # row title: two lines
_LABEL = 14  # frame label above each panel
_DPI = 100
_FRAMES = 32  # frames per rendered sweep, as ``busfed synth`` writes by default


def write_contact_sheet(
    out_png: Path,
    *,
    seed: int,
    vendors: tuple[str, ...] = ("vendor-a", "vendor-b", "vendor-c"),
    frames_per_vendor: int = 6,
    size: int = 256,
) -> Path:
    """Render sweeps for each vendor and write them as a grid of frames.

    Parameters
    ----------
    out_png : Path
        PNG to write (its folder is created).
    seed : int
        Seeds every sweep; the same arguments give the same picture.
    vendors : tuple of str
        Keys of ``deploy.synth.VENDORS``, one row each.
    frames_per_vendor : int
        Frames shown from the lesion sweep (>= 1), evenly spread from the frame before
        the lesion appears to the frame after it leaves.
    size : int
        Frame side in pixels (even, >= 32); frames are shown at one screen pixel each.

    Returns
    -------
    Path
        ``out_png``, an image ``(frames_per_vendor + 1) * (size + 6) + 6`` pixels wide and
        ``len(vendors) * (size + 50) + 6`` high.

    Raises
    ------
    UsageError
        An unknown vendor, no vendor, no frame, or a bad size.
    """
    if frames_per_vendor < 1 or not vendors:
        raise UsageError(
            f"need frames_per_vendor >= 1 and a vendor, got {frames_per_vendor} and {vendors}"
        )
    columns = frames_per_vendor + 1
    row_height = _TITLE + _LABEL + size + _PAD
    width, height = columns * (size + _PAD) + _PAD, len(vendors) * row_height + _PAD
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(figure)

    for row, name in enumerate(vendors):
        preset = vendor_preset(name)
        lesion_seq, sweep_seq, normal_seq = np.random.SeedSequence([seed, row]).spawn(3)
        lesion = sample_lesion(np.random.default_rng(lesion_seq))
        sweep = render_sweep(
            lesion, preset, frames=_FRAMES, size=size, rng=np.random.default_rng(sweep_seq)
        )
        normal = render_sweep(
            None,
            preset,
            frames=_FRAMES,
            size=size,
            rng=np.random.default_rng(normal_seq),
            rib=True,
        )
        top = height - _PAD - row * row_height  # pixels from the bottom edge
        path = sweep.path
        figure.text(
            _PAD / width,
            (top - 2) / height,
            f"{name}: {lesion.size_mm:.0f} mm {lesion.shape}, {lesion.orientation}, "
            f"{lesion.margin}, {lesion.echo}, posterior {lesion.posterior}\n"
            f"{'malignant' if lesion.malignant else 'benign'}, BI-RADS {lesion.birads}; "
            f"sweep {path.direction_deg:.0f} deg from radial, "
            f"{path.step_mm * 10:.1f} mm/s at 10 fps, skew {path.skew_deg:.0f} deg",
            fontsize=8,
            va="top",
        )
        shown = _frames_across(sorted(sweep.boxes), frames_per_vendor, len(sweep.frames))
        panels = [(sweep.frames[t], sweep.boxes.get(t), f"frame {t}") for t in shown]
        last = len(normal.frames) // 2
        label = "normal tissue" + (", rib" if normal.path.rib else "")
        panels.append((normal.frames[last], None, label))
        for column, (frame, box, title) in enumerate(panels):
            axes = figure.add_axes(
                (
                    (_PAD + column * (size + _PAD)) / width,
                    (top - _TITLE - _LABEL - size) / height,
                    size / width,
                    size / height,
                )
            )
            axes.imshow(frame, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes.set_axis_off()
            axes.set_title(title, fontsize=7, pad=2)
            if box is not None:
                x1, y1, x2, y2 = box
                axes.add_patch(
                    Rectangle(
                        (x1 - 0.5, y1 - 0.5),
                        x2 - x1,
                        y2 - y1,
                        fill=False,
                        edgecolor="lime",
                        linewidth=0.8,
                    )
                )

    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=_DPI, facecolor="white")
    return out_png


def _frames_across(visible: list[int], count: int, frames: int) -> list[int]:
    """``count`` frames from just before the lesion appears to just after it leaves.

    The whole sweep when the lesion is in no frame.
    """
    first, last = (visible[0] - 1, visible[-1] + 1) if visible else (0, frames - 1)
    first, last = max(0, first), min(frames - 1, last)
    return [int(t) for t in np.linspace(first, last, count).round()]
