"""``prepare tabular --like``: new raw rows (a day's traffic) prepared into the id space of an earlier
``prepare tabular`` output, so that a model trained on that data scores or evaluates them.

Each sparse and sequence field's values become ids the way the earlier schema records (``DatasetSchema.ids``),
through the plan :func:`~recsys_llm.data.tabular.raw_values.prepared_plan` rebuilds (the one ``raw_value_ids``
uses) and the conversion's own per-block code: a vocabulary's value it does not hold gets id 0 (a sequence
drops it), text is hashed with the conversion's salt, integer ids outside the table are an error. The
output holds one split, the earlier schema (fingerprint included) and its value-text files::

    schema = prepare_tabular_like("day_2024_06_01.csv", "data/shop", "data/shop-0601")
    # recsys-llm score --artifact exports/shop --data data/shop-0601 --split test
"""

import dataclasses
import os
import shutil
import warnings
from typing import Dict, List, Optional, Set

import pyarrow as pa
from tqdm import tqdm

from recsys_llm.data.parquet_files import parquet_files
from recsys_llm.data.parquet_writer import write_prepared
from recsys_llm.data.schema import DatasetSchema, check_split_name
from recsys_llm.data.tabular.config import TabularConfig, check_tabular_config
from recsys_llm.data.tabular.convert import field_way, format_hint, near_names, write_splits, write_vocabulary
from recsys_llm.data.tabular.growth import grow_vocabularies
from recsys_llm.data.tabular.raw_values import prepared_plan
from recsys_llm.data.tabular.source import (ColumnTypeChanged, csv_column_types, is_parquet, repeated_columns,
                                            source_columns)
from recsys_llm.data.tabular.tokens import FieldPlan
from recsys_llm.data.validation import DataError, open_parquet
from recsys_llm.progress import bar_options
from recsys_llm.typed_config import as_bool

#: the ``TabularConfig`` options the earlier preparation decided (its splits, its ids), refused with ``--like``
LIKE_DECIDED = {"split_by": "--split-by", "split_fractions": "--split", "seed": "--seed",
                "vocabulary_fields": "--vocabulary", "hash_fields": "--hash"}


