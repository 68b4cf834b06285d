"""Vector files with provenance, and an on-disk cache of encoded texts.

A vector file is one safetensors file: the tensor ``vectors`` (N, d) plus metadata
``keys`` (the N row names, e.g. field names) and ``provenance`` (JSON: model id and
weights hash, pooling, template, schema name, fingerprints and fields, the command that
made it). Loading checks the provenance against what the caller expects and raises
:class:`VectorProvenanceError` naming the item that differs: vectors made for another
schema, model or template are never reused silently.

Example::

    save_vectors("fields.safetensors", vectors, ["user_id", "age"],
                 VectorProvenance(model_id="minilm", model_hash="ab12", pooling="mean",
                                  template="{name}: {description}").for_schema(schema))
    stored = load_vectors("fields.safetensors", schema=schema)
    stored.vectors  # (2, 384)
"""

import collections
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import sys
import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save

from recsys_llm.atomic_dir import check_no_file_above, check_writable, write_bytes_atomically
from recsys_llm.data.schema import SEMANTIC_FIELD_KEYS, DatasetSchema
from recsys_llm.data.schema_changes import schema_change_note
from recsys_llm.paths import not_a_regular_file
from recsys_llm.semantics.encoder import text_list

FORMAT_VERSION = "1"


class VectorProvenanceError(ValueError):
    """A vector file does not match the schema, model or template it is used with."""


