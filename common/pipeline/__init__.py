"""Inference: a video in; a cancer-risk score, BI-RADS-aligned category and heatmaps out.

One module per stage, chained by ``run.run_pipeline``::

    preprocess? -> detect -> track -> clip -> classify -> score -> explain?

- ``config``: ``PipelineConfig`` (every setting) and ``PreprocessConfig``;
- ``preprocess``: optional speckle reduction and contrast normalisation (off by default);
- ``detect``: Faster R-CNN on every frame, boxes in video pixels;
- ``track``: IoU linking of boxes into tracks (Hungarian), or ground-truth tracks;
- ``clip``: 8-frame clips cropped exactly as in training (``common.geometry``);
- ``classify``: I3D malignancy probability per clip;
- ``score``: mean clip probability and its BI-RADS-aligned category;
- ``explain``: class activation maps, projected back onto the frames;
- ``keyframe``: the 2D comparator's P(malignant) of every annotated frame;
- ``render``: the report, annotated video and heatmap figure of ``busfed predict``.

The package imports nothing itself, so that importing ``config`` stays free of torch. Its
modules use ``common.geometry`` and ``common.models``, never ``common.data``: training data
loading sits above the pipeline (``common/__init__``).
"""
