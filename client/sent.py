"""The site's copy of the update it sent last, so that a repeated request costs no epsilon.

A SuperLink or ServerApp that dies mid-round loses the round; when the federation resumes
it asks the sites again for that round, from the same global model. Training again would
draw fresh noise and spend the patients' privacy a second time. Re-sending the update
already released is post-processing of a released output: it costs nothing more. So the
site keeps, in its own state folder, the last update it sent with the fingerprint of the
global model it started from, and answers a repeated request with it.

The file never leaves the site (the server only ever sees it masked by SecAgg+). Only the
latest round of a campaign is kept: an older one can never be asked for again, because a
resumed federation restarts at the round after its last registered version.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import NDArrays, Scalar

from common.files import atomic_path

SENT_DIR = "sent"


@dataclass(frozen=True)
class SentUpdate:
    weights: NDArrays
    num_examples: int
    metrics: dict[str, Scalar]


class SentUpdates:
    """``state/sent/<campaign>/round-NNNN.npz``: one site's released updates, latest only."""

    def __init__(self, state: Path) -> None:
        self.root = state / SENT_DIR

    def _folder(self, campaign: str) -> Path:
        # A campaign name comes from the server: keep it a plain file name at the site.
        return self.root / re.sub(r"[^A-Za-z0-9._-]", "_", campaign)

    def path(self, campaign: str, server_round: int) -> Path:
        return self._folder(campaign) / f"round-{server_round:04d}.npz"

    def save(
        self,
        campaign: str,
        server_round: int,
        *,
        global_model: str,
        update: SentUpdate,
    ) -> Path:
        """Write atomically (temp file, fsync, rename), then drop older rounds' files."""
        folder = self._folder(campaign)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.path(campaign, server_round)
        meta = {
            "global_model": global_model,
            "num_examples": update.num_examples,
            "metrics": update.metrics,
        }
        arrays: dict[str, Any] = {f"w{i:05d}": w for i, w in enumerate(update.weights)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_path(final, mode=0o600, sync=True) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)
        for old in folder.glob("round-*.npz"):
            if old != final:
                old.unlink(missing_ok=True)
        return final

    def load(self, campaign: str, server_round: int, *, global_model: str) -> SentUpdate | None:
        """The update sent for this round from this same global model, or None."""
        path = self.path(campaign, server_round)
        if not path.exists():
            return None
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta["global_model"] != global_model:
                return None
            names = sorted(k for k in data.files if k.startswith("w"))
            weights = [data[k] for k in names]
        return SentUpdate(
            weights=weights, num_examples=int(meta["num_examples"]), metrics=meta["metrics"]
        )
