"""``prepare tabular --like DIR --schema FILE``: the schema file of a day that brings new fields (columns).

The file holds the earlier output's fields as they were (the same settings) plus new ones; the earlier fields
keep their ids (prepared ``--like``), the new ones are prepared as a fresh ``prepare tabular --schema`` would.
A field of the earlier output the file leaves out is dropped (its column is not read; a run on the output
started ``train.init_scope=tables`` does not take its table). :func:`read_added_fields` checks the file against
the earlier schema before any row is read.
"""

import os
from typing import Any, Dict, List, NamedTuple

from recsys_llm.data.schema import DatasetSchema, FieldSpec, SchemaError, load_raw, schema_file
from recsys_llm.data.schema_changes import moved_hashed_text_fields
from recsys_llm.data.tabular.config import TabularConfig


class AddedFields(NamedTuple):
    """The schema file of :func:`read_added_fields`, checked against the earlier output's schema."""

    schema: DatasetSchema  # the file's schema (its fields in its order), rooted at the file's directory
    added: List[FieldSpec]  # its fields the earlier schema lacks, in its order
    dropped: List[str]  # the earlier schema's fields it leaves out


def _settings(spec: FieldSpec) -> Dict[str, Any]:
    """What a field's ids and table depend on: every setting but ``value_text`` (a file's place, left out of the
    fingerprint too; the earlier field's value-text file is the one kept)."""
    return {key: value for key, value in spec.to_dict().items() if key != "value_text"}


def _changes(before: FieldSpec, after: FieldSpec) -> List[str]:
    """``cardinality 10 -> 12`` for each setting of field ``before`` that ``after`` changes (``unset``: left out)."""
    old, new = _settings(before), _settings(after)
    return [f"{key} {old.get(key, 'unset')!r} -> {new.get(key, 'unset')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def read_added_fields(schema_path: str, like: DatasetSchema, like_dir: str) -> AddedFields:
    """Reads the schema file ``schema_path`` of new rows prepared ``--like like_dir`` (whose schema is ``like``)
    and checks that it keeps the earlier fields as they were.

    Raises:
        SchemaError: a bad schema file; one that records ``ids`` or ``splits`` (what prepare writes); a field of
            the earlier schema whose settings it changes (kind, cardinality, hashed, description, ...), naming the
            field, the settings and both files; another label or row key than the earlier; an earlier hashed-text
            field at another position (its hash's salt); no field at all of the earlier schema (nothing to keep:
            prepare afresh).
    """
    path = schema_file(schema_path)
    raw = load_raw(path)
    schema = DatasetSchema.from_dict(raw, root=os.path.dirname(os.path.abspath(path)), source=path)
    where = f"prepare tabular --like {like_dir} --schema {path}"
    for key in ("ids", "splits"):
        if isinstance(raw, dict) and raw.get(key):
            raise SchemaError(f"{where}: {key} is what prepare tabular writes into the prepared schema.json; expected "
                              "it left out of the schema it reads (the earlier fields keep the earlier output's ids)")
    earlier = {spec.name: spec for spec in like.fields}
    changed = [f"field {spec.name!r}: {'; '.join(_changes(earlier[spec.name], spec))}"
               for spec in schema.fields if spec.name in earlier and _changes(earlier[spec.name], spec)]
    if changed:
        raise SchemaError(f"{where}: {'; '.join(changed)} (earlier in {like_dir}/schema.json); expected each field of "
                          "the earlier data as it was, so that it keeps its ids and its trained table (add new fields "
                          "only; a field whose settings change is a new field: give it a new name)")
    if schema.label != like.label:
        raise SchemaError(f"{where}: label {schema.label!r}, but the earlier data's is {like.label!r} ({like_dir}); "
                          "expected the same label column")
    row_key_named = isinstance(raw, dict) and raw.get("row_key") is not None
    if row_key_named and schema.row_key != like.row_key:
        raise SchemaError(f"{where}: row_key {schema.row_key!r}, but the earlier data's is {like.row_key!r} "
                          f"({like_dir}); expected the same row key (or none named)")
    moved = moved_hashed_text_fields([spec.name for spec in like.fields], [spec.name for spec in schema.fields],
                                     [name for name, way in like.ids.items() if way == "hashed_text"])
    if moved:
        raise SchemaError(f"{where}: {'; '.join(moved)} (earlier in {like_dir}/schema.json); a hashed-text field's "
                          "ids are hashed with its position among all the fields (dense ones included) as the salt, "
                          "so at another position its values would get other ids than its trained table's; expected "
                          "each such field at its earlier position (add new fields after it; keep the fields before "
                          "it, or give it a new name: a new field)")
    kept = [spec.name for spec in schema.fields if spec.name in earlier]
    if not kept:
        raise SchemaError(f"{where}: none of the earlier data's fields {list(earlier)} is in the file, so no field "
                          "keeps its ids; expected the earlier fields as they were plus the new ones (or prepare "
                          "afresh, without --like)")
    return AddedFields(schema=schema, added=[spec for spec in schema.fields if spec.name not in earlier],
                       dropped=[name for name in earlier if name not in kept])


def check_added_field_options(config: TabularConfig, added: AddedFields, like_dir: str) -> None:
    """Raises ValueError where ``--vocabulary`` / ``--hash`` (``TabularConfig.vocabulary_fields``, ``hash_fields``)
    names a field of the earlier data that the schema file keeps (whose way to its ids the earlier preparation
    decided). Names of no field of the file are left to
    :func:`~recsys_llm.data.tabular.convert.check_field_options`, which checks the new fields' options as a fresh
    ``prepare tabular`` does."""
    new = {spec.name for spec in added.added}
    kept = {spec.name for spec in added.schema.fields} - new
    for flag, names in (("--vocabulary", config.vocabulary_fields), ("--hash", config.hash_fields)):
        earlier = [name for name in names if name in kept]
        if earlier:
            raise ValueError(f"prepare tabular --like {like_dir}: {flag} {' '.join(earlier)}: field(s) of the earlier "
                             "data, whose ids the earlier preparation decided; expected it only for the new field(s) "
                             f"{sorted(new)}")
