"""``prepare_tabular``: the two passes over the source, one Parquet file per split, validated
block by block, written whole or not at all."""

import bisect
import contextlib
import dataclasses
import hashlib
import os
import re
import shlex
import unicodedata
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys_llm.data.compressed import open_text
from recsys_llm.data.parquet_writer import SplitWriter, arrow_schema_for, list_array, open_split_writers, write_prepared
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec, SchemaError, load_raw, schema_file
from recsys_llm.data.synthetic import write_value_text
from recsys_llm.data.tabular.config import FILL_HINT, TabularConfig, check_tabular_config
from recsys_llm.data.tabular.source import (ColumnTypeChanged, csv_column_types, first_line, is_parquet,
                                            read_blocks, repeated_columns, source_columns)
from recsys_llm.data.tabular.splits import random_split, split_of_rows
from recsys_llm.data.tabular.tokens import (ID_WAY_OF_PLAN, INTEGER_PATTERN, NULL_MARKERS, FieldPlan, field_tokens,
                                            missing_tokens, plan_fields, token_ids, without_unknown_tokens)
from recsys_llm.data.validation import (
    DataError,
    check_dense,
    check_float32_range,
    check_ids,
    check_labels,
    check_no_nulls,
    describe_row,
    offsets_from_lengths,
    row_of_value,
)
from recsys_llm.progress import bar_options


def prepare_tabular(
    data_path: str,
    schema_path: str,
    out_dir: str,
    config: Optional[TabularConfig] = None,
    *,
    progress: bool = False,
    field_ways: Optional[Dict[str, str]] = None,
) -> DatasetSchema:
    """Converts a user's CSV/Parquet data with a user-written schema into validated splits.

    The output is built in a temp directory and replaces ``out_dir`` only when complete and
    checked (:func:`~recsys_llm.data.parquet_writer.write_prepared`): a failed conversion leaves an
    earlier output as it was.

    Args:
        data_path (str): CSV file with a header line (``.gz``, ``.bz2``, ``.zst``, ``.lz4``: decompressed as
            read), Parquet file, or directory of Parquet files.
        schema_path (str): JSON/YAML schema (fields, label, optional row key and extra columns).
        out_dir (str): output directory (``train/valid/test.parquet``, ``text/``, ``schema.json``);
            absent, empty or an earlier prepared data set.
        config (Optional[TabularConfig]): split and parsing options.
        progress (bool): show a tqdm bar over rows.
        field_ways (Optional[Dict[str, str]]): when given, filled with the way each sparse and sequence
            field's values became ids, as the prepare report prints it (:func:`field_way`); the prepared
            schema records it too (``DatasetSchema.ids``), without the option that asked for it.

    Returns:
        DatasetSchema: the written schema.

    Raises:
        SchemaError: a bad schema file, or one without a sparse or sequence field. DataError: data
            that does not fit the schema, naming the file, the column and what was expected, or a
            split left without rows.
            FileExistsError: ``out_dir`` holds other files. ValueError: ``out_dir`` holds an input.

    Example::

        schema = prepare_tabular("clicks.csv", "clicks.yaml", "data/clicks", TabularConfig(split_by="ts"))
    """
    check_tabular_config(config, "prepare_tabular")
    config = config or TabularConfig()
    path = schema_file(schema_path)
    raw = load_raw(path)
    user_schema = DatasetSchema.from_dict(raw, root=os.path.dirname(os.path.abspath(path)), source=path)
    if user_schema.ids:
        raise SchemaError(f"{path}: ids is what prepare tabular writes into the prepared schema.json (how it made each "
                          "field's ids); expected it left out of the schema it reads: choose a field's way with --hash "
                          "FIELD or --vocabulary FIELD (TabularConfig.hash_fields, vocabulary_fields)")
    if isinstance(raw, dict) and raw.get("splits"):  # the splits are the ones this conversion writes
        raise SchemaError(f"{path}: splits is what prepare tabular writes into the prepared schema.json (train / valid / "
                          "test files it makes); expected it left out of the schema it reads: choose the split with "
                          "--split-by COLUMN or --split TRAIN VALID TEST")
    if not user_schema.categorical_fields:  # else only train would find it: every model embeds categorical fields
        what = "fields is empty" if not user_schema.fields else f"fields {user_schema.dense_feature_names} are all dense"
        raise SchemaError(f"{path}: {what}; expected at least one sparse or sequence field (the models embed them; "
                          "dense fields are optional)")
    # a row key the schema names must be in the data; only an unnamed one is generated (as row_id)
    row_key_named = isinstance(raw, dict) and raw.get("row_key") is not None
    if user_schema.row_key and user_schema.row_key in [f.name for f in user_schema.fields] + [user_schema.label]:
        if not row_key_named:  # the schema names no row key: the default name of the numbered rows is taken
            raise SchemaError(f"{path}: without row_key the rows are numbered as {user_schema.row_key!r}, which is also "
                              "a field or the label; expected another name for that column, or a row_key naming a "
                              "column of its own holding a unique integer per row")
        raise SchemaError(f"{path}: row_key {user_schema.row_key!r} is also a field or the label; expected a column "
                          "of its own holding a unique integer per row")
    if user_schema.row_key in user_schema.extra_columns:  # written once, as the row key
        user_schema.extra_columns = [c for c in user_schema.extra_columns if c != user_schema.row_key]
    check_field_options(config, user_schema, schema_path)
    value_texts = [user_schema.value_text_path(spec.name) for spec in user_schema.fields if spec.value_text]
    # checked before any row is read, and written into the prepared directory as checked
    user_texts = {spec.name: user_value_text(user_schema, spec.name) for spec in user_schema.fields if spec.value_text}
    plans: Dict[str, FieldPlan] = {}
    schema = write_prepared(
        out_dir, data_path, [data_path, schema_path] + value_texts,
        lambda tmp: _convert(data_path, user_schema, schema_path, tmp, config, progress, user_texts, row_key_named,
                             plans, label_named=isinstance(raw, dict) and "label" in raw),
    )
    if field_ways is not None:
        field_ways.update({spec.name: field_way(spec, plans[spec.name], config)
                           for spec in user_schema.categorical_fields})
    return schema


