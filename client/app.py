"""The site's ClientApp, run by the hospital's SuperNode for every message of a round.

Legacy Flower path on purpose: SecAgg+ exists only there (``NumPyClient`` +
``secaggplus_mod``). The site's config comes from the SuperNode
(``--node-config site-config=PATH``), never from the server.

Flower starts a fresh ``flwr-clientapp`` process for each message, and three of SecAgg+'s
four stages never reach the client: this module stays light (no torch at import) so that
those stages cost a process start, not a deep-learning stack's import.
"""

from __future__ import annotations

from pathlib import Path

from flwr.client import Client, ClientApp
from flwr.common import Context

from client.policy import SITE_CONFIG_KEY, secure_aggregation_mod
from common.config import load_site_config


def client_fn(context: Context) -> Client:
    from client.site import SiteClient  # torch, Opacus, torchvision: only when training

    config = load_site_config(Path(str(context.node_config[SITE_CONFIG_KEY])))
    return SiteClient(config, dict(context.run_config)).to_client()


# SecAgg+ through the site's policy: a request without it never reaches training unless
# the site's config allows it.
app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
