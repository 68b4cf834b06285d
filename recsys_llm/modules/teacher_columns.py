"""Offline distillation's teacher columns for one's own training loop (ELEC's ``offline`` mode).

:func:`write_teacher_columns` runs a trained teacher over batches and writes its logits (and
representations) by row key; :func:`attach_columns` joins them into a copy of a split, so that
:class:`~recsys_llm.data.parquet.ParquetBatchReader` yields them as the ``extras`` a
:class:`~recsys_llm.modules.teacher_student.TeacherStudentTask` in ``offline`` mode reads. A run of
``recsys-llm train`` has both done, sharded, by ``recsys-llm teacher-outputs``.
"""

import contextlib
import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from recsys_llm.atomic_dir import write_file_atomically
from recsys_llm.data.batch import Batch
from recsys_llm.data.parquet_writer import vector_array
from recsys_llm.data.row_chunks import ROW_ID_EXTRA
from recsys_llm.modules.teacher_student import TeacherStudentConfig
from recsys_llm.progress import bar_options


@torch.no_grad()
def write_teacher_columns(
    teacher: nn.Module,
    batches: Iterable[Batch],
    output_path: str,
    *,
    row_key: str = "row_id",
    with_representation: bool = True,
    progress: bool = True,
    logits_column: str = TeacherStudentConfig.teacher_logits_key,
    representation_column: str = TeacherStudentConfig.teacher_representation_key,
) -> int:
    """Runs a trained teacher over batches of one's own loop and writes its outputs by row key (offline mode).

    For a run of ``recsys-llm train``, ``recsys-llm teacher-outputs``
    (:func:`recsys_llm.train.teacher_outputs.write_teacher_outputs`) does this sharded, for whole splits.

    Columns: ``row_key`` (int64), ``logits_column`` (float32) and, if asked,
    ``representation_column`` (fixed_size_list<float32, H_t>). Join them into a copy of
    the split with :func:`attach_columns` so the reader yields them as extras. The teacher
    runs in eval mode and gets its own mode back afterwards; a failure leaves no file
    (:func:`~recsys_llm.atomic_dir.write_file_atomically`).

    A sharded teacher: pass its task (a DMP's ``model.module``), on every rank, each writing a file of its own
    from a reader of its ``rank`` and ``world_size`` built ``equal_batches=False`` and iterated through
    ``reader.padded()`` (the ranks run equally many lookups, and every row is written once: the default reader
    caps the ranks at one batch count and skips rows of an uneven split); :func:`attach_columns` takes
    the ranks' files together. After torchrec's ``TrainPipelineSparseDist`` call its ``detach()`` first: until then
    the sharded modules' forwards belong to the pipeline.

    Args:
        teacher (nn.Module): ``predict(batch) -> CTROutput`` (a ``CTRTask``; a
            ``TeacherStudentTask``'s ``teacher``).
        batches (Iterable[Batch]): the split, with its row keys in ``extras[row_key]`` or, as
            :class:`~recsys_llm.data.parquet.ParquetBatchReader` gives them for a row key of any
            name, ``extras["row_id"]``; or ``(batch, real)`` pairs of ``ParquetBatchReader.padded()``,
            whose ``real=False`` repeats run the teacher but write nothing.
        output_path (str): Parquet file (written atomically).
        row_key (str): column name of the row keys (the split's row key column, to join on).
        with_representation (bool): also write the representations.
        progress (bool): tqdm bar.
        logits_column (str): column of the teacher's logits: the student's
            ``TeacherStudentConfig.teacher_logits_key``.
        representation_column (str): column of its representations: the student's
            ``TeacherStudentConfig.teacher_representation_key``.

    Returns:
        int: rows written.
    """
    rows = 0

    def write(handle: Any) -> None:
        nonlocal rows
        writer: Optional[pq.ParquetWriter] = None
        try:
            for item in tqdm(batches, desc="teacher outputs", disable=not progress, **bar_options()):
                batch, real = item if isinstance(item, tuple) else (item, True)  # padded(): (batch, real)
                extras = getattr(batch, "extras", None)
                if extras is None:
                    raise TypeError(f"write_teacher_columns: a {type(batch).__name__} without extras (torchrec's own "
                                    "Batch has none); the row keys come in recsys_llm.data.batch.Batch's "
                                    f"extras[{row_key!r}], as ParquetBatchReader gives them")
                keys = extras.get(row_key, extras.get(ROW_ID_EXTRA))
                if keys is None:
                    where = " or ".join(f"extras[{key!r}]" for key in dict.fromkeys([row_key, ROW_ID_EXTRA]))
                    raise KeyError(f"write_teacher_columns: batch has no {where} (row keys); extras: "
                                   f"{sorted(batch.extras)}")
                output = teacher.predict(batch)
                columns = {
                    row_key: pa.array(keys.cpu().numpy().astype(np.int64)),
                    logits_column: pa.array(output.logits.float().cpu().numpy()),
                }
                if with_representation:
                    rep = output.representation.float().cpu().numpy()  # (B, H_t)
                    columns[representation_column] = vector_array(rep)
                table = pa.table(columns)
                if not real:  # a padded() repeat: run for the ranks' collectives, its rows written already (a
                    table = table.slice(0, 0)  # rank of no rows of its own writes a file of no rows)
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema)
                writer.write_table(table)
                rows += table.num_rows
        except BaseException:
            if writer is not None:  # closed here, not later by the garbage collector over the closed temp file
                with contextlib.suppress(Exception):
                    writer.close()
            raise
        if writer is None:
            raise ValueError("write_teacher_columns: no batches")
        writer.close()

    was_training = teacher.training
    teacher.eval()
    try:
        write_file_atomically(output_path, write)
    finally:
        teacher.train(was_training)
    return rows


