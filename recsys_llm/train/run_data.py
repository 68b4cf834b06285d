"""The data side of a run: its schema (the embedded synthetic data generated when asked), its
rank-sharded readers of train / valid / test, and the metric subsets the data marks."""

import os
import sys
from typing import Dict, Optional

import pyarrow.parquet as pq

from recsys_llm.data.pair_swap import SwappedPairs
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_files import resolve_paths
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.train.config import (DEFAULT_COLD_ITEM_COLUMN, ConfigError, ExperimentConfig, parse_plugin_sections,
                                     schema_json_path)
from recsys_llm.train.distributed import DistContext, barrier
from recsys_llm.train.task_builder import check_plugin_columns, plugin_extras


def load_or_generate_schema(config: ExperimentConfig, ctx: DistContext, generate: bool = True) -> DatasetSchema:
    """Loads ``data.schema``; rank 0 first generates the synthetic data if asked and missing.

    Args:
        generate (bool): False for a job on a trained run (evaluate, export, teacher outputs):
            it reads the data the run trained on, which data generated now need not be.

    Raises:
        FileNotFoundError: the schema is missing and ``data.synthetic_rows`` is 0 (or ``generate`` is False).
    """
    path = config.data.schema
    if not path:
        raise ValueError("data.schema is empty: set it in the config or with data.schema=PATH")
    schema_file = schema_json_path(path)
    if not generate and not os.path.exists(schema_file):
        raise FileNotFoundError(
            f"{schema_file}: schema not found; a trained run is evaluated and exported on the data it trained on, "
            "which is not generated here: point data.schema at it"
            + ("" if os.path.isabs(path) else f" (the relative path {path!r} is read from the working directory "
               f"{os.getcwd()}, as in training: run from there, or pass data.schema=ABSOLUTE_PATH)")
        )
    if config.data.synthetic_rows <= 0:
        if not os.path.exists(schema_file):
            raise FileNotFoundError(f"{schema_file}: schema not found; {missing_schema_hint(config)}")
        return DatasetSchema.load(schema_file)
    # rank 0 alone decides whether to generate; every rank then meets at the barrier, also one
    # that already sees the schema (a slower rank, or a node-local path)
    if ctx.is_main and not os.path.exists(schema_file):
        _generate_once(schema_file, config.data.synthetic_rows, config.data.synthetic_seed)
    barrier()
    return DatasetSchema.load(schema_file)


def missing_schema_hint(config: ExperimentConfig) -> str:
    """Names the command that writes the data a run's missing ``data.schema`` should hold.

    An ELEC run's data is often not ``prepare``'s: an offline student reads the split copies
    ``teacher-outputs`` writes, and a gain network or a joint / frozen student with per-row vectors
    (``elec.vector_source=extras``, the default) reads the copies ``semantics export --attach-dir`` writes.

    Args:
        config (ExperimentConfig): the run's settings (its free-form ``elec`` section is read).

    Returns:
        str: what to run first, for the error that reports the missing schema.
    """
    _, elec = parse_plugin_sections(config)
    if elec is not None:
        if elec.task == "distill" and elec.distill.mode == "offline":
            return ("an offline student reads the teacher's outputs: run `recsys-llm teacher-outputs "
                    "--checkpoint GAIN_RUN --output-dir DIR` first (its DIR/schema.json is data.schema)")
        if elec.vector_source == "extras":
            return ("ELEC's per-row LLM vectors are read from split copies with the vector column: run "
                    "`recsys-llm semantics export --schema PREPARED --llm ADAPTED --output-dir VECTORS "
                    "--attach-dir DIR` first (its DIR/schema.json is data.schema; `recsys-llm semantics adapt` "
                    "before it), or read entity vectors with elec.vector_source=entity_table from the prepared data")
    return "run `recsys-llm prepare` or set data.synthetic_rows>0 to generate the embedded synthetic data there"


def _generate_once(schema_file: str, rows: int, seed: int) -> None:
    """Generates the synthetic data of ``schema_file``'s directory unless another job (that started at the
    same time, e.g. an experiment's runs side by side) made it while this one waited for it."""
    from recsys_llm.atomic_dir import check_writable, file_locked
    from recsys_llm.data.parquet_writer import write_prepared
    from recsys_llm.data.synthetic import generate_synthetic

    directory = os.path.dirname(os.path.abspath(schema_file))
    parent, name = os.path.split(directory)
    try:  # a mistyped data.schema on a read-only data mount: say so, not "Permission denied: .<name>.generating.lock"
        check_writable(directory)
    except PermissionError as error:
        raise PermissionError(f"{schema_file} not found, and the embedded synthetic data (data.synthetic_rows) "
                              f"cannot be generated there: {error}") from None
    os.makedirs(parent, exist_ok=True)
    lock = os.path.join(parent, f".{name}.generating.lock")
    if os.path.exists(lock):  # maybe another job's, generating now (or a killed one's: no lock then, no wait)
        print(f"[recsys_llm] {schema_file}: waiting for the job that holds {lock} to generate it", file=sys.stderr,
              flush=True)
    with file_locked(lock, "", wait=True):
        if os.path.exists(schema_file):
            return
        # a mistyped or unmounted data.schema lands here too: say so, and never write into a
        # directory that holds something else (write_prepared refuses it)
        print(f"[recsys_llm] {schema_file} not found: generating {rows} rows of the embedded synthetic data "
              "there (data.synthetic_rows; set it to 0 to require existing data)", file=sys.stderr, flush=True)
        write_prepared(directory, "synthetic", [], lambda tmp: generate_synthetic(tmp, rows, seed=seed, progress=True))


