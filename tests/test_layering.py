"""The package's import layers (docs/design.md, "Packages and what each one does"): at module
level a file imports only its own layer and the layers below it, and library code never
imports test helpers. Imports inside functions may reach up (a plug-in naming a run directory
in an error, say); they load nothing at import time and form no import cycle.
"""

import ast
import os
from typing import Iterator, List, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "recsys_llm")

# lowest first; a module imports at module level only from its own layer or one below it
LAYERS = ("leaf", "data", "models", "semantics", "modules", "train", "serving", "cli")
LEAF_MODULES = {"recsys_llm", "recsys_llm.atomic_dir", "recsys_llm.error_text", "recsys_llm.file_hash",
                "recsys_llm.paths", "recsys_llm.env", "recsys_llm.host_memory", "recsys_llm.progress", "recsys_llm.typed_config",
                "recsys_llm.train.distributed"}
DATA_LEVEL_MODULES = {"recsys_llm.id_rules"}  # the id rules of the data's fields, shared by reader and serving


def layer_of(module: str) -> str:
    if module in LEAF_MODULES:
        return "leaf"
    if module in DATA_LEVEL_MODULES:
        return "data"
    top = module.split(".")[1]
    return "cli" if top in ("demo", "__main__") else top  # python -m recsys_llm: the command


def _module_level_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node that runs at import time: all but function bodies (class bodies run)."""
    pending: List[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        pending.extend(ast.iter_child_nodes(node))


def _imports(tree: ast.Module) -> Iterator[Tuple[str, int]]:
    for node in _module_level_nodes(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def _library_files() -> Iterator[Tuple[str, str]]:
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                yield path, module


def test_every_library_module_has_a_layer() -> None:
    for _, module in _library_files():
        assert layer_of(module) in LAYERS, f"{module}: no layer in {LAYERS}; add it to tests/test_layering.py"


def test_module_level_imports_go_down_the_layers_only() -> None:
    upward = []
    for path, module in _library_files():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        for imported, line in _imports(tree):
            if not imported.startswith("recsys_llm"):
                continue
            if LAYERS.index(layer_of(imported)) > LAYERS.index(layer_of(module)):
                upward.append(f"{os.path.relpath(path, REPO)}:{line}: {module} ({layer_of(module)}) imports "
                              f"{imported} ({layer_of(imported)})")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_library_code_never_imports_test_helpers() -> None:
    found = []
    for path, _ in _library_files():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):  # inside functions too
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            found += [f"{os.path.relpath(path, REPO)}:{node.lineno}: {name}" for name in names
                      if name == "tests" or name.startswith("tests.")]
    assert not found, "library code imports test helpers:\n" + "\n".join(found)


@pytest.mark.parametrize("module, expected", [
    ("recsys_llm.models.task", "models"), ("recsys_llm.train.distributed", "leaf"), ("recsys_llm.demo", "cli"),
    ("recsys_llm.id_rules", "data"), ("recsys_llm.cli.export", "cli"),
])
def test_the_layer_of_a_module(module: str, expected: str) -> None:
    assert layer_of(module) == expected


def test_the_old_task_module_still_imports_with_a_deprecation_warning() -> None:
    import importlib
    import sys

    sys.modules.pop("recsys_llm.train.task", None)
    with pytest.warns(DeprecationWarning, match=r"recsys_llm\.train\.task moved to recsys_llm\.models\.task"):
        old = importlib.import_module("recsys_llm.train.task")
    from recsys_llm.models.task import CTRTask

    assert old.CTRTask is CTRTask
