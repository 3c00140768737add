"""The consortium lead's federation: enrol sites, run the SuperLink, start and watch runs.

Everything lives in one consortium folder, made by ``consortium.init_consortium``
(``busfed federation init --dir D``):

=======================  ==============================================================
``consortium.toml``      the consortium's settings, read as a ``Consortium``
``pki/``                 ``ca.crt``, ``ca.key`` (move it offline), ``server.crt``/``.key``
``flwr/config.toml``     the ``flwr`` CLI's connection profile (``FLWR_HOME``)
``superlink.db``         the SuperLink's state: runs and enrolled nodes
``enrolments.jsonl``     append-only: every enrolment and revocation, with key fingerprints
``launches.jsonl``       append-only: every run started, its campaign and out-dir
``runs/<campaign>/``     the ServerApp's out-dir (``rounds.jsonl``, ``summary.json``)
``mlflow.db``            MLflow, with ``mlartifacts/``, unless another tracking URI is set
=======================  ==============================================================

Flower's own CLI does the talking (``flwr supernode register|unregister|list``, ``flwr
run|list|stop``); this package adds what Flower does not keep: which site holds which node
and key, and which run belongs to which campaign and out-dir. One module per job:
``consortium`` (the settings file), ``superlink``, ``enrolment``, ``runs``, ``status``,
``logs`` (the append-only logs they share) and ``cli`` (``busfed federation ...``).
"""