def check_field_options(config: TabularConfig, user_schema: DatasetSchema, schema_path: str) -> None:
    """Raises ValueError unless each field of ``--hash`` / ``--vocabulary`` (``TabularConfig.hash_fields``,
    ``vocabulary_fields``) is a categorical field of ``user_schema`` that can take that way to its ids."""
    for name in config.hash_fields:
        spec = _option_field(f"--hash {name} (TabularConfig.hash_fields)", name, user_schema, schema_path)
        if not spec.hashed:
            raise ValueError(f"--hash {name} (TabularConfig.hash_fields): field {name!r} is not hashed in "
                             f"{schema_path}; expected \"hashed\": true for it in the schema (its table then takes "
                             "ids hashed into its cardinality)")
        if spec.value_text:
            raise ValueError(f"--hash {name} (TabularConfig.hash_fields): field {name!r} has its own value_text "
                             f"{user_schema.value_text_path(name)} in {schema_path}, keyed by the column's ids; hashing "
                             "would give its values other ids, which that text does not describe (drop one of the two)")
        if name in config.vocabulary_fields:
            raise ValueError(f"--hash {name} (TabularConfig.hash_fields): field {name!r} is also in --vocabulary "
                             "(TabularConfig.vocabulary_fields); a field is either hashed or mapped through a "
                             "vocabulary (drop one of the two)")
    for name in config.vocabulary_fields:
        spec = _option_field(f"--vocabulary {name} (TabularConfig.vocabulary_fields)", name, user_schema, schema_path)
        if spec.hashed:
            raise ValueError(f"--vocabulary {name} (TabularConfig.vocabulary_fields): field {name!r} is hashed in "
                             f"{schema_path}; a field is either hashed or mapped through a vocabulary")
        if spec.value_text:
            raise ValueError(f"--vocabulary {name} (TabularConfig.vocabulary_fields): field {name!r} has its own "
                             f"value_text {user_schema.value_text_path(name)} in {schema_path}, keyed by the column's ids; "
                             "a vocabulary would renumber them and replace that text (drop one of the two)")


def _option_field(option: str, name: str, user_schema: DatasetSchema, schema_path: str) -> FieldSpec:
    """The sparse or sequence field ``name`` of ``user_schema`` that ``option`` (``--hash query
    (TabularConfig.hash_fields)``, say) names.

    Raises:
        ValueError: the schema has no such field, naming ``option`` and the schema's categorical fields.
    """
    spec = next((f for f in user_schema.categorical_fields if f.name == name), None)
    if spec is None:
        raise ValueError(f"{option}: {schema_path} has no sparse or sequence field {name!r}; its categorical fields: "
                         f"{user_schema.sparse_feature_names}")
    return spec


def field_way(spec: FieldSpec, plan: FieldPlan, config: TabularConfig, grown: str = "") -> str:
    """How the values of categorical field ``spec`` became ids under ``plan`` (for the prepare report):
    ``vocabulary``, ``hashed text`` (:func:`~recsys_llm.data.hashing.hash_strings`), ``integer ids``
    or, for a hashed field, ``integer ids mod <cardinality>``; ``(--vocabulary)`` or ``(--hash)``
    when an option asked for it; ``grown``: what ``--grow-vocabulary`` added (``2 new values, ids 5-6``); a
    vocabulary that lacked some written values (``--like``) says how many."""
    if plan.mode == "vocab":
        unseen = f" ({plan.unseen:,} of {plan.values:,} values not in it: id 0, unknown)" if plan.unseen else ""
        return ("vocabulary" + (" (--vocabulary)" if spec.name in config.vocabulary_fields else "")
                + (f", {grown}" if grown else "") + unseen)
    if plan.mode == "hash":
        return "hashed text" + (" (--hash)" if spec.name in config.hash_fields else "")
    return f"integer ids mod {spec.cardinality}" if spec.hashed else "integer ids"


