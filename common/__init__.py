"""What the sites and the consortium share: models, pipeline, data, privacy; no network I/O.

Imports inside ``common/`` run one way, along these layers, lowest first. A module imports
from its own layer and the layers below it, never from one above; ``tests/test_layers.py``
reads this list and checks every import against it, so a new top-level module or package
of ``common/`` goes into one of the layers here.

1. ``errors``, ``files``: the error hierarchy and atomic writes; they import nothing of busfed.
2. ``cli``, ``config``, ``keys``, ``flower_compat``, ``privacy``, ``site_states``: what every
   command shares (exit codes, the site config, key files, Flower's patches, privacy
   accounting and the ledger, each site's state in a round); they know nothing of images.
3. ``geometry``: boxes, clip windows, crop regions and crops, one definition for training
   and inference.
4. ``models``: the networks, their presets, bundles and weight loading.
5. ``pipeline``: inference, one module per stage (detect -> track -> clip -> classify ->
   score -> explain); it never reads a manifest.
6. ``data``: manifests, video I/O and the training units; data loading may use the
   pipeline (its preprocessing, a detector's clips), never the other way round.
7. ``evaluation``, ``metrics``: scores and the paper's statistics on held-out data.

Nothing in ``common/``, ``client/`` or ``server/`` imports ``deploy/`` or ``tests/``, and
``client/`` and ``server/`` do not import each other.
"""
