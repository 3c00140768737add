"""The site's SecAgg+ policy: a training request in the clear never reaches training."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.policy import secure_aggregation_mod
from common.config import load_site_config, render_site_config
from deploy.demo import demo_site_config


def site_context(tmp_path: Path, *, require: bool) -> Context:
    config = demo_site_config("hospital-x", tmp_path)
    privacy = config.privacy.model_copy(update={"require_secure_aggregation": require})
    path = tmp_path / "site.toml"
    path.write_text(render_site_config(config.model_copy(update={"privacy": privacy})))
    return Context(
        run_id=1,
        node_id=7,
        node_config={"site-config": str(path)},
        state=RecordDict(),
        run_config={},
    )


@pytest.fixture(autouse=True)
def task_identity() -> None:
    # Flower reads the identity of the running task when it builds a Message.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 3, 1, 0


def train_message(*, secagg: bool) -> Message:
    content = RecordDict({"fitins.config": ConfigRecord({"round": 1})})
    if secagg:  # the first stage of SecAgg+, as SecAggPlusWorkflow sends it
        content[RECORD_KEY_CONFIGS] = ConfigRecord(
            {
                Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3,
                Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 4194304,
                Key.MOD_RANGE: 4294967296, Key.MAX_WEIGHT: 1000.0,
            }
        )  # fmt: skip
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_training_without_secagg_is_refused(tmp_path: Path) -> None:
    called: list[Message] = []
    reply = secure_aggregation_mod(
        train_message(secagg=False),
        site_context(tmp_path, require=True),
        lambda m, c: called.append(m) or m,
    )
    assert called == []
    assert reply.has_error()
    assert "hospital-x refuses to train" in reply.error.reason
    assert "secure aggregation" in reply.error.reason


def test_training_with_secagg_runs_the_protocol(tmp_path: Path) -> None:
    trained: list[Message] = []
    reply = secure_aggregation_mod(
        train_message(secagg=True),
        site_context(tmp_path, require=True),
        lambda m, c: trained.append(m) or m,
    )
    assert not reply.has_error()
    # The setup stage answers with the site's SecAgg+ public keys; nothing is trained yet.
    assert {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2} <= set(
        reply.content.config_records[RECORD_KEY_CONFIGS]
    )
    assert trained == []


def test_a_site_may_opt_out_explicitly(tmp_path: Path) -> None:
    msg = train_message(secagg=False)
    reply = secure_aggregation_mod(msg, site_context(tmp_path, require=False), lambda m, c: m)
    assert reply is msg


def test_site_config_round_trip_and_errors(tmp_path: Path) -> None:
    ctx = site_context(tmp_path, require=True)
    path = Path(str(ctx.node_config["site-config"]))
    config = load_site_config(path)
    assert config.site.data == tmp_path / "data" and config.privacy.delta == 1e-5
    from common.errors import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace("epsilon_budget = 8.0", "epsilon_budget = -1"))
    with pytest.raises(ConfigError, match=r"bad.toml: privacy\.epsilon_budget: "):
        load_site_config(bad)
    missing = tmp_path / "missing.toml"
    missing.write_text(
        "\n".join(
            line
            for line in path.read_text().splitlines()
            if not line.startswith("noise_multiplier")
        )
    )
    with pytest.raises(ConfigError, match="noise_multiplier"):
        load_site_config(missing)
