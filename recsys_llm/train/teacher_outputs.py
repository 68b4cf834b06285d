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
fewer repeat one: ``ParquetBatchReader.padded``), sending each batch's outputs to rank 0 over a
host-memory group. Rank 0 writes the file atomically, row group by row group: its own outputs
as they come, every other rank's, which follow its own in the file, through a spill file beside
the copy (``<copy>.rank<r>.tmp``, an Arrow IPC stream) that it reads back once the teacher is
done, checking the row count (and the row keys when the schema has one). No table or split's
outputs are ever held whole: rank 0 holds a batch of each rank and a row group. Existing
finished files are never rewritten, so a run resumes an earlier unfinished one in the same
``--output-dir``; a directory holding anything else is refused before the teacher is loaded.
``teacher.json`` records which checkpoint wrote the copies (content hashes of its
``train_state.json`` and DCP ``.metadata``), so a resume with another teacher -- one trained
again, or another run's -- is refused rather than left with copies of two teachers; and the data
they were copied from (each split's Parquet-footer hash), so a resume after the data was prepared
again is refused rather than left with copies of both.
"""

import contextlib
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow.parquet as pq
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module

from recsys_llm.atomic_dir import (
    LOCK_FILE,
    check_own_entries,
    directory_locked,
    is_temp_file_of,
    write_text_atomically,
)
from recsys_llm.data.parquet_files import resolve_paths, same_split_fingerprint, split_fingerprint
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.validation import check_split_has_rows, open_parquet
from recsys_llm.modules.teacher_student import TeacherStudentTask
from recsys_llm.train.checkpoint import checkpoint_digests
from recsys_llm.train.config import ExperimentConfig
from recsys_llm.train.distributed import barrier, host_group
from recsys_llm.train.task_builder import plugin_extras
from recsys_llm.train.teacher_output_stream import (
    LOGITS_COLUMN,
    REPRESENTATION_COLUMN,
    is_spill_of,
    predict_steps,
    remove_spills,
    send_step,
    write_on_rank_0,
)
from recsys_llm.train.trained_run import check_splits_row_vectors, load_trained_model, open_trained_run

SCHEMA_FILE = "schema.json"
# which checkpoint wrote the copies, from which data: {"checkpoint": path, "sha256": {file: digest},
# "data_fingerprints": {split: split_fingerprint}}
TEACHER_FILE = "teacher.json"
DATA_FINGERPRINTS_KEY = "data_fingerprints"


def check_teacher_columns_free(schema: DatasetSchema) -> None:
    """Refuses data whose field, label or row key has the name of a column the copies write
    (``teacher_logits``, ``teacher_representation``): the copies would put the teacher's outputs in that column's
    place (a field's values silently replaced) and their schema, listing it as an extra column, would not load.

    Raises:
        ValueError: naming the columns.
    """
    own = [spec.name for spec in schema.fields] + [schema.label] + ([schema.row_key] if schema.row_key else [])
    taken = [name for name in (LOGITS_COLUMN, REPRESENTATION_COLUMN) if name in own]
    if taken:
        raise ValueError(f"{schema.root}: schema {schema.name!r} has a field, label or row key named "
                         f"{', '.join(repr(name) for name in taken)}, a column teacher-outputs writes "
                         f"({LOGITS_COLUMN}, {REPRESENTATION_COLUMN}) into its copies; rename that column in the data "
                         "and prepare it again")


def check_output_dir(output_dir: str, schema: DatasetSchema) -> None:
    """Raises unless ``output_dir`` is absent, empty or holds only teacher outputs of ``schema``'s
    splits (``<split>.parquet`` or ``<split>/``, their temp files, ``schema.json``): an unfinished
    run there is resumed, anything else is not written next to.

    Raises:
        FileExistsError: naming the directory and its first other entry.
    """
    own = {SCHEMA_FILE, TEACHER_FILE} | {name for split in schema.splits for name in (split, f"{split}.parquet")}
    own |= {f"{name}.tmp" for name in own} | {LOCK_FILE}  # the lock file a killed run leaves (no lock)

    def is_own(name: str) -> bool:
        return (name in own or is_temp_file_of(name, SCHEMA_FILE) or is_temp_file_of(name, TEACHER_FILE)
                or any(is_spill_of(name, f"{split}.parquet") for split in schema.splits))

    check_own_entries(output_dir, "data set with teacher outputs", is_own,
                      f"{SCHEMA_FILE}, {TEACHER_FILE} and the split copies {sorted(schema.splits)}")


def teacher_record(checkpoint: str, data_fingerprints: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """What ``teacher.json`` records of the checkpoint directory ``checkpoint``: its path (for
    messages) and its identity files' sha256 (:func:`~recsys_llm.train.checkpoint.checkpoint_digests`),
    and of the source data, when given, each split's :func:`source_fingerprints`."""
    record: Dict[str, Any] = {"checkpoint": os.path.abspath(checkpoint), "sha256": checkpoint_digests(checkpoint)}
    if data_fingerprints is not None:
        record[DATA_FINGERPRINTS_KEY] = dict(data_fingerprints)
    return record


def source_fingerprints(schema: DatasetSchema) -> Dict[str, str]:
    """Split -> :func:`~recsys_llm.data.parquet_files.split_fingerprint` (a hash of its files' Parquet footers)
    of every split of ``schema`` whose file or directory is there."""
    return {split: split_fingerprint(schema, split) for split in sorted(schema.splits)
            if os.path.exists(schema.split_path(split))}


def _holds_a_copy(path: str) -> bool:
    """A finished split copy, or a split directory with one."""
    if not os.path.isdir(path):
        return True
    return any(not name.endswith(".tmp") for name in os.listdir(path))


def _finished_copies(output_dir: str) -> List[str]:
    """The entries of ``output_dir`` that are finished split copies (or split directories holding one)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(name for name in names if name not in (SCHEMA_FILE, TEACHER_FILE, LOCK_FILE)
                  and not name.endswith(".tmp") and _holds_a_copy(os.path.join(output_dir, name)))


def check_same_teacher(output_dir: str, record: Dict[str, Any]) -> None:
    """Raises when ``output_dir`` already holds finished copies written by another teacher checkpoint
    than ``record`` describes (:func:`teacher_record`), copies of splits whose source data holds other
    rows now (prepared again), or copies without a ``teacher.json``. Without a finished copy any
    ``teacher.json`` there is replaced: nothing of another teacher would be kept. Records without data
    fingerprints (older versions) are not compared on the data.

    Raises:
        ValueError: naming the directory, both checkpoints (or the splits whose data changed) and the remedy.
    """
    finished = _finished_copies(output_dir)
    if not finished:
        return
    path = os.path.join(output_dir, TEACHER_FILE)
    remedy = "use a new --output-dir, or delete it to write every split again with this teacher"
    if not os.path.isfile(path):
        raise ValueError(f"{output_dir}: holds teacher outputs ({', '.join(finished)}) without {TEACHER_FILE} "
                         "(written by an older version), so which teacher wrote them is unknown: " + remedy)
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        saved_digests = dict(saved["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: damaged or not a teacher record ({error}); {remedy}") from error
    shared = set(saved_digests) & set(record["sha256"])
    differing = sorted(name for name in shared if saved_digests[name] != record["sha256"][name])
    if differing or not shared:
        raise ValueError(
            f"{output_dir}: holds teacher outputs of another teacher checkpoint ({saved.get('checkpoint')}) than "
            f"{record['checkpoint']} (differing: {', '.join(differing) or 'no file of both to compare'}): a resume "
            f"would mix the outputs of two teachers; {remedy}"
        )
    saved_data, current_data = saved.get(DATA_FINGERPRINTS_KEY), record.get(DATA_FINGERPRINTS_KEY)
    if isinstance(saved_data, dict) and isinstance(current_data, dict):
        copied = {name[: -len(".parquet")] if name.endswith(".parquet") else name for name in finished}
        changed = sorted(split for split in copied if split in saved_data and split in current_data
                         and not same_split_fingerprint(saved_data[split], current_data[split]))
        if changed:
            raise ValueError(
                f"{output_dir}: holds teacher outputs of split(s) {changed} copied from other data than those splits "
                f"hold now (prepared again since?): a resume would mix copies of both; {remedy}"
            )


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
            raise ValueError("an offline student's task (elec.distill.mode=offline), which holds no teacher to run; "
                             "take the run of its teacher")
        return task.teacher
    if not hasattr(task, "predict"):
        raise ValueError(f"{type(task).__name__}: expected a CTRTask-like module with predict(batch)")
    return task


def split_copies(
    schema: DatasetSchema, splits: Sequence[str], output_dir: str
) -> Tuple[List[Tuple[str, str]], Dict[str, str]]:
    """Where each split file's copy goes: a split of one file becomes ``<split>.parquet`` in ``output_dir``,
    a directory's files go to ``<split>/`` under their own names; a file two splits name (valid = test) gets
    a copy in each. An empty file of a directory gets no copy (it has no row to give outputs for).

    Returns:
        Tuple[List[Tuple[str, str]], Dict[str, str]]: ``(source file, its copy)`` pairs, and the new schema's
        split paths (relative to ``output_dir``).

    Raises:
        DataError: a split without rows (naming its file, or its directory).
    """
    copies: List[Tuple[str, str]] = []
    new_splits: Dict[str, str] = {}
    for split in splits:
        sources = resolve_paths(schema, split)
        sizes = [open_parquet(source).metadata.num_rows for source in sources]
        check_split_has_rows(sources, sum(sizes))
        single = len(sources) == 1 and not os.path.isdir(schema.split_path(split))
        split_dir = output_dir if single else os.path.join(output_dir, split)
        copies += [(source, os.path.join(split_dir, f"{split}.parquet" if single else os.path.basename(source)))
                   for source, size in zip(sources, sizes) if size]
        new_splits[split] = f"{split}.parquet" if single else split
    return copies, new_splits


def _earlier_copies(output_dir: str, schema: DatasetSchema, splits: Dict[str, str]) -> Dict[str, str]:
    """The splits other than ``splits`` that an earlier run of the same teacher copied into ``output_dir``
    (its ``schema.json`` names them, and they are there), so that a run over some splits keeps the
    others pointing at their copies, not back at the data without teacher columns."""
    try:
        with open(os.path.join(output_dir, SCHEMA_FILE), encoding="utf-8") as handle:
            earlier = json.load(handle)["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(earlier, dict):
        return {}
    return {split: path for split, path in earlier.items()
            if split in schema.splits and split not in splits and isinstance(path, str)
            and not os.path.isabs(path) and not path.startswith("..")
            and os.path.exists(os.path.join(output_dir, path))}


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
        Dict[str, Any]: ``{"schema": path, "representation_dim": H, "files": [...]}``; ``representation_dim``
        on rank 0 only (it reads the written copy).
    """
    elec = config.elec or {}
    if elec.get("task") == "distill" and (elec.get("distill") or {}).get("mode") == "offline":
        raise ValueError(f"--checkpoint {checkpoint}: an offline student's run "
                         "(elec.distill.mode=offline), which holds no teacher; pass the run of its teacher (elec.task="
                         "gain), or of a joint or frozen distillation")
    run = open_trained_run(config, checkpoint)
    ctx, schema = run.ctx, run.schema
    if os.path.realpath(output_dir) == os.path.realpath(schema.root):
        raise ValueError(f"--output-dir {output_dir}: is the input data's own directory; "
                         "the copies with teacher columns need another directory")
    check_teacher_columns_free(schema)  # before the teacher is loaded
    check_output_dir(output_dir, schema)  # before the teacher is loaded
    unknown = [split for split in splits or () if split not in schema.splits]  # before teacher.json and the teacher
    if unknown:
        raise ValueError(f"--splits: {unknown} are no splits of schema {schema.name!r}; expected names "
                         f"among {sorted(schema.splits)}")
    check_splits_row_vectors(config, splits or sorted(schema.splits), run)  # before the teacher loads
    copies, new_splits = split_copies(schema, splits or sorted(schema.splits), output_dir)
    refusal: List[Optional[str]] = [None]
    # rank 0 holds the output directory from its checks until the schema is written: another run there (another
    # teacher's, checked against the same empty directory) would mix its copies with this one's
    held = contextlib.ExitStack()
    if ctx.is_main:  # rank 0 writes, and alone needs to see the directory; its error is every rank's
        try:
            held.enter_context(directory_locked(output_dir, (
                f"{output_dir}: another teacher-outputs run is writing this --output-dir (it holds {LOCK_FILE} "
                "there); wait for it to end (or stop it), or use another --output-dir")))
            record = teacher_record(run.checkpoint, source_fingerprints(schema))
            check_same_teacher(output_dir, record)
            os.makedirs(output_dir, exist_ok=True)
            remove_spills(output_dir, schema)
            write_text_atomically(os.path.join(output_dir, TEACHER_FILE), json.dumps(record, indent=2) + "\n")
        except (OSError, ValueError) as error:
            refusal = [str(error)]
    if ctx.world_size > 1:
        dist.broadcast_object_list(refusal, src=0, group=host_group())
    if refusal[0] is not None:
        held.close()
        raise ValueError(refusal[0])
    with held:
        if ctx.is_main and progress:  # building the shards and loading them takes minutes for large tables
            print(f"[recsys_llm] teacher-outputs: loading {run.checkpoint} on {ctx.world_size} rank(s)",
                  file=sys.stderr, flush=True)
        model = load_trained_model(config, run)
        model.eval()
        teacher = teacher_of(model)
        extras = plugin_extras(config)
        # rank 0 decides which files are finished, so every rank runs the same files
        host = host_group()
        pending = [[(source, target) for source, target in copies if not os.path.exists(target)]]
        if ctx.world_size > 1:
            dist.broadcast_object_list(pending, src=0, group=host)
        for source, target in pending[0]:
            steps = predict_steps(teacher, schema, source, extras, batch_size, progress and ctx.is_main, ctx.device,
                                  ctx.rank, ctx.world_size)
            error: Optional[Exception] = None
            if ctx.is_main:  # an error is told to every rank, so none waits for the next file
                error = write_on_rank_0(source, target, schema.row_key, steps, ctx.world_size, host, progress)
            else:
                for step in steps:
                    send_step(step, host)
            failure = [None if error is None else f"{type(error).__name__}: {error}"]
            if ctx.world_size > 1:
                dist.broadcast_object_list(failure, src=0, group=host)
            if error is not None:
                raise error
            if failure[0] is not None:
                raise RuntimeError(f"rank 0 failed to write {target}: {failure[0]}")
        report: Dict[str, Any] = {"schema": os.path.join(output_dir, SCHEMA_FILE),
                                  "files": [target for _, target in copies]}
        if ctx.is_main:
            width = pq.ParquetFile(report["files"][0]).schema_arrow.field(REPRESENTATION_COLUMN).type.list_size
            report["representation_dim"] = int(width)
            copied = {**_earlier_copies(output_dir, schema, new_splits), **new_splits}
            schema.relocated(output_dir, copied, [LOGITS_COLUMN, REPRESENTATION_COLUMN]).save(report["schema"])
        barrier()
        return report
