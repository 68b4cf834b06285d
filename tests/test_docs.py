"""The documentation keeps up with the code: every config key is in docs/usage.md."""

import dataclasses
import os
from typing import Iterator

from recsys_llm.modules.elec import ELECConfig
from recsys_llm.modules.llactr import LLaCTRConfig
from recsys_llm.modules.teacher_student import TeacherStudentConfig
from recsys_llm.train.config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keys(cls: type, prefix: str) -> Iterator[str]:
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type):
            yield from _keys(field.type, f"{prefix}{field.name}.")
        elif field.name not in ("llactr", "elec"):
            yield f"{prefix}{field.name}"


def test_every_config_key_has_a_row_in_the_usage_guide() -> None:
    with open(os.path.join(REPO, "docs", "usage.md"), encoding="utf-8") as handle:
        guide = handle.read()
    keys = [*_keys(ExperimentConfig, ""), *_keys(LLaCTRConfig, "llactr."), *_keys(ELECConfig, "elec."),
            *_keys(TeacherStudentConfig, "elec.distill.")]
    assert len(keys) > 60
    missing = [key for key in keys if f"| `{key}` |" not in guide]
    assert not missing, f"docs/usage.md section 7 lacks {missing}"
