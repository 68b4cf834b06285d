"""Serving artifact of a trained CTR task: the ELEC student alone (or any ``CTRTask``).

``export_task`` writes a directory::

    model.safetensors     (unsharded) state dict of the task as served, weights only: less its
                          training-only parts (loss terms such as LLaCTR's FRE, logit terms
                          folded into the backbone such as FIE on FM), which serving never reads;
                          the whole task's when there is no dense program
    tables.json           its EmbeddingBagCollection tables (name, rows, dim, features, pooling,
                          data type: as trained, or INT8 / INT4 with ``--table-dtype int8 | int4``)
    dense_program.pt2     torch.export program of everything after the EBC lookup:
                          (dense (B, Dd), pooled (B, sum of table dims)[, entity vectors
                          (B, K * d) of a gain network's entity tables]) -> logits (B,)
    config.json           format version, export id, SHA-256 of the files above and of its own other keys,
                          library versions (torch, torchrec, fbgemm_gpu, recsys_llm and its commit), feature names,
                          id rules, whether the tables pool per-id weights (``weighted``: an
                          ``is_weighted`` EBC, served with the request's weights), model config,
                          program status
    INFERENCE.md          how to call it

The export id (random per export) is also stored in the state file's and the program's
metadata: ``ServedModel.load`` refuses files of two exports copied into one directory, and
files whose bytes differ from the SHA-256 recorded at export (a changed weight loads without
any other error: a flipped bit in the program gave NaN for every request). It warns when the
serving process has another torch, torchrec or fbgemm_gpu than the export had.

The EBC lookup stays eager (``ServedModel`` rebuilds the EBC from ``tables.json``; on a
serving host with torchrec's inference sharding it would be a TBE lookup) because
``torch.export`` does not capture KeyedJaggedTensor inputs; the dense part is one
exported program, no Python model code needed. When ``torch.export`` cannot capture a
backbone, ``dense_program`` is ``null`` in ``config.json`` (with the reason) and the
state dict, then the whole task's, serves through the model code.

Only the student of a ``TeacherStudentTask`` is exported (keys ``student.*``): its
artifact holds no teacher, LLM, injection or semantic-table parameter. :func:`export_task`
refuses a task that reads LLM vectors from the rows (a gain network on row vectors); a gain
network on entity tables is exported with its injection and its frozen tables
(``semantic_tables.json``), and serves without an LLM.

Example (inference)::

    served = ServedModel.load("runs/elec/export", trust_program=True)  # an artifact you exported
    probabilities = served.predict(dense_features, sparse_kjt)  # (B,)

Modules: ``artifact`` (file names and format constants), ``state`` (gathering a sharded
model's state dict; reading an artifact's weights safely), ``export`` (:func:`export_task`),
``inference_doc`` (the artifact's INFERENCE.md), ``served_model`` (:class:`ServedModel`),
``quantized_tables`` (INT8 / INT4 tables, ``export --table-dtype int8 | int4``, torchrec's
quantized EBC); the artifact's other file names and keys are in ``recsys_llm.serving.artifact``.
"""

from recsys_llm.serving.artifact import EXPORT_MARKER_FILES, FORMAT_VERSION, STATE_FILE
from recsys_llm.serving.export import (
    DenseHead,
    check_export_output,
    check_servable,
    export_task,
    serving_form,
)
from recsys_llm.serving.inference_doc import INFERENCE_EXAMPLE
from recsys_llm.serving.served_model import ARTIFACT_READ_ERRORS, CONFIG_KEYS, ServedModel
from recsys_llm.serving.state import (
    load_state_file,
    materialize_meta,
    open_state_file,
    strip_wrappers,
    sub_state,
    unsharded_state_dict,
)

__all__ = [
    "ARTIFACT_READ_ERRORS",
    "CONFIG_KEYS",
    "EXPORT_MARKER_FILES",
    "FORMAT_VERSION",
    "INFERENCE_EXAMPLE",
    "STATE_FILE",
    "DenseHead",
    "ServedModel",
    "check_export_output",
    "check_servable",
    "export_task",
    "load_state_file",
    "materialize_meta",
    "open_state_file",
    "serving_form",
    "strip_wrappers",
    "sub_state",
    "unsharded_state_dict",
]
