"""Make ``tests/data/busbra-sample``: a few dozen BUS-BRA images, downscaled, for CI.

BUS-BRA (Gómez-Flores, Gregorio-Calas and Pereira, "BUS-BRA: A Breast Ultrasound Dataset
for Assessing Computer-aided Diagnosis Systems", Medical Physics 2023; MIT-style licence,
``LICENSE.txt`` in its folder) is about 140 MB and stays outside the repository. The
sample keeps its layout (``Images/``, ``Masks/``, ``bus_data.csv``, ``5-fold-cv.csv``,
``LICENSE.txt``) so every tool that reads the full set reads the sample too:

* per scanner, the first ``--cases`` benign and ``--cases`` malignant patients (by case
  number) whose images span the official folds, with all of each patient's images (so
  patients with images of both breasts stay whole);
* images shrunk by ``--scale`` (Lanczos), masks by nearest neighbour; ``Width``,
  ``Height`` and ``BBOX`` rewritten for the small images, ``BBOX`` from the small mask in
  BUS-BRA's own convention (``[x, y, w, h]``: 1-based top-left pixel, ``w`` = last column
  minus first), so the sample's boxes agree with its masks as the full set's do.

Usage: ``python benchmarks/busbra_sample.py --busbra BUSBRA --out tests/data/busbra-sample``
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

SCANNER_PREFIXES = ("GE Logiq 7", "GE Logiq 5", "Toshiba", "U-Systems")


def mask_bbox(mask: np.ndarray) -> list[int]:
    """BUS-BRA's ``[x, y, w, h]`` of a mask's lesion pixels (1-based x, y; w = x_max - x_min)."""
    ys, xs = np.nonzero(mask > 127)
    return [
        int(xs.min()) + 1,
        int(ys.min()) + 1,
        int(xs.max() - xs.min()),
        int(ys.max() - ys.min()),
    ]


def pick_cases(rows: list[dict[str, str]], folds: dict[str, str], per_class: int) -> list[str]:
    """Per scanner and class, the first ``per_class`` cases, taken round-robin over folds.

    Each group starts at the next fold, so that together the groups cover every fold.
    """
    by_group: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        scanner = next(p for p in SCANNER_PREFIXES if row["Device"].startswith(p))
        fold = folds[row["ID"]]
        cases = by_group[(scanner, row["Pathology"])][fold]
        if row["Case"] not in cases:
            cases.append(row["Case"])
    chosen: list[str] = []
    for start, group in enumerate(sorted(by_group)):
        per_fold = [sorted(c, key=int) for _, c in sorted(by_group[group].items())]
        per_fold = per_fold[start % len(per_fold) :] + per_fold[: start % len(per_fold)]
        taken: list[str] = []
        while len(taken) < per_class and any(per_fold):
            for cases in per_fold:
                if cases and len(taken) < per_class:
                    taken.append(cases.pop(0))
        chosen += taken
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--busbra", type=Path, required=True, help="the full BUSBRA folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=3, help="patients per scanner and class")
    parser.add_argument("--scale", type=float, default=1 / 3)
    args = parser.parse_args()
    with (args.busbra / "bus_data.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (args.busbra / "5-fold-cv.csv").open(newline="") as handle:
        fold_rows = list(csv.DictReader(handle))
    folds = {r["ID"]: r["kFold"] for r in fold_rows}
    cases = set(pick_cases(rows, folds, args.cases))
    kept = [r for r in rows if r["Case"] in cases]
    (args.out / "Images").mkdir(parents=True, exist_ok=True)
    (args.out / "Masks").mkdir(parents=True, exist_ok=True)
    for row in kept:
        name = row["ID"].removeprefix("bus_")
        with Image.open(args.busbra / "Images" / f"{row['ID']}.png") as image:
            size = (
                max(1, round(image.width * args.scale)),
                max(1, round(image.height * args.scale)),
            )
            image.convert("L").resize(size, Image.Resampling.LANCZOS).save(
                args.out / "Images" / f"{row['ID']}.png", optimize=True
            )
        with Image.open(args.busbra / "Masks" / f"mask_{name}.png") as mask:
            small = mask.convert("L").resize(size, Image.Resampling.NEAREST)
            small.save(args.out / "Masks" / f"mask_{name}.png", optimize=True)
        row.update(
            Width=str(size[0]),
            Height=str(size[1]),
            BBOX=str(mask_bbox(np.asarray(small))).replace(" ", ""),
        )
    with (args.out / "bus_data.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    ids = {r["ID"] for r in kept}
    with (args.out / "5-fold-cv.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fold_rows[0]))
        writer.writeheader()
        writer.writerows(r for r in fold_rows if r["ID"] in ids)
    shutil.copy(args.busbra / "LICENSE.txt", args.out / "LICENSE.txt")
    print(f"{len(kept)} images of {len(cases)} patients -> {args.out}")


if __name__ == "__main__":
    main()
