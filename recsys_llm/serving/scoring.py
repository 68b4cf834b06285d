"""Offline scoring with an exported artifact: every row of a Parquet split through :class:`ServedModel`, the
way serving scores a request, with AUC / LogLoss against the split's labels and, optionally, each row's score
written to Parquet (``recsys-llm score``).

It answers what a checkpoint's ``recsys-llm evaluate`` cannot: what the served artifact itself predicts, e.g.
with INT8 / INT4 tables (``export --table-dtype``), after it was copied to another host, or on a day's new
data, with no training code, run config or LLM::

    recsys-llm score --artifact exports/student --data data/synthetic --split test --output scores.parquet
"""

import contextlib
import os
import time
import warnings
from typing import Any, Dict, Optional

import pyarrow as pa
import torch
from tqdm import tqdm

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_files import first_file_columns
from recsys_llm.data.parquet_writer import SplitWriter
from recsys_llm.data.row_chunks import ROW_ID_EXTRA
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.progress import interval_options
from recsys_llm.serving.served_model import ServedModel
from recsys_llm.train.config import DEFAULT_COLD_ITEM_COLUMN
from recsys_llm.train.metrics import CTRMetrics

SCORE_COLUMNS = ("label", "logit", "probability")


def score_columns(schema: DatasetSchema, with_row_key: bool, with_label: bool = True) -> pa.Schema:
    """The Arrow schema of a scores file: the split's row key (when its files have one), then
    :data:`SCORE_COLUMNS` (without ``label`` for rows without one), float32."""
    key = [pa.field(schema.row_key, pa.int64())] if with_row_key and schema.row_key else []
    names = [name for name in SCORE_COLUMNS if with_label or name != "label"]
    return pa.schema(key + [pa.field(name, pa.float32()) for name in names])


def check_scores_output(output: str) -> None:
    """Raises FileExistsError for an ``output`` that exists (scores are never written over), and
    FileNotFoundError for one whose directory does not."""
    if os.path.lexists(output):
        raise FileExistsError(f"{output}: exists; the scores are written to a new file (remove it, or pass another "
                              "--output)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{output}: its directory {parent} does not exist")


def check_artifact_fits(served: ServedModel, schema: DatasetSchema) -> None:
    """Raises ValueError, naming ``schema``'s file, unless its rows fit the artifact: every sparse feature the
    artifact reads, the dense features it reads in its column order (the program reads them by position: another
    order would score every row silently wrong; an artifact that does not record their names, exported before
    2026-12-06, is checked for their number), the vocabularies the model was trained on (where the artifact records
    them), and tables without per-id weights (a split holds none)."""
    where = os.path.join(schema.root, "schema.json")
    hint = "score data prepared with the schema it was trained on"
    missing = sorted(set(served.feature_names) - set(schema.sparse_feature_names))
    if missing:
        raise ValueError(f"{where}: the schema has no sparse features {missing}, which the artifact reads (it serves "
                         f"{served.feature_names}); {hint}")
    names, expected = schema.dense_feature_names, served.dense_feature_names
    if expected is not None and names != expected:
        raise ValueError(f"{where}: the schema's dense features {names} are not the artifact's {expected}, in this "
                         f"order (it reads them by column); {hint}")
    if expected is None and len(names) != served.num_dense_features:
        raise ValueError(f"{where}: the schema has {len(names)} dense features {names}; the artifact reads "
                         f"{served.num_dense_features}; {hint}")
    other = schema.changed_vocabularies(served.vocabularies)
    if other:
        raise ValueError(f"{where}: the vocabulary of field(s) {other} is not the one the artifact's model was trained "
                         "on, so the same values would read other rows of its tables (data prepared afresh, not "
                         "--like the training data); prepare the rows with `recsys-llm prepare tabular --input FILE "
                         "--like TRAINING_DATA --out DIR`")
    for note in schema.grown_vocabularies(served.vocabularies or {}, "the artifact's model"):
        warnings.warn(note, stacklevel=2)
    if served.weighted:
        raise ValueError("the artifact's tables pool per-id weights (config.json: weighted), and a Parquet split holds "
                         "ids without weights: score it in Python, ServedModel.logits with the KeyedJaggedTensor's "
                         "weights")


@torch.no_grad()
def score_split(
    served: ServedModel,
    schema: DatasetSchema,
    split: str,
    batch_size: int = 8192,
    output: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Scores every row of ``split`` with ``served``, in the files' row order.

    Args:
        served (ServedModel): a loaded artifact (``ServedModel.load``).
        schema (DatasetSchema): the data's schema; its features must be the artifact's.
        split (str): a split name of the schema, a Parquet file or a directory of them.
        batch_size (int): rows per ``served.logits`` call.
        output (Optional[str]): a new Parquet file for each row's row key (when the files have the
            schema's), label (when they have one), logit and probability (float32), written atomically; None:
            metrics only.
        progress (bool): a tqdm bar over the batches.

    Returns:
        Dict[str, Any]: ``split``, ``rows``, ``samples_per_s`` (``served.logits`` alone), ``labeled`` (the
        split's first file has the label column: else its rows are scored without metrics), the metrics of
        :class:`~recsys_llm.train.metrics.CTRMetrics` (``auc``, ``logloss``, ...; ``cold/...`` when the data
        marks cold items), and ``output``.

    Raises:
        ValueError: rows of ``schema`` that do not fit the artifact (:func:`check_artifact_fits`), or a batch
            the artifact refuses (``ServedModel.logits``).
        FileExistsError: ``output`` exists (checked before anything is read).
    """
    if output is not None:
        check_scores_output(output)
    check_artifact_fits(served, schema)
    first_file = first_file_columns(schema, split)
    labeled = schema.label in first_file  # else rows to score (a day's traffic before its clicks)
    cold = labeled and DEFAULT_COLD_ITEM_COLUMN in schema.extra_columns
    subsets = {"cold": DEFAULT_COLD_ITEM_COLUMN} if cold else {}
    reader = ParquetBatchReader(schema, split, batch_size, extras=list(subsets.values()), equal_batches=False,
                                labels=labeled)
    metrics = CTRMetrics(subsets)
    with_row_key = bool(schema.row_key) and schema.row_key in first_file
    rows, seconds = 0, 0.0
    columns_out = score_columns(schema, with_row_key, labeled)
    # on an error the writer removes its temp file: nothing appears at ``output``
    with SplitWriter(output, columns_out) if output else contextlib.nullcontext() as writer:
        for batch in tqdm(reader, desc=f"score {split}", unit="batch", disable=not progress, **interval_options()):
            start = time.perf_counter()
            logits = served.logits(batch.dense_features, batch.sparse_features)  # (B,)
            seconds += time.perf_counter() - start
            if labeled:
                metrics.update(logits, batch.labels, batch.extras)
            rows += logits.numel()
            if writer is not None:
                columns = {"label": batch.labels.numpy(), "logit": logits.numpy(),
                           "probability": torch.sigmoid(logits).numpy()}
                if with_row_key:
                    columns[schema.row_key] = batch.extras[ROW_ID_EXTRA].numpy()
                writer.write({name: columns[name] for name in columns_out.names})
    return {"split": split, "rows": rows, "samples_per_s": rows / seconds if seconds else 0.0, "labeled": labeled,
            **(metrics.compute() if labeled else {}), "output": output}
