"""Rows and entities rendered as text for the CTR-adapted LLM (ELEC, docs/methods.md section 2).

A row becomes one sentence per field, ``"{description} is {value}."``, where the value of a
sparse or sequence field comes from the field's value-text file (id -> text) and a dense
value is a rounded number. Everything is vectorised with pyarrow compute kernels: the id
column is mapped to text with ``index_in`` + ``take`` (a hash join), sentences are built with
``binary_join_element_wise``; no Python loop over rows.

Example::

    renderer = RowTextRenderer(schema, RowTextConfig(fields=["user_id", "item_id", "genres"]))
    texts = renderer.render(pq.read_table(schema.split_path("train")))   # pa.ChunkedArray of strings (N,)
    items = renderer.entity_text(train_table, "item_id", ["item_id", "genres"])  # id, text
"""

import dataclasses
import re
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec, SchemaError
from recsys_llm.data.validation import check_number, offsets_from_lengths
from recsys_llm.typed_config import check_str_settings


ROW_TEMPLATE_PLACEHOLDERS = ("description", "value")
NULL_TEXT = "unknown"  # default value text of a null: a dense value, a sparse id or an id inside a sequence
EMPTY_SEQUENCE_TEXT = "none"  # default value text of an empty or null sequence
# RowTextConfig settings added after files recorded the others, with their defaults (RowTextConfig.recorded)
LATER_SETTINGS = {"null_text": NULL_TEXT, "empty_sequence_text": EMPTY_SEQUENCE_TEXT}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def check_row_template(template: Any, what: str) -> None:
    """Refuses a row-text template with other placeholders than ``{description}`` and ``{value}``,
    another brace, or without exactly one ``{value}`` (templates are filled by plain replacement, not
    ``str.format``: any other ``{...}`` would reach the LLM literally).

    Raises:
        SchemaError: naming ``what``, the template and the allowed placeholders.
    """
    if not isinstance(template, str):
        raise SchemaError(f"{what} must be a string, got {type(template).__name__}: {template!r}")
    unknown = sorted({name for name in _PLACEHOLDER.findall(template) if name not in ROW_TEMPLATE_PLACEHOLDERS})
    if unknown:
        names = ", ".join("{" + name + "}" for name in unknown)
        raise SchemaError(f"{what} {template!r}: unknown placeholder {names}; use {{description}} and {{value}}")
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:  # a placeholder missing a brace would reach the LLM literally
        raise SchemaError(f"{what} {template!r}: unmatched '{{' or '}}' outside {{description}} and {{value}}; "
                          "a template holds no other braces")
    if template.count("{value}") != 1:
        raise SchemaError(f"{what} needs exactly one '{{value}}': {template!r}")


def check_entity_fields(fields: Optional[List[str]]) -> None:
    """Refuses entity text fields (``semantics export --entity-fields``) that name a field more than once
    (its sentence would be written twice, or its column read twice).

    Raises:
        SchemaError: naming the fields, the option and the repeated names.
    """
    if isinstance(fields, str):  # iterated, it would name the fields 'i', 't', 'e', ...
        raise SchemaError(f"entity text fields must be a list of field names, got the single string {fields!r}; "
                          f"pass [{fields!r}]")
    twice = sorted({name for name in fields or [] if fields.count(name) > 1})
    if twice:
        raise SchemaError(f"entity text fields {fields} (semantics export --entity-fields) name "
                          f"{', '.join(map(repr, twice))} more than once; name each field once")


@dataclasses.dataclass
class RowTextConfig:
    """How a row is written.

    Args:
        template (str): one sentence per field; ``{description}`` is the field description
            (without surrounding spaces; the field name when blank) and ``{value}`` its value text
            (exactly once); no other placeholder is allowed.
        separator (str): between sentences.
        fields (Optional[List[str]]): fields to render, in order; None renders all fields.
        dense_decimals (int): dense values are rounded to this many decimals.
        list_separator (str): between the value texts of a sequence field.
        missing_value (Optional[str]): text of an id without value text; None writes the id.
        templates (Dict[str, str]): per-field template overrides (field name -> template).
        null_text (str): **(ours)** text of a null value or id.
        empty_sequence_text (str): **(ours)** text of an empty or null sequence.
    """

    template: str = "{description} is {value}."
    separator: str = " "
    fields: Optional[List[str]] = None
    dense_decimals: int = 3
    list_separator: str = ", "
    missing_value: Optional[str] = None
    templates: Dict[str, str] = dataclasses.field(default_factory=dict)
    null_text: str = NULL_TEXT
    empty_sequence_text: str = EMPTY_SEQUENCE_TEXT

    def __post_init__(self) -> None:
        check_str_settings(self, ("template", "separator", "list_separator", "missing_value", "null_text",
                                  "empty_sequence_text"), "RowTextConfig")  # True or 3 would be written as text
        check_number("RowTextConfig.dense_decimals", self.dense_decimals, integer=True)  # pc.round: < 0 rounds to tens
        check_row_template(self.template, "row-text template")
        if isinstance(self.fields, str):  # list("user_id") would name the fields 'u', 's', 'e', ...
            raise SchemaError(f"row-text fields must be a list of field names, got the single string {self.fields!r}; "
                              f"pass [{self.fields!r}]")
        twice = sorted({name for name in self.fields or [] if self.fields.count(name) > 1})
        if twice:
            raise SchemaError(f"row-text fields {self.fields} (semantics adapt / export --fields) name "
                              f"{', '.join(map(repr, twice))} more than once; name each field once")
        if not isinstance(self.templates, dict):
            raise SchemaError(f"row-text templates must map field names to templates, got {self.templates!r}")
        for field_name, template in self.templates.items():
            check_row_template(template, f"row-text template for field {field_name!r}")

    def template_for(self, field_name: str) -> str:
        """The row-text template of ``field_name``: its own, else the common one (checked either way)."""
        template = self.templates.get(field_name, self.template)
        check_row_template(template, f"row-text template for field {field_name!r}")
        return template

    def recorded(self) -> Dict[str, Any]:
        """The settings as files record them (``row_text.json``, a tuning checkpoint, a vector file's
        fingerprint): a setting added after such files were written is left out where it holds its
        default, so the files of earlier versions still match, and they read these."""
        settings = dataclasses.asdict(self)
        for name, default in LATER_SETTINGS.items():
            if settings[name] == default:
                del settings[name]
        return settings

    def fingerprint(self) -> str:
        """A stable string of the settings (part of a vector file's provenance); per-field templates
        given in another order are the same settings."""
        settings = self.recorded()
        settings["templates"] = dict(sorted(settings["templates"].items()))
        return repr(sorted(settings.items()))


