"""Turn BUS-BRA into the two CSVs of ``busfed site ingest --key-frames``: one site, or three.

BUS-BRA (Gómez-Flores, Gregorio-Calas and Pereira, Medical Physics 2023) keeps its 1,875
images in one folder (``Images/bus_0001-l.png``) and their labels in ``bus_data.csv``
(``ID, Case, Histology, Pathology, BIRADS, Device, Width, Height, Side, BBOX``); the
official folds are ``kFold`` in ``5-fold-cv.csv``. This writes ``OUT/annotations.csv``
(``file, patient_id, label, birads, vendor, split``: ``file`` relative to the BUS-BRA
folder, ``patient_id`` = ``Case``, so both breasts' images are one patient) and
``OUT/boxes.csv`` (``file, frame, x1, y1, x2, y2``, frame 0, pixel edges). With
``--test-fold K`` fold K is ``test``, ``--val-fold J`` is ``val`` and the others
``train``; without it the split is blank and ingest draws it per patient. A patient whose
images fall in two folds is reported and left to ingest's leak check. ``--by-scanner``
writes three sites instead, ``OUT/logiq7`` (GE Logiq 7), ``OUT/logiq5`` (GE Logiq 5) and
``OUT/toshiba-usystems`` (Toshiba Aplio 300 and U-Systems), each with its two CSVs.

BBOX is ``[x, y, w, h]`` as MATLAB writes it: ``x, y`` the 1-based first column and row,
``w, h`` the last minus the first; the pixel-edge box is ``x1 = x - 1, y1 = y - 1,
x2 = x + w, y2 = y + h``. Checked against the masks (``Masks/mask_0001-l.png``, nonzero =
lesion) on every run; on the full set: 1,874/1,875 boxes equal the mask's bounding box within
1 px (all 1,874 exactly). The one exception, ``bus_0845-s`` (BBOX
``[214,77,164,100]``, mask ``x 291..377, y 107..176``), is printed, and where a mask
exists and disagrees by more than 1 px the mask's box is written. ``Width`` and
``Height`` are not used: four rows give a wrong height (``bus_0856-l``, ``bus_0857-r``,
``bus_0912-l``, ``bus_0990-l``), and ingest checks each box against the real image.

Usage: ``python benchmarks/busbra.py --busbra BUSBRA --out OUT [--test-fold K]
[--val-fold J] [--by-scanner]``, then per site ``busfed site ingest BUSBRA --key-frames
--annotations OUT/SITE/annotations.csv --boxes OUT/SITE/boxes.csv --out SITE_DIR
--secret-file F``.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

# Device prefix -> (vendor written to the manifest, site with --by-scanner).
SCANNERS = {
    "GE Logiq 7": ("ge-logiq7", "logiq7"),
    "GE Logiq 5": ("ge-logiq5", "logiq5"),
    "Toshiba Aplio 300": ("toshiba-aplio300", "toshiba-usystems"),
    "U-Systems": ("u-systems", "toshiba-usystems"),
}
ANNOTATION_COLUMNS = ("file", "patient_id", "label", "birads", "vendor", "split")
BOX_COLUMNS = ("file", "frame", "x1", "y1", "x2", "y2")
Edges = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixel edges


def bbox_edges(bbox: str) -> Edges:
    """BUS-BRA's ``"[x,y,w,h]"`` (1-based x, y; w = last - first column) as pixel edges."""
    x, y, w, h = (int(v) for v in json.loads(bbox))
    return x - 1, y - 1, x + w, y + h


def mask_edges(path: Path) -> Edges | None:
    """The pixel edges of a mask's nonzero pixels; None without a mask or a lesion."""
    if not path.is_file():
        return None
    with Image.open(path) as mask:
        ys, xs = np.nonzero(np.asarray(mask.convert("L")))
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def lesion_box(busbra: Path, row: dict[str, str]) -> tuple[Edges, str | None]:
    """An image's lesion box, and how its BBOX compares with its mask.

    The second value is None without a mask, ``"exact"``, ``"within 1 px"``, or
    ``"disagree"``: the box returned is then the mask's.
    """
    box = bbox_edges(row["BBOX"])
    mask = mask_edges(busbra / "Masks" / f"mask_{row['ID'].removeprefix('bus_')}.png")
    if mask is None:
        return box, None
    if box == mask:
        return box, "exact"
    if max(abs(a - b) for a, b in zip(box, mask, strict=True)) <= 1:
        return box, "within 1 px"
    return mask, "disagree"