def prepare_tabular_like(
    data_path: str,
    like_dir: str,
    out_dir: str,
    config: Optional[TabularConfig] = None,
    *,
    split_name: str = "test",
    progress: bool = False,
    field_ways: Optional[Dict[str, str]] = None,
    grow_vocabulary: bool = False,
) -> DatasetSchema:
    """Prepares the rows of ``data_path`` into the id space of the earlier ``prepare tabular`` output ``like_dir``.

    Written whole or not at all (:func:`~recsys_llm.data.parquet_writer.write_prepared`).

    Args:
        data_path (str): CSV file with a header line (compressed ones decompressed as read), Parquet file or
            directory, holding the earlier schema's field columns; its label column, row key and extra columns
            are optional.
        like_dir (str): the earlier output (its ``schema.json`` must record ``ids``).
        out_dir (str): output directory (``<split_name>.parquet``, ``text/``, ``schema.json``); absent, empty
            or an earlier output of this kind.
        config (Optional[TabularConfig]): CSV parsing options, ``label_threshold``, ``fill_missing_dense`` and
            ``rows_per_group``; the options the earlier preparation decided (:data:`LIKE_DECIDED`) must be left
            at their defaults.
        split_name (str): the one split written.
        progress (bool): a tqdm bar over rows.
        field_ways (Optional[Dict[str, str]]): when given, filled with each categorical field's way, as the
            prepare report prints it.
        grow_vocabulary (bool): values a vocabulary lacks take the free ids of the field's table
            (:func:`~recsys_llm.data.tabular.growth.grow_vocabularies`; the output's value-text files hold them)
            instead of id 0; one more pass over the rows.

    Returns:
        DatasetSchema: the written schema: the earlier one (same fields, label, row key, ``ids``, hence the same
        fingerprint) with ``splits = {split_name: "<split_name>.parquet"}`` and the earlier extra columns that
        ``data_path`` holds; without the label column in ``data_path`` its split has none (rows to score).

    Raises:
        TypeError: ``grow_vocabulary`` is not a bool (``"false"`` would count as True).
        ValueError: ``like_dir``'s schema records no ``ids`` (another source's data, or an older output), an
            option the earlier preparation decided. SchemaError: a ``split_name`` that is no plain name.
        DataError: rows that do not fit the earlier schema (a missing field column, an integer id outside its
            table, a label that is no 0/1), naming the file, the column, the row and what was expected.
    """
    check_tabular_config(config, "prepare_tabular_like")
    if as_bool(grow_vocabulary) is None:  # "false" would count as True
        raise TypeError(f"prepare_tabular_like: grow_vocabulary must be True or False, got {grow_vocabulary!r}")
    config = config or TabularConfig()
    defaults = TabularConfig()
    decided = [flag for option, flag in LIKE_DECIDED.items() if getattr(config, option) != getattr(defaults, option)]
    if decided:
        raise ValueError(f"prepare tabular --like {like_dir}: {', '.join(decided)} (TabularConfig) decided by the "
                         "earlier preparation, whose splits and ids the new rows keep; expected them left out")
    check_split_name(split_name, "--split-name (prepare tabular --like)")
    like = DatasetSchema.load(like_dir)
    unrecorded = [spec.name for spec in like.categorical_fields if spec.name not in like.ids]
    if unrecorded:
        raise ValueError(
            f"prepare tabular --like {like_dir}: its schema {like.name!r} does not record how field(s) {unrecorded} "
            "became ids (the 'ids' key `recsys-llm prepare tabular` writes); expected a directory prepared by "
            "`prepare tabular` (synthetic, movielens and criteo data, or tabular data prepared before ids were "
            "recorded, cannot be extended: prepare the earlier data again with prepare tabular)"
        )
    plans = {spec.name: prepared_plan(like, spec.name, f"prepare tabular --like {like_dir}")
             for spec in like.categorical_fields}
    available = source_columns(data_path, config)
    wanted = [spec.name for spec in like.fields]
    missing = [name for name in wanted if name not in available]
    if missing:
        raise DataError(f"{data_path}: missing column(s) {missing}, field(s) of the earlier schema {like.name!r} "
                        f"({like_dir}); {near_names(missing, available)}{format_hint(data_path, available, config)}"
                        f"the file has columns {available}")
    with_label = like.label in available
    row_key = like.row_key if like.row_key and like.row_key in available else None
    extras = [name for name in like.extra_columns if name in available and name != like.row_key]
    columns = list(dict.fromkeys(wanted + [like.label] * with_label + extras + ([row_key] if row_key else [])))
    if is_parquet(data_path):  # the columns were taken from the first file: every other file must agree
        optional = [name for name in [like.label, like.row_key] + list(like.extra_columns) if name]
        _check_same_columns(data_path, columns, [name for name in optional if name not in columns])
    if not with_label and split_name in ("train", "valid"):  # the splits training reads; it failed there, later
        warnings.warn(f"{data_path}: no label column {like.label!r}, so split {split_name!r} is written without "
                      "labels, as rows to score (`recsys-llm score`); training and its validation read labels",
                      stacklevel=2)
    repeated = repeated_columns(available, columns)
    if repeated:
        raise DataError(f"{data_path}: column(s) {repeated} of the earlier schema {like.name!r} occur more than once "
                        "in the file; expected each column once (rename or drop the copies)")
    growth = grow_vocabularies(data_path, like, plans, config, progress) if grow_vocabulary else {}
    for name, grown in growth.items():
        if grown.lacking == grown.read:  # the grown ids would be spent on them, for good (later days keep them)
            warnings.warn(f"{data_path}: none of the {grown.read:,} values of field {name!r} is in its vocabulary "
                          f"({like_dir}), so --grow-vocabulary spends the table's free ids on them (for good: later "
                          "days prepared --like the output keep them); are they written in another form than the "
                          "earlier data's (numbers where it had names, another spelling)?", stacklevel=2)
        if grown.left_out:
            warnings.warn(f"{data_path}: field {name!r} met {grown.added + grown.left_out} values its vocabulary "
                          f"({like_dir}) lacks, {grown.left_out} more than its table has free ids (cardinality "
                          f"{like.field(name).cardinality:,d}); they get id 0. Prepare the earlier data with a larger "
                          "cardinality to leave room for new values", stacklevel=2)
    split_file = f"{split_name}.parquet"
    schema = write_prepared(
        out_dir, data_path, [data_path, like_dir],
        lambda tmp: _write_like(data_path, like, tmp, plans, columns, row_key, extras, config, split_name, progress,
                                set(growth)),
        with_label=with_label, marker_files=("schema.json", split_file),
    )
    for spec in like.categorical_fields:
        plan = plans[spec.name]
        if plan.mode == "vocab" and plan.values and plan.unseen == plan.values:
            warnings.warn(f"{data_path}: none of the {plan.values:,} values of field {spec.name!r} is in its "
                          f"vocabulary ({like_dir}), so every one got id 0 (unknown); are they written in another form "
                          "than the earlier data's (numbers where it had names, another spelling)?", stacklevel=2)
    if field_ways is not None:
        field_ways.update({spec.name: field_way(spec, plans[spec.name], config,
                                                growth[spec.name].describe() if spec.name in growth else "")
                           for spec in like.categorical_fields})
    return schema


