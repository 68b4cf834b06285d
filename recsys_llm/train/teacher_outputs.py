"""Teacher outputs precomputed into Parquet columns, for ELEC's offline distillation.

In offline mode the student reads ``teacher_logits`` (B,) and ``teacher_representation``
(B, H) from ``batch.extras``, so the teacher (and the LLM behind its vectors) never runs
while the student trains. :func:`write_teacher_outputs` runs a trained model (an ELEC gain
network, the teacher of a teacher-student run, or any ``CTRTask``) once over every split and
writes copies of the split files with those two columns plus a schema that lists them::

    recsys-llm teacher-outputs --config gain.yaml --checkpoint runs/gain --output-dir data/ml-100k-teacher
    recsys-llm train --config student.yaml data.schema=data/ml-100k-teacher/schema.json \\
        elec.task=distill elec.distill.mode=offline

The teacher runs sharded, as it was trained: every rank loads its shards of the checkpoint
and runs the teacher over its contiguous range of each file's rows (ranks with one batch
fewer repeat one: ``ParquetBatchReader.padded``); rank 0 gathers the outputs,
checks the row count (and the row keys when the schema has one) and writes the file
atomically. No table is ever gathered whole. Existing finished files are never rewritten, so
a run resumes an earlier unfinished one in the same ``--output-dir``; a directory holding
anything else is refused before the teacher is loaded.
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module
from tqdm import tqdm

from recsys_llm.atomic_dir import check_own_entries
from recsys_llm.data.parquet import ParquetBatchReader, resolve_paths
from recsys_llm.data.row_chunks import ROW_ID_EXTRA
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.modules.teacher_student import TeacherStudentTask
from recsys_llm.train.config import ExperimentConfig
from recsys_llm.train.distributed import barrier, host_group
from recsys_llm.train.task_builder import plugin_extras
from recsys_llm.train.trained_run import load_trained_model, open_trained_run

LOGITS_COLUMN = "teacher_logits"
REPRESENTATION_COLUMN = "teacher_representation"
SCHEMA_FILE = "schema.json"


def check_output_dir(output_dir: str, schema: DatasetSchema) -> None:
    """Raises unless ``output_dir`` is absent, empty or holds only teacher outputs of ``schema``'s
    splits (``<split>.parquet`` or ``<split>/``, their temp files, ``schema.json``): an unfinished
    run there is resumed, anything else is not written next to.

    Raises:
        FileExistsError: naming the directory and its first other entry.
    """
    own = {SCHEMA_FILE} | {name for split in schema.splits for name in (split, f"{split}.parquet")}
    own |= {f"{name}.tmp" for name in own}
    check_own_entries(output_dir, "data set with teacher outputs", own.__contains__,
                      f"{SCHEMA_FILE} and the split copies {sorted(schema.splits)}")


def teacher_of(task: nn.Module) -> nn.Module:
    """The module whose outputs are distilled.

    Args:
        task (nn.Module): what ``build_task`` built for the run, possibly inside DMP: a
            ``CTRTask``-like module with ``predict(batch) -> CTROutput``, or a
            ``TeacherStudentTask`` with a teacher.

    Raises:
        ValueError: the task has no teacher (an offline teacher-student run).
    """
    task = get_unwrapped_module(task)
    if isinstance(task, TeacherStudentTask):
        if task.teacher is None:
            raise ValueError("the run is an offline teacher-student run: it holds no teacher to run")
        return task.teacher
    if not hasattr(task, "predict"):
        raise ValueError(f"{type(task).__name__}: expected a CTRTask-like module with predict(batch)")
    return task


@torch.no_grad()
def predict_file(
    teacher: nn.Module,
    schema: DatasetSchema,
    path: str,
    extras: Sequence[str],
    batch_size: int,
    progress: bool,
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world_size: int = 1,
    group: Optional[dist.ProcessGroup] = None,
) -> Optional[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """Teacher logits (N,), representations (N, H) and row keys (N,) or None, in file order.

    Collective when ``world_size > 1``: each rank runs the (sharded) teacher over its
    contiguous range of the file's rows, and rank 0 receives every rank's outputs over
    ``group`` (:func:`~recsys_llm.train.distributed.host_group`: host memory, not the GPU).

    Returns:
        the outputs on rank 0; ``None`` on the other ranks.
    """
    reader = ParquetBatchReader(schema, path, batch_size, rank=rank, world_size=world_size, extras=extras,
                                shuffle=False, prefetch=2, equal_batches=False, pin_memory=device.type == "cuda")
    logits: List[np.ndarray] = []
    representations: List[np.ndarray] = []
    keys: List[np.ndarray] = []
    for batch, real in tqdm(reader.padded(), total=reader.padded_len, desc=os.path.basename(path),
                            disable=not progress):
        output = teacher.predict(batch.to(device, non_blocking=True))
        if real:
            logits.append(output.logits.float().cpu().numpy())  # (B,)
            representations.append(output.representation.float().cpu().numpy())  # (B, H)
            if ROW_ID_EXTRA in batch.extras:
                keys.append(batch.extras[ROW_ID_EXTRA].numpy())
    local = (logits, representations, keys)
    parts = [local]
    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        dist.gather_object(local, parts, dst=0, group=group)
    if rank != 0:
        return None
    # ranks hold contiguous ranges in rank order, so concatenation restores file order
    logits, representations, keys = ([array for part in parts for array in part[i]] for i in range(3))
    return np.concatenate(logits), np.concatenate(representations), np.concatenate(keys) if keys else None


def write_with_columns(
    source: str, target: str, logits: np.ndarray, representations: np.ndarray, row_key: Optional[str],
    keys: Optional[np.ndarray],
) -> None:
    """Copies ``source`` row group by row group with the two teacher columns appended (atomic)."""
    handle = pq.ParquetFile(source)
    rows = handle.metadata.num_rows
    if rows != len(logits):
        raise ValueError(f"{source}: {rows} rows, but the teacher produced {len(logits)} outputs")
    width = representations.shape[1]
    tmp = f"{target}.tmp"
    writer: Optional[pq.ParquetWriter] = None
    start = 0
    try:
        for group in range(handle.num_row_groups):
            table = handle.read_row_group(group)
            stop = start + table.num_rows
            if keys is not None and row_key is not None:
                expected = table.column(row_key).to_numpy(zero_copy_only=False)
                if not np.array_equal(expected, keys[start:stop]):
                    raise ValueError(f"{source}: row group {group}: row keys {row_key!r} differ from the reader's order")
            flat = pa.array(np.ascontiguousarray(representations[start:stop], dtype=np.float32).reshape(-1))
            table = table.append_column(LOGITS_COLUMN, pa.array(logits[start:stop].astype(np.float32)))
            table = table.append_column(REPRESENTATION_COLUMN, pa.FixedSizeListArray.from_arrays(flat, width))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="lz4")
            writer.write_table(table)
            start = stop
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, target)


def write_teacher_outputs(
    config: ExperimentConfig,
    checkpoint: str,
    output_dir: str,
    splits: Optional[Sequence[str]] = None,
    batch_size: int = 4096,
    progress: bool = True,
) -> Dict[str, Any]:
    """Runs the trained teacher over ``splits`` and writes split copies with its outputs.

    Collective: call on every rank (``torchrun`` or alone); rank 0 writes.

    Args:
        config (ExperimentConfig): the teacher's training config.
        checkpoint (str): checkpoint directory or run directory (its best model).
        output_dir (str): where the copies and ``schema.json`` go.
        splits (Optional[Sequence[str]]): default: every split of the schema.
        batch_size (int): rows per teacher call.
        progress (bool): tqdm per file.

    Returns:
        Dict[str, Any]: ``{"schema": path, "representation_dim": H, "files": [...]}``.
    """
    run = open_trained_run(config, checkpoint)
    ctx, schema = run.ctx, run.schema
    if os.path.realpath(output_dir) == os.path.realpath(schema.root):
        raise ValueError(f"teacher outputs: --output-dir {output_dir} is the input data's own directory; "
                         "the copies with teacher columns need another directory")
    check_output_dir(output_dir, schema)  # before the teacher is loaded
    model = load_trained_model(config, run)
    model.eval()
    teacher = teacher_of(model)
    extras = plugin_extras(config)
    targets: Dict[str, str] = {}  # source file -> its copy
    new_splits: Dict[str, str] = {}
    for split in splits or sorted(schema.splits):
        sources = resolve_paths(schema, split)
        single = len(sources) == 1 and not os.path.isdir(schema.split_path(split))
        split_dir = output_dir if single else os.path.join(output_dir, split)
        for source in sources:
            targets[source] = os.path.join(split_dir, f"{split}.parquet" if single else os.path.basename(source))
        new_splits[split] = f"{split}.parquet" if single else split
    # rank 0 decides which files are finished, so every rank runs the same files
    host = host_group()
    pending = [[source for source, target in targets.items() if not os.path.exists(target)]]
    if ctx.world_size > 1:
        dist.broadcast_object_list(pending, src=0, group=host)
    for source in pending[0]:
        outputs = predict_file(teacher, schema, source, extras, batch_size, progress and ctx.is_main, ctx.device,
                               ctx.rank, ctx.world_size, host)
        error: Optional[Exception] = None
        if ctx.is_main:
            try:
                os.makedirs(os.path.dirname(targets[source]), exist_ok=True)
                write_with_columns(source, targets[source], *outputs[:2], schema.row_key, outputs[2])
            except Exception as caught:  # told to every rank, so none waits for the next file
                error = caught
        failure = [None if error is None else f"{type(error).__name__}: {error}"]
        if ctx.world_size > 1:
            dist.broadcast_object_list(failure, src=0, group=host)
        if error is not None:
            raise error
        if failure[0] is not None:
            raise RuntimeError(f"teacher outputs: rank 0 failed to write {targets[source]}: {failure[0]}")
    report: Dict[str, Any] = {"schema": os.path.join(output_dir, SCHEMA_FILE), "files": list(targets.values())}
    if ctx.is_main:
        width = pq.ParquetFile(report["files"][0]).schema_arrow.field(REPRESENTATION_COLUMN).type.list_size
        report["representation_dim"] = int(width)
        schema.relocated(output_dir, new_splits, [LOGITS_COLUMN, REPRESENTATION_COLUMN]).save(report["schema"])
    barrier()
    return report
