"""Every Sphinx cross-reference in the package's docstrings (``:func:``, ``:class:``, ``:meth:``, ...) names something
that exists: a function renamed or moved leaves no reference to its old name behind."""

import builtins
import importlib
import inspect
import re
from pathlib import Path
from typing import List

import recsys_llm

PACKAGE = Path(recsys_llm.__file__).resolve().parent
# a role and its target, less a leading ``~`` and a trailing ``()``; ``title <target>`` forms are not used here
REFERENCE = re.compile(r":(?:func|class|meth|mod|attr|data|exc):`~?([^`<]+?)(?:\(\))?`")


def _exists(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute path under the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(found, part):
                return False
            found = getattr(found, part)
        return True
    return False


def _unresolved(path: Path) -> List[str]:
    """References in ``path`` that resolve neither as written, nor in its module, nor in a class it defines or imports
    (Sphinx resolves a bare ``:meth:`x``` in the class it is written in), nor as a builtin."""
    module_name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    module = importlib.import_module(module_name)
    classes = [value for value in vars(module).values() if inspect.isclass(value)]
    text = path.read_text(encoding="utf-8")
    unresolved = []
    for match in REFERENCE.finditer(text):  # over the whole text: a target broken over two lines resolves to nothing
        target = match.group(1)
        if not (_exists(target) or _exists(f"{module_name}.{target}") or hasattr(builtins, target.split(".")[0])
                or any(_exists(f"{cls.__module__}.{cls.__qualname__}.{target}") for cls in classes)):
            number = text.count("\n", 0, match.start()) + 1
            unresolved.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {match.group(0)!r}")
    return unresolved


def test_every_docstring_reference_names_something_that_exists() -> None:
    files = [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__main__.py"]  # __main__ runs the CLI
    assert len(files) > 50
    unresolved = [entry for path in files for entry in _unresolved(path)]
    assert not unresolved, "\n".join(unresolved)