def _convert(
    data_path: str,
    user_schema: DatasetSchema,
    schema_path: str,
    out_dir: str,
    config: TabularConfig,
    progress: bool,
    user_texts: Dict[str, pa.Table],
    row_key_named: bool = False,
    plans_out: Optional[Dict[str, FieldPlan]] = None,
    label_named: bool = True,
) -> DatasetSchema:
    """The conversion into the fresh directory ``out_dir``; returns the schema rooted there (not yet saved).
    ``user_texts``: per field with its own value-text file, that file as :func:`user_value_text` checked it;
    ``plans_out``: when given, filled with each categorical field's plan; ``label_named``: the schema file names its
    label column (else it is the default ``label``)."""
    available = source_columns(data_path, config)
    wanted = [f.name for f in user_schema.fields] + [user_schema.label] + list(user_schema.extra_columns)
    missing = [c for c in wanted if c not in available]
    if missing:
        if user_schema.label in missing and not label_named:
            raise DataError(f"{data_path}: no column {user_schema.label!r}, the label column {schema_path} names by not "
                            "naming one (the default); expected the 0/1 click column named with label: COLUMN in the "
                            f"schema; {near_names(missing, available)}the file has columns {available}")
        raise DataError(f"{data_path}: missing column(s) {missing} named in {schema_path}; "
                        f"{near_names(missing, available)}{format_hint(data_path, available, config)}"
                        f"the file has columns {available}")
    # the row key and split column too: of two columns of one name the CSV reader silently takes the first
    repeated = repeated_columns(available, wanted + ([user_schema.row_key] if row_key_named else []))
    if repeated:
        raise DataError(f"{data_path}: column(s) {repeated} named in {schema_path} occur more than once in the "
                        "file; expected each column once (rename or drop the copies)")
    if config.split_by and available.count(config.split_by) > 1:
        raise DataError(f"{data_path}: column {config.split_by!r} named by --split-by (TabularConfig.split_by) occurs "
                        "more than once in the file; expected it once (rename or drop the copies)")
    if not row_key_named and available.count(user_schema.row_key) > 1:  # row_id, read as the row key when present
        raise DataError(f"{data_path}: column {user_schema.row_key!r}, read as the row key as {schema_path} names no "
                        "row_key, occurs more than once in the file; expected it once (rename or drop the copies)")
    if row_key_named and user_schema.row_key not in available:
        raise DataError(
            f"{data_path}: missing row key column {user_schema.row_key!r} named by row_key in {schema_path}; "
            f"{near_names([user_schema.row_key], available)}the file has columns {available} (drop row_key from the "
            "schema to number the rows as row_id)"
        )
    if config.split_by and config.split_by not in available:
        raise DataError(f"{data_path}: missing column {config.split_by!r} named by --split-by "
                        f"(TabularConfig.split_by); {near_names([config.split_by], available)}the file has columns "
                        f"{available}")
    row_key = user_schema.row_key if user_schema.row_key in available else None
    columns = list(dict.fromkeys(wanted + ([config.split_by] if config.split_by else []) + ([row_key] if row_key else [])))

    column_types = None  # of the extra and split columns of a CSV: the reader's, from the first block
    try:
        plans, split_values, rows = plan_fields(data_path, user_schema, config, columns, row_key, progress=progress)
    except ColumnTypeChanged as error:  # a later block does not fit them: read again with the whole file's
        column_types = csv_column_types(data_path, error.columns, config)
        if column_types is None:
            raise
        plans, split_values, rows = plan_fields(data_path, user_schema, config, columns, row_key, column_types,
                                                progress)
    if plans_out is not None:
        plans_out.update(plans)
    check_planned_fields(data_path, user_schema, plans, config)
    total = len(split_values) if split_values is not None else rows
    split_rows = split_of_rows(total, split_values, config, data_path) if split_values is not None else None
    schema = _output_schema(user_schema, plans, out_dir, user_texts)
    bar = tqdm(total=total, desc="tabular rows", unit="row", disable=not progress, **bar_options())
    try:
        write_splits(data_path, user_schema, schema, plans, columns, row_key, split_rows, config, bar, column_types)
    finally:
        bar.close()
    return schema


def check_planned_fields(data_path: str, user_schema: DatasetSchema, plans: Dict[str, FieldPlan],
                         config: TabularConfig) -> None:
    """After the first pass (``plans``): raises DataError where a field with its own value-text file would not
    keep the column's integer ids (a vocabulary or hashed text), and warns of vocabularies holding missing-looking
    values or one text in several Unicode forms."""
    for spec in user_schema.fields:
        if spec.value_text and plans[spec.name].mode == "vocab":
            vocabulary = plans[spec.name].vocabulary
            example = vocabulary.filter(pc.invert(pc.match_substring_regex(vocabulary, INTEGER_PATTERN)))[0].as_py()
            raise DataError(
                f"{data_path}: column {spec.name!r} holds strings that are not integer ids (such as "
                f"{example!r}) and would be mapped through a vocabulary, but field "
                f"{spec.name!r} has its own value_text {user_schema.value_text_path(spec.name)}, keyed by the column's "
                "ids; expected integer ids (or drop value_text from the field: the vocabulary becomes its value text)"
            )
        if spec.value_text and plans[spec.name].mode == "hash" and spec.name not in config.hash_fields:
            raise DataError(
                f"{data_path}: column {spec.name!r} of hashed field {spec.name!r} holds values that are not integer "
                f"ids, so all its values would be hashed as text, but the field has its own value_text "
                f"{user_schema.value_text_path(spec.name)}, keyed by the column's ids, which would describe no id; "
                "expected integer ids (or drop value_text from the field)"
            )
    for name, plan in plans.items():
        if plan.mode == "vocab":
            _warn_of_missing_markers(data_path, name, plan.vocabulary)
            _warn_of_unicode_variants(data_path, name, plan.vocabulary)


