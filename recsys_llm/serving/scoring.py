"""Offline scoring with an exported artifact: every row of a Parquet split through :class:`ServedModel`, the
way serving scores a request, with AUC / LogLoss against the split's labels and, optionally, each row's score
written to Parquet (``recsys-llm score``).

It answers what a checkpoint's ``recsys-llm evaluate`` cannot: what the served artifact itself predicts, e.g.
with INT8 / INT4 tables (``export --table-dtype``), after it was copied to another host, or on a day's new
data, with no training code, run config or LLM::

    recsys-llm score --artifact exports/student --data data/synthetic --split test --output scores.parquet
    torchrun --nproc_per_node 4 -m recsys_llm.cli score --artifact exports/student --data ... --output scores.parquet

Under ``torchrun`` every rank scores its contiguous share of the rows with its own copy of the artifact (no
collective per batch), and rank 0 writes every rank's scores into the one file, in the files' row order: the rows
one process writes, their scores to float rounding (the batches are cut elsewhere). Only rank 0's host writes, so
the ranks need no shared file system for the output.
"""

import contextlib
import json
import os
import time
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from recsys_llm.atomic_dir import check_writable
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_files import first_file_columns, split_fingerprint
from recsys_llm.data.parquet_writer import SplitWriter, numpy_dtype
from recsys_llm.data.row_chunks import ROW_ID_EXTRA
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.progress import bar_options
from recsys_llm.serving.export import rows_per_feature
from recsys_llm.serving.served_model import ServedModel
from recsys_llm.train.config import DEFAULT_COLD_ITEM_COLUMN
from recsys_llm.train.distributed import (
    host_group,
    is_main_process,
    mean_over_ranks,
    run_on_every_rank,
    sum_over_ranks,
)
from recsys_llm.train.metrics import CTRMetrics

SCORE_COLUMNS = ("label", "logit", "probability")
# a scores file's Parquet key-value metadata: what made it (scores_stamp), so that the same command run again (after a
# kill once the file was in place) replaces its own earlier file, and no other
SCORES_STAMP_KEY = b"recsys_llm.scores"

ScoreColumns = Dict[str, np.ndarray]  # a scores file's column name -> n values, in its Arrow type's numpy dtype


def score_columns(schema: DatasetSchema, with_row_key: bool, with_label: bool = True) -> pa.Schema:
    """The Arrow schema of a scores file: the split's row key (when its files have one), then
    :data:`SCORE_COLUMNS` (without ``label`` for rows without one), float32."""
    key = [pa.field(schema.row_key, pa.int64())] if with_row_key and schema.row_key else []
    names = [name for name in SCORE_COLUMNS if with_label or name != "label"]
    return pa.schema(key + [pa.field(name, pa.float32()) for name in names])


def scores_stamp(served: ServedModel, schema: DatasetSchema, split: str) -> Optional[str]:
    """What a scores file of ``split`` by ``served`` is stamped with (:data:`SCORES_STAMP_KEY`): JSON of the artifact's
    export id and the split's :func:`~recsys_llm.data.parquet_files.split_fingerprint`; None for an artifact exported
    without an export id (before 2026-12), whose scores files get no stamp."""
    export_id = served.export_id
    if not export_id:
        return None
    return json.dumps({"export_id": export_id, "split": split_fingerprint(schema, split)}, sort_keys=True)


def _stamp_of(path: str) -> Optional[str]:
    """The :data:`SCORES_STAMP_KEY` of the Parquet file ``path`` (a regular file, not a link); None for any other
    file, or one without it."""
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    stamp = metadata.get(SCORES_STAMP_KEY)
    return stamp.decode("utf-8", "replace") if stamp else None


