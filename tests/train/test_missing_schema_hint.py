"""A run whose data.schema is missing names the command that writes that data: ``prepare`` for a plain
run, ``teacher-outputs`` for an offline student, ``semantics export --attach-dir`` for per-row ELEC vectors."""

import re

import pytest
import torch

from recsys_llm.train.config import load_config
from recsys_llm.train.distributed import DistContext
from recsys_llm.train.run_data import load_or_generate_schema

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


@pytest.mark.parametrize(
    "overrides, expected, not_expected",
    [
        ([], r"run `recsys-llm prepare`", "teacher-outputs"),
        (["elec.task=distill", "elec.distill.mode=offline"], r"run `recsys-llm teacher-outputs", "prepare"),
        (["elec.task=gain", "elec.vector_dim=128"], r"recsys-llm semantics export .*--attach-dir", "prepare`"),
        (["elec.task=distill", "elec.distill.mode=joint"], r"recsys-llm semantics export .*--attach-dir", "prepare`"),
        (["elec.task=gain", "elec.vector_source=entity_table", "elec.entity_field=item_id"],
         r"run `recsys-llm prepare`", "attach-dir"),
    ],
)
def test_a_missing_schema_names_the_step_that_writes_it(tmp_path, overrides: list, expected: str,
                                                        not_expected: str) -> None:
    """The README's ELEC lines train on data.schema=data/ml-100k-llm (or -teacher) before that data exists:
    the error says which earlier step writes it, not `prepare`, which never does."""
    config = load_config(None, [f"data.schema={tmp_path}/absent/schema.json", *overrides])
    with pytest.raises(FileNotFoundError, match="schema not found") as info:
        load_or_generate_schema(config, CTX)
    message = str(info.value)
    assert re.search(expected, message), message
    assert not_expected not in message, message