def user_value_text(user_schema: DatasetSchema, field: str) -> pa.Table:
    """The user's value-text file of ``field`` with ``id`` as int64 and ``text`` as UTF-8 strings (what the
    LLM steps read), other columns kept.

    Raises:
        SchemaError: a missing or unreadable file, or one without ``id`` and ``text`` columns.
        DataError: ids that are not integers, a null or repeated id (the LLM steps would silently take the
            first text of an id), or text that is not UTF-8; naming the file, the column and the row.
    """
    path = user_schema.value_text_path(field)
    table = user_schema.load_value_text(field).combine_chunks()
    where = f"{path}: value-text file of field {field!r}"
    ids = table.column("id").chunk(0) if table.num_rows else pa.array([], pa.int64())
    if pa.types.is_dictionary(ids.type):
        ids = pc.cast(ids, ids.type.value_type)
    if not pa.types.is_integer(ids.type):
        raise DataError(f"{where}: column 'id' has type {ids.type}; expected integer ids (int64) of the field")
    if ids.null_count:
        row = int(np.argmax(~np.asarray(ids.is_valid())))
        raise DataError(f"{where}: column 'id', row {row}: null value; expected an integer id in every row")
    if pa.types.is_uint64(ids.type) and len(ids) and pc.max(ids).as_py() > 2**63 - 1:
        raise DataError(f"{where}: column 'id' holds {pc.max(ids).as_py()}, above 2**63 - 1; expected int64 ids")
    ids = pc.cast(ids, pa.int64())
    keys = ids.to_numpy(zero_copy_only=False)
    repeat = _first_repeat(keys)
    if repeat is not None:
        first, second = repeat
        raise DataError(f"{where}: id {int(keys[first])} is repeated, in rows {first} and {second}; expected one text "
                        "per id (the LLM steps would take the first)")
    text = table.column("text").chunk(0) if table.num_rows else pa.array([], pa.string())
    if pa.types.is_dictionary(text.type):
        text = pc.cast(text, text.type.value_type)
    if pa.types.is_string(text.type) or pa.types.is_large_string(text.type):
        text = pc.cast(text, pa.binary())  # validated as UTF-8 below (Parquet readers do not check it)
    try:
        text = pc.cast(text, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        if not pa.types.is_binary(text.type):
            raise DataError(f"{where}: column 'text' has type {text.type}; expected UTF-8 strings") from error
        for row, value in enumerate(text.to_pylist()):
            try:
                if value is not None:
                    value.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: column 'text', row {row}: {value[:80]!r} is not UTF-8; expected UTF-8 text "
                                "(re-encode the file, e.g. from latin-1)") from error
        raise DataError(f"{where}: column 'text' cannot be read as UTF-8 strings ({error})") from error
    columns = {name: table.column(name) for name in table.column_names}
    columns.update(id=ids, text=text)
    return pa.table(columns)


#: values that usually stand for a missing one: pyarrow's CSV markers, a database export's \\N, Python's None
MISSING_LOOKING = sorted(NULL_MARKERS | {"\\N", "None", "none", "NONE", "Null"})


def _warn_of_missing_markers(data_path: str, name: str, vocabulary: pa.Array) -> None:
    """Warns where a field's vocabulary holds values such as ``NA``, ``NULL`` or ``\\N``: in a CSV they are words
    unless ``--missing-token`` says otherwise, so they became categories (and texts the LLM reads) of their own."""
    found = vocabulary.filter(pc.is_in(vocabulary, value_set=pa.array(MISSING_LOOKING))).to_pylist()
    if found:
        options = " ".join(f"--missing-token {shlex.quote(value)}" for value in found)
        warnings.warn(f"{data_path}: column {name!r} holds {found}, taken as values of their own (categories with "
                      f"ids and texts); if they mean a missing value, prepare again with {options} (id 0, as an "
                      "empty cell)", stacklevel=3)