def scanner(device: str) -> tuple[str, str]:
    return next(v for prefix, v in SCANNERS.items() if device.startswith(prefix))


def split_of(fold: str, test_fold: int | None, val_fold: int | None) -> str:
    if test_fold is None:
        return ""
    return {str(test_fold): "test", str(val_fold): "val"}.get(fold, "train")


def convert(
    busbra: Path, out: Path, *, test_fold: int | None, val_fold: int | None, by_scanner: bool
) -> dict[str, int]:
    """Write the CSVs; returns images per site and prints what it checked."""
    with (busbra / "5-fold-cv.csv").open(newline="") as handle:
        folds = {r["ID"]: r["kFold"] for r in csv.DictReader(handle)}
    sites: dict[str, tuple[list[tuple[str, ...]], list[tuple[object, ...]]]] = defaultdict(
        lambda: ([], [])
    )
    case_folds: dict[str, set[str]] = defaultdict(set)
    agree = exact = masked = 0
    with (busbra / "bus_data.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            where = f"bus_data.csv line {reader.line_num}"
            if row["ID"] not in folds:
                raise SystemExit(f"{where}, field ID: {row['ID']} is not in 5-fold-cv.csv")
            file = f"Images/{row['ID']}.png"
            box, check = lesion_box(busbra, row)
            if check is not None:
                masked += 1
                exact += check == "exact"
                if check == "disagree":
                    print(
                        f"{file} ({where}, field BBOX): {row['BBOX']} gives edges "
                        f"{bbox_edges(row['BBOX'])}, its mask {box}; the mask's box is written"
                    )
                else:
                    agree += 1
            vendor, site = scanner(row["Device"])
            annotations, boxes = sites[site if by_scanner else "."]
            fold = folds[row["ID"]]
            case_folds[row["Case"]].add(fold)
            annotations.append(
                (file, row["Case"], row["Pathology"], row["BIRADS"], vendor,
                 split_of(fold, test_fold, val_fold))
            )  # fmt: skip
            boxes.append((file, 0, *box))
    print(
        f"{agree:,}/{masked:,} boxes equal the mask's bounding box within 1 px ({exact:,} exactly)"
    )
    for case, seen in sorted(case_folds.items(), key=lambda item: int(item[0])):
        if len(seen) > 1:
            print(f"Case {case}: images in folds {', '.join(sorted(seen))}; ingest's check decides")
    for site, (annotations, boxes) in sorted(sites.items()):
        (out / site).mkdir(parents=True, exist_ok=True)
        for name, header, rows in (
            ("annotations.csv", ANNOTATION_COLUMNS, annotations),
            ("boxes.csv", BOX_COLUMNS, boxes),
        ):
            with (out / site / name).open("w", newline="") as handle:
                csv.writer(handle).writerows([header, *rows])
        patients = len({row[1] for row in annotations})
        print(f"{out / site}: {len(annotations)} images of {patients} patients")
    return {site: len(rows) for site, (rows, _) in sites.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--busbra", type=Path, required=True, help="the BUSBRA folder")
    parser.add_argument("--out", type=Path, required=True, help="where the CSVs go")
    parser.add_argument("--test-fold", type=int, choices=range(1, 6), help="kFold -> test")
    parser.add_argument("--val-fold", type=int, choices=range(1, 6), help="kFold -> val")
    parser.add_argument("--by-scanner", action="store_true", help="three sites by scanner")
    args = parser.parse_args()
    if args.val_fold is not None and (args.test_fold is None or args.val_fold == args.test_fold):
        parser.error("--val-fold needs a different --test-fold")
    convert(
        args.busbra,
        args.out,
        test_fold=args.test_fold,
        val_fold=args.val_fold,
        by_scanner=args.by_scanner,
    )


if __name__ == "__main__":
    main()
