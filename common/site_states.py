"""Where each site is in the round in progress, as the ServerApp records it in
``OUT_DIR/sites.json`` (``server.site_state``), and the run config's site names.

Light on purpose (no Flower import): the demo and ``busfed federation status`` read it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

STATE_FILE = "sites.json"
# What a site is doing while a message of each stage is out, and once it has answered.
ASKED = {
    "setup": ("setting up", "set up"),
    "share_keys": ("exchanging keys", "keys sent"),
    "collect_masked_vectors": ("training", "update sent"),
    "unmask": ("unmasking", "shares sent"),
    "train": ("training", "update sent"),
    "evaluate": ("evaluating", "evaluated"),
}


def parse_site_names(text: str) -> dict[int, str]:
    """``"NODE=SITE,NODE=SITE"`` (the run config's ``site-names``) as node id -> site.

    Raises
    ------
    ValueError
        A pair that is not ``integer=name``.
    """
    names: dict[int, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        node, sep, site = pair.partition("=")
        if not sep or not node.strip().isdigit() or not site.strip():
            raise ValueError(f"site-names: {pair!r} is not NODE_ID=SITE")
        names[int(node)] = site.strip()
    return names


def format_site_names(names: dict[int, str]) -> str:
    """The inverse of ``parse_site_names``."""
    return ",".join(f"{node}={site}" for node, site in sorted(names.items()))


def read_site_states(out_dir: Path) -> dict[str, Any] | None:
    """The ServerApp's latest ``sites.json`` in ``out_dir``, or None before its first round."""
    try:
        return dict(json.loads((out_dir / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return None


def describe_site_states(states: dict[str, Any], *, now: float | None = None) -> str:
    """One line: ``round 2: hospital-a training 41 s, hospital-b update sent, ...``."""
    now = time.time() if now is None else now
    parts = []
    for site, entry in sorted(states.get("sites", {}).items()):
        text = f"{site} {entry['state']}"
        if entry["state"] in {asked for asked, _ in ASKED.values()}:
            text += f" {max(0.0, now - float(entry['since'])):.0f} s"
        parts.append(text)
    return f"round {states.get('round', '?')}: " + ", ".join(parts)
