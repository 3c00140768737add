"""A site's data, read and cut for training: the layer above the pipeline (``common/__init__``).

- ``manifest``: ``manifest.csv`` and ``boxes.csv``, validated row by row (``load_site``);
- ``video``: reading, probing and writing grayscale videos;
- ``units``: per-patient detector frames and classifier clips, the privacy unit of DP-SGD;
- ``keyframes``: the 2D comparator's key frames, its three readings and per-patient units.

Boxes, windows and crops are ``common.geometry``'s, the same as at inference.
"""
