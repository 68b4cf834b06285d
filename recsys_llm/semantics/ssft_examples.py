"""SSFT's examples: the prompts that ask which field a sampled value belongs to (disjoint training and held-out
values per field, :func:`build_examples`), fitted to the model's ``max_length`` (:func:`fit_prompts`), and the
digest of what a tune reads of the data (:func:`examples_digest`)."""

import hashlib
import json
import random
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.semantics.templates import PromptTemplates, distinct_values, ssft_prompt, value_identity

if TYPE_CHECKING:  # annotations only: ssft imports this module
    from recsys_llm.semantics.ssft import SSFTConfig


class SSFTExample(NamedTuple):
    """One prompt: ``prompt`` text, ``label`` (index of the true field), raw ``value``."""

    prompt: str
    label: int
    value: str


def check_distinct_field_texts(fields: Sequence[FieldSpec], texts: Sequence[str]) -> None:
    """Raises ValueError naming fields whose field texts (the InfoNCE keys) are the same text: each would be the
    other's positive and negative at once, and neither could be retrieved."""
    first: Dict[str, str] = {}
    for spec, text in zip(fields, texts):
        if text in first:
            raise ValueError(
                f"SSFT: fields {first[text]!r} and {spec.name!r} have the same field text {text!r}, the key InfoNCE "
                "tells fields apart by; give them distinct descriptions, or a field template that holds {name} "
                "(--field-template)"
            )
        first[text] = spec.name


