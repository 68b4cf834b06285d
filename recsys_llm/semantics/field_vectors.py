"""Field vectors of LLaCTR: one LLM vector per field, [num_fields, d_llm], with provenance.

Each field with text (a schema description, or any field when asked) is written as
``templates.field`` (default ``"{name}: {description}"``) and encoded by the tuned
(SSFT adapter) or untuned model; decoders pool the last token, encoders average. The
result is saved with :func:`recsys_llm.semantics.store.save_vectors`: model id and
hash, pooling, template, schema fingerprints and fields, and the fields left out; they are
checked against the schema's ``semantic_fingerprint`` (names, kinds, descriptions, order, label),
which a table grown since leaves as it was.

Example::

    config = FieldVectorConfig(adapter_dir="runs/ssft/adapter")
    stored = encode_field_vectors(config, DatasetSchema.load("data/ml-100k"), "runs/fields.safetensors")
    stored.vectors.shape  # (num_fields_with_text, d_llm)
"""

import dataclasses
import json
import os
import warnings
from typing import Dict, List, Optional

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.semantics.encoder import NumberRule, TextEncoder, check_field_texts_fit, check_number_fields
from recsys_llm.semantics.pooling import POOLINGS
from recsys_llm.semantics.ssft_adapter import is_tuned_base, load_tuned_encoder, read_adapter_info
from recsys_llm.semantics.store import (StoredVectors, VectorProvenance, cached_encode, check_same_fields_output,
                                         check_same_vectors_output, load_vectors, save_vectors)
from recsys_llm.semantics.templates import PromptTemplates, field_text, select_fields
from recsys_llm.typed_config import check_bool_settings, check_str_settings


DEFAULT_MAX_LENGTH = 256  # tokens per field text of an untuned model

# FieldVectorConfig numbers: field -> its rule (and `semantics encode` option)
_NUMBER_RULES: Dict[str, NumberRule] = {
    "batch_size": NumberRule("--batch-size", integer=True, minimum=1),
    "max_length": NumberRule("--max-length", integer=True, minimum=1),
}


@dataclasses.dataclass
class FieldVectorConfig:
    """Settings of ``recsys-llm semantics encode``.

    Args:
        model_path (Optional[str]): untuned model directory; None -> offline MiniLM. With
            ``adapter_dir`` the adapter names its base model: leave it None (or give that base, also
            at another path where it moved: the files are checked against the adapter's).
        adapter_dir (Optional[str]): SSFT adapter directory (``<tune output>/adapter``).
        templates (PromptTemplates): ``field`` / ``field_without_description`` are used;
            with an adapter, the templates it was tuned with are used unless
            ``override_templates`` is set.
        override_templates (bool): use ``templates`` even when the adapter has its own.
        pooling (str): ``auto`` or explicit; with ``adapter_dir``, ``auto`` or the adapter's own.
        include_fields_without_description (bool): also encode fields without a
            description (as their bare name); otherwise they are left out.
        batch_size (int): texts per forward pass.
        max_length (Optional[int]): tokens per text; None -> 256, or the adapter's own
            (which is the only value allowed with ``adapter_dir``).
        device (Optional[str]): None -> CUDA if available.
        dtype (str): ``auto`` -> bf16 on a GPU that computes in it (Ampere or newer, or ROCm), else fp32
            (CPU and older GPUs).
        cache_dir (Optional[str]): encoded-text cache; None disables it.
        trust_remote_code (bool): run the model directory's own code if its config asks for it
            (off: such a model is refused).
    """

    model_path: Optional[str] = None
    adapter_dir: Optional[str] = None
    templates: PromptTemplates = dataclasses.field(default_factory=PromptTemplates)
    override_templates: bool = False
    pooling: str = "auto"
    include_fields_without_description: bool = False
    batch_size: int = 64
    max_length: Optional[int] = None
    device: Optional[str] = None
    dtype: str = "auto"
    cache_dir: Optional[str] = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_number_fields(self, _NUMBER_RULES, "semantics encode", optional=("max_length",))
        check_str_settings(self, ("device", "dtype"), "FieldVectorConfig",
                           paths=("model_path", "adapter_dir", "cache_dir"))
        check_bool_settings(self, ("override_templates", "include_fields_without_description", "trust_remote_code"),
                            "FieldVectorConfig")  # "false" would count as True (and run a model directory's code)
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"FieldVectorConfig.pooling (semantics encode --pooling) must be one of {POOLINGS}, "
                f"got {self.pooling!r}"
            )


def build_field_encoder(config: FieldVectorConfig) -> "tuple[TextEncoder, PromptTemplates, dict]":
    """The encoder (tuned or untuned), the field templates to use and adapter info ({} if untuned).

    Raises:
        ValueError: with an adapter, a model, pooling or max length other than the adapter's.
    """
    if config.adapter_dir:
        check_adapter_settings(config, read_adapter_info(config.adapter_dir))  # before the model loads
        encoder, info = load_tuned_encoder(config.adapter_dir, config.batch_size, config.device, config.dtype,
                                           config.trust_remote_code, base_model_path=config.model_path)
        templates = config.templates if config.override_templates else PromptTemplates(**info["templates"])
        return encoder, templates, info
    max_length = DEFAULT_MAX_LENGTH if config.max_length is None else config.max_length
    encoder = TextEncoder(config.model_path, pooling=config.pooling, batch_size=config.batch_size,
                          max_length=max_length, device=config.device, dtype=config.dtype,
                          trust_remote_code=config.trust_remote_code)
    return encoder, config.templates, {}