@dataclasses.dataclass
class VectorProvenance:
    """What made a set of vectors.

    Args:
        model_id (str): model name or path.
        model_hash (str): fingerprint of the model's weights and config (+ adapter).
        pooling (str): ``mean``, ``last_token`` or ``cls``.
        template (str): the text template (or its id) the texts were made with.
        schema_name (str): data set name, '' when not tied to a schema.
        schema_fingerprint (str): ``DatasetSchema.fingerprint()``, '' when not tied to one.
        schema_fields (List[str]): all field names of that schema, in order.
        left_out (List[str]): keys that were asked for but have no vector (e.g. fields
            without text).
        created_by (str): the command line that made the file.
        created_at (str): UTC time stamp.
        extra (Dict[str, Any]): anything else (JSON-serialisable), e.g. SSFT metrics.
        max_length (Optional[int]): tokens per text the encoder cut the texts at (None: not
            recorded, files of older versions).
        schema_contents (Dict[str, Any]): what the schema fingerprint hashes
            (``DatasetSchema.fingerprinted()``), so a mismatch names the fields that differ;
            empty in files of older versions.
        schema_semantic_fingerprint (str): ``DatasetSchema.semantic_fingerprint()`` (the fields' names,
            kinds, descriptions and order, the label: not their sizes), what a file keyed by field is
            checked against; '' in files of older versions, checked against ``schema_fingerprint``.
    """

    model_id: str
    model_hash: str
    pooling: str
    template: str
    schema_name: str = ""
    schema_fingerprint: str = ""
    schema_fields: List[str] = dataclasses.field(default_factory=list)
    left_out: List[str] = dataclasses.field(default_factory=list)
    created_by: str = dataclasses.field(default_factory=lambda: " ".join(sys.argv))
    created_at: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    max_length: Optional[int] = None
    schema_contents: Dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_semantic_fingerprint: str = ""

    def for_schema(self, schema: DatasetSchema) -> "VectorProvenance":
        """A copy tied to ``schema`` (name, fingerprints, field list, what the fingerprint hashes)."""
        return dataclasses.replace(
            self, schema_name=schema.name, schema_fingerprint=schema.fingerprint(),
            schema_fields=[f.name for f in schema.fields], schema_contents=schema.fingerprinted(),
            schema_semantic_fingerprint=schema.semantic_fingerprint(),
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<dict>") -> "VectorProvenance":
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - allowed
        if unknown:
            raise VectorProvenanceError(f"{source}: provenance has unknown keys {sorted(unknown)}")
        missing = {"model_id", "model_hash", "pooling", "template"} - set(raw)
        if missing:
            raise VectorProvenanceError(f"{source}: provenance lacks {sorted(missing)}")
        return cls(**dict(raw))


def first_non_finite_row(vectors: torch.Tensor) -> Optional[Tuple[int, int, float]]:
    """``(row, number of rows with a NaN/inf, the first such value)`` of (N, d) ``vectors``,
    None when all are finite. The torch twin of :func:`recsys_llm.data.validation.first_non_finite_row`."""
    finite = torch.isfinite(vectors)
    if bool(finite.all()):
        return None
    bad_rows = ~finite.all(dim=1)  # (N,)
    row = int(bad_rows.nonzero()[0, 0])
    value = vectors[row][~finite[row]][0].item()  # a Python float (complex for complex tensors)
    return row, int(bad_rows.sum()), value


class StoredVectors(NamedTuple):
    """A loaded vector file: ``vectors`` (N, d) float32, ``keys`` (N names), provenance."""

    vectors: torch.Tensor
    keys: List[str]
    provenance: VectorProvenance


def save_vectors(path: str, vectors: torch.Tensor, keys: Sequence[str], provenance: VectorProvenance) -> None:
    """Writes vectors and their provenance atomically (a fsynced temp file renamed into place).

    Args:
        path (str): target ``.safetensors`` file.
        vectors (torch.Tensor): (N, d).
        keys (Sequence[str]): N distinct row names.
        provenance (VectorProvenance): what made them.

    Raises:
        ValueError: wrong shape, repeated keys, or a NaN/inf value (named by its key); nothing
            is written then.
    """
    keys = [str(k) for k in keys]
    if vectors.dim() != 2 or vectors.size(0) != len(keys):
        raise ValueError(f"{path}: need vectors of shape (len(keys)={len(keys)}, d), got {tuple(vectors.shape)}")
    repeated = sorted(key for key, count in collections.Counter(keys).items() if count > 1)
    if repeated:
        raise ValueError(f"{path}: keys must be distinct, got duplicates {repeated}")
    bad = first_non_finite_row(vectors.detach())
    if bad is not None:
        row, count, value = bad
        raise ValueError(
            f"{path}: not written: the vector of {keys[row]!r} (row {row}) holds {value}, and {count} of {len(keys)} "
            "vectors hold NaN/inf; expected finite values (check the model, its dtype and the pooling)"
        )
    metadata = {
        "format": FORMAT_VERSION,
        "keys": json.dumps(keys),
        "provenance": json.dumps(provenance.to_dict(), sort_keys=True),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    write_bytes_atomically(path, save({"vectors": vectors.detach().to("cpu").contiguous()}, metadata=metadata))


def check_vector_output(path: str) -> None:
    """Raises unless ``path`` may take a field-vector file: absent, or one written before by
    :func:`save_vectors` for a schema (``semantics encode``'s own output, re-encoded).

    Call it before encoding: :func:`save_vectors` replaces whatever is at ``path``.

    Raises:
        FileExistsError: ``path`` is a directory, or a file of something else (a config, a
            foreign ``.safetensors``), which writing the vectors would destroy, or lies under a file.
        PermissionError: its directory cannot be written (found before the encode, not after it).
    """
    if os.path.isdir(path):
        raise FileExistsError(f"{path}: is a directory; expected a .safetensors file path")
    if not os.path.exists(path):
        check_no_file_above(path)  # the directories made for it: under a directory, not a file
        check_writable(path)
        return
    check_writable(os.path.realpath(path))
    if _stored_provenance(path) is None:
        raise FileExistsError(
            f"{path}: exists and is not a field-vector file written by `recsys-llm semantics encode` (no vector "
            "provenance in its metadata); writing the vectors there would replace it: choose another --output path, "
            "or delete the file first"
        )


def _stored_provenance(path: str) -> Optional[Dict[str, Any]]:
    """The provenance of the field-vector file :func:`save_vectors` wrote at ``path``; None for anything else (not
    safetensors, no or unreadable provenance, none of its keys, no file at all)."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        provenance = json.loads(metadata["provenance"])
    except Exception:  # noqa: BLE001 - not safetensors, no or unreadable provenance: not ours
        return None
    return provenance if "keys" in metadata and provenance.get("schema_fingerprint") else None


#: what the refusal to write other field vectors over a file tells to do
_WRITE_BESIDE = ("runs trained on them read this file to resume, evaluate and export. Write the new vectors to another "
                 "--output (e.g. runs/fields_day2.safetensors) and train them in a new train.run_dir with "
                 "llactr.vectors_path=NEW, or delete the file first to replace it")
#: the provenance entries (and ``extra`` entries) a field-vector file's vectors depend on: two files that differ in
#: one hold other vectors; where they lie, when and by which command line they were written do not count
VECTOR_IDENTITY_KEYS = ("model_hash", "pooling", "template", "max_length", "schema_semantic_fingerprint",
                        "schema_fields", "left_out")
VECTOR_IDENTITY_EXTRA_KEYS = ("texts", "dtype")


def _vector_identity(provenance: Mapping[str, Any]) -> Dict[str, Any]:
    """The :data:`VECTOR_IDENTITY_KEYS` and :data:`VECTOR_IDENTITY_EXTRA_KEYS` of a provenance dict."""
    extra = provenance.get("extra") or {}
    return {**{key: provenance.get(key) for key in VECTOR_IDENTITY_KEYS},
            **{key: extra.get(key) for key in VECTOR_IDENTITY_EXTRA_KEYS}}


def check_same_vectors_output(path: str, provenance: VectorProvenance) -> None:
    """Raises when ``path`` holds a field-vector file whose vectors differ from those ``provenance`` describes
    (another LLM or SSFT adapter, pooling, template, field texts, fields, dtype): runs trained on it read the file
    to resume, evaluate and export, so an LLM upgrade or a new template writes beside it. The same vectors written
    again replace it; so does anything where ``path`` holds no field-vector file (:func:`check_vector_output`
    vouched for it). Entries an older file lacks are not compared.

    Raises:
        FileExistsError: naming the entries that differ, both models and the way out.
    """
    earlier = _stored_provenance(path)
    if earlier is None:
        return
    before, now = _vector_identity(earlier), _vector_identity(provenance.to_dict())
    differing = [key for key in now if before[key] is not None and before[key] != now[key]]
    if not differing:
        return
    raise FileExistsError(
        f"{path}: holds other field vectors (of {earlier.get('model_id')!r}, fingerprint {earlier.get('model_hash')}) "
        f"than this encode's (of {provenance.model_id!r}, fingerprint {provenance.model_hash}; differing: "
        f"{', '.join(differing)}); {_WRITE_BESIDE}"
    )


def check_same_fields_output(path: str, schema: DatasetSchema) -> None:
    """Raises when ``path`` holds a field-vector file made for other fields than ``schema``'s (another
    ``schema_semantic_fingerprint``: a field added, dropped, renamed or described otherwise): runs trained on it
    read it to resume, evaluate and export, and a run on the next day's schema with a new field needs vectors of
    its own beside them. Files without that record, and anything :func:`check_vector_output` vouched for that is
    no field-vector file, pass.

    Raises:
        FileExistsError: naming both field lists' difference and the way out.
    """
    earlier = _stored_provenance(path)
    recorded = (earlier or {}).get("schema_semantic_fingerprint")
    if not recorded or recorded == schema.semantic_fingerprint():
        return
    fields = [f.name for f in schema.fields]
    before = earlier.get("schema_fields") or []
    added, dropped = [n for n in fields if n not in before], [n for n in before if n not in fields]
    what = "; ".join(part for part in (f"added {added}" if added else "", f"dropped {dropped}" if dropped else "")
                     if part) or "names, kinds, descriptions, order or label changed"
    raise FileExistsError(
        f"{path}: holds field vectors of other fields than schema {schema.name!r} has ({what}; field-vector "
        f"fingerprint {recorded} there, {schema.semantic_fingerprint()} here); {_WRITE_BESIDE}"
    )


def check_cache_dir(cache_dir: Optional[str]) -> None:
    """Raises unless ``cache_dir`` can hold the encoded-text cache (``semantics encode --cache-dir``):
    None (no cache), a directory, or a path to create under the nearest existing directory.

    Call it before encoding: the cache directory is made when the first entry is written.

    Raises:
        NotADirectoryError: ``cache_dir``, or the part of it that exists, is a file (or else not a
            directory), named with the option.
    """
    if cache_dir is None:
        return
    existing = os.path.abspath(cache_dir)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.isdir(existing):
        return
    what = "a file" if os.path.isfile(existing) else "not a directory"
    where = "" if existing == os.path.abspath(cache_dir) else f"{existing} "  # a file on the way
    raise NotADirectoryError(
        f"--cache-dir {cache_dir}: {where}is {what}, expected a directory for the encoded-text cache; "
        "give a directory path (made if missing), or leave --cache-dir out for no cache"
    )


def _check_schema(path: str, provenance: VectorProvenance, schema: DatasetSchema) -> None:
    """Raises unless the vectors (keyed by field) were made for ``schema``: for its fields' names, kinds,
    descriptions and order and its label (``schema_semantic_fingerprint``; a grown table changes none), or, in
    a file of an older version that lacks it, for all of the schema (``schema_fingerprint``: sizes too)."""
    semantic = bool(provenance.schema_semantic_fingerprint)
    recorded = provenance.schema_semantic_fingerprint if semantic else provenance.schema_fingerprint
    current = schema.semantic_fingerprint() if semantic else schema.fingerprint()
    if recorded == current:
        return
    fingerprint = "field-vector fingerprint" if semantic else "fingerprint"
    what = ": the names, kinds, descriptions and order of the fields, and the label" if semantic else ""
    made_for = (f"schema {provenance.schema_name!r} ({fingerprint} {recorded or 'none'}{what}) "
                f"with fields {provenance.schema_fields}")
    names = [f.name for f in schema.fields]
    same_names = list(provenance.schema_fields or []) == names  # said of a file of an older version
    settings = "kinds or descriptions" if semantic else "kinds, sizes or descriptions"
    what_differs = schema_change_note(
        provenance.schema_contents, schema,
        f" (the same field names: their {settings}, or the label, differ)" if same_names else "",
        SEMANTIC_FIELD_KEYS if semantic else None)
    raise VectorProvenanceError(
        f"vectors in {path} were made for {made_for}; the current schema {schema.name!r} has {fingerprint} "
        f"{current} with fields {names}{what_differs}. Re-encode them for this schema "
        "(`recsys-llm semantics encode`, to a new --output: runs trained on this file read it) and train with "
        "llactr.vectors_path=NEW."
    )


def load_vectors(
    path: str,
    schema: Optional[DatasetSchema] = None,
    expected: Optional[Mapping[str, Any]] = None,
) -> StoredVectors:
    """Reads a vector file and checks its provenance.

    Args:
        path (str): a file written by :func:`save_vectors`.
        schema (Optional[DatasetSchema]): when given, the file must have been made for a
            schema with the same semantic fingerprint (fields' names, kinds, descriptions and order,
            and label; a file of an older version: the same fingerprint, sizes too), and every key
            must be one of its fields.
        expected (Optional[Mapping[str, Any]]): provenance items that must match exactly,
            e.g. ``{"pooling": "last_token", "model_hash": "ab12"}``.

    Returns:
        StoredVectors: vectors (N, d) float32, keys, provenance.

    Raises:
        FileNotFoundError: nothing at ``path``.
        VectorProvenanceError: naming the file and the first item that does not match, or
            the first key whose vector holds NaN/inf; or ``path`` is a directory.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: vector file not found")
    found = not_a_regular_file(path)
    if found is not None:  # safetensors would say "No such device (os error 19)" of a directory, and wait on a FIFO
        raise VectorProvenanceError(f"{path}: is {found}, not a field-vector file; give the .safetensors file "
                                    "`recsys-llm semantics encode --output` wrote")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "vectors" not in handle.keys():
                raise VectorProvenanceError(f"{path}: no tensor 'vectors' (tensors: {list(handle.keys())})")
            vectors = handle.get_tensor("vectors")
    except VectorProvenanceError:
        raise
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise VectorProvenanceError(f"{path}: not a readable safetensors vector file: {error}") from error
    for item in ("keys", "provenance"):
        if item not in metadata:
            raise VectorProvenanceError(f"{path}: metadata lacks {item!r}: not written by save_vectors")
    try:
        keys = json.loads(metadata["keys"])
        raw_provenance = json.loads(metadata["provenance"])
    except (ValueError, RecursionError) as error:
        raise VectorProvenanceError(f"{path}: metadata is not valid JSON ({error}): damaged, or not written by "
                                    "save_vectors") from error
    if (not isinstance(keys, list) or not all(isinstance(key, str) for key in keys)
            or not isinstance(raw_provenance, dict)):
        raise VectorProvenanceError(f"{path}: metadata 'keys' is not a list of field names or 'provenance' not an "
                                    "object: damaged, or not written by save_vectors")
    provenance = VectorProvenance.from_dict(raw_provenance, source=path)
    if vectors.dim() != 2 or vectors.size(0) != len(keys):
        raise VectorProvenanceError(f"{path}: {len(keys)} keys but vectors of shape {tuple(vectors.shape)}")
    if not vectors.is_floating_point():
        raise VectorProvenanceError(f"{path}: vectors of dtype {vectors.dtype}; expected floating-point vectors "
                                    "(save_vectors writes float32): not an encoder's output")
    bad = first_non_finite_row(vectors)
    if bad is not None:
        row, count, value = bad
        raise VectorProvenanceError(
            f"{path}: the vector of {keys[row]!r} (row {row}) holds {value}, and {count} of {len(keys)} vectors hold "
            "NaN/inf; expected finite values: the file is damaged or its model gave NaN/inf, re-encode it"
        )
    zeros = [keys[row] for row in vectors.eq(0).all(dim=1).nonzero().flatten().tolist()]
    if zeros:  # no direction: FIE's cosine similarities with it are 0
        warnings.warn(f"{path}: the vectors of {zeros[:5]}{' ...' if len(zeros) > 5 else ''} ({len(zeros)} of "
                      f"{len(keys)}) are all zeros, which no encoder gives: they carry no meaning to the terms that "
                      "read them; re-encode the file", stacklevel=2)
    if schema is not None:
        _check_schema(path, provenance, schema)
        unknown = [k for k in keys if k not in {f.name for f in schema.fields}]
        if unknown:
            raise VectorProvenanceError(f"{path}: keys {unknown} are not fields of schema {schema.name!r}")
    for item, want in (expected or {}).items():
        if item == "keys":
            have: Any = keys
        else:  # an item older files keep in extra (max_length) is there when the field is None
            have = getattr(provenance, item, None)
            if have is None:
                have = provenance.extra.get(item)
        if have != want:
            raise VectorProvenanceError(f"vectors in {path} have {item}={have!r}, expected {want!r}")
    return StoredVectors(vectors.float(), keys, provenance)


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 over the texts (length-prefixed, so ``["ab"]`` and ``["a", "b"]`` differ)."""
    digest = hashlib.sha256()
    for text in texts:
        raw = text.encode("utf-8")
        digest.update(f"{len(raw)}:".encode())
        digest.update(raw)
    return digest.hexdigest()


def cache_key(model_hash: str, pooling: str, max_length: int, template_id: str, texts: Sequence[str],
              dtype: str = "") -> str:
    """Cache file stem: hash of (model, pooling, max length, template, texts, compute dtype)."""
    payload = json.dumps([FORMAT_VERSION, model_hash, pooling, max_length, template_id, texts_hash(texts), dtype])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cached_encode(
    encoder: Any,
    texts: Sequence[str],
    template_id: str,
    cache_dir: Optional[str],
    progress: bool = True,
) -> torch.Tensor:
    """``encoder.encode(texts)`` memoised on disk under ``cache_dir``.

    The key is a hash of the encoder's model hash, pooling, max length and compute dtype
    (when it has one), the template id and the texts, so any change of model, dtype,
    template or text misses the cache. A cache file that does not read back (damaged,
    or not the entry its name says) is warned about, encoded again and replaced.
    ``cache_dir`` is made when missing; a file there is refused before encoding
    (:func:`check_cache_dir`).

    Args:
        encoder (TextEncoder): anything with ``encode``, ``model_hash``, ``model_id``,
            ``pooling`` and ``max_length``.
        texts (Sequence[str]): N texts.
        template_id (str): the template (or its hash) the texts were made with.
        cache_dir (Optional[str]): None disables the cache.
        progress (bool): passed to ``encoder.encode``; also reports a cache hit on stderr.

    Returns:
        torch.Tensor: (N, d) float32.

    Raises:
        TypeError: ``texts`` is a single string, or one of them is not a string
            (:func:`~recsys_llm.semantics.encoder.text_list`).
        NotADirectoryError: ``cache_dir`` is a file (:func:`check_cache_dir`).
        ValueError: with a ``cache_dir``, the encoder gave NaN / inf vectors (nothing is cached);
            without one the vectors are returned unchecked.
    """
    texts = text_list(texts)
    if cache_dir is None:
        return encoder.encode(texts, progress=progress)
    check_cache_dir(cache_dir)  # before encoding: the vectors could not be cached there
    dtype = getattr(encoder, "dtype", "")
    key = cache_key(encoder.model_hash, encoder.pooling, encoder.max_length, template_id, texts, dtype)
    path = os.path.join(cache_dir, f"{key}.safetensors")
    # every item of the key: a file copied or renamed under another entry's name is not taken for it
    expected = {"model_hash": encoder.model_hash, "pooling": encoder.pooling, "template": template_id,
                "texts_sha256": texts_hash(texts), "max_length": encoder.max_length, "dtype": dtype}
    if os.path.exists(path):
        try:
            stored = load_vectors(path, expected=expected)
        except VectorProvenanceError as error:  # a damaged entry: encoded again and replaced
            warnings.warn(f"encode cache: {error}; the texts are encoded again and the cache file replaced", stacklevel=2)
        else:
            if stored.vectors.size(0) == len(texts):
                if progress:  # otherwise nothing tells a hit from an encode with the same vectors
                    print(f"[recsys_llm] encode cache: the vectors of the {len(texts)} texts read from {path}, not "
                          "encoded again", file=sys.stderr, flush=True)
                return stored.vectors
    vectors = encoder.encode(texts, progress=progress)
    bad = first_non_finite_row(vectors)
    if bad is not None:
        row, count, value = bad
        raise ValueError(
            f"{encoder.model_id}: text {row} ({texts[row][:80]!r}) was encoded to a vector holding {value}, and "
            f"{count} of {len(texts)} texts to NaN/inf; nothing was cached in {cache_dir}. Expected finite vectors "
            "(check the model, its dtype and the pooling)"
        )
    provenance = VectorProvenance(
        model_id=encoder.model_id, model_hash=encoder.model_hash, pooling=encoder.pooling, template=template_id,
        extra={"texts_sha256": texts_hash(texts), "dtype": dtype}, max_length=encoder.max_length,
    )
    try:
        save_vectors(path, vectors, [str(i) for i in range(len(texts))], provenance)
    except OSError as error:  # a shared cache this user may read, not write: the vectors are still good
        if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
            raise
        warnings.warn(f"encode cache: {cache_dir} cannot be written here ({error.strerror or error}): the vectors "
                      "are used but not cached (its entries are still read)", stacklevel=2)
    return vectors