#: characters that show as nothing: a value with one reads as the value without it
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def _warn_of_unicode_variants(data_path: str, name: str, vocabulary: pa.Array, shown: int = 3) -> None:
    """Warns where a field's vocabulary holds one text in several Unicode forms (an NFD ``e`` + U+0301 beside the
    NFC ``\xe9``, a zero-width space): each became a value of its own (an id and a text), and a served request
    in the other form gets the other id. Only non-ASCII values are normalized (an ASCII text has one form)."""
    non_ascii = vocabulary.filter(pc.invert(pc.string_is_ascii(vocabulary))).to_pylist()
    forms: Dict[str, List[str]] = {}
    for value in non_ascii:
        forms.setdefault(unicodedata.normalize("NFC", value).translate(INVISIBLE), []).append(value)
    ascii_forms = [form for form in forms if form.isascii()]  # 'Paris' + U+200B beside 'Paris'
    if ascii_forms:
        present = vocabulary.filter(pc.is_in(vocabulary, value_set=pa.array(ascii_forms, pa.string())))
        for form in present.to_pylist():
            forms[form].append(form)
    groups = [sorted(values) for values in forms.values() if len(values) > 1]
    if groups:
        listed = "; ".join(" / ".join(ascii(value) for value in group) for group in groups[:shown])
        more = f" and {len(groups) - shown} more" if len(groups) > shown else ""
        warnings.warn(f"{data_path}: column {name!r} holds {len(groups)} text(s) in several Unicode forms ({listed}"
                      f"{more}), each form a value of its own (an id and a text); to read them as one, normalize the "
                      "column (unicodedata.normalize('NFC', ...), zero-width characters removed) before preparing, "
                      "and the served model's raw values the same way", stacklevel=3)


def write_vocabulary(path: str, vocabulary: pa.Array) -> None:
    """A vocabulary field's value-text file: id 0 ``unknown`` (a missing value, or one the vocabulary lacks), then
    the ``vocabulary``'s values as ids 1..V."""
    write_value_text(path, ["unknown"] + vocabulary.to_pylist())


def value_text_file(field_name: str) -> str:
    """``text/<field>.parquet``, the value-text file of a field in a prepared directory. A field
    (column) name that is not a plain file name (``a/b``, ``../../x``, ``.x``) gets its unsafe
    characters replaced and a hash of the name appended, so its file stays in ``text/`` and no
    two fields share one."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", field_name)
    if safe != field_name or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha256(field_name.encode()).hexdigest()[:8]}"
    return f"text/{safe}.parquet"


def format_hint(path: str, available: List[str], config: TabularConfig) -> str:
    """Why a CSV's header may not be the columns it holds: an empty file, a JSON-lines or UTF-16 file (read as
    CSV), or another delimiter than ``config.delimiter``; ``""`` when none of these shows."""
    if is_parquet(path):
        return ""
    if not available:
        return "the file is empty (no header line); "
    with open_text(path) as handle:  # a .csv.gz as its CSV
        head = handle.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in head:
        return "the file looks UTF-16 encoded; expected UTF-8 text (save it as UTF-8); "
    if any("\ufffd" in name for name in available):
        return ("the header is not UTF-8 (a latin-1 or Windows-1252 export?); expected a UTF-8 file (re-save it as "
                "UTF-8, e.g. iconv -f latin1 -t utf-8); ")
    if available[0].lstrip("\ufeff").lstrip().startswith(("{", "[")):
        return "the file looks like JSON (lines); prepare tabular reads CSV or Parquet; "
    if available[0].lstrip("\ufeff").lower().startswith("sep=") and len(available) <= 2:
        line = config.delimiter.join(available).lstrip("\ufeff")
        return (f"the first line is Excel's delimiter line ({line!r}), not the header; expected the header on the "
                "first line (delete that line, and pass --delimiter for a delimiter other than ','); ")
    other = next((d for d in ("\t", ";", "|", ",") if d != config.delimiter and d in available[0]), None)
    if len(available) == 1 and other:
        return f"the header is one column holding {other!r}: pass --delimiter {other!r}; "
    return ""


def near_names(missing: List[str], available: List[str]) -> str:
    """``"the file has 'User ' for 'user' (...); "`` for each missing column that a column of the file names
    but for case and surrounding spaces; ``""`` when none does."""
    def key(name: str) -> str:  # an NFD 'é' (macOS, some exports) is the NFC one of the schema to a reader's eye
        return unicodedata.normalize("NFC", name).strip().lower()

    near = [f"{a!r} for {m!r}" + (f" ({ascii(a)}: another Unicode form of {ascii(m)})"
                                  if a.strip().lower() != m.strip().lower() else "")
            for m in missing for a in available if a != m and key(a) == key(m)]
    return (f"the file has {', '.join(near)} (names must match exactly, case, spaces and Unicode form included); "
            if near else "")


def new_field_specs(specs: List[FieldSpec], plans: Dict[str, FieldPlan], out_dir: str,
                    user_texts: Dict[str, pa.Table]) -> List[FieldSpec]:
    """The fields ``specs`` as the output under ``out_dir`` records them; writes their vocabularies (``plans``)
    and the user's checked value texts (``user_texts``, per field) into ``out_dir/text``."""
    fields = []
    for spec in specs:
        value_text = spec.value_text
        plan = plans.get(spec.name)
        if plan is not None and plan.mode == "vocab":
            value_text = value_text_file(spec.name)
            write_vocabulary(os.path.join(out_dir, value_text), plan.vocabulary)
        elif value_text:
            value_text = value_text_file(spec.name)
            os.makedirs(os.path.join(out_dir, "text"), exist_ok=True)
            pq.write_table(user_texts[spec.name], os.path.join(out_dir, value_text))
        fields.append(dataclasses.replace(spec, value_text=value_text))
    return fields


