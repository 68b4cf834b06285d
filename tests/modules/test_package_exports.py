import importlib

import pytest

import recsys_llm.models
import recsys_llm.modules


@pytest.mark.parametrize("name", recsys_llm.modules.__all__)
def test_each_plug_in_imports_from_the_package_as_from_its_module(name: str) -> None:
    """`from recsys_llm.modules import ...` gave ImportError for every plug-in: users needed about ten deep imports."""
    found = getattr(recsys_llm.modules, name)
    assert found is getattr(importlib.import_module(found.__module__), name)
    assert found.__module__.startswith("recsys_llm.modules.")


def test_unknown_names_and_the_task_of_the_models_package() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'FIE'"):
        recsys_llm.modules.FIE  # noqa: B018
    assert "FieldInteractionEnhancement" in dir(recsys_llm.modules)
    from recsys_llm.models import CTRTask
    from recsys_llm.models.task import CTRTask as defined

    assert CTRTask is defined
