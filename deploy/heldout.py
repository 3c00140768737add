"""The demo's held-out hospital: a synthetic site that never trains, scored with every version.

A consortium keeps external test sets back (see README). The demo does the same on a small
scale: one more synthetic hospital, of a scanner the pretraining data did not use, is
generated but enrolled nowhere; after the run, the starting model (round 0) and each
round's registered version score all of its videos the way ``busfed evaluate --split all``
does, so the demo's table shows whether the federation learned, with a 95% CI.

WAUVE runs its whole pipeline (detector boxes, tracking, clips); the key-frame comparator
reads the annotated boxes. Both report the video-level AUC where a video without a tracked
lesion scores 0 ("nothing suspicious found"): every video counts, as in deployment. A
detector campaign reports its AP at IoU 0.5 (patient bootstrap CI).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.data.manifest import SiteData
from common.data.units import SPLITS
from common.evaluation.detector import evaluate_detector_site
from common.evaluation.videos import evaluate_videos
from common.models.bundle import DetectorBundle, KeyFrameBundle, ModelBundle
from common.pipeline.config import PipelineConfig


@dataclass(frozen=True)
class HeldOutScore:
    """One version's score on the held-out site: ``metric`` is ``AUC`` or ``AP@0.5``."""

    round: int
    version: str
    metric: str
    value: float | None
    ci95: tuple[float | None, float | None]
    n: int

    def text(self) -> str:
        """``0.812 (0.701-0.923)``, or ``-`` when undefined (one class only, no box)."""
        if self.value is None:
            return "-"
        low, high = (f"{b:.3f}" if b is not None else "?" for b in self.ci95)
        return f"{self.value:.3f} ({low}-{high})"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeldOutScore:
        low, high = data["ci95"]
        return cls(
            int(data["round"]), str(data["version"]), str(data["metric"]), data["value"],
            (low, high), int(data["n"]),
        )  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round, "version": self.version, "metric": self.metric,
            "value": self.value, "ci95": list(self.ci95), "n": self.n,
        }  # fmt: skip


def score_version(
    bundle: ModelBundle, site: SiteData, *, round: int, version: str, out: Path
) -> HeldOutScore:
    """Score every video (or image, for a detector) of ``site``; write ``busfed evaluate``'s
    files (scores.csv and metrics.json, or metrics.json) into ``out``."""
    bundle.eval()
    info = {"model": version, "data": str(site.root), "split": "all"}
    if isinstance(bundle, DetectorBundle):
        metrics = evaluate_detector_site(
            bundle, site, splits=SPLITS, device=torch.device("cpu"), info=info
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        ci = metrics["average_precision_ci95"]
        return HeldOutScore(
            round, version, "AP@0.5", metrics["average_precision"], (ci[0], ci[1]),
            metrics["n_images"],
        )  # fmt: skip
    # A key-frame model reads the annotated boxes; WAUVE finds its own.
    config = PipelineConfig(boxes_source="gt" if isinstance(bundle, KeyFrameBundle) else "detector")
    evaluation = evaluate_videos(bundle, site, site.rows, config=config, wauve=None, info=info)
    evaluation.write(out)
    scored = evaluation.metrics["with_fallback"]
    low, high = scored.get("auc_ci95") or (None, None)
    return HeldOutScore(
        round, version, "AUC", _finite(scored.get("auc")), (_finite(low), _finite(high)),
        int(scored.get("n", 0)),
    )  # fmt: skip


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