def check_scores_output(output: str, stamp: Optional[str] = None) -> bool:
    """Raises FileExistsError for an ``output`` that exists, unless it is a scores file this command wrote before
    (stamped ``stamp``; with ``stamp`` None, before the artifact is loaded, any stamped scores file passes, to be
    checked once it is), FileNotFoundError for one whose directory does not exist, PermissionError for one whose
    directory this user cannot write in (:func:`~recsys_llm.atomic_dir.check_writable`). Under a process group
    (collective) rank 0, which writes the file, checks, and every rank raises: the others a RuntimeError that says so.
    An empty ``output`` (``--output ''``) is a ValueError on every rank: it names no file, and the scores would be
    dropped.

    Returns:
        bool: on rank 0, whether ``output`` holds this command's own earlier scores, which the new ones replace (the
        same command run again after a kill once they were in place); False on the other ranks.
    """
    if not output:
        raise ValueError(f"--output {output!r}: names no file; expected the path of a new Parquet file for the scores "
                         "(e.g. scores.parquet), or leave --output out to compute the metrics only")
    own = False

    def check_on_rank_0() -> None:
        nonlocal own
        if not is_main_process():
            return
        if os.path.lexists(output):
            found = _stamp_of(output)
            if found is None or (stamp is not None and found != stamp):
                other = " (the scores of another artifact or other data)" if found is not None else ""
                raise FileExistsError(f"{output}: exists{other}; the scores are written to a new file (remove it, or "
                                      "pass another --output)")
            own = stamp is not None
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{output}: its directory {parent} does not exist")
        check_writable(output)  # its temp file goes there: refused now, not once the artifact and data are loaded

    run_on_every_rank(check_on_rank_0, "the --output check")
    return own


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
    # a field's ids index a table of its cardinality rows: the same data prepared with other sizes (prepare criteo
    # --hash-size, a schema's cardinality) reads other rows for every id, and would score every row silently wrong
    fields = {spec.name: spec for spec in schema.categorical_fields}
    resized = [f"{name}: {rows} rows, the data's cardinality {fields[name].cardinality}"
               for name, rows in rows_per_feature(served.embedding_bag_collection).items()
               if name in fields and fields[name].cardinality != rows]
    if resized:
        raise ValueError(f"{where}: the artifact's tables do not have the sizes of the data's fields "
                         f"({'; '.join(resized)}), so its ids would read other rows; {hint}")
    other = schema.changed_vocabularies(served.vocabularies, served.raw_id_ways)
    if other:
        cause = schema.other_ids_cause(served.vocabularies)
        raise ValueError(f"{where}: the vocabulary of field(s) {other} is not the one the artifact's model was trained "
                         f"on, so the same values would read other rows of its tables ({cause}); "
                         f"{schema.same_ids_advice('TRAINING_DATA')}")
    for note in schema.grown_vocabularies(served.vocabularies or {}, "the artifact's model"):
        if is_main_process():  # once, not once a rank
            warnings.warn(note, stacklevel=2)
    if served.weighted:
        raise ValueError("the artifact's tables pool per-id weights (config.json: weighted), and a Parquet split holds "
                         "ids without weights: score it in Python, ServedModel.logits with the KeyedJaggedTensor's "
                         "weights")


def _send_scores(held: List[ScoreColumns], columns: pa.Schema, group: Optional[dist.ProcessGroup]) -> None:
    """Sends this rank's scores to rank 0: their row count, then each column whole."""
    count = sum(len(chunk[columns.names[0]]) for chunk in held)
    dist.send(torch.tensor([count], dtype=torch.int64), 0, group=group)
    for field in columns if count else ():
        joined = np.concatenate([chunk[field.name] for chunk in held]).astype(numpy_dtype(field.type), copy=False)
        dist.send(torch.from_numpy(joined), 0, group=group)


def _receive_scores(source: int, columns: pa.Schema, group: Optional[dist.ProcessGroup]) -> ScoreColumns:
    """Rank 0's side of :func:`_send_scores` for rank ``source``."""
    count = torch.zeros(1, dtype=torch.int64)
    dist.recv(count, source, group=group)
    received: ScoreColumns = {}
    for field in columns:
        column = torch.from_numpy(np.empty(int(count), dtype=numpy_dtype(field.type)))
        if count:
            dist.recv(column, source, group=group)
        received[field.name] = column.numpy()
    return received


