"""Evaluation of trained models on held-out data; the commands only parse and print.

- ``validation``: a site's held-out patients during a federated round (losses, AUCs and
  the score histogram behind the consortium's pooled AUC; no score leaves the site);
- ``loading``: a model version from a folder or the MLflow registry, on a device, and the
  check of its kind;
- ``scoring``: the one loop that scores a site's videos (an unreadable video is listed,
  never fatal), and the scores file and run summary both model kinds write;
- ``discrimination``: the video-level AUC with DeLong's 95% CI and the operating point at
  the biopsy threshold, with and without the fallback score for unscored videos;
- ``videos``: ``busfed evaluate``'s work, dispatched by bundle kind to ``wauve`` (one
  pipeline score per video) or ``keyframe`` (the 2D comparator's three readings);
- ``detection``: the lesion detector's recall and average precision at one IoU (VOC's
  all-point AP), the patient-level bootstrap of both, and the batched inference behind them;
- ``score_table``: a scores CSV read for ``busfed metrics``, bad rows skipped and listed.

Nothing here imports torch at package level: ``busfed metrics`` must start fast.
"""
