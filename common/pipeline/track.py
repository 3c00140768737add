"""Stage 2, track: link per-frame boxes into lesion tracks by IoU.

Assignment is optimal per frame (Hungarian, ``scipy.optimize.linear_sum_assignment`` on
``1 - IoU``), not greedy: with two lesions close together a greedy match by score can
steal the other lesion's box and swap the tracks. Each open track is compared by its last
observed box; assigned pairs with IoU below ``link_iou`` are then dropped, as in SORT
(Bewley et al., 2016), so a track ends (and a new one starts) where the box jumps. A track
survives up to ``max_gap`` consecutive frames without a match (a missed detection);
longer, and it is closed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

from common.geometry import Box, boxed_frames, consecutive_runs
from common.pipeline.detect import FrameDetections


@dataclass(frozen=True)
class Track:
    """One lesion followed across frames.

    Attributes
    ----------
    track_id : int
        0, 1, ... in order of the track's first frame.
    boxes : dict[int, Box]
        Observed box per frame, x1y1x2y2 in video pixels. Frames between ``first`` and
        ``last`` may be missing (gaps of at most ``max_gap``).
    scores : dict[int, float]
        Detector score per observed frame (1.0 for ground truth).
    """

    track_id: int
    boxes: dict[int, Box] = field(hash=False)
    scores: dict[int, float] = field(hash=False)

    @property
    def first(self) -> int:
        return min(self.boxes)

    @property
    def last(self) -> int:
        return max(self.boxes)

    def filled_boxes(self) -> dict[int, Box]:
        """A box for every frame from ``first`` to ``last``.

        A frame missing inside a gap gets the box linearly interpolated, coordinate by
        coordinate, between the observed boxes before and after it: the probe moves
        smoothly over a few frames, and a clip needs every frame.
        """
        observed = sorted(self.boxes)
        filled: dict[int, Box] = {}
        for before, after in pairwise(observed):
            a, b = np.asarray(self.boxes[before]), np.asarray(self.boxes[after])
            for f in range(before, after):
                w = (f - before) / (after - before)
                filled[f] = _box((1 - w) * a + w * b)
        filled[observed[-1]] = self.boxes[observed[-1]]
        return filled


@dataclass
class _Open:
    boxes: dict[int, Box]
    scores: dict[int, float]
    last: int


def link_tracks(
    detections: Sequence[FrameDetections], *, link_iou: float, max_gap: int
) -> list[Track]:
    """Link the detections of consecutive frames into tracks.

    Parameters
    ----------
    detections : sequence of FrameDetections
        One per frame, in frame order (``detect_lesions``' output).
    link_iou : float
        Smallest IoU, in (0, 1], between a track's last box and a new box to link them.
    max_gap : int
        Frames a track may go unmatched and still continue, >= 0.

    Returns
    -------
    list of Track
        Every track, even one box long, ordered by first frame; unmatched detections start
        new tracks in decreasing score order.
    """
    open_tracks: list[_Open] = []
    done: list[_Open] = []
    for f, frame in enumerate(detections):
        alive = [t for t in open_tracks if f - t.last - 1 <= max_gap]
        done += [t for t in open_tracks if f - t.last - 1 > max_gap]
        open_tracks = alive
        matched: set[int] = set()
        if len(frame.boxes) and open_tracks:
            last = torch.tensor([t.boxes[t.last] for t in open_tracks], dtype=torch.float32)
            iou = box_iou(last, torch.from_numpy(frame.boxes)).numpy()
            rows, cols = linear_sum_assignment(1.0 - iou)
            for r, c in zip(rows, cols, strict=True):
                if iou[r, c] >= link_iou:
                    track = open_tracks[r]
                    track.boxes[f] = _box(frame.boxes[c])
                    track.scores[f] = float(frame.scores[c])
                    track.last = f
                    matched.add(int(c))
        for c in range(len(frame.boxes)):
            if c not in matched:
                open_tracks.append(
                    _Open({f: _box(frame.boxes[c])}, {f: float(frame.scores[c])}, last=f)
                )
    done += open_tracks
    done.sort(key=lambda t: min(t.boxes))
    return [Track(i, t.boxes, t.scores) for i, t in enumerate(done)]


def gt_tracks(boxes: Mapping[int, Box], *, n_frames: int) -> list[Track]:
    """Ground-truth boxes as tracks: one track per run of consecutive boxed frames.

    The oracle mode of evaluation. Runs are not bridged across gaps, because training
    (``common.data.units.build_units``) does not bridge them either: the clips cut from
    these tracks are exactly the training clips of the same video. Boxes of frames at or
    past ``n_frames`` are ignored, as in training.

    Parameters
    ----------
    boxes : mapping of int to Box
        ``{frame: (x1, y1, x2, y2)}`` in video pixels, at most one lesion per frame.
    n_frames : int
        Frames in the video.
    """
    runs = consecutive_runs(boxed_frames(boxes, n_frames))
    return [
        Track(i, {f: _box(boxes[f]) for f in run}, dict.fromkeys(run, 1.0))
        for i, run in enumerate(runs)
    ]


def _box(values: Sequence[float] | np.ndarray) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)