def _output_schema(
    user_schema: DatasetSchema, plans: Dict[str, FieldPlan], out_dir: str, user_texts: Dict[str, pa.Table]
) -> DatasetSchema:
    """The output schema rooted at ``out_dir``; writes vocabularies and the user's checked value texts
    (``user_texts``, per field) into ``out_dir/text``."""
    fields = new_field_specs(user_schema.fields, plans, out_dir, user_texts)
    return DatasetSchema(
        name=user_schema.name,
        fields=fields,
        label=user_schema.label,
        row_key=user_schema.row_key or "row_id",
        splits={"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet"},
        extra_columns=list(user_schema.extra_columns),
        root=os.path.abspath(out_dir),
        ids={name: ID_WAY_OF_PLAN[plan.mode] for name, plan in plans.items()},
    )


def write_splits(
    data_path: str,
    user_schema: DatasetSchema,
    schema: DatasetSchema,
    plans: Dict[str, FieldPlan],
    columns: List[str],
    row_key: Optional[str],
    split_rows: Optional[np.ndarray],
    config: TabularConfig,
    bar: tqdm,
    column_types: Optional[Dict[str, pa.DataType]] = None,
    with_label: bool = True,
    utf8_checked: bool = True,
) -> None:
    """Streams the source block by block into one Parquet file per split under ``schema.root``
    (``column_types``: of a CSV's extra and split columns, as :func:`read_blocks` takes them). A schema of one
    split takes every row; ``with_label``: the source has the label column (False: rows to score, written
    without one); ``utf8_checked``: a first pass (:func:`plan_fields`) checked the strings for UTF-8."""
    writers: List[SplitWriter] = []
    keys: List[np.ndarray] = []  # the row keys read from the data, checked for repeats at the end
    starts: List[Tuple[int, str, int]] = []  # (row, file, row in the file) at which each block starts
    row = 0
    with contextlib.ExitStack() as open_writers:  # each writer is closed, or on an error its .tmp removed
        for file_path, file_row, block in read_blocks(data_path, user_schema, columns, config, row_key, column_types):
            starts.append((row, file_path, file_row))
            out = _convert_block(block, schema, plans, config, file_path, file_row, row_key, row, with_label=with_label,
                                 utf8_checked=utf8_checked)
            if row_key:
                keys.append(out[schema.row_key])
            if not writers:
                extra_types = {name: block.column(name).type for name in schema.extra_columns}
                arrow_schema = arrow_schema_for(schema, extra_types, with_label=with_label)
                writers = open_split_writers(open_writers, schema, arrow_schema, config.rows_per_group)
            n = block.num_rows
            if split_rows is not None:
                split = split_rows[row : row + n]
            else:
                split = np.zeros(n, np.int64) if len(writers) == 1 else random_split(np.arange(row, row + n), config)
            table = pa.table(out)
            for index, writer in enumerate(writers):
                selected = np.nonzero(split == index)[0]
                if selected.size:
                    part = table.take(pa.array(selected))
                    writer.write({name: part.column(name).combine_chunks() for name in part.column_names})
            row += n
            bar.update(n)
        if not writers:
            raise DataError(f"{data_path}: the file is empty (0 rows); expected at least one row")
        if row_key:
            _check_unique_keys(data_path, row_key, np.concatenate(keys), starts)


def _check_unique_keys(path: str, column: str, keys: np.ndarray, starts: List[Tuple[int, str, int]]) -> None:
    """Raises if a row key repeats (LLM row vectors and teacher outputs are looked up by it). ``keys``: (rows,);
    ``starts``: (row, file, row in the file) at which each block of ``keys`` starts, to name the rows."""
    if keys.size < 2 or bool(np.all(keys[1:] > keys[:-1])):  # increasing (the common case): unique
        return
    ordered = np.sort(keys)  # ~25x faster than a stable argsort at 10^7+ keys
    if not bool(np.any(ordered[1:] == ordered[:-1])):
        return
    repeat = _first_repeat(keys)
    if repeat is not None:
        first, second = repeat
        where = []
        for row in (first, second):
            block_row, file_path, file_row = starts[bisect.bisect_right([s[0] for s in starts], row) - 1]
            place = describe_row(file_row + row - block_row, first_line(file_path))
            where.append(place if file_path == path else f"{file_path} {place}")
        raise DataError(
            f"{path}: row key column {column!r}: key {int(keys[first])} is repeated, in "
            f"{where[0]} and {where[1]}; expected a unique key per row (LLM row vectors are looked up by it)"
        )


