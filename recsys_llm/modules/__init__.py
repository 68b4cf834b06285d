"""Plug-ins for any TorchRec model: FRE, FIE, injection, semantic tables, distillation.

The names below import from here (``from recsys_llm.modules import FieldInteractionEnhancement``);
each is loaded from its module when first asked for, so importing one plug-in does not import
the others.

=================================  ==============================  ==========================================
name                               module                          what it is
=================================  ==============================  ==========================================
FieldRepresentationEnhancement     field_semantics                 LLaCTR's FRE loss term
FieldInteractionEnhancement        field_interaction               LLaCTR's FIE logit term
LLaCTRConfig, build_llactr_terms   llactr                          both terms from a field-vector file
VectorFieldInjection               dense_injection                 an LLM vector as one more field
DLRMDenseInjection(Backbone)       dense_injection                 the same for torchrec's DLRM
SemanticTable, SemanticTableTask   semantic_table                  frozen, sharded table of LLM vectors
ScoreDistillation                  distillation                    score-level KD (BCE / KL, temperature)
RepresentationDistillation         distillation                    representation-level KD (MSE / cosine)
TeacherStudentTask(Config)         teacher_student                 teacher and student under one DMP
load_full_state                    teacher_student                 a full state into a (sharded) model's shards
write_teacher_columns              teacher_columns                 a teacher's outputs for offline distillation
attach_columns                     teacher_columns                 those columns joined to a split's rows
load_semantic_vectors              semantic_table                  entity vectors into a semantic table's shards
refresh_after_load                 field_interaction               FIE's frozen weights after an in-place load
ELECConfig, build_elec_task        elec                            ELEC's gain network / student from a config
=================================  ==============================  ==========================================
"""

import importlib
from typing import Any, Dict, List

_MODULE_OF: Dict[str, str] = {
    "FieldRepresentationEnhancement": "field_semantics",
    "FieldInteractionEnhancement": "field_interaction",
    "LLaCTRConfig": "llactr",
    "build_llactr_terms": "llactr",
    "VectorFieldInjection": "dense_injection",
    "DLRMDenseInjection": "dense_injection",
    "DLRMDenseInjectionBackbone": "dense_injection",
    "SemanticTable": "semantic_table",
    "SemanticTableTask": "semantic_table",
    "ScoreDistillation": "distillation",
    "RepresentationDistillation": "distillation",
    "TeacherStudentConfig": "teacher_student",
    "TeacherStudentTask": "teacher_student",
    "load_full_state": "teacher_student",
    "write_teacher_columns": "teacher_columns",
    "attach_columns": "teacher_columns",
    "load_semantic_vectors": "semantic_table",
    "refresh_after_load": "field_interaction",
    "ELECConfig": "elec",
    "build_elec_task": "elec",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