class RowTextRenderer:
    """Renders Parquet rows (or entities) of a schema as text.

    Args:
        schema (DatasetSchema): fields, descriptions and value-text files.
        config (RowTextConfig): templates and the fields to render.
    """

    def __init__(self, schema: DatasetSchema, config: Optional[RowTextConfig] = None) -> None:
        self._schema = schema
        self._config = config or RowTextConfig()
        field_names = [f.name for f in schema.fields]
        names = self._config.fields if self._config.fields is not None else field_names
        unknown = [name for name in self._config.templates if name not in field_names]
        if unknown:  # a misspelt field name: its template would never be used
            raise SchemaError(f"row-text templates name {unknown}, no field of schema {schema.name!r} (fields "
                              f"{field_names}); name fields of the schema")
        absent = [name for name in names if name not in field_names]
        if absent:  # a misspelt --fields
            raise SchemaError(f"row-text fields (semantics adapt / export --fields) {absent}: no fields of schema "
                              f"{schema.name!r} ({schema.root}); its fields: {', '.join(field_names)}")
        self._fields: List[FieldSpec] = [schema.field(n) for n in names]
        # field name -> (id, text) table, None when the field has no value text; the configured fields'
        # are read here (a bad file is named at once), other fields' (an entity's text) when first needed
        self._value_text: Dict[str, Optional[pa.Table]] = {}
        for spec in self._fields:
            self._value_table(spec)

    def _value_table(self, spec: FieldSpec) -> Optional[pa.Table]:
        """The value text of a sparse or sequence field as ``id`` (int64), ``text`` (string, null where the file's
        is blank); None without one."""
        if spec.name not in self._value_text:
            table = self._schema.load_value_text(spec.name) if spec.is_categorical else None
            if table is not None:
                ids = table.column("id")
                if not pa.types.is_integer(ids.type):
                    raise SchemaError(
                        f"{self._schema.value_text_path(spec.name)}: column 'id' must be int64, got {ids.type}")
                text = pc.cast(table.column("text"), pa.string())
                # a blank text ("", " ") is none: the id is then written as one without value text
                text = pc.if_else(pc.equal(pc.utf8_trim_whitespace(text), ""), pa.scalar(None, pa.string()), text)
                table = pa.table({"id": pc.cast(ids, pa.int64()), "text": text})
            self._value_text[spec.name] = table
        return self._value_text[spec.name]

    @property
    def config(self) -> RowTextConfig:
        return self._config

    @property
    def field_names(self) -> List[str]:
        return [f.name for f in self._fields]

    def value_text(self, spec: FieldSpec, column: pa.ChunkedArray) -> pa.ChunkedArray:
        """The value text of one column: (N,) strings.

        Sparse ids are mapped through the value-text file (or written as numbers when the
        field has none); sequences join the texts of their first ``max_length`` ids (all without
        one), as training reads them; dense values are rounded. A null
        value or id is written ``null_text`` (``unknown``); an empty or null sequence ``empty_sequence_text``
        (``none``).
        """
        if spec.kind == FieldKind.DENSE:
            # unsafe: an integer above 2**53 (a timestamp in ns) is its nearest float, as training reads it
            rounded = pc.round(pc.cast(column, pa.float64(), safe=False), ndigits=self._config.dense_decimals)
            return pc.fill_null(pc.cast(rounded, pa.string()), self._config.null_text)
        if spec.kind == FieldKind.SPARSE:
            return pa.chunked_array([self._id_text(spec, chunk) for chunk in column.chunks], type=pa.string())
        chunks = []
        for chunk in column.chunks:  # list<int64>
            if spec.max_length:  # its first max_length ids, as training and serving read it
                chunk = pc.list_slice(chunk, 0, spec.max_length)
            lengths = pc.fill_null(pc.list_value_length(chunk), 0).to_numpy(zero_copy_only=False)
            offsets = offsets_from_lengths(lengths).astype(np.int32)
            texts = self._id_text(spec, pc.list_flatten(chunk))
            lists = pa.ListArray.from_arrays(pa.array(offsets), texts)
            joined = pc.binary_join(lists, self._config.list_separator)
            chunks.append(pc.if_else(pc.equal(joined, ""), self._config.empty_sequence_text, joined))
        return pa.chunked_array(chunks, type=pa.string())

    def _id_text(self, spec: FieldSpec, ids: pa.Array) -> pa.Array:
        """The text of each id (N,): its value text, else ``missing_value`` or the number; a null id ``null_text``
        (a null would make its whole row's text null)."""
        if pa.types.is_uint64(ids.type):  # a hashed field's id may be above 2**63 - 1 (training folds it)
            as_number = pc.cast(ids, pa.string())  # its own digits
            # the int64 of the same bits, as training reads it (a negative id: no value text has it)
            ids = pc.cast(ids, pa.int64(), safe=False)
        else:
            ids = pc.cast(ids, pa.int64())
            as_number = pc.cast(ids, pa.string())
        table = self._value_table(spec)
        if table is None:
            return pc.fill_null(as_number, self._config.null_text)
        index = pc.index_in(ids, value_set=table.column("id"))  # (N,) row of each id, null if absent
        text = pc.take(table.column("text"), index)
        fallback = as_number if self._config.missing_value is None else pa.scalar(self._config.missing_value)
        text = pc.coalesce(text, fallback)
        text = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
        return pc.if_else(pc.is_valid(ids), text, self._config.null_text)

    def sentence(self, spec: FieldSpec, column: pa.ChunkedArray) -> pa.ChunkedArray:
        """``template`` applied to every value of the column: (N,) strings."""
        template = self._config.template_for(spec.name)
        description = spec.description.strip() or spec.name  # as LLaCTR's field text reads it
        prefix, suffix = template.split("{value}")
        prefix = prefix.replace("{description}", description)
        suffix = suffix.replace("{description}", description)
        values = self.value_text(spec, column)
        if not suffix.startswith("."):
            return pc.binary_join_element_wise(prefix, values, suffix, "")
        # a value that ends its own sentence ("Inc.", "Help!") takes the template's "." once
        ends_sentence = pc.match_substring_regex(values, r"[.!?]$")
        suffixes = pc.if_else(ends_sentence, suffix[1:], suffix)
        return pc.binary_join_element_wise(prefix, values, suffixes, "")

    def render(self, table: pa.Table) -> pa.ChunkedArray:
        """One text per row of ``table``: the sentences of the configured fields.

        Args:
            table (pa.Table): rows with a column per configured field.

        Returns:
            pa.ChunkedArray: (N,) strings.
        """
        missing = [n for n in self.field_names if n not in table.column_names]
        if missing:
            raise SchemaError(f"rows to render lack columns {missing}; they have {table.column_names}")
        if not self._fields:
            raise SchemaError("row-text config selects no fields")
        sentences = [self.sentence(spec, table.column(spec.name)) for spec in self._fields]
        return pc.binary_join_element_wise(*sentences, self._config.separator)

    def entity_text(self, table: pa.Table, key_field: str, fields: Optional[List[str]] = None) -> pa.Table:
        """One text per distinct id of ``key_field`` (a user or an item).

        The attributes of an entity (e.g. an item's genres) are taken from its first row
        in ``table``; with ``fields=None`` the text is the key's own sentence.

        Args:
            table (pa.Table): rows holding ``key_field`` and ``fields``.
            key_field (str): a sparse field whose ids are the entities.
            fields (Optional[List[str]]): fields written for each entity (default ``[key_field]``).

        Returns:
            pa.Table: columns ``id`` (int64, sorted) and ``text`` (string).
        """
        key_spec = self._schema.field(key_field)
        if key_spec.kind != FieldKind.SPARSE:
            raise SchemaError(f"entity key {key_field!r} must be a sparse field, it is {key_spec.kind.value}")
        check_entity_fields(fields)
        fields = fields or [key_field]
        specs = [self._schema.field(n) for n in fields]
        others = [n for n in fields if n != key_field]
        rows = table.select([key_field]).append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        first = rows.group_by(key_field, use_threads=False).aggregate([("__row", "min")])  # first row of each id
        grouped = table.select([key_field, *others]).take(first.column("__row_min"))
        grouped = grouped.sort_by(key_field)
        sentences = [self.sentence(spec, grouped.column(spec.name)) for spec in specs]
        text = pc.binary_join_element_wise(*sentences, self._config.separator)
        return pa.table({"id": pc.cast(grouped.column(key_field), pa.int64()), "text": text})