def build_examples(
    schema: DatasetSchema,
    fields: Sequence[FieldSpec],
    config: "SSFTConfig",
) -> Tuple[List[SSFTExample], List[SSFTExample]]:
    """Samples disjoint training and held-out values per field and makes their prompts.

    Up to ``S_train + S_valid`` distinct values are sampled per field; of the n sampled,
    ``S_valid`` are held out, but of a field too small for both at most what it can spare:
    ``min(S_valid, max(1, n // 5, n - S_train))`` (none when n < 2), and up to ``S_train`` of
    the rest are for training. A value text that occurs in several fields, in any case or
    spacing (:func:`~recsys_llm.semantics.templates.value_identity`), is kept only for the
    first (its answer would be ambiguous). A field left without values (none in the data,
    or all kept for earlier fields) is warned about: it is tuned only as a wrong answer.

    Returns:
        Tuple[List[SSFTExample], List[SSFTExample]]: training and held-out examples.
    """
    rng = random.Random(config.seed)
    names = [f.name for f in fields]
    train, valid = [], []
    seen: set = set()
    empty: List[str] = []
    for label, spec in enumerate(fields):
        values = distinct_values(schema, spec.name, config.samples_train + config.samples_valid, rng, config.templates)
        if not values:
            empty.append(f"{spec.name!r} (no value in the data)")
        elif not {value_identity(v) for v in values} - seen:
            empty.append(f"{spec.name!r} (its sampled values are all values of earlier fields)")
        values = [v for v in values if value_identity(v) not in seen]  # Comedy of one field, comedy of another
        seen.update(value_identity(v) for v in values)
        n = len(values)
        n_valid = 0 if n < 2 else min(config.samples_valid, max(1, n // 5, n - config.samples_train))
        for i, value in enumerate(values[: n_valid + config.samples_train]):
            example = SSFTExample(ssft_prompt(value, names, config.templates), label, value)
            (valid if i < n_valid else train).append(example)
    if not train:
        raise ValueError(f"schema {schema.name!r}: no field values to tune on (fields {names})")
    _warn_of_bare_ids(schema, fields)
    if empty:
        warnings.warn(
            f"schema {schema.name!r}: SSFT has no value to tune on for field(s) {', '.join(empty)}: they are only "
            "ever a wrong answer, and the held-out accuracy leaves them out; check their value texts (value_text) "
            "and data",
            stacklevel=2,
        )
    return train, valid


def _warn_of_bare_ids(schema: DatasetSchema, fields: Sequence[FieldSpec]) -> None:
    """Warns of categorical fields without value texts whose SSFT values no model can tell apart by reading them:
    bare ids of two or more such fields (the same kind of number in each), or a hashed field's hash buckets. One id
    field alone (a user id, as in the public code) is left to tell by its numbers."""
    bare = [f for f in fields if f.kind != FieldKind.DENSE and not f.value_text]
    if len(bare) > 1 or any(f.hashed for f in bare):
        names = ", ".join(f"{f.name!r}{' (hashed)' if f.hashed else ''}" for f in bare)
        warnings.warn(
            f"schema {schema.name!r}: field(s) {names} have no value texts (value_text): SSFT reads their ids as the "
            "feature values, numbers alike in each of them (hash buckets for a hashed one), so their tuning and "
            "held-out accuracy mean little. Give them value texts (the raw values), or leave their descriptions "
            "out to leave them out of SSFT",
            stacklevel=3,
        )


def examples_digest(field_texts: Sequence[str], train: Sequence[SSFTExample], valid: Sequence[SSFTExample]) -> str:
    """sha256 (16 hex digits) over the field texts (the keys) and the training and held-out prompts and labels,
    in order: what a tune reads of the schema's descriptions, value texts and data."""
    payload = [list(field_texts), [[e.prompt, e.label] for e in train], [[e.prompt, e.label] for e in valid]]
    return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()[:16]


def fit_prompts(
    examples: Sequence[SSFTExample],
    field_names: Sequence[str],
    templates: PromptTemplates,
    tokenizer: Any,
    max_length: int,
    taken: Optional[Set[str]] = None,
    requested_max_length: Optional[int] = None,
    position_limit: Optional[int] = None,
) -> Tuple[List[SSFTExample], int]:
    """Shortens the value of every prompt longer than ``max_length`` tokens until the prompt fits.

    The query vector is read at the prompt's last token, right before the answer; a prompt
    the tokenizer truncates loses its candidate set and ``### Response:`` instead, and its
    query lands in the middle of the value. The longest prefix of the value (in characters)
    whose prompt fits is kept; a value of which nothing fits is left out, and so is one whose
    shortened value is in ``taken`` (values of long texts sharing their start would otherwise
    give one prompt several times: in training and held out, or with other fields as the answer).

    Args:
        taken (Optional[Set[str]]): the values prompts keep, here and in other example lists
            (training and held-out); None -> those of ``examples``. Each shortened value kept is added.
        requested_max_length (Optional[int]): ``--max-length`` as asked, when the model's positions
            capped it at ``max_length`` (the error then says that raising it cannot help).
        position_limit (Optional[int]): the model's own position limit, past which no ``--max-length``
            goes (the error says so when the prompt without its value is longer); None: not known.

    Returns:
        Tuple[List[SSFTExample], int]: the examples (in order) and how many were shortened or left out.

    Raises:
        ValueError: even the prompt of an empty value is longer than ``max_length``.
    """
    names = list(field_names)
    taken = {e.value for e in examples} if taken is None else taken

    def length(text: str) -> int:
        return len(tokenizer(text, truncation=False)["input_ids"])

    encoded = tokenizer([e.prompt for e in examples], truncation=False)["input_ids"] if examples else []
    lengths = [len(ids) for ids in encoded]
    if any(size > max_length for size in lengths):
        bare = length(ssft_prompt("", names, templates))
        if bare > max_length:
            capped = requested_max_length is not None and requested_max_length > max_length
            # the candidate set lists every field's name: with many fields it outgrows any --max-length
            shorter = ("fewer fields (a field without a description is left out), shorter field names (the candidate "
                       "set lists them), or shorter prompt templates (PromptTemplates in Python)")
            if capped:
                remedy = (f"the model's positions cap --max-length {requested_max_length} there: use a model with "
                          f"more positions, {shorter}")
            elif position_limit is not None and bare > position_limit:
                remedy = (f"the model's {position_limit} positions cannot hold it, whatever --max-length: use a model "
                          f"with more positions, {shorter}")
            else:
                remedy = (f"raise --max-length (SSFTConfig.max_length) above {bare} (a value's own tokens come on "
                          "top), or shorten the field names (the candidate set lists them)")
            raise ValueError(
                f"SSFT prompt without its value is {bare} tokens, more than max_length {max_length} (its instruction "
                f"and candidate set of {len(names)} fields alone); {remedy}"
            )
    fitted: List[SSFTExample] = []
    changed = 0
    for example, size in zip(examples, lengths):
        if size <= max_length:
            fitted.append(example)
            continue
        changed += 1
        low, high = 0, len(example.value)  # the longest prefix whose prompt fits: low fits, high + 1 does not
        while low < high:
            middle = (low + high + 1) // 2
            if length(ssft_prompt(example.value[:middle].rstrip(), names, templates)) <= max_length:
                low = middle
            else:
                high = middle - 1
        value = example.value[:low].rstrip()
        if value and value not in taken:
            taken.add(value)
            fitted.append(SSFTExample(ssft_prompt(value, names, templates), example.label, value))
    return fitted, changed
