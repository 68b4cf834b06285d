"""Field-level prompts of LLaCTR: field texts, SSFT instructions and sampled field values.

Templates are ``str.format`` strings held in :class:`PromptTemplates`:

* field text (what a field vector encodes): ``"{name}: {description}"``, or
  ``"{name}"`` when the schema has no description for the field;
* SSFT prompt (Alpaca style, docs/methods.md section 1): instruction "Given a feature,
  answer which field it belongs to, choosing from the candidate set", input
  ``"The feature is: {value}. The candidate set is: [{fields}]"``; the query vector is
  read at the last prompt token, right after ``### Response:``.

Values of a field come from its ``value_text`` file (the text of sampled ids), from the
train split for dense fields (formatted numbers), or are raw id tokens when a
categorical field has no text.

Example::

    templates = PromptTemplates()
    field_text(schema.field("age"), templates)  # 'age: age of the user in years'
    ssft_prompt("34", ["user_id", "age"], templates)
"""

import dataclasses
import hashlib
import json
import random
import string
from typing import Any, Dict, Iterable, List

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from recsys_llm.data.parquet_files import parquet_files
from recsys_llm.data.schema import MISSING_ID, DatasetSchema, FieldKind, FieldSpec, SchemaError
from recsys_llm.data.validation import is_list_type

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
SSFT_INSTRUCTION = "Given a feature, answer which field it belongs to, choosing from the candidate set"
SSFT_INPUT = "The feature is: {value}. The candidate set is: [{fields}]"


# PromptTemplates attribute -> (placeholders it may use, placeholders it must use)
TEMPLATE_PLACEHOLDERS = {
    "field": (("name", "description", "kind"), ()),  # and {name} or {description}: _DISTINGUISHING
    "field_without_description": (("name", "description", "kind"), ("name",)),  # its description is blank
    "instruction": ((), ()),  # inserted as it is, never formatted: a '{...}' would reach the LLM literally
    "input": (("value", "fields"), ("value",)),
    "prompt": (("instruction", "input"), ("input",)),
}
_TEMPLATE_OPTIONS = {"field": " (--field-template)"}
# PromptTemplates attribute -> placeholders of which it must use one: without them every field's text is the same
_DISTINGUISHING = {"field": ("name", "description")}


def _placeholders(template: str) -> List[str]:
    """Every ``str.format`` field name in ``template``, also those nested in format specs."""
    names = []
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            names.append(name)
        if spec:
            names.extend(_placeholders(spec))
    return names


