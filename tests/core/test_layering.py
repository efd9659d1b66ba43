"""The package layout reads top-down (README, "Layout of the code"): a package imports only
packages below it, so there is no import cycle between them. Checked from the source, without
importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import isolated_agent

pytestmark = pytest.mark.unit

# Top first. A package may import itself and anything after it in this list.
LAYERS = ["cli", "jobs", "engines", "backupd", "guard", "fusefs", "env", "backup", "overlay",
          "protocol", "system", "errors"]
# Packages that must not import pyfuse3 (a model or a library, never a FUSE file system).
NO_PYFUSE3 = ["env", "backup", "overlay", "protocol", "system", "errors"]

PACKAGE = Path(isolated_agent.__file__).parent


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        top = relative.parts[0].removesuffix(".py")
        if top in ("__init__", "__main__"):
            continue
        found.append((top, path))
    return found


def _imported(path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved)."""
    names = set()
    module = ".".join(("isolated_agent", *path.relative_to(PACKAGE).with_suffix("").parts))
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if node.module == "isolated_agent")
    return names


def test_every_package_has_a_layer() -> None:
    assert {top for top, _ in _modules()} <= set(LAYERS)


def test_packages_import_only_layers_below_them() -> None:
    upward = []
    for top, path in _modules():
        allowed = set(LAYERS[LAYERS.index(top):])
        for name in _imported(path):
            parts = name.split(".")
            if parts[0] != "isolated_agent" or len(parts) < 2 or parts[1] == "__version__":
                continue
            if parts[1] not in allowed:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not upward, "\n".join(upward)


def test_libraries_do_not_import_pyfuse3() -> None:
    offenders = [str(path.relative_to(PACKAGE)) for top, path in _modules()
                 if top in NO_PYFUSE3
                 and any(name.split(".")[0] == "pyfuse3" for name in _imported(path))]
    assert not offenders
