"""ROC curves as a PNG: one drawing routine for `busfed evaluate` and `busfed metrics`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.metrics import RocCurve


@dataclass(frozen=True)
class RocLine:
    """One curve of the figure; ``point`` (1 - specificity, sensitivity) marks a threshold."""

    label: str
    curve: RocCurve
    point: tuple[float, float] | None = None


def write_roc_png(path: Path, lines: list[RocLine], *, title: str, size: float = 4.5) -> None:
    """Draw every line (or say that no AUC is defined) against the chance diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(size, size), layout="constrained")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    for line in lines:
        (drawn,) = ax.plot(
            line.curve.false_positive_rate, line.curve.sensitivity, lw=1.5, label=line.label
        )
        if line.point is not None:
            ax.plot(
                *line.point, marker="o", ms=7, mfc="white", mec=drawn.get_color(), mew=2,
                ls="none",
            )  # fmt: skip
    if lines:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "AUC undefined: one class only", ha="center")
    ax.set(
        xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
        title=title, aspect="equal",
    )  # fmt: skip
    figure.savefig(path, dpi=110)
    plt.close(figure)
