"""Site policy mods: checks the hospital applies to every message before its ClientApp runs."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.config import load_site_config

SITE_CONFIG_KEY = "site-config"


def refusal(msg: Message, reason: str) -> Message:
    """An error reply the server logs as this site's failure for the round."""
    log(WARNING, "busfed site policy: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def require_secure_aggregation_mod(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Refuse any training request that does not run the SecAgg+ protocol.

    A training message without SecAgg+ stage configs would make the site send its update
    in the clear; the site, not the server, decides whether that is acceptable
    (``privacy.require_secure_aggregation`` in its config).
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    config = load_site_config(Path(str(ctxt.node_config[SITE_CONFIG_KEY])))
    if config.privacy.require_secure_aggregation and (
        RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return refusal(
            msg,
            f"site {config.site.name} refuses to train: the request does not use secure "
            "aggregation (SecAgg+), and the site config requires it",
        )
    return call_next(msg, ctxt)
