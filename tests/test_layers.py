"""Imports run one way: inside ``common/`` along the layers written in ``common/__init__.py``;
nothing the product runs imports ``deploy/`` or ``tests/``; ``client/`` and ``server/`` stay apart.

Sources are parsed with ``ast``, nothing of busfed is imported. Every import counts, also one
inside a function or under ``TYPE_CHECKING``: either couples the two modules.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the product runs, and what none of it may import.
PRODUCT = ("common", "client", "server")
NOT_IMPORTED_BY_PRODUCT = ("deploy", "tests")


def read_layers(root: Path) -> dict[str, int]:
    """``{name under common/: layer}`` from the numbered list in ``common/__init__.py``."""
    docstring = ast.get_docstring(ast.parse((root / "common" / "__init__.py").read_text())) or ""
    layers: dict[str, int] = {}
    for line in docstring.splitlines():
        item = re.match(r"(\d+)\. (.*?):", line)
        if item:
            for name in re.findall(r"``(\w+)``", item.group(2)):
                layers[name] = int(item.group(1))
    return layers


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for each import of ``path``, relative imports made absolute.

    ``from a.b import c`` gives ``a.b``; ``from a import b`` gives ``a.b`` (``b`` may be
    a module of the package ``a``).
    """
    module = module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if "." in base:
                yield node.lineno, base
            else:
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}"


def _sources(root: Path, top: str) -> list[Path]:
    return sorted((root / top).rglob("*.py"))


def _layer_name(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "common" and len(parts) > 1 else None


def layer_violations(root: Path) -> list[str]:
    """Each import inside ``common/`` that goes up the layers, or involves an unplaced name."""
    layers = read_layers(root)
    problems = []
    for path in _sources(root, "common"):
        where = path.relative_to(root)
        own = _layer_name(module_name(root, path))
        if own is None:
            continue  # common/__init__.py: the layers themselves
        if own not in layers:
            problems.append(f"{where}: common.{own} is in no layer of common/__init__.py")
            continue
        for line, target in imported_modules(root, path):
            name = _layer_name(target)
            if name is None:
                continue
            if name not in layers:
                problems.append(f"{where}:{line}: imports {target}, in no layer")
            elif layers[name] > layers[own]:
                problems.append(
                    f"{where}:{line}: imports {target} (layer {layers[name]}, {name}) "
                    f"from layer {layers[own]} ({own})"
                )
    return problems


def forbidden_imports(root: Path) -> list[str]:
    """Each import of ``deploy``/``tests`` by the product, between ``client``/``server``, or
    of ``mlflow`` by ``common``."""
    problems = []
    for top in PRODUCT:
        forbidden = set(NOT_IMPORTED_BY_PRODUCT)
        forbidden |= {"client": {"server"}, "server": {"client"}}.get(top, set())
        # common/ never opens a network connection: the MLflow client belongs to server/, deploy/
        forbidden |= {"common": {"mlflow"}}.get(top, set())
        for path in _sources(root, top):
            for line, target in imported_modules(root, path):
                if target.split(".")[0] in forbidden:
                    problems.append(f"{path.relative_to(root)}:{line}: imports {target}")
    return sorted(set(problems))


def test_layers_are_written_down():
    layers = read_layers(ROOT)
    assert {"errors", "geometry", "models", "pipeline", "data"} <= set(layers)
    assert layers["geometry"] < layers["models"] < layers["pipeline"] < layers["data"]


def test_common_imports_run_down_the_layers():
    problems = layer_violations(ROOT)
    assert not problems, "imports against the layers of common/__init__.py:\n" + "\n".join(problems)


def test_product_does_not_import_deploy_tests_or_the_other_side():
    problems = forbidden_imports(ROOT)
    assert not problems, "\n".join(problems)


def test_the_checks_name_the_offending_import(tmp_path: Path):
    (tmp_path / "common" / "pipeline").mkdir(parents=True)
    (tmp_path / "common" / "data").mkdir()
    (tmp_path / "client").mkdir()
    layers = '"""Layers.\n\n1. ``pipeline``: inference.\n2. ``data``: loading.\n"""\n'
    (tmp_path / "common" / "__init__.py").write_text(layers)
    (tmp_path / "common" / "data" / "units.py").write_text("from common.pipeline import run\n")
    (tmp_path / "common" / "pipeline" / "run.py").write_text(
        "import os\n\ndef f():\n    from ..data.units import build_units\n"
    )
    (tmp_path / "common" / "stray.py").write_text("")
    (tmp_path / "client" / "site.py").write_text("from deploy.synth import generate_site\n")
    assert layer_violations(tmp_path) == [
        "common/pipeline/run.py:4: imports common.data.units (layer 2, data) "
        "from layer 1 (pipeline)",
        "common/stray.py: common.stray is in no layer of common/__init__.py",
    ]
    assert forbidden_imports(tmp_path) == ["client/site.py:1: imports deploy.synth"]