def _first_repeat(keys: np.ndarray) -> Optional[Tuple[int, int]]:
    """``(first, second)``: the first two rows (first < second) of the smallest key of ``keys`` (N,)
    that occurs more than once; None when every key is unique."""
    order = np.argsort(keys, kind="stable")  # equal keys keep their row order
    repeats = np.nonzero(keys[order][1:] == keys[order][:-1])[0]
    if not repeats.size:
        return None
    return int(order[repeats[0]]), int(order[repeats[0] + 1])


def _row_keys(array: pa.Array, path: str, column: str, row: int) -> np.ndarray:
    """(N,) int64 row keys of a block whose first row is ``row``; a missing or non-integer key is an error."""
    line = first_line(path)
    what = "an integer row key per row (LLM row vectors are looked up by it)"
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        check_no_nulls(path, column, array, row, what, line)
        ok = np.asarray(pc.match_substring_regex(array, INTEGER_PATTERN), dtype=bool)
        if not ok.all():
            first = int(np.argmin(ok))
            raise DataError(f"{path}: column {column!r}, {describe_row(row + first, line)}: row key "
                            f"{array[first].as_py()!r} is not an integer; expected {what}")
        try:
            array = pc.cast(pc.utf8_trim_whitespace(array), pa.int64())
        except pa.ArrowInvalid as error:  # a key beyond int64, the type keys are written as
            first = next((i for i, key in enumerate(array.to_pylist()) if not -(2**63) <= int(key) < 2**63), None)
            if first is None:
                raise DataError(f"{path}: row key column {column!r}: {error}; expected int64 keys") from error
            raise DataError(f"{path}: column {column!r}, {describe_row(row + first, line)}: row key "
                            f"{array[first].as_py().strip()} is outside -2**63 .. 2**63 - 1; expected {what}, within "
                            "int64") from error
    elif pa.types.is_floating(array.type):  # pandas writes integer columns with a gap as float64
        try:
            array = pc.cast(array, pa.int64())  # refuses fractions
        except pa.ArrowInvalid as error:
            values = array.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls as NaN, named below
            with np.errstate(invalid="ignore"):
                whole = np.isfinite(values) & (values == np.floor(values)) & (np.abs(values) < 2.0**63)
            bad = np.asarray(array.is_valid(), dtype=bool) & ~whole
            first = int(np.argmax(bad))
            raise DataError(f"{path}: row key column {column!r} has non-integer values: "
                            f"{describe_row(row + first, line)}: row key {values[first].item()!r} is not a whole "
                            f"number; expected {what}") from error
    elif not pa.types.is_integer(array.type):
        raise DataError(f"{path}: row key column {column!r} has type {array.type}; expected integers")
    check_no_nulls(path, column, array, row, what, line)
    if pa.types.is_uint64(array.type):  # keys are int64: one above 2**63 - 1 would not cast
        above = np.asarray(pc.greater(array, pa.scalar(2**63 - 1, pa.uint64())), dtype=bool)
        if above.any():
            first = int(np.argmax(above))
            raise DataError(f"{path}: column {column!r}, {describe_row(row + first, line)}: row key "
                            f"{array[first].as_py()} is above 2**63 - 1; expected {what}, within int64")
    return pc.cast(array, pa.int64()).to_numpy(zero_copy_only=False)


def _beyond_int64(
    flat: pa.Array, spec: FieldSpec, offsets: Optional[np.ndarray], path: str, row: int, line: Optional[int]
) -> Optional[str]:
    """The message naming the first integer token of ``flat`` (a block's tokens of ``spec``, ``offsets`` per row for
    a sequence; the block's first row is ``row``) outside int64, which ids are read as; None when there is none."""
    for index, value in enumerate(flat.to_pylist()):
        try:
            number = int(value)
        except (TypeError, ValueError):  # null, or a missing-value marker
            continue
        if not -(2**63) <= number < 2**63:
            hint = ("" if spec.hashed else f", or pass --vocabulary {spec.name} (TabularConfig.vocabulary_fields) to map "
                    "every value through a vocabulary")
            return (f"{path}: column {spec.name!r}, {describe_row(row + row_of_value(offsets, index), line)}: id "
                    f"{value.strip()} is outside the int64 range (-2**63 .. 2**63 - 1) that ids are read as; expected "
                    f"integer ids in [0, {spec.cardinality}) in {spec.kind.value} field {spec.name!r}{hint}")
    return None


def _not_integer(
    flat: pa.Array, spec: FieldSpec, offsets: Optional[np.ndarray], path: str, row: int, line: Optional[int]
) -> Optional[str]:
    """The message naming the first token of ``flat`` that is no integer (a field whose way is integer ids, as a
    ``--like`` schema records, given text such as ``u85``); None when there is none."""
    for index, value in enumerate(flat.to_pylist()):
        if value is None:
            continue
        try:
            int(value)
        except (TypeError, ValueError):
            return (f"{path}: column {spec.name!r}, {describe_row(row + row_of_value(offsets, index), line)}: "
                    f"{value!r} is not an integer id; expected integer ids in [0, {spec.cardinality}) in "
                    f"{spec.kind.value} field {spec.name!r}, the way its schema records (ids: integer)")
    return None


