"""``prepare tabular --like``: new raw rows (a day's traffic) prepared into the id space of an earlier
``prepare tabular`` output, so that a model trained on that data scores or evaluates them.

Each sparse and sequence field's values become ids the way the earlier schema records (``DatasetSchema.ids``),
through the plan :func:`~recsys_llm.data.tabular.raw_values.prepared_plan` rebuilds (the one ``raw_value_ids``
uses) and the conversion's own per-block code: a vocabulary's value it does not hold gets id 0 (a sequence
drops it), text is hashed with the conversion's salt, integer ids outside the table are an error. The
output holds one split, the earlier schema (fingerprint included) and its value-text files::

    schema = prepare_tabular_like("day_2024_06_01.csv", "data/shop", "data/shop-0601")
    # recsys-llm score --artifact exports/shop --data data/shop-0601 --split test

A schema file of the earlier fields plus new ones (``schema_path``, ``--schema``) adds fields: the earlier ones
keep their ids, the new ones are prepared as a fresh ``prepare tabular`` prepares them
(:mod:`~recsys_llm.data.tabular.added`).
"""

import dataclasses
import os
import shutil
import warnings
from typing import Dict, List, NamedTuple, Optional, Set

import pyarrow as pa
from tqdm import tqdm

from recsys_llm.data.parquet_files import parquet_files
from recsys_llm.data.parquet_writer import write_prepared
from recsys_llm.data.schema import DatasetSchema, FieldSpec, check_split_name
from recsys_llm.data.tabular.added import AddedFields, check_added_field_options, read_added_fields
from recsys_llm.data.tabular.config import TabularConfig, check_tabular_config
from recsys_llm.data.tabular.convert import (check_field_options, check_planned_fields, field_way, format_hint,
                                             near_names, new_field_specs, user_value_text, write_splits,
                                             write_vocabulary)
from recsys_llm.data.tabular.growth import grow_vocabularies
from recsys_llm.data.tabular.raw_values import prepared_plan
from recsys_llm.data.tabular.source import (ColumnTypeChanged, csv_column_types, is_parquet, repeated_columns,
                                            source_columns)
from recsys_llm.data.tabular.tokens import ID_WAY_OF_PLAN, FieldPlan, plan_fields
from recsys_llm.data.validation import DataError, open_parquet
from recsys_llm.progress import bar_options
from recsys_llm.typed_config import as_bool

#: the ``TabularConfig`` options the earlier preparation decided (its splits, its ids), refused with ``--like``
LIKE_DECIDED = {"split_by": "--split-by", "split_fractions": "--split", "seed": "--seed",
                "vocabulary_fields": "--vocabulary", "hash_fields": "--hash"}