def check_split_names(config: ExperimentConfig, schema: DatasetSchema) -> None:
    """Refuses a ``data.train_split`` that is not a split of ``schema`` (a typo, or empty), and a
    ``data.valid_split`` / ``data.test_split`` that is set but not one, naming the setting and the splits.

    Raises:
        ConfigError: naming the setting, the data directory and its splits.
    """
    data = config.data
    if data.train_split not in schema.splits:
        raise ConfigError(
            f"data.train_split={data.train_split!r}: {schema.root} has no such split (it has "
            f"{sorted(schema.splits)}); expected the split to train on"
        )
    absent = [(name, split) for name, split in (("valid", data.valid_split), ("test", data.test_split))
              if split and split not in schema.splits]
    if absent:  # both at once: a day's data prepared --like holds one split, and lacks either
        settings = " and ".join(f"data.{name}_split={split!r}" for name, split in absent)
        clear = " ".join(f"data.{name}_split=''" for name, _ in absent)
        without = " or ".join(f"a {name}" for name, _ in absent)
        raise ConfigError(
            f"{settings}: {schema.root} has no such split (it has {sorted(schema.splits)}); "
            f"set {clear} to train without {without} split"
        )


def build_readers(
    config: ExperimentConfig, schema: DatasetSchema, ctx: DistContext, train_transform: Optional[SwappedPairs] = None
) -> Dict[str, ParquetBatchReader]:
    """This rank's readers of the run's splits: ``train`` (shuffled, with ``train_transform``), and
    ``valid`` / ``test`` where the config names them (every row scored, metric-subset columns read).

    Raises:
        ConfigError: ``data.train_split``, ``data.valid_split`` or ``data.test_split`` names a split the data
            does not have (:func:`check_split_names`).
    """
    check_split_names(config, schema)
    data = config.data
    check_plugin_columns(config, schema, [s for s in (data.train_split, data.valid_split, data.test_split)
                                          if s in schema.splits])
    eval_batch = data.eval_batch_size or data.batch_size
    train_extras = list(dict.fromkeys(list(data.extras) + plugin_extras(config)))
    eval_extras = list(dict.fromkeys(train_extras + list(metric_subsets(config, schema).values())))
    common = dict(rank=ctx.rank, world_size=ctx.world_size, validate=data.validate, prefetch=data.prefetch,
                  pin_memory=ctx.device.type == "cuda")
    readers = {
        "train": ParquetBatchReader(
            schema, data.train_split, data.batch_size, extras=train_extras, shuffle=data.shuffle,
            seed=config.train.seed, transform=train_transform, **common,
        ),
    }
    for name, split in (("valid", data.valid_split), ("test", data.test_split)):
        if not split:
            continue
        readers[name] = ParquetBatchReader(schema, split, eval_batch, extras=eval_extras, equal_batches=False,
                                           **common)  # evaluate scores every row
    return readers


def metric_subsets(config: ExperimentConfig, schema: DatasetSchema) -> Dict[str, str]:
    """The metric subsets of evaluation: ``{"cold": data.cold_item_column}`` when the data has that
    extra column, else none.

    Raises:
        ConfigError: ``data.cold_item_column`` is set to another name than the default and the data
            has no such extra column (a typo would silently drop the cold-item metrics; the default may
            be absent, as in data without cold items).
    """
    column = config.data.cold_item_column
    if not column:
        return {}
    if column in schema.extra_columns:
        return {"cold": column}
    if column == DEFAULT_COLD_ITEM_COLUMN:
        return {}
    found = ""
    split = next((name for name in (config.data.test_split, config.data.train_split) if name in schema.splits), None)
    if split is not None:  # what the files hold besides the schema's extra columns
        path = resolve_paths(schema, split)[0]
        file_columns = sorted(pq.ParquetFile(path).schema_arrow.names)
        found = (f"; {path} has that column, but the schema does not list it in extra_columns: add it there"
                 if column in file_columns else f"; file columns of {path}: {file_columns}")
    raise ConfigError(
        f"data.cold_item_column={column!r}: the data has no such extra column (extra_columns of {schema.root}: "
        f"{list(schema.extra_columns)}{found}). Name the 0/1 column that marks cold items, or set "
        "data.cold_item_column='' for no cold-item metrics"
    )