def check_adapter_settings(config: FieldVectorConfig, info: dict) -> None:
    """Raises ValueError when ``config`` asks for a base model, pooling or max length other than
    the ones the SSFT adapter (its ``ssft.json`` ``info``) was tuned with: its vectors would not
    be what the settings say. A base model at another path is the same when it holds the files the
    adapter was tuned on (moved, or copied to another machine)."""
    asked = {
        "--model": (config.model_path, info["base_model_path"]),
        "--pooling": (None if config.pooling == "auto" else config.pooling, info["pooling"]),
        "--max-length": (config.max_length, info["max_length"]),
    }
    for option, (value, tuned) in asked.items():
        if option == "--model" and value is not None:
            value, tuned = os.path.realpath(value), os.path.realpath(tuned)
            if value != tuned and is_tuned_base(value, info):  # the same files elsewhere
                continue
        if value is not None and value != tuned:
            raise ValueError(
                f"semantics encode {option} {value}: the SSFT adapter {config.adapter_dir} was tuned with "
                f"{option} {tuned}, which encode uses with it; leave {option} out, or tune an adapter with {value}"
            )


def check_adapter_fields(adapter_dir: str, info: dict, schema: DatasetSchema, fields: List[str]) -> None:
    """Raises ValueError when ``fields`` of ``schema`` were not all among the fields the SSFT adapter was tuned on
    (an adapter of another data set: its field vectors would say nothing about these fields)."""
    unknown = [name for name in fields if name not in info["fields"]]
    if unknown:
        raise ValueError(
            f"{adapter_dir}: the SSFT adapter was tuned on the fields {info['fields']}, not on {unknown} of schema "
            f"{schema.name!r}; tune it on this schema (recsys-llm semantics tune --schema ...)"
        )


def _warn_of_texts_not_tuned_on(adapter_dir: str, info: dict, names: List[str], texts: List[str],
                                overridden: bool) -> None:
    """Warns when a field's text (its description, edited since, or another template: ``overridden``) is not the
    one the SSFT adapter was tuned to map its values to; adapters saved before ``field_texts`` was recorded are not
    checked."""
    tuned = dict(zip(info["fields"], info.get("field_texts") or []))
    changed = [name for name, text in zip(names, texts) if name in tuned and tuned[name] != text]
    if changed:
        fix = ("leave --field-template out (FieldVectorConfig.override_templates) to encode with the adapter's own "
               "template" if overridden else "tune it again on the schema's current descriptions")
        warnings.warn(
            f"{adapter_dir}: the SSFT adapter was tuned with other texts of the fields {changed} (e.g. "
            f"{tuned[changed[0]]!r}, now {texts[names.index(changed[0])]!r}): their vectors encode texts it never saw; "
            f"{fix}", stacklevel=3)


def encode_field_vectors(config: FieldVectorConfig, schema: DatasetSchema, output: str) -> StoredVectors:
    """Encodes one vector per field with text and saves them with provenance to ``output``.

    Returns:
        StoredVectors: vectors (F, d_llm), the field names, provenance (as re-loaded).

    Raises:
        ValueError: ``output`` is a directory, or the SSFT adapter was not tuned on these fields (both
            checked before the model loads).
        FileExistsError: ``output`` holds vectors of other fields (before the model loads:
            :func:`~recsys_llm.semantics.store.check_same_fields_output`) or other vectors (another LLM or adapter,
            template, field texts, ...; before encoding: :func:`~recsys_llm.semantics.store.check_same_vectors_output`).
    """
    if os.path.isdir(output):  # the file's path is wanted: found only when writing, after encoding otherwise
        raise ValueError(f"{output}: is a directory; give the path of the field-vector file to write, "
                         f"e.g. {os.path.join(output, 'fields.safetensors')}")
    fields = select_fields(schema, config.include_fields_without_description)
    left_out = [f.name for f in schema.fields if f not in fields]
    if not fields:
        raise ValueError(
            f"schema {schema.name!r}: no field has a description, so no field vector can be made; "
            "describe the fields or set include_fields_without_description"
        )
    check_same_fields_output(output, schema)  # before the model loads
    if config.adapter_dir:  # before the model loads
        info = read_adapter_info(config.adapter_dir)
        check_adapter_fields(config.adapter_dir, info, schema, [f.name for f in fields])
    encoder, templates, info = build_field_encoder(config)
    texts = [field_text(f, templates) for f in fields]
    check_field_texts_fit(encoder, [f.name for f in fields], texts, "semantics encode", refuse_alike=False)
    if info:
        _warn_of_texts_not_tuned_on(config.adapter_dir, info, [f.name for f in fields], texts,
                                    config.override_templates)
    extra = {"texts": texts, "templates": json.loads(templates.describe()), "dtype": encoder.dtype}
    if info:
        extra["ssft_adapter"] = os.path.abspath(config.adapter_dir)
        extra["ssft_fields"] = info["fields"]
    provenance = VectorProvenance(
        model_id=encoder.model_id, model_hash=encoder.model_hash, pooling=encoder.pooling,
        template=templates.template_id(), left_out=left_out, extra=extra, max_length=encoder.max_length,
    ).for_schema(schema)
    check_same_vectors_output(output, provenance)  # before encoding
    vectors = cached_encode(encoder, texts, templates.template_id(), config.cache_dir)  # (F, d_llm)
    save_vectors(output, vectors, [f.name for f in fields], provenance)
    return load_vectors(output, schema=schema)
