"""The networks and how they travel: detector, I3D classifier, key-frame comparator.

- ``presets``: the architecture knobs (``paper`` and the CPU-sized ``tiny``);
- ``detector``, ``i3d``, ``keyframe``: the three networks; ``frozen``: frozen BatchNorm for
  their trunks;
- ``bundle``: the networks a federation trains, as flat weight lists;
- ``loading``: a model version's folder (weights and model card);
- ``backbone``: torchvision's ImageNet ResNet weights from a local file into the trunks.
"""
