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


@pytest.mark.parametrize("name, module", [("load_full_state", "teacher_student"),
                                          ("write_teacher_columns", "teacher_columns"),
                                          ("attach_columns", "teacher_columns"),
                                          ("load_semantic_vectors", "semantic_table"),
                                          ("refresh_after_load", "field_interaction")])
def test_the_functions_the_plug_ins_need_import_from_the_package(name: str, module: str) -> None:
    """docs/usage.md's recipes load a gain network's state (load_full_state), fill semantic tables
    (load_semantic_vectors) and refresh FIE after an in-place load; only the classes imported from the package."""
    assert name in recsys_llm.modules.__all__
    assert getattr(recsys_llm.modules, name) is getattr(importlib.import_module(f"recsys_llm.modules.{module}"), name)
