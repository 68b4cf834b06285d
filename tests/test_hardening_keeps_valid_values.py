"""The API hardening refuses wrong values, not valid ones of another type: a ``pathlib.Path`` where a path is
taken, numpy bools and integers, another task's ``nn.ModuleDict`` of terms; and FIE's pair weights keep
a shape-only (meta) forward working.
"""

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.fm import FMConfig
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.field_interaction import _semantic_pair_matrix
from recsys_llm.modules.llactr import LLaCTRConfig
from recsys_llm.modules.teacher_columns import attach_columns
from recsys_llm.serving.state import unsharded_state_dict
from recsys_llm.train.checkpoint import CheckpointManager
from recsys_llm.typed_config import ConfigError


def _split_and_columns(tmp_path: pathlib.Path):
    split = tmp_path / "split.parquet"
    pq.write_table(pa.table({"row_id": np.array([3, 1, 2], np.int64), "x": [0.5, 1.5, 2.5]}), split)
    first, second = tmp_path / "rank0.parquet", tmp_path / "rank1.parquet"
    pq.write_table(pa.table({"row_id": np.array([1, 2], np.int64), "teacher_logits": np.float32([0.1, 0.2])}), first)
    pq.write_table(pa.table({"row_id": np.array([3], np.int64), "teacher_logits": np.float32([0.3])}), second)
    return split, first, second


def test_attach_columns_takes_paths_as_pathlib_paths_too(tmp_path):
    """pq.read_table took a Path before attach_columns took several files; a Path was then iterated as a list."""
    split, first, second = _split_and_columns(tmp_path)
    pq.write_table(pa.concat_tables([pq.read_table(first), pq.read_table(second)]), tmp_path / "all.parquet")
    assert attach_columns(str(split), tmp_path / "all.parquet", "row_id", str(tmp_path / "copy.parquet")) == 3
    assert attach_columns(split, [first, second], "row_id", tmp_path / "copy2.parquet") == 3
    for copy in ("copy.parquet", "copy2.parquet"):
        np.testing.assert_allclose(pq.read_table(tmp_path / copy).column("teacher_logits").to_numpy(),
                                   [0.3, 0.1, 0.2])
    with pytest.raises(ValueError, match="attach_columns: no columns file given"):
        attach_columns(split, [], "row_id", tmp_path / "copy3.parquet")


def test_a_schema_root_may_be_a_pathlib_path(tmp_path):
    fields = [FieldSpec(name="item", kind="sparse", cardinality=4)]
    schema = DatasetSchema("n", fields, splits={"train": "train.parquet"}, root=tmp_path)
    assert schema.root == str(tmp_path) and schema.split_path("train") == str(tmp_path / "train.parquet")
    with pytest.raises(Exception, match="root must be a string"):
        DatasetSchema("n", fields, root=3)


def test_numpy_bools_are_bools_and_stored_as_bools():
    """A sweep grid's cell (pandas / numpy) is np.True_, which no bool subclasses."""
    config = LLaCTRConfig("fields.safetensors", use_fre=np.False_, use_fie=np.bool_(True))
    assert config.use_fre is False and config.use_fie is True
    assert FMConfig(dense_as_fields=np.False_).dense_as_fields is False
    for bad in ("false", 1, np.int64(1), np.array([True])):
        with pytest.raises(ConfigError, match="llactr.use_fre: expected true or false"):
            LLaCTRConfig("fields.safetensors", use_fre=bad)


def test_another_tasks_terms_are_taken_as_they_are(tmp_path):
    """task.logit_terms is an nn.ModuleDict, which is no Mapping: CTRTask(backbone, logit_terms=task.logit_terms)."""
    schema = DatasetSchema("n", [FieldSpec(name="item", kind="sparse", cardinality=4)])
    backbone = build_backbone(SMOKE_CONFIGS["fm"], schema, device=torch.device("cpu"))
    terms = nn.ModuleDict({"zero": nn.Identity()})
    task = CTRTask(backbone, logit_terms=terms, loss_terms=nn.ModuleDict())
    assert list(task.logit_terms) == ["zero"] and isinstance(task.logit_terms["zero"], nn.Identity)
    with pytest.raises(TypeError, match="CTRTask: loss_terms must be a mapping"):
        CTRTask(backbone, loss_terms=[nn.Identity()])


def test_numpy_integers_are_integers(tmp_path):
    assert CheckpointManager(str(tmp_path), keep=np.int64(3))._keep == 3
    model = nn.Sequential(nn.Linear(2, 2))
    assert sorted(unsharded_state_dict(model, dst=np.int64(0))) == ["0.bias", "0.weight"]


def test_fie_pair_weights_of_a_shape_only_forward():
    """torch.autocast refuses the meta device ("unsupported scalarType"); a meta forward has no autocast to leave."""
    num_keys, num_pairs = 4, 6
    rows, cols = torch.triu_indices(num_keys, num_keys, offset=1)
    meta = {"device": "meta"}
    matrix = _semantic_pair_matrix(torch.empty(2, num_keys, 8, **meta), torch.empty(num_pairs, **meta),
                                   torch.empty(num_pairs, num_pairs, **meta), torch.empty(num_pairs, **meta),
                                   (rows * num_keys + cols).to("meta"), 0.1)
    assert matrix.shape == (num_keys, num_keys) and matrix.is_meta


def test_a_config_subclass_with_an_annotation_for_type_checkers_only_is_built(tmp_path, monkeypatch):
    """check_str_settings reads which fields take None from the annotations: a subclass annotating a field with a
    name imported only under ``if TYPE_CHECKING:`` failed with NameError when built (it was built before); its
    own ``Optional`` and ``X | None`` fields take None, and the inherited checks still refuse what they refused."""
    (tmp_path / "own_llactr.py").write_text(
        "from __future__ import annotations\n"
        "import dataclasses\n"
        "from typing import TYPE_CHECKING, Optional\n"
        "from recsys_llm.modules.llactr import LLaCTRConfig\n"
        "from recsys_llm.typed_config import check_str_settings\n"
        "if TYPE_CHECKING:\n"
        "    from somewhere_else import Thing\n"
        "@dataclasses.dataclass\n"
        "class OwnLLaCTR(LLaCTRConfig):\n"
        "    thing: Optional[Thing] = None\n"
        "    note: Optional[str] = None\n"
        "    label: str | None = None\n"
        "    def __post_init__(self) -> None:\n"
        "        super().__post_init__()\n"
        "        check_str_settings(self, ('note', 'label'), 'own')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from own_llactr import OwnLLaCTR

    assert OwnLLaCTR(vectors_path=tmp_path / "v.parquet").vectors_path == str(tmp_path / "v.parquet")
    with pytest.raises(ConfigError, match=r"llactr\.vectors_path: expected a string, got 3"):
        OwnLLaCTR(vectors_path=3)
    with pytest.raises(ConfigError, match=r"own\.note: expected a string or None, got 1"):
        OwnLLaCTR(vectors_path="v", note=1)
