"""The package's layering, as the README's architecture section lists it: each layer imports only the ones
above it (an import cycle, or the core importing the training service, fails here)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distbp"
# top to bottom, as in the README
LAYERS = ["serialization", "autograd", "nn", "optim", "data", "models", "comm", "parallel", "ps", "train", "cli"]


def _layer_of(path):
    part = path.relative_to(PACKAGE).parts[0]
    return part.removesuffix(".py")


def _imported_layers(path):
    """The distbp layers a module imports, absolute or relative, at any depth (lazy imports too)."""
    tree = ast.parse(path.read_text(), str(path))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # packages between distbp/ and the module
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module == "distbp":  # from distbp import cli
                names = [a.name for a in node.names]
            elif node.level == 0:  # from distbp.cli import main; other packages are no layer
                names = [module.removeprefix("distbp.")] if module.startswith("distbp.") else []
            elif node.level - 1 == depth:  # relative to distbp itself: "from ..comm import", "from . import nn"
                names = [module] if module else [a.name for a in node.names]
            else:
                names = []  # within its own layer (or above the package)
            for name in names:
                found.add(name.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("distbp."))
    return found & set(LAYERS)


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer_of(p) in LAYERS and "v1" not in p.parts)


def test_every_module_belongs_to_a_listed_layer():
    unlisted = {_layer_of(p) for p in PACKAGE.rglob("*.py")} - set(LAYERS) - {"__init__", "__main__"}
    assert not unlisted, f"layers missing from LAYERS and the README: {sorted(unlisted)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_layers_above_its_own(path):
    mine = LAYERS.index(_layer_of(path))
    below = sorted(name for name in _imported_layers(path) if LAYERS.index(name) > mine)
    assert not below, f"{path.relative_to(PACKAGE)} ({LAYERS[mine]}) imports {below}, listed below it"
