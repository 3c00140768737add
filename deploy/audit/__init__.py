"""The auditor's room: verify the sites' privacy ledgers, report on them, audit empirically.

``verify`` checks each ledger's signatures, hash chain, order and epsilons with an
independent accountant; ``report`` renders the result as a static HTML page; ``empirical``
bounds the epsilon of the sites' DP-SGD from one rehearsal run with canaries; ``cli`` and
``empirical_cli`` are ``busfed audit ...``. It lives in ``deploy/``, apart from the
consortium's ``server/``, which never imports it, and is not in the Flower app bundle.
"""