def check_template(attribute: str, template: Any) -> None:
    """Refuses a :class:`PromptTemplates` template with unknown or missing placeholders (a field text
    without the field's name or description: every field's would be the same).

    Raises:
        ValueError: naming the attribute, the template and the placeholders it may use.
    """
    allowed, required = TEMPLATE_PLACEHOLDERS[attribute]
    where = f"PromptTemplates.{attribute}{_TEMPLATE_OPTIONS.get(attribute, '')}"
    if not isinstance(template, str):
        raise ValueError(f"{where} must be a string, got {type(template).__name__}: {template!r}")
    use = ("use " + ", ".join("{" + name + "}" for name in allowed)) if allowed else "it takes no placeholders"
    try:
        names = _placeholders(template)
    except ValueError as error:
        raise ValueError(f"{where} {template!r}: not a str.format template ({error}); {use}") from error
    unknown = sorted({n for n in names if n not in allowed})
    if unknown:
        listed = ", ".join("{" + n + "}" for n in unknown)
        raise ValueError(f"{where} {template!r}: unknown placeholder {listed}; {use}")
    missing = [n for n in required if n not in names]
    if missing:
        raise ValueError(f"{where} {template!r}: needs the placeholder {{{missing[0]}}}; {use}")
    distinguishing = _DISTINGUISHING.get(attribute, ())
    if distinguishing and not set(distinguishing) & set(names):
        listed = " or ".join("{" + n + "}" for n in distinguishing)
        raise ValueError(f"{where} {template!r}: needs {listed}, or every field's text is the same; {use}")
    try:
        template.format(**{name: "x" for name in allowed})
    except (ValueError, KeyError, IndexError, AttributeError) as error:
        raise ValueError(f"{where} {template!r}: cannot be filled ({error}); {use}") from error


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """The text templates of LLaCTR (all ``str.format`` strings).

    Args:
        field (str): field text; placeholders ``{name}``, ``{description}`` (one of these two at least),
            ``{kind}``.
        field_without_description (str): used when the field has no description (same placeholders,
            ``{name}`` required).
        instruction (str): SSFT instruction, used as it is (no placeholders).
        input (str): SSFT input; placeholders ``{value}`` (required), ``{fields}`` (comma-joined names).
        prompt (str): wrapper; placeholders ``{instruction}``, ``{input}`` (required).
        number_format (str): format of dense values, e.g. ``"{:.4g}"``.

    Unknown placeholders are refused here, when the templates are made (ValueError).
    """

    field: str = "{name}: {description}"
    field_without_description: str = "{name}"
    instruction: str = SSFT_INSTRUCTION
    input: str = SSFT_INPUT
    prompt: str = ALPACA_PROMPT
    number_format: str = "{:.4g}"

    def __post_init__(self) -> None:
        for attribute in TEMPLATE_PLACEHOLDERS:
            check_template(attribute, getattr(self, attribute))
        try:
            ok = isinstance(self.number_format, str) and isinstance(self.number_format.format(1.5), str)
        except (ValueError, KeyError, IndexError, AttributeError):
            ok = False
        if not ok or "{" not in self.number_format:
            raise ValueError(
                f"PromptTemplates.number_format {self.number_format!r}: expected one positional field for a float, "
                "e.g. '{:.4g}'"
            )

    def template_id(self) -> str:
        """16 hex digits identifying all templates (for caches and provenance)."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The templates as JSON, recorded in vector provenance."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def has_description(spec: FieldSpec) -> bool:
    """Whether the schema describes the field (not only blank text)."""
    return bool(spec.description and spec.description.strip())


def field_text(spec: FieldSpec, templates: PromptTemplates) -> str:
    """The text a field vector is encoded from (name and schema description)."""
    template = templates.field if has_description(spec) else templates.field_without_description
    try:
        return template.format(name=spec.name, description=spec.description.strip(), kind=spec.kind.value)
    except (KeyError, IndexError) as error:
        raise ValueError(f"field template {template!r}: unknown placeholder {error}; use {{name}}, {{description}}, {{kind}}") from error


def ssft_prompt(value: str, field_names: List[str], templates: PromptTemplates) -> str:
    """The full SSFT prompt for one feature value (ends where the answer would start)."""
    input_text = templates.input.format(value=value, fields=", ".join(field_names))
    return templates.prompt.format(instruction=templates.instruction, input=input_text)


def select_fields(schema: DatasetSchema, include_without_description: bool = False) -> List[FieldSpec]:
    """Input fields that get field-level semantics: those with a description (or all)."""
    return [f for f in schema.fields if include_without_description or has_description(f)]


def _first_split(schema: DatasetSchema) -> str:
    for name in ("train", *sorted(schema.splits)):
        if name in schema.splits:
            return schema.split_path(name)
    raise SchemaError(f"schema {schema.name!r} has no splits to read dense values from")


def _column_values(schema: DatasetSchema, spec: FieldSpec, max_scan_rows: int) -> pa.Array:
    """The distinct non-null values of the field's column in the first ``max_scan_rows`` rows of the train
    split (a sequence field's ids, flattened)."""
    path = _first_split(schema)
    dataset = ds.dataset(parquet_files(path), format="parquet")  # a directory's *.parquet files, not its *.tmp
    if spec.name not in dataset.schema.names:
        raise SchemaError(f"{path}: no column {spec.name!r} for {spec.kind.value} field {spec.name!r}")
    chunks, seen = [], 0
    for batch in dataset.to_batches(columns=[spec.name]):
        column = batch.column(0)
        chunks.append(pc.list_flatten(column) if is_list_type(column.type) else column)
        seen += batch.num_rows
        if seen >= max_scan_rows:
            break
    if not chunks:
        return pa.array([], pa.float32())
    return pc.unique(pa.chunked_array(chunks).combine_chunks().drop_null())


def value_identity(text: str) -> str:
    """What tells two value texts apart for SSFT: ``Comedy``, ``comedy`` and `` COMEDY`` are one value, as an uncased
    tokenizer (MiniLM's) reads them as one text, which SSFT would otherwise hold out and train on alike."""
    return " ".join(text.split()).casefold()


def _distinct_ignoring_case(texts: Iterable[str]) -> List[str]:
    """Sorted texts, one of each set with the same :func:`value_identity`."""
    kept: Dict[str, str] = {}
    for text in sorted(texts):  # the first of each set in sorted order, so the kept texts are sorted too
        kept.setdefault(value_identity(text), text)
    return list(kept.values())


def distinct_values(
    schema: DatasetSchema,
    field_name: str,
    limit: int,
    rng: random.Random,
    templates: PromptTemplates = PromptTemplates(),
    max_scan_rows: int = 1_000_000,
) -> List[str]:
    """Up to ``limit`` distinct value texts of a field, in random order.

    Args:
        schema (DatasetSchema): the data set.
        field_name (str): which field.
        limit (int): how many values at most.
        rng (random.Random): source of the sample (seeded by the caller).
        templates (PromptTemplates): ``number_format`` for dense values.
        max_scan_rows (int): rows of the train split scanned for dense values and for the ids of
            a categorical field without value texts.

    Returns:
        List[str]: texts from the field's ``value_text`` file, formatted numbers (dense),
        or the ids that occur in the train split (categorical without text; a hashed field's are
        hash buckets). Id 0, the missing value of every prepared field (its text ``unknown``, the
        same in every field), is no value of the field and left out.
    """
    spec = schema.field(field_name)
    if spec.kind == FieldKind.DENSE:
        numbers = _column_values(schema, spec, max_scan_rows).to_pylist()
        texts = sorted({templates.number_format.format(float(v)) for v in numbers})
    elif spec.value_text:
        table = schema.load_value_text(field_name)
        table = table.filter(pc.not_equal(table.column("id"), MISSING_ID))
        # as RowTextRenderer reads it: a text column of numbers (years, codes) is their text
        column = pc.cast(table.column("text"), pa.string()).combine_chunks().drop_null()
        texts = _distinct_ignoring_case(t for t in pc.unique(column).to_pylist() if t and t.strip())
    else:  # ids of the data, not of the table's range: most ids of a hashed field's buckets never occur
        ids = {int(i) for i in _column_values(schema, spec, max_scan_rows).to_pylist()}
        if spec.hashed:  # the buckets the reader folds them into (IdRules: a non-negative remainder)
            ids = {i % spec.cardinality for i in ids}
        texts = [str(i) for i in sorted(ids - {MISSING_ID})]
    rng.shuffle(texts)
    return texts[:limit]