#: of :data:`LIKE_DECIDED`, those a schema file of new fields (``schema_path``) takes for its new fields
NEW_FIELD_OPTIONS = ("vocabulary_fields", "hash_fields")


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
    schema_path: Optional[str] = None,
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
            at their defaults (with ``schema_path``, ``vocabulary_fields`` and ``hash_fields`` may name new fields).
        split_name (str): the one split written.
        progress (bool): a tqdm bar over rows.
        field_ways (Optional[Dict[str, str]]): when given, filled with each categorical field's way, as the
            prepare report prints it.
        grow_vocabulary (bool): values a vocabulary lacks take the free ids of the field's table
            (:func:`~recsys_llm.data.tabular.growth.grow_vocabularies`; the output's value-text files hold them)
            instead of id 0; one more pass over the rows.
        schema_path (Optional[str]): a schema file holding the earlier fields as they were plus new fields
            (:func:`~recsys_llm.data.tabular.added.read_added_fields`): the earlier fields are prepared as without
            it, the new ones as a fresh ``prepare tabular`` prepares them from these rows (their vocabularies,
            hashing; ``config``'s ``vocabulary_fields`` and ``hash_fields`` may name them); an earlier field the
            file leaves out is dropped, with a warning. The output then has the file's fields, in its order, and
            another fingerprint: a run on it takes the shared fields' tables (``train.init_scope=tables``).

    Returns:
        DatasetSchema: the written schema: the earlier one (same fields, label, row key, ``ids``, hence the same
        fingerprint; with ``schema_path``, the file's fields and name) with ``splits = {split_name:
        "<split_name>.parquet"}`` and the earlier extra columns that ``data_path`` holds; without the label column
        in ``data_path`` its split has none (rows to score).

    Raises:
        TypeError: ``grow_vocabulary`` is not a bool (``"false"`` would count as True).
        ValueError: ``like_dir``'s schema records no ``ids`` (another source's data, or an older output), an
            option the earlier preparation decided. SchemaError: a ``split_name`` that is no plain name; a
            ``schema_path`` that changes a field of the earlier schema, its label or row key.
        DataError: rows that do not fit the earlier schema (a missing field column, an integer id outside its
            table, a label that is no 0/1), naming the file, the column, the row and what was expected.
    """
    check_tabular_config(config, "prepare_tabular_like")
    if as_bool(grow_vocabulary) is None:  # "false" would count as True
        raise TypeError(f"prepare_tabular_like: grow_vocabulary must be True or False, got {grow_vocabulary!r}")
    config = config or TabularConfig()
    defaults = TabularConfig()
    decided = [flag for option, flag in LIKE_DECIDED.items() if getattr(config, option) != getattr(defaults, option)
               and not (schema_path and option in NEW_FIELD_OPTIONS)]
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
    added = _read_added(schema_path, like, like_dir, config) if schema_path else None
    if added is not None:
        like = _kept_schema(like, added)
    plans = {spec.name: prepared_plan(like, spec.name, f"prepare tabular --like {like_dir}")
             for spec in like.categorical_fields}
    available = source_columns(data_path, config)
    wanted = [spec.name for spec in like.fields]
    _check_columns(data_path, wanted, available, config, f"field(s) of the earlier schema {like.name!r} ({like_dir})")
    new = _plan_added(data_path, schema_path, added, available, config, progress) if added else None
    with_label = like.label in available
    row_key = like.row_key if like.row_key and like.row_key in available else None
    added_names = [spec.name for spec in added.added] if added else []
    extras = _carried_extras(like, available, added_names)
    columns = list(dict.fromkeys(wanted + added_names + [like.label] * with_label + extras
                                 + ([row_key] if row_key else [])))
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
        out_dir, data_path, [data_path, like_dir] + ([schema_path] if schema_path else []),
        lambda tmp: _write_like(data_path, like, tmp, plans, columns, row_key, extras, config, split_name, progress,
                                set(growth), new),
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
        if new is not None:
            field_ways.update({spec.name: field_way(spec, new.plans[spec.name], config) + " (new field)"
                               for spec in new.added.added if spec.is_categorical})
    return schema


def _carried_extras(like: DatasetSchema, available: List[str], added_names: List[str]) -> List[str]:
    """The earlier extra columns the rows hold and the output carries as they are: not the row key, and not a
    column a new field of ``--schema`` now reads (it becomes that field, encoded, rather than a copy)."""
    return [name for name in like.extra_columns
            if name in available and name != like.row_key and name not in added_names]


class _NewFields(NamedTuple):
    """The new fields of a ``--schema`` given with ``--like`` (:func:`_read_added`), planned
    (:func:`_plan_added`): their plans and their own checked value-text files."""

    added: AddedFields
    plans: Dict[str, FieldPlan]
    user_texts: Dict[str, pa.Table]


def _read_added(schema_path: str, like: DatasetSchema, like_dir: str, config: TabularConfig) -> AddedFields:
    """The checked schema file of new fields (:func:`~recsys_llm.data.tabular.added.read_added_fields`), its
    ``--vocabulary`` / ``--hash`` options checked against its new fields; warns of dropped earlier fields."""
    added = read_added_fields(schema_path, like, like_dir)
    check_added_field_options(config, added, like_dir)
    check_field_options(config, dataclasses.replace(added.schema, fields=added.added, ids={}), schema_path)
    if added.dropped:
        warnings.warn(f"{schema_path}: leaves out field(s) {added.dropped} of the earlier data ({like_dir}), so the "
                      "output drops them (their columns are not read; a run on it started train.init_scope=tables "
                      "takes no table of theirs)", stacklevel=3)
    return added


def _kept_schema(like: DatasetSchema, added: AddedFields) -> DatasetSchema:
    """The earlier schema ``like`` without the fields the schema file of ``added`` drops."""
    return dataclasses.replace(like, fields=[spec for spec in like.fields if spec.name not in added.dropped],
                               ids={name: way for name, way in like.ids.items() if name not in added.dropped})


def _check_columns(data_path: str, names: List[str], available: List[str], config: TabularConfig, whose: str) -> None:
    """Raises DataError naming the columns of ``names`` that ``data_path`` (whose columns are ``available``) lacks,
    ``whose`` they are, near names and what the file has."""
    missing = [name for name in names if name not in available]
    if missing:
        raise DataError(f"{data_path}: missing column(s) {missing}, {whose}; {near_names(missing, available)}"
                        f"{format_hint(data_path, available, config)}the file has columns {available}")


def _plan_added(data_path: str, schema_path: str, added: AddedFields, available: List[str], config: TabularConfig,
                progress: bool) -> _NewFields:
    """The first pass of a fresh ``prepare tabular`` over the new fields' columns: their plans (vocabularies,
    hashing) and their own value-text files, checked.

    Raises:
        DataError: a new field's column the rows lack, naming the file, the field and the schema file.
    """
    names = [spec.name for spec in added.added]
    _check_columns(data_path, names, available, config, f"new field(s) of {schema_path} (--schema)")
    new_schema = dataclasses.replace(added.schema, fields=list(added.added), ids={}, extra_columns=[])
    texts = {spec.name: user_value_text(new_schema, spec.name) for spec in added.added if spec.value_text}
    plans: Dict[str, FieldPlan] = {}
    if new_schema.categorical_fields:
        plans = plan_fields(data_path, new_schema, config, names, progress=progress).plans
        check_planned_fields(data_path, new_schema, plans, config)
    return _NewFields(added, plans, texts)


def _fields_in_order(like: DatasetSchema, new: _NewFields, new_specs: List[FieldSpec]) -> List[FieldSpec]:
    """The output's fields in the schema file's order: the earlier fields as ``like`` has them, the new ones as
    ``new_specs`` (their value-text files in the output)."""
    specs = {spec.name: spec for spec in like.fields}
    specs.update({spec.name: spec for spec in new_specs})
    return [specs[spec.name] for spec in new.added.schema.fields]


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
    new: Optional[_NewFields] = None,
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
    if new is not None:  # the new fields' vocabularies and value texts, as a fresh preparation writes them
        new_specs = new_field_specs(new.added.added, new.plans, out_dir, new.user_texts)
        schema = dataclasses.replace(
            schema, name=new.added.schema.name, fields=_fields_in_order(like, new, new_specs),
            ids={**schema.ids, **{name: ID_WAY_OF_PLAN[plan.mode] for name, plan in new.plans.items()}})
        plans = {**plans, **new.plans}
    with_label = like.label in columns

    def write(column_types: Optional[Dict[str, pa.DataType]]) -> None:
        with tqdm(desc="tabular rows", unit="row", disable=not progress, **bar_options()) as bar:
            write_splits(data_path, schema, schema, plans, columns, row_key, None, config, bar, column_types,
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