ATTACHED_ROWS_PER_GROUP = 65536  # row groups of the copy: the reader's unit, as the splits `prepare` writes


def attach_columns(split_path: str, columns_path: Union[str, "os.PathLike[str]", Sequence[str]], key_column: str,
                   output_path: str) -> int:
    """Writes a copy of a split with the columns of ``columns_path`` joined on ``key_column``.

    The split is copied a row group at a time (of ``ATTACHED_ROWS_PER_GROUP`` rows); besides its key
    column, only the columns to attach are held whole (the teacher outputs: rows x (H + 2) x 4 bytes).
    ``columns_path`` may be several files with the same columns, e.g. the ranks' own files of
    :func:`write_teacher_columns`: their rows are taken together.

    Raises:
        ValueError: a row of the split has no match, a key occurs twice in ``columns_path``, or a
            column already exists.

    Returns:
        int: rows written.
    """
    with pq.ParquetFile(split_path) as split:
        return _attach_columns(split, split_path, columns_path, key_column, output_path)


def _attach_columns(split: pq.ParquetFile, split_path: str, columns_path: str, key_column: str,
                    output_path: str) -> int:
    """:func:`attach_columns` of the open ``split``."""
    # a path (str or os.PathLike, as pq.read_table takes it), or several
    one = isinstance(columns_path, (str, os.PathLike))
    paths = [os.fspath(path) for path in ([columns_path] if one else columns_path)]
    if not paths:
        raise ValueError("attach_columns: no columns file given (an empty list); pass the teacher-column file(s)")
    columns_path = ", ".join(paths)  # as errors name them
    try:
        extra = pa.concat_tables([pq.read_table(path) for path in paths])
    except pa.ArrowInvalid as error:
        raise ValueError(f"{columns_path}: files of other columns; expected the same in each ({error})") from None
    for path, names in ((split_path, split.schema_arrow.names), (columns_path, extra.column_names)):
        if key_column not in names:
            raise ValueError(f"{path}: no key column {key_column!r}; columns {names}")
    keys = extra.column(key_column)
    if pc.count_distinct(keys).as_py() != len(keys):  # index_in would take each key's first row
        counts = pc.value_counts(keys)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"{columns_path}: key {repeated!r} of column {key_column!r} occurs more than once; expected "
                         "one row per key")
    index = pc.index_in(split.read(columns=[key_column]).column(key_column), value_set=keys)  # (N,)
    if index.null_count:
        raise ValueError(f"{split_path}: {index.null_count} rows have no {key_column!r} in {columns_path}")
    attached = [name for name in extra.column_names if name != key_column]
    for name in attached:
        if name in split.schema_arrow.names:
            raise ValueError(f"{split_path}: already has a column {name!r}")

    def write(handle: Any) -> None:
        start = 0
        writer: Optional[pq.ParquetWriter] = None
        try:
            for batch in split.iter_batches(batch_size=ATTACHED_ROWS_PER_GROUP):
                table = pa.Table.from_batches([batch])
                rows = index.slice(start, batch.num_rows)
                for name in attached:
                    table = table.append_column(name, pc.take(extra.column(name), rows))
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema)
                writer.write_table(table, row_group_size=ATTACHED_ROWS_PER_GROUP)
                start += batch.num_rows
            if writer is None:  # a split without rows: its columns and the attached ones, no row
                empty = pa.Table.from_batches([], split.schema_arrow)
                for name in attached:
                    empty = empty.append_column(extra.schema.field(name), extra.column(name).slice(0, 0))
                writer = pq.ParquetWriter(handle, empty.schema)
        except BaseException:
            if writer is not None:  # closed here, not later by the garbage collector over the removed temp file
                with contextlib.suppress(Exception):
                    writer.close()
            raise
        writer.close()

    write_file_atomically(output_path, write)
    return split.metadata.num_rows
