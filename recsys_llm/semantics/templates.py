"""Field-level prompts of LLaCTR: field texts, SSFT instructions and sampled field values.

Templates are ``str.format`` strings held in :class:`PromptTemplates`:

* field text (what a field vector encodes): ``"{name}: {description}"``, or
  ``"{name}"`` when the schema has no description for the field;
* SSFT prompt (Alpaca style, METHODS.md section 1): instruction "Given a feature,
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
from typing import List

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec, SchemaError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
SSFT_INSTRUCTION = "Given a feature, answer which field it belongs to, choosing from the candidate set"
SSFT_INPUT = "The feature is: {value}. The candidate set is: [{fields}]"


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """The text templates of LLaCTR (all ``str.format`` strings).

    Args:
        field (str): field text; placeholders ``{name}``, ``{description}``, ``{kind}``.
        field_without_description (str): used when the field has no description.
        instruction (str): SSFT instruction.
        input (str): SSFT input; placeholders ``{value}``, ``{fields}`` (comma-joined names).
        prompt (str): wrapper; placeholders ``{instruction}``, ``{input}``.
        number_format (str): format of dense values, e.g. ``"{:.4g}"``.
    """

    field: str = "{name}: {description}"
    field_without_description: str = "{name}"
    instruction: str = SSFT_INSTRUCTION
    input: str = SSFT_INPUT
    prompt: str = ALPACA_PROMPT
    number_format: str = "{:.4g}"

    def template_id(self) -> str:
        """16 hex digits identifying all templates (for caches and provenance)."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The templates as JSON, recorded in vector provenance."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def has_description(spec: FieldSpec) -> bool:
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


def _dense_values(schema: DatasetSchema, spec: FieldSpec, max_scan_rows: int) -> pa.Array:
    path = _first_split(schema)
    dataset = ds.dataset(path, format="parquet")
    if spec.name not in dataset.schema.names:
        raise SchemaError(f"{path}: no column {spec.name!r} for dense field {spec.name!r}")
    chunks, seen = [], 0
    for batch in dataset.to_batches(columns=[spec.name]):
        chunks.append(batch.column(0))
        seen += batch.num_rows
        if seen >= max_scan_rows:
            break
    if not chunks:
        return pa.array([], pa.float32())
    return pc.unique(pa.chunked_array(chunks).combine_chunks().drop_null())


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
        max_scan_rows (int): rows of the train split scanned for dense values.

    Returns:
        List[str]: texts from the field's ``value_text`` file, formatted numbers (dense),
        or raw id tokens (categorical without text).
    """
    spec = schema.field(field_name)
    if spec.kind == FieldKind.DENSE:
        numbers = _dense_values(schema, spec, max_scan_rows).to_pylist()
        texts = sorted({templates.number_format.format(float(v)) for v in numbers})
    elif spec.value_text:
        table = schema.load_value_text(field_name)
        column = table.column("text").combine_chunks().drop_null()
        texts = sorted(t for t in pc.unique(column).to_pylist() if t and t.strip())
    else:
        ids = rng.sample(range(spec.cardinality), min(limit, spec.cardinality))
        return [str(i) for i in ids]
    rng.shuffle(texts)
    return texts[:limit]