def _is_number(dtype: pa.DataType) -> bool:
    """Integers, floats, or decimals (Spark and DuckDB write a ``DECIMAL(10, 2)`` price as decimal128)."""
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype)


def _convert_block(
    block: pa.RecordBatch,
    schema: DatasetSchema,
    plans: Dict[str, FieldPlan],
    config: TabularConfig,
    path: str,
    row: int,
    row_key: Optional[str],
    source_row: Optional[int] = None,
    with_label: bool = True,
    utf8_checked: bool = True,
) -> Dict[str, object]:
    """One block of source rows -> output columns, validated (row numbers count data rows from 0).

    ``row``: the block's first row in the file ``path`` (what messages name); ``source_row``: its first row
    in the whole source, a directory's files one after another (the row_id written without a row key;
    None: ``row``); ``with_label``: the block holds the label column (False: no label is written);
    ``utf8_checked``: a first pass over the same rows checked their strings for UTF-8 (else checked here).
    Tokens of a sequence field that its vocabulary does not hold (new data prepared ``--like`` an earlier
    output) are dropped, as a missing token is.
    """
    out: Dict[str, object] = {}
    n = block.num_rows
    line = first_line(path)
    start = row if source_row is None else source_row
    out[schema.row_key] = (
        _row_keys(block.column(row_key), path, row_key, row) if row_key else np.arange(start, start + n, dtype=np.int64)
    )
    for salt, spec in enumerate(schema.fields):
        array = block.column(spec.name)
        if spec.kind == FieldKind.DENSE:
            if not _is_number(array.type):
                raise DataError(f"{path}: column {spec.name!r} (dense field) has type {array.type}; expected numbers "
                                "(integers, floats or decimals)")
            values = pc.cast(array, pa.float64())
            if config.fill_missing_dense is not None:
                values = pc.fill_null(values, config.fill_missing_dense).to_numpy(zero_copy_only=False)
                values = np.where(np.isfinite(values), values, config.fill_missing_dense)
            else:
                check_no_nulls(path, spec.name, values, row, f"a finite float ({FILL_HINT})", line)
                values = values.to_numpy(zero_copy_only=False)
            check_dense(path, spec.name, values, row, line, FILL_HINT)
            check_float32_range(path, spec.name, values, row, line)
            out[spec.name] = values.astype(np.float32)
            continue
        # plan_fields, the first pass, checked every block's strings for UTF-8
        flat, lengths = field_tokens(array, spec, config.sequence_separator, path, row,
                                     missing_tokens(config, plans[spec.name].missing),
                                     utf8_checked=utf8_checked)
        offsets = None if lengths is None else offsets_from_lengths(lengths)
        try:
            ids = token_ids(flat, plans[spec.name], spec, salt)
        except pa.ArrowInvalid as error:
            raise DataError(_beyond_int64(flat, spec, offsets, path, row, line)
                            or _not_integer(flat, spec, offsets, path, row, line)
                            or f"{path}: column {spec.name!r}: cannot read ids: {error}") from error
        ids = check_ids(path, spec, ids, offsets, row, line)
        if plans[spec.name].mode == "vocab":  # values the vocabulary lacks got id 0, as missing ones do
            plans[spec.name].values += len(flat) - flat.null_count
            plans[spec.name].unseen += int((ids == 0).sum()) - flat.null_count
            if lengths is not None:
                ids, lengths = without_unknown_tokens(ids, lengths)
        out[spec.name] = ids if lengths is None else list_array(lengths, ids)
    if with_label:
        out[schema.label] = _labels(block, schema, config, path, row, line)
    for name in schema.extra_columns:
        out[name] = block.column(name)
    return out


def _labels(block: pa.RecordBatch, schema: DatasetSchema, config: TabularConfig, path: str, row: int,
            line: Optional[int]) -> np.ndarray:
    """(N,) int8 0/1 labels of a block whose first row is ``row`` (``value > config.label_threshold`` when it is
    set); missing or other values raise a DataError naming ``path``, the label column and the row."""
    labels = block.column(schema.label)
    check_no_nulls(path, schema.label, labels, row, "0 or 1", line)
    if not (_is_number(labels.type) or pa.types.is_boolean(labels.type)):
        raise DataError(f"{path}: label column {schema.label!r} has type {labels.type}; expected 0/1 numbers")
    values = pc.cast(labels, pa.float64()).to_numpy(zero_copy_only=False)
    if config.label_threshold is not None:
        nan = np.isnan(values)
        if nan.any():  # NaN > threshold is False: a missing label would silently become 0
            first = int(np.argmax(nan))
            raise DataError(f"{path}: column {schema.label!r}, {describe_row(row + first, line)}: label nan is not a "
                            f"number to binarise with the label threshold {config.label_threshold}; expected a "
                            "number in every row")
        values = (values > config.label_threshold).astype(np.float64)
    check_labels(path, schema.label, values, row, line,
                 "or pass --label-threshold T, TabularConfig.label_threshold in Python, for label = value > T")
    return values.astype(np.int8)
