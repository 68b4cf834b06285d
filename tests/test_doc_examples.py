"""The ``Example::`` blocks of the plug-in surface (``recsys_llm.models``, ``recsys_llm.modules``) run.

Each block runs as a reader would paste it, in a namespace of what the examples take as given
(not their own module's, whose private names a reader does not have), as torchrec's and
FuxiCTR's do: torch, torchrec's EBC and KJT types, the public names of both packages, a
``schema``, its ``ebc``, and a batch's ``dense`` and ``kjt``. Blocks that need files or a
process group are sketches, listed in ``SKETCHES`` with why.
"""

import importlib
import inspect
import pkgutil
import textwrap
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import recsys_llm.models
import recsys_llm.modules

SKETCHES = {
    "recsys_llm.models.once_differentiable": "a fragment: how to decorate a backward",
    "recsys_llm.modules.elec": "shards the task (shard_model needs a process group)",
    "recsys_llm.modules.llactr": "reads a field-vector file",
    "recsys_llm.modules.random_stream.own_random_stream": "a fragment (build_gain_network(...))",
    "recsys_llm.modules.semantic_table": "shards the task and reads vector exports",
}


def _blocks(doc: str) -> List[str]:
    """The indented block under each line ending in ``Example::``, dedented."""
    lines, found, i = doc.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].rstrip().endswith("Example::"):
            i += 1
            continue
        indent, body, i = len(lines[i]) - len(lines[i].lstrip()), [], i + 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        found.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return found


def _documented(module) -> Iterator[Tuple[str, str]]:
    """(qualified name, docstring) of the module and of the classes, functions and methods it defines."""
    yield module.__name__, module.__doc__ or ""
    for name, obj in vars(module).items():
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ != module.__name__:
            continue
        yield f"{module.__name__}.{name}", obj.__doc__ or ""
        for method_name, method in vars(obj).items() if inspect.isclass(obj) else ():
            function = getattr(method, "__func__", method)
            if inspect.isfunction(function):
                yield f"{module.__name__}.{name}.{method_name}", function.__doc__ or ""


def _examples() -> Dict[str, Tuple[str, str]]:
    found = {}
    for package in (recsys_llm.models, recsys_llm.modules):
        for info in pkgutil.iter_modules(package.__path__):
            module_name = f"{package.__name__}.{info.name}"
            for where, doc in _documented(importlib.import_module(module_name)):
                for k, block in enumerate(_blocks(doc)):
                    found[f"{where}[{k}]" if k else where] = (module_name, block)
    return found


EXAMPLES = _examples()


def _given() -> Dict[str, object]:
    """What the examples take as given: torch, torchrec's sparse types and the public names of models / modules.

    Tables, batches and schemas are not given: each example builds what it uses, as a reader would."""
    public = {name: getattr(package, name) for package in (recsys_llm.models, recsys_llm.modules)
              for name in package.__all__}
    return {**public, "torch": torch, "EmbeddingBagCollection": EmbeddingBagCollection,
            "EmbeddingBagConfig": EmbeddingBagConfig, "KeyedJaggedTensor": KeyedJaggedTensor,
            "KeyedTensor": KeyedTensor}


def test_the_plug_in_surface_has_examples() -> None:
    assert len(EXAMPLES) >= 20 and set(SKETCHES) <= set(EXAMPLES)


@pytest.mark.parametrize("where", sorted(set(EXAMPLES) - set(SKETCHES)))
def test_the_example_runs(where: str) -> None:
    module_name, block = EXAMPLES[where]
    torch.manual_seed(0)
    namespace = _given()
    exec(compile(block, f"<Example of {where}>", "exec"), namespace)  # noqa: S102 - the project's own docstrings
