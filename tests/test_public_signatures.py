"""The optional settings of the public API's constructors and functions are keyword-only.

Given by position, a value lands in whatever parameter stands there and is often taken silently (a device as
``trust_remote_code``, a list of fields as ``use_fre``, a dict of logit terms as a field injection). Past the
leading arguments each name below takes by position, every parameter with a default is keyword-only.
"""

import importlib
import inspect
from typing import Tuple

import pytest

# (module, qualified name, the parameters with a default that may come by position)
PUBLIC_CALLABLES: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("recsys_llm.data.parquet", "ParquetBatchReader", ()),
    ("recsys_llm.data.tabular.convert", "prepare_tabular", ("config",)),
    ("recsys_llm.data.tabular.like", "prepare_tabular_like", ("config",)),
    ("recsys_llm.models.registry", "build_backbone", ("num_extra_fields",)),
    ("recsys_llm.models.dlrm", "build_dlrm", ()),
    ("recsys_llm.models.task", "CTRTask", ()),
    ("recsys_llm.modules.llactr", "LLaCTRConfig", ()),
    ("recsys_llm.modules.semantic_table", "SemanticTable", ()),
    ("recsys_llm.modules.semantic_table", "SemanticTableTask", ()),
    ("recsys_llm.modules.teacher_student", "load_full_state", ("prefix",)),
    ("recsys_llm.modules.teacher_columns", "write_teacher_columns", ()),
    ("recsys_llm.semantics.encoder", "TextEncoder", ("model_path",)),
    ("recsys_llm.semantics.encoder", "TextEncoder.from_model", ()),
    ("recsys_llm.semantics.ctr_llm", "CTRAdaptedLLM.from_config", ()),
    ("recsys_llm.semantics.schema_export", "export_schema_vectors", ()),
    ("recsys_llm.serving.export", "export_task", ()),
    ("recsys_llm.serving.state", "unsharded_state_dict", ()),
    ("recsys_llm.train.checkpoint", "CheckpointManager", ()),
    ("recsys_llm.train.checkpoint", "load_checkpoint", ("optimizer",)),
    ("recsys_llm.train.pipeline", "train_epoch", ()),
    ("recsys_llm.train.pipeline", "evaluate", ()),
)


@pytest.mark.parametrize("module, name, positional", PUBLIC_CALLABLES, ids=[n for _, n, _ in PUBLIC_CALLABLES])
def test_optional_settings_are_keyword_only(module: str, name: str, positional: Tuple[str, ...]) -> None:
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    parameters = inspect.signature(target).parameters.values()
    by_position = [p.name for p in parameters
                   if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty]
    assert by_position == list(positional), f"{name}: {by_position} may come by position"
