"""``busfed site ingest``: turn a hospital's export into a de-identified site dataset.

Two kinds of export are read:

**Videos** (``SRC/**/*.avi|mp4|mov|mkv``, any codec PyAV decodes, e.g. MJPEG AVI) with

- an annotation CSV (``--annotations``), one row per video file, columns
  ``file, patient_id, label`` and the optional ``birads, age, lesion_size_mm, vendor,
  split``: ``file`` is the video's path relative to ``SRC`` (``/`` separators),
  ``patient_id`` the hospital's identifier (it never reaches the output), ``label``
  ``benign`` or ``malignant``, ``split`` ``train``, ``val`` or ``test`` (blank: drawn from
  the patient's pseudonym, 70/15/15, so all of a patient's videos share it); other
  columns are ignored;
- a box CSV (``--boxes``; by default ``boxes.csv`` beside the annotations, if present),
  columns ``file, frame, x1, y1, x2, y2``: 0-based frame index and pixel edges in the
  source video's frames (``0 <= x1 < x2 <= width``). Videos without boxes are kept.

**Key frames** (``--key-frames``): still images (PNG, JPEG, BMP or TIFF), each labelled
in one of two ways:

- by its folder, as BUSI is laid out: ``SRC/benign/*``, ``SRC/malignant/*`` and
  ``SRC/normal/*`` (a ``normal`` image becomes ``benign`` with BI-RADS ``1``, as for a
  normal sweep); an annotation row is optional, and its ``label``, if given, must agree
  with the folder;
- by its row in the annotation CSV, as BUS-BRA and many archives keep one folder of images
  and the labels in a table: the image may be anywhere under ``SRC`` and the row's
  ``label`` (``benign``, ``malignant`` or ``normal``) labels it.

The annotation CSV has the videos' columns (only ``file`` is required here; ``file`` as
``benign/x.png`` or ``Images/bus_0001-l.png``). An image in no label folder whose row has
no label is rejected, naming the row; without ``--annotations`` such an image is rejected
too. With ``--annotations``, the CSV lists the export's loose images: other images outside
the label folders (masks, another site's images) are left out and counted in one warning.
The box CSV is the videos' (``frame`` = 0 for a still), its boxes checked against the real
image size (``x2 == width`` is the border, and valid). Each image becomes a one-frame video,
which ``load_site`` reads like any other (the 2D key-frame model's input, cropped around its
box; the video classifier needs 8 frames and skips them). An image without a
``patient_id`` counts as its own patient, which overstates the number of patients if one
woman has several images: the summary warns, since the privacy unit is the patient.

**DICOM files** (any file with the DICM preamble, or named ``.dcm``) are read in either
mode, by ``client.ingest.dicom``: single images and cine loops, in any transfer syntax GDCM
decodes. In the annotation CSV, ``file`` names the DICOM file; a blank ``patient_id`` is
the header's PatientID (pseudonymised like any other), a blank ``vendor`` its
Manufacturer. Only the pixels are kept, black outside the scanner's tissue regions; each
file's de-identification record is in ``OUT/dicom-deid.json``. A cine loop among key
frames is rejected.

Bad rows are skipped, each rejected file named with the CSV, line and field (a label
outside the schema, a box outside the image, a patient found in two splits, a file
annotated twice); the rest of the export is ingested.

The output ``--out`` is a site dataset (``common.data.manifest``): ``manifest.csv``,
``boxes.csv`` and ``videos/<hash>.mp4`` (H.264, metadata-free, burned-in text masked,
odd sizes padded with black at the bottom and right). Patient ids are pseudonyms
(``client.deid``), ages above 89 are written as 90 (HIPAA Safe Harbor), and no source file
name appears in it. Source files are only read.

Each run is incremental: ``--out/.ingest-state.json`` keeps, per source file (keyed by a
keyed hash of its path), a SHA-256 of its content, its annotation and boxes and the
settings; a file whose digest is unchanged and whose output exists is not processed again.
Changing the secret or the de-identification settings redoes every file; outputs of
files that left the export (or whose annotation became invalid) are deleted.

Modules by stage: ``export`` reads the export and validates each file's fields before any
file is opened; ``convert`` decodes, checks, masks and re-encodes one file; ``run`` is the
incremental run that ties them together and writes the dataset.
"""

from client.ingest.export import Rejected
from client.ingest.run import STATE_FILE, Ingested, IngestReport, ingest

__all__ = ["STATE_FILE", "IngestReport", "Ingested", "Rejected", "ingest"]