@torch.no_grad()
def score_split(
    served: ServedModel,
    schema: DatasetSchema,
    split: str,
    batch_size: int = 8192,
    output: Optional[str] = None,
    progress: bool = True,
    cold_item_column: str = DEFAULT_COLD_ITEM_COLUMN,
) -> Dict[str, Any]:
    """Scores every row of ``split`` with ``served``, in the files' row order.

    Under a process group (``torchrun``; collective: call it on every rank) each rank scores its contiguous share of
    the rows (``ParquetBatchReader``'s ranges), rank 0 writes every rank's scores to ``output`` in row order, and the
    metrics are those of all the rows; every rank returns the same report.

    Args:
        served (ServedModel): a loaded artifact (``ServedModel.load``).
        schema (DatasetSchema): the data's schema; its features must be the artifact's.
        split (str): a split name of the schema, a Parquet file or a directory of them.
        batch_size (int): rows per ``served.logits`` call.
        output (Optional[str]): a new Parquet file for each row's row key (when the files have the
            schema's), label (when they have one), logit and probability (float32), written atomically (by rank 0)
            and stamped with what made it (:func:`scores_stamp`); None: metrics only.
        progress (bool): a tqdm bar over the batches (rank 0's).
        cold_item_column (str): the 0/1 extra column of cold items (the run's ``data.cold_item_column``): the
            ``cold/...`` metrics when the schema has it; another name than the default that it lacks is an error;
            ``""``: none.

    Returns:
        Dict[str, Any]: ``split``, ``rows``, ``ranks``, ``samples_per_s`` (``served.logits`` alone; summed over the
        ranks), ``labeled`` (the split's first file has the label column: else its rows are scored without
        metrics), the metrics of :class:`~recsys_llm.train.metrics.CTRMetrics` (``auc``, ``logloss``, ...;
        ``cold/...`` when the data marks cold items), and ``output``.

    Raises:
        ValueError: an empty ``output``, rows of ``schema`` that do not fit the artifact
            (:func:`check_artifact_fits`), a row key column named as a scores column, a ``cold_item_column``
            (not the default) the schema lacks, or a batch the artifact refuses (``ServedModel.logits``).
        FileExistsError: ``output`` exists, and is not the scores of this artifact and split that an earlier call
            wrote, which are replaced (checked before anything but the split's Parquet footers is read).
        FileNotFoundError: ``output``'s directory does not exist (checked likewise).
        PermissionError: this user cannot write in ``output``'s directory (checked likewise).
        RuntimeError: on the other ranks, when rank 0's ``output`` check or another rank's scoring failed.
    """
    grouped = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    stamp = scores_stamp(served, schema, split) if output is not None and rank == 0 else None
    replace = check_scores_output(output, stamp) if output is not None else False
    check_artifact_fits(served, schema)
    first_file = first_file_columns(schema, split)
    labeled = schema.label in first_file  # else rows to score (a day's traffic before its clicks)
    own_columns = [name for name in SCORE_COLUMNS if labeled or name != "label"]
    if output is not None and schema.row_key in own_columns and schema.row_key in first_file:
        raise ValueError(f"--output {output}: the data's row key column {schema.row_key!r} has the name of a column "
                         f"the scores file writes ({', '.join(own_columns)}), so the file would hold two columns of "
                         "that name; rename the row key column (row_key in the schema file) and prepare the data "
                         "again, or leave --output out to compute the metrics only")
    if cold_item_column and cold_item_column != DEFAULT_COLD_ITEM_COLUMN and \
            cold_item_column not in schema.extra_columns:
        raise ValueError(f"cold item column {cold_item_column!r}: the data has no such extra column (extra_columns: "
                         f"{list(schema.extra_columns)})")
    cold = labeled and bool(cold_item_column) and cold_item_column in schema.extra_columns
    subsets = {"cold": cold_item_column} if cold else {}
    reader = ParquetBatchReader(schema, split, batch_size, extras=list(subsets.values()), equal_batches=False,
                                labels=labeled, rank=rank, world_size=world_size)
    metrics = CTRMetrics(subsets)
    with_row_key = bool(schema.row_key) and schema.row_key in first_file
    columns_out = score_columns(schema, with_row_key, labeled)
    held: List[ScoreColumns] = []  # another rank's scores, sent to rank 0 once they are all computed

    def score_own_rows() -> "tuple[int, float]":
        rows, seconds = 0, 0.0
        for batch in tqdm(reader, desc=f"score {split}", unit="batch", disable=not (progress and rank == 0),
                          **bar_options()):
            start = time.perf_counter()
            logits = served.logits(batch.dense_features, batch.sparse_features)  # (B,)
            seconds += time.perf_counter() - start
            if labeled:
                metrics.update(logits, batch.labels, batch.extras)
            rows += logits.numel()
            if output is not None:
                columns = {"label": batch.labels.numpy(), "logit": logits.numpy(),
                           "probability": torch.sigmoid(logits).numpy()}
                if with_row_key:
                    columns[schema.row_key] = batch.extras[ROW_ID_EXTRA].numpy()
                chunk = {name: columns[name] for name in columns_out.names}
                if writer is not None:
                    writer.write(chunk)
                else:
                    held.append(chunk)
        return rows, seconds

    # on an error the writer removes its temp file: nothing appears at ``output``; its temp file is its own and
    # linked into place, so scores another process wrote there meanwhile are left as they are
    if stamp is not None:
        columns_out = columns_out.with_metadata({SCORES_STAMP_KEY: stamp.encode("utf-8")})
    opened = SplitWriter(output, columns_out, replace=replace) if output is not None and rank == 0 else None
    with opened if opened is not None else contextlib.nullcontext() as writer:
        rows, seconds = run_on_every_rank(score_own_rows, f"scoring {split}")
        if output is not None and world_size > 1:
            group = host_group()
            if rank == 0:
                for source in range(1, world_size):  # rank order is row order: each rank's range follows the last's
                    writer.write(_receive_scores(source, columns_out, group))
            else:
                _send_scores(held, columns_out, group)
    rate = rows / seconds if seconds else 0.0
    return {"split": split, "rows": sum_over_ranks(rows), "ranks": world_size,
            "samples_per_s": mean_over_ranks(rate) * world_size, "labeled": labeled,
            **(metrics.compute() if labeled else {}), "output": output}
