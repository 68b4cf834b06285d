"""Moved to :mod:`recsys_llm.models.task` (2026-12-04): the task contract belongs with the
models it wraps, below the plug-ins that build on it. This name stays for code written
against it and warns once on import."""

import warnings

from recsys_llm.models.task import CTRTask, checked_term, required_extra

__all__ = ["CTRTask", "checked_term", "required_extra"]

warnings.warn("recsys_llm.train.task moved to recsys_llm.models.task; import CTRTask from there",
              DeprecationWarning, stacklevel=2)