def _check_same_columns(data_path: str, columns: List[str], left_out: List[str]) -> None:
    """Raises unless every Parquet file of ``data_path`` has ``columns`` (what the first file has of the earlier
    schema's) and none of ``left_out`` (the label, row key and extra columns the first file lacks, which would be
    dropped from the other files' rows, or their keys replaced by row numbers), naming the file and the column."""
    files = parquet_files(data_path)
    for file_path in files[1:]:
        names = open_parquet(file_path).schema_arrow.names
        absent = [name for name in columns if name not in names]
        if absent:
            raise DataError(f"{file_path}: missing column(s) {absent} that {files[0]} has; expected the same columns "
                            f"in every file of {data_path}")
        more = [name for name in left_out if name in names]
        if more:
            raise DataError(f"{file_path}: has column(s) {more} of the earlier schema that {files[0]} lacks; expected "
                            f"the same columns in every file of {data_path} (the label, row key and extra columns are "
                            "read from every file or from none)")


def _write_like(
    data_path: str,
    like: DatasetSchema,
    out_dir: str,
    plans: Dict[str, FieldPlan],
    columns: List[str],
    row_key: Optional[str],
    extras: List[str],
    config: TabularConfig,
    split_name: str,
    progress: bool,
    grown: Set[str],
) -> DatasetSchema:
    """Writes the one split and the earlier value-text files into the fresh directory ``out_dir``; returns the
    schema rooted there (not yet saved). ``columns``: the source columns read; ``extras``: the earlier extra
    columns among them; ``grown``: the fields whose vocabularies took new values (their files hold them)."""
    for spec in like.fields:
        if spec.value_text:  # the same relative path, so the schema names it as the earlier one does
            target = os.path.join(out_dir, spec.value_text)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if spec.name in grown:
                write_vocabulary(target, plans[spec.name].vocabulary)
            else:
                shutil.copyfile(like.value_text_path(spec.name), target)
    schema = dataclasses.replace(like, splits={split_name: f"{split_name}.parquet"}, extra_columns=list(extras),
                                 root=os.path.abspath(out_dir), ids=dict(like.ids))
    with_label = like.label in columns

    def write(column_types: Optional[Dict[str, pa.DataType]]) -> None:
        with tqdm(desc="tabular rows", unit="row", disable=not progress, **bar_options()) as bar:
            write_splits(data_path, like, schema, plans, columns, row_key, None, config, bar, column_types,
                         with_label=with_label, utf8_checked=False)

    try:
        write(None)
    except ColumnTypeChanged as error:  # an extra column whose type the first block did not show: read again
        column_types = csv_column_types(data_path, error.columns, config)
        if column_types is None:
            raise
        for plan in plans.values():  # the rows are written again from the first
            plan.values = plan.unseen = 0
        write(column_types)
    return schema
