"""Site policy mods: checks the hospital applies to every message before its ClientApp runs."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from flwr.app import Context, Error, Message, MessageType
from flwr.client.mod import secaggplus_mod
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


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run SecAgg+ for training requests that use it; refuse the others unless allowed.

    A training message without SecAgg+ stage configs would make the site send its update
    in the clear; the site, not the server, decides whether that is acceptable
    (``privacy.require_secure_aggregation`` in its config). Flower's ``secaggplus_mod``
    cannot serve a plain request, so it is applied here only to SecAgg+ ones.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    config = load_site_config(Path(str(ctxt.node_config[SITE_CONFIG_KEY])))
    if config.privacy.require_secure_aggregation:
        return refusal(
            msg,
            f"site {config.site.name} refuses to train: the request does not use secure "
            "aggregation (SecAgg+), and the site config requires it",
        )
    return call_next(msg, ctxt)
