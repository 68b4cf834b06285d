"""Data set schema: the fields of a CTR data set, their kinds, sizes and text.

A schema is one JSON (or YAML) file next to the Parquet splits it describes::

    {
      "name": "ml-100k",
      "label": "label",
      "row_key": "row_id",
      "splits": {"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet"},
      "fields": [
        {"name": "user_id", "kind": "sparse", "cardinality": 944,
         "description": "user id", "value_text": "text/user_id.parquet"},
        {"name": "age", "kind": "dense", "description": "age of the user in years"},
        {"name": "genres", "kind": "sequence", "cardinality": 20, "max_length": 6,
         "description": "genres of the movie"}
      ]
    }

Parquet column types per kind: ``sparse`` int64 ids in ``[0, cardinality)``,
``sequence`` list<int64> of such ids (multi-hot), ``dense`` float32. The label
column holds 0/1. ``value_text`` names a Parquet file (columns ``id`` int64,
``text`` string) that maps ids of the field to human-readable text: what the LLM
methods read. Text maps live in files, not in the schema, so they scale to 10^7 ids.
"""

import dataclasses
import difflib
import enum
import hashlib
import json
import numbers
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from recsys_llm.atomic_dir import write_text_atomically
from recsys_llm.error_text import one_line
from recsys_llm.paths import is_plain_file_name, not_a_regular_file


def schema_file(path: str) -> str:
    """``path`` itself, or ``path/schema.json`` when ``path`` is a data directory."""
    return os.path.join(path, "schema.json") if os.path.isdir(path) else path


class SchemaError(ValueError):
    """A schema file, or data that does not match its schema."""


def check_split_name(split: Any, where: str) -> None:
    """Refuses a split name that is not a plain name: commands name the split's copies after it
    (``<out>/<split>.parquet``, ``<out>/<split>/``), so ``../x``, ``/abs/x`` or ``.hidden`` would
    write outside the output directory, or over a temp file beside it.

    Raises:
        SchemaError: naming ``where``, the split and what was expected.
    """
    if is_plain_file_name(split) and not split.startswith("."):
        return
    raise SchemaError(f"{where}: splits key {split!r}: expected a plain split name (e.g. train, valid, test) without "
                      "'/', '\\' or a leading '.'; it names the split's copies in output directories")


class FieldKind(str, enum.Enum):
    SPARSE = "sparse"
    DENSE = "dense"
    SEQUENCE = "sequence"


#: The id of a missing value in every sparse and sequence field of prepared data (text ``unknown``).
MISSING_ID = 0

#: the keys a schema file may hold at its top level
SCHEMA_KEYS = ("name", "label", "row_key", "splits", "extra_columns", "fields", "ids")

#: the settings of a field that its LLM field vector depends on (:meth:`DatasetSchema.semantic_fingerprint`): the name
#: and description (the text it is encoded from) and the kind (a field template may read it; ids or a number). Not
#: ``cardinality``, ``hashed`` or ``max_length`` (how many ids, how they are folded, how many a row keeps: the
#: tables', not the text's), ``embedding_dim`` (the model's width) or ``value_text`` (where the values' texts lie)
SEMANTIC_FIELD_KEYS = ("name", "kind", "description")

#: how ``prepare tabular`` turned a categorical field's values into ids (``DatasetSchema.ids``): through
#: a vocabulary (its value-text file), hashed as text, or read as integer ids (folded if ``hashed``)
ID_WAYS = ("vocabulary", "hashed_text", "integer")


def _a(value: Any) -> str:
    """``value``'s type with its article, for messages: ``a str``, ``an int``."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


_INT64_MAX = 2**63 - 1


def _checked_int(value: Any, where: str, key: str, minimum: int, meaning: str = "") -> int:
    """``value`` as a Python int, refusing strings, floats and bools (``true`` is no count)."""
    expected = f"expected an integer >= {minimum}{meaning}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, str):
            hint = " (write the number without quotes; YAML reads 1e2 as a string: write 100)"
        raise SchemaError(f"{where}: {key}={value!r}: {expected}, got {_a(value)}{hint}")
    if value < minimum:
        raise SchemaError(f"{where}: {key}={value!r}: {expected}")
    if value > _INT64_MAX:  # ids and lengths are int64 tensors: a larger count trains nothing
        raise SchemaError(f"{where}: {key}={value!r}: expected an integer of at most 2**63 - 1 ({_INT64_MAX})")
    return int(value)


def _checked_str(value: Any, where: str, key: str, optional: bool = False, empty: bool = False) -> Optional[str]:
    """``value`` if it is a string (non-empty unless ``empty``), or None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not (value or empty):
        expected = "a non-empty string" if not empty else "a string"
        raise SchemaError(f"{where}: {key}={value!r}: expected {expected}{' or null' if optional else ''}, "
                          f"got {'an empty string' if value == '' else _a(value)}")
    return value


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One input field.

    Args:
        name (str): column name in the Parquet files and feature name in the KJT (no ``.`` in a
            sparse or sequence field's: its table's name is a torch module name).
        kind (FieldKind): sparse (one id), sequence (list of ids) or dense (one float).
        cardinality (int): number of ids (embedding table rows) for sparse/sequence.
        hashed (bool): ids were hashed into ``[0, cardinality)``; readers then fold
            out-of-range ids with a modulo instead of rejecting them.
        description (str): human-readable meaning of the field, read by the LLM methods.
        value_text (Optional[str]): Parquet file (relative to the schema) mapping ids to text.
        max_length (int): sequences are truncated to this many ids (their first ones); 0: not truncated.
        embedding_dim (Optional[int]): per-field override of the model's embedding dim.
    """

    name: str
    kind: FieldKind = FieldKind.SPARSE
    cardinality: int = 0
    hashed: bool = False
    description: str = ""
    value_text: Optional[str] = None
    max_length: int = 0
    embedding_dim: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            got = "an empty string" if isinstance(self.name, str) else _a(self.name)
            raise SchemaError(f"field name {self.name!r}: expected a non-empty string, got {got}")
        where = f"field {self.name!r}"
        try:
            kind = FieldKind(self.kind)
        except (ValueError, TypeError):
            raise SchemaError(
                f"{where}: kind={self.kind!r}: expected one of {', '.join(k.value for k in FieldKind)}"
            ) from None
        object.__setattr__(self, "kind", kind)
        if kind != FieldKind.DENSE and "." in self.name:  # found by the first model built, after prepare
            raise SchemaError(
                f"{where}: name={self.name!r}: a {kind.value} field's name may not contain '.', as its embedding "
                f"table (e.g. t_{self.name}) is a torch module name; rename the column, e.g. "
                f"{self.name.replace('.', '_')!r}"
            )
        minimum = 0 if kind == FieldKind.DENSE else 1  # a categorical field needs at least one id
        meaning = "" if minimum == 0 else f" (the number of ids of a {kind.value} field)"
        object.__setattr__(self, "cardinality", _checked_int(self.cardinality, where, "cardinality", minimum, meaning))
        if not isinstance(self.hashed, bool):
            raise SchemaError(f"{where}: hashed={self.hashed!r}: expected true or false, got {_a(self.hashed)}")
        if self.hashed and self.cardinality < 2:  # id 0 is the missing value: one more row for the hashed values
            raise SchemaError(f"{where}: cardinality={self.cardinality} with hashed=true: expected at least 2 (id 0 "
                              "is kept for a missing value, values hash into [1, cardinality))")
        if self.description is None:  # YAML's empty `description:`: no description
            object.__setattr__(self, "description", "")
        _checked_str(self.description, where, "description", empty=True)
        _checked_str(self.value_text, where, "value_text", optional=True)
        object.__setattr__(self, "max_length", _checked_int(self.max_length, where, "max_length", 0))
        # keys another kind reads: here a sign of the wrong kind, not a setting
        if kind == FieldKind.DENSE and self.cardinality:
            raise SchemaError(f"{where}: cardinality={self.cardinality} on a dense field (one float per row, no ids); "
                              "a field of ids is kind: sparse (or sequence)")
        if kind != FieldKind.SEQUENCE and self.max_length:
            raise SchemaError(f"{where}: max_length={self.max_length} on a {kind.value} field (one value per row); "
                              "a field of several ids per row is kind: sequence")
        if self.embedding_dim is not None:
            object.__setattr__(self, "embedding_dim", _checked_int(self.embedding_dim, where, "embedding_dim", 1))

    @property
    def is_categorical(self) -> bool:
        return self.kind in (FieldKind.SPARSE, FieldKind.SEQUENCE)

    def to_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, 0, False, "") or k == "name"}
        out["kind"] = self.kind.value
        return out


def _short_hash(contents: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of ``contents`` as sorted JSON: a schema fingerprint."""
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class DatasetSchema:
    """All fields of a data set plus where its splits live.

    Args:
        name (str): data set name.
        fields (List[FieldSpec]): input fields in model order.
        label (str): label column (0/1).
        row_key (Optional[str]): int64 column that identifies a row (per-row LLM vectors,
            offline teacher outputs); None if the data has none.
        splits (Dict[str, str]): split name -> Parquet file or directory, relative to ``root``.
        extra_columns (List[str]): other columns kept in the files (e.g. ``is_cold_item``).
        root (str): directory of the schema file; relative paths resolve against it.
        ids (Dict[str, str]): categorical field -> how ``prepare tabular`` made its ids from the
            source's values, one of :data:`ID_WAYS` (what
            :func:`~recsys_llm.data.tabular.raw_values.raw_value_ids` repeats for raw values at
            serving time); written by ``prepare tabular`` only, empty for the other sources.
    """

    name: str
    fields: List[FieldSpec]
    label: str = "label"
    row_key: Optional[str] = "row_id"
    splits: Dict[str, str] = dataclasses.field(default_factory=dict)
    extra_columns: List[str] = dataclasses.field(default_factory=list)
    root: str = "."
    ids: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # a config built in Python: a string was iterated letter by letter ("train" as splits t, r, a, i, n)
        for key in ("splits", "ids"):
            if not isinstance(getattr(self, key), Mapping):
                raise SchemaError(f"schema {self.name!r}: {key} must be a mapping, got {getattr(self, key)!r}")
        for key in ("fields", "extra_columns"):
            if isinstance(getattr(self, key), str):
                raise SchemaError(f"schema {self.name!r}: {key} must be a list, got the string {getattr(self, key)!r}")
        if isinstance(self.root, os.PathLike):  # a pathlib.Path, as os.path.join takes it
            self.root = os.fspath(self.root)
        for key in ("label", "root"):
            if not isinstance(getattr(self, key), str):
                raise SchemaError(f"schema {self.name!r}: {key} must be a string, got {getattr(self, key)!r}")
        if self.row_key is not None and not isinstance(self.row_key, str):
            raise SchemaError(f"schema {self.name!r}: row_key must be a column name or None, got {self.row_key!r}")
        for split in self.splits:
            check_split_name(split, f"schema {self.name!r}")
        names = [f.name for f in self.fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(f"schema {self.name!r}: duplicate field names {duplicates}")
        if self.label in names:
            raise SchemaError(f"schema {self.name!r}: the label {self.label!r} is also listed as an input field")
        repeated = sorted({c for c in self.extra_columns if self.extra_columns.count(c) > 1})
        if repeated:
            raise SchemaError(f"schema {self.name!r}: extra_columns lists {repeated} more than once; list each column once")
        listed_twice = [c for c in self.extra_columns if c in names or c == self.label]
        if listed_twice:
            raise SchemaError(
                f"schema {self.name!r}: extra_columns {listed_twice} are also fields or the label; an extra column "
                "is carried as it is, a field is encoded and the label read: list each column once"
            )
        categorical = {f.name: f for f in self.fields if f.is_categorical}
        for field, way in self.ids.items():
            if field not in categorical:
                raise SchemaError(f"schema {self.name!r}: ids names {field!r}, which is not a sparse or sequence field "
                                  f"of the schema ({sorted(categorical)})")
            if way not in ID_WAYS:
                raise SchemaError(f"schema {self.name!r}: ids.{field}: expected one of {list(ID_WAYS)}, got {way!r}")
            if way == "vocabulary" and not categorical[field].value_text:
                raise SchemaError(f"schema {self.name!r}: ids.{field} is vocabulary, but field {field!r} has no "
                                  "value_text, the file that holds its vocabulary")
            if way == "hashed_text" and not categorical[field].hashed:
                raise SchemaError(f"schema {self.name!r}: ids.{field} is hashed_text, but field {field!r} is not "
                                  "hashed (\"hashed\": true)")

    # ---- views -------------------------------------------------------------------------
    @property
    def categorical_fields(self) -> List[FieldSpec]:
        return [f for f in self.fields if f.is_categorical]

    @property
    def dense_fields(self) -> List[FieldSpec]:
        return [f for f in self.fields if f.kind == FieldKind.DENSE]

    @property
    def sparse_feature_names(self) -> List[str]:
        """Keys of the KeyedJaggedTensor, in order."""
        return [f.name for f in self.categorical_fields]

    @property
    def dense_feature_names(self) -> List[str]:
        return [f.name for f in self.dense_fields]

    def field(self, name: str) -> FieldSpec:
        """The field named ``name``; a :class:`SchemaError` listing the fields if there is none."""
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"schema {self.name!r} has no field {name!r}; fields: {[f.name for f in self.fields]}")

    def split_path(self, split: str) -> str:
        """The file or directory of ``split`` under the schema's root; a :class:`SchemaError` listing the splits if
        there is none."""
        if split not in self.splits:
            raise SchemaError(f"schema {self.name!r} has no split {split!r}; splits: {sorted(self.splits)}")
        return os.path.join(self.root, self.splits[split])

    def value_text_path(self, field_name: str) -> Optional[str]:
        """The id -> text Parquet file of ``field_name``, or None when the schema gives it none."""
        spec = self.field(field_name)
        return os.path.join(self.root, spec.value_text) if spec.value_text else None

    def load_value_text(self, field_name: str) -> Optional[pa.Table]:
        """Returns the id -> text table of a field (columns ``id``, ``text``), or None. A ``text``
        column of Arrow's ``string_view`` type comes back as ``string`` (pyarrow's filter and sort
        kernels do not take it); other types are the readers' to check."""
        path = self.value_text_path(field_name)
        if path is None:
            return None
        if not os.path.isfile(path):
            raise SchemaError(f"{path}: value-text file of field {field_name!r} not found (schema {self.root}, "
                              "field value_text); prepare the data again or fix the path")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise SchemaError(f"{path}: value-text file of field {field_name!r} is not a readable Parquet file "
                              f"({error})") from error
        missing = {"id", "text"} - set(table.column_names)
        if missing:
            raise SchemaError(f"{path}: value-text file of field {field_name!r} lacks columns {sorted(missing)}")
        is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16 has the type
        if is_string_view(table.column("text").type):
            table = table.set_column(table.column_names.index("text"), "text", table.column("text").cast(pa.string()))
        return table

    def vocabulary_records(self) -> Dict[str, Dict[str, Any]]:
        """Which value each id of a vocabulary field means: ``{field: {"ids": N, "digest": d}}``, ``d`` a digest of
        the ``N`` rows (``id``, ``text``) of its value-text file, for the fields ``ids`` records as ``vocabulary``
        whose file is there (in data without ``ids``, synthetic or MovieLens, every field with a value-text file).

        :meth:`fingerprint` leaves the vocabularies out (it covers sizes, not which value got which id), so data of
        the same source prepared afresh instead of ``--like`` keeps it while its ids mean other values (a value
        first seen on a later day sorts in between the earlier ones). Runs and exports record these
        (:meth:`changed_vocabularies` checks data against them).
        """
        records = {}
        for name in self._vocabulary_fields():
            table = self.load_value_text(name).sort_by("id")
            records[name] = {"ids": table.num_rows, "digest": _vocabulary_digest(table, table.num_rows)}
        return records

    def changed_vocabularies(self, recorded: Mapping[str, Any],
                             trained_on: Optional["DatasetSchema"] = None) -> List[str]:
        """The fields of ``recorded`` (:meth:`vocabulary_records` of the data a model trained on) whose recorded ids
        mean other values in this schema's vocabularies, or that hold fewer ids, or whose ids this schema records
        another way (``integer``: the same source prepared without ``--vocabulary``); and, where ``recorded`` holds
        some vocabulary, this schema's vocabulary fields it lacks (their ids were another way's: ``--vocabulary``
        now, not then). A vocabulary that grew (``prepare tabular --like --grow-vocabulary``) keeps its earlier ids
        and passes; a record that is no such mapping is left unchecked. A vocabulary of fewer ids (an earlier day's
        data, the model's grew since) passes where ``trained_on`` (the model's training data, or its artifact's
        ``ids/``) holds the recorded vocabulary and begins with this one."""
        ours = set(self._vocabulary_fields())
        changed = sorted(ours - set(recorded)) if recorded else []
        for name, record in sorted(recorded.items()):
            if not isinstance(record, dict) or not isinstance(record.get("ids"), int):
                continue
            if name not in ours:
                if self.ids.get(name, "vocabulary") != "vocabulary":
                    changed.append(name)
                continue
            table = self.load_value_text(name).sort_by("id")
            count = record["ids"]
            if table.num_rows < count:
                if not _begins_recorded_vocabulary(table, name, record, trained_on):
                    changed.append(name)
            elif _vocabulary_digest(table, count) != record.get("digest"):
                changed.append(name)
        return sorted(changed)

    def grown_vocabularies(self, recorded: Mapping[str, Any], model: str) -> List[str]:
        """One note per field of ``recorded`` (:meth:`vocabulary_records` of the data a model trained on) whose
        vocabulary here holds values added since (``--grow-vocabulary``): ``model`` never trained their rows."""
        notes = []
        for name in self._vocabulary_fields():
            record = recorded.get(name)
            if not isinstance(record, dict) or not isinstance(record.get("ids"), int):
                continue
            count, now = record["ids"], self.load_value_text(name).num_rows
            if now > count:
                notes.append(
                    f"{os.path.join(self.root, 'schema.json')}: the vocabulary of {name!r} holds {now - count} "
                    f"value{'s' * (now - count != 1)} "
                    f"(ids {count}..{now - 1}) added after {model} was trained (--grow-vocabulary); rows with them "
                    "read table rows it never trained (their initial weights, not id 0's): score them with a model "
                    "trained on such rows, or prepare them --like the training data without --grow-vocabulary "
                    "(id 0, unknown)")
        return notes

    def other_ids_cause(self, recorded: Optional[Mapping[str, Any]] = None) -> str:
        """For messages: how this data came to have ids that mean other values than a model's data of the same
        fingerprint (:meth:`changed_vocabularies` named them against ``recorded``, where given)."""
        shorter = [name for name, record in sorted((recorded or {}).items())
                   if isinstance(record, dict) and isinstance(record.get("ids"), int)
                   and name in self._vocabulary_fields() and self.load_value_text(name).num_rows < record["ids"]]
        if self.ids and shorter:
            return (f"the vocabulary of {shorter} here holds fewer ids than the model's, which grew since "
                    "(--grow-vocabulary): data prepared --like an earlier day's data, whose ids can be checked "
                    "against the model's only where its training data (or its artifact's ids/) is at hand and "
                    "begins with them; prepare it --like the model's own training data instead")
        if self.ids:
            return "data of the same source prepared afresh, not --like the training data"
        return "data generated or converted again otherwise: another seed, other rows or another source file"

    def same_ids_advice(self, training_data: str) -> str:
        """For messages: how to get rows into the ids of ``training_data`` (a directory, or a placeholder)."""
        if self.ids:
            return f"prepare the rows with `recsys-llm prepare tabular --input FILE --like {training_data} --out DIR`"
        return (f"use the data the model trained on ({training_data}), or data prepared as it was (the same source "
                "file, seed and rows)")

    def _vocabulary_fields(self) -> List[str]:
        """The fields whose value-text file is there and says which value each id means: those ``ids`` records as
        ``vocabulary`` (data of ``prepare tabular``); in data that records no ``ids`` (synthetic, MovieLens), every
        field with a value-text file (its texts are what its ids mean: the same source prepared again with another
        seed, or other rows, gives an id another item)."""
        if self.ids:
            names = [name for name, way in sorted(self.ids.items()) if way == "vocabulary"]
        else:
            names = sorted(field.name for field in self.fields if field.value_text)
        return [name for name in names
                if self.value_text_path(name) is not None and os.path.isfile(self.value_text_path(name))]

    def fingerprint(self) -> str:
        """Hash of everything a model or vector file depends on: field names, kinds, sizes, descriptions
        (a field-vector file, one vector per field, is checked against :meth:`semantic_fingerprint`).

        Where files live is left out (``value_text`` paths, splits), so copies of the data
        written elsewhere (``semantics export --attach-dir``, ``teacher-outputs``) keep the
        fingerprint and the vectors made for the original stay valid.
        """
        return _short_hash(self.fingerprinted())

    def fingerprinted(self) -> Dict[str, Any]:
        """What :meth:`fingerprint` hashes: ``{"fields": [field dicts without value_text], "label": ...}``.

        Vector files and runs record it beside the fingerprint, so a mismatch can name the fields
        that differ (:func:`~recsys_llm.data.schema_changes.schema_changes`).
        """
        fields = [{k: v for k, v in f.to_dict().items() if k != "value_text"} for f in self.fields]
        return {"fields": fields, "label": self.label}

    def semantic_fingerprint(self) -> str:
        """Hash of what one LLM vector per field depends on: each field's name, kind and description
        (:data:`SEMANTIC_FIELD_KEYS`), their order, and the label; not the sizes of the fields' tables.

        A schema whose item table grew (a daily retrain) keeps it, so its field vectors
        (``semantics encode``) stay valid; vectors of ids or rows depend on :meth:`fingerprint`.
        """
        return _short_hash(self.semantic_fingerprinted())

    def semantic_fingerprinted(self) -> Dict[str, Any]:
        """What :meth:`semantic_fingerprint` hashes: ``{"fields": [{name, kind, description}], "label": ...}``."""
        fields = [{k: v for k, v in f.to_dict().items() if k in SEMANTIC_FIELD_KEYS} for f in self.fields]
        return {"fields": fields, "label": self.label}

    # ---- io ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "row_key": self.row_key,
            "splits": dict(self.splits),
            "extra_columns": list(self.extra_columns),
            "fields": [f.to_dict() for f in self.fields],
            **({"ids": dict(self.ids)} if self.ids else {}),
        }

    def relocated(self, root: str, splits: Dict[str, str], extra_columns: Sequence[str] = ()) -> "DatasetSchema":
        """The schema of split copies written under ``root`` (e.g. with vectors attached).

        Args:
            root (str): directory of the new schema file.
            splits (Dict[str, str]): the copied splits, relative to ``root``; splits not
                named keep pointing at their original files.
            extra_columns (Sequence[str]): columns the copies add.
        """
        out = DatasetSchema.from_dict(self.to_dict(), root=root, source=f"{self.name} (relocated)")
        out.splits = {name: splits.get(name, os.path.relpath(self.split_path(name), root)) for name in self.splits}
        for spec in out.fields:
            if spec.value_text:
                object.__setattr__(spec, "value_text", os.path.relpath(os.path.join(self.root, spec.value_text), root))
        out.extra_columns += [c for c in extra_columns if c not in out.extra_columns]
        return out

    def save(self, path: str) -> None:
        """Writes the schema as JSON (atomically: a temp file renamed into place)."""
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], root: str = ".", source: str = "<dict>") -> "DatasetSchema":
        """Builds a schema from its parsed file, checking every key and value type.

        Args:
            raw (Dict[str, Any]): the parsed JSON/YAML mapping.
            root (str): directory of the schema file.
            source (str): how to name the file in messages.

        Raises:
            SchemaError: an unknown key, a value of the wrong type or range, naming ``source``,
                the key (and field) and what was expected.
        """
        if not isinstance(raw, dict) or "fields" not in raw:
            raise SchemaError(f"{source}: a schema must be a mapping with a 'fields' list")
        unknown = sorted((k for k in raw if k not in SCHEMA_KEYS), key=str)
        if unknown:
            hints = [f"{k!r} -> {m[0]!r}" for k in unknown for m in [difflib.get_close_matches(str(k), SCHEMA_KEYS, 1)] if m]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise SchemaError(f"{source}: unknown top-level keys {unknown}{hint}; allowed: {list(SCHEMA_KEYS)}")
        if not isinstance(raw["fields"], list):
            raise SchemaError(f"{source}: fields: expected a list of field mappings, got {_a(raw['fields'])}")
        allowed = {f.name for f in dataclasses.fields(FieldSpec)}
        fields = []
        for i, item in enumerate(raw["fields"]):
            if not isinstance(item, dict) or "name" not in item:
                raise SchemaError(f"{source}: fields[{i}] must be a mapping with a 'name'")
            unknown = set(item) - allowed
            if unknown:
                raise SchemaError(
                    f"{source}: field {item['name']!r} has unknown keys {sorted(unknown, key=str)}; allowed: {sorted(allowed)}"
                )
            try:
                fields.append(FieldSpec(**item))
            except SchemaError as error:
                raise SchemaError(f"{source}: {error}") from error
        splits = raw.get("splits", {})
        if not isinstance(splits, dict):
            raise SchemaError(
                f"{source}: splits={splits!r}: expected a mapping of split name -> file, e.g. "
                f"{{train: train.parquet, valid: valid.parquet, test: test.parquet}}; got {_a(splits)}"
            )
        for split, file in splits.items():
            _checked_str(split, source, "splits key")
            check_split_name(split, source)
            _checked_str(file, source, f"splits.{split}")
        extra_columns = raw.get("extra_columns", [])
        if not isinstance(extra_columns, list):
            raise SchemaError(f"{source}: extra_columns={extra_columns!r}: expected a list of column names, "
                              f"got {_a(extra_columns)}")
        for i, column in enumerate(extra_columns):
            _checked_str(column, source, f"extra_columns[{i}]")
        ids = raw.get("ids", {})
        if not isinstance(ids, dict):
            raise SchemaError(f"{source}: ids={ids!r}: expected a mapping of field name -> one of {list(ID_WAYS)}, "
                              f"got {_a(ids)}")
        try:
            return cls(
                name=_checked_str(raw.get("name", os.path.basename(root)), source, "name"),
                fields=fields,
                label=_checked_str(raw.get("label", "label"), source, "label"),
                row_key=_checked_str(raw.get("row_key", "row_id"), source, "row_key", optional=True),
                splits=dict(splits),
                extra_columns=list(extra_columns),
                root=root,
                ids=dict(ids),
            )
        except SchemaError as error:
            if str(error).startswith(source):
                raise
            raise SchemaError(f"{source}: {error}") from error

    @classmethod
    def load(cls, path: str) -> "DatasetSchema":
        """Reads a schema from JSON or YAML; ``path`` may also be the directory holding ``schema.json``."""
        path = schema_file(path)
        return cls.from_dict(load_raw(path), root=os.path.dirname(os.path.abspath(path)), source=path)


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one YAML mapping."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping, where PyYAML silently keeps
    the last value (``data: {batch_size: 512, batch_size: 1024}`` would train with 1024).

    Use as ``yaml.load(text, Loader=UniqueKeyLoader)``; raises :class:`DuplicateKeyError` naming
    the dotted key path (``data.batch_size``, ``fields[0].cardinality``) and both lines. A merge
    key (``<<: *defaults``) may still be overridden: that is what it is for.
    """

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._check_unique_keys(node, "", set())
        return self.construct_document(node)

    def _check_unique_keys(self, node: yaml.Node, where: str, visited: Set[int]) -> None:
        if id(node) in visited:  # an alias met again (or a recursive one)
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_unique_keys(item, f"{where}[{i}]", visited)
        elif isinstance(node, yaml.MappingNode):
            lines: Dict[Any, int] = {}
            for key_node, value_node in node.value:
                path = where  # a merge key's mapping is merged into this one
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    path = f"{where}.{key}" if where else str(key)
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        raise DuplicateKeyError(
                            f"key {path!r} is written twice, on line {lines[key]} and line {line}; expected each key "
                            "once in a mapping (YAML would silently keep the last value)"
                        )
                    lines[key] = line
                self._check_unique_keys(value_node, path, visited)


def _unique_json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: a mapping, refusing a key written twice (JSON keeps the last)."""
    seen: Set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is written twice in one object; expected each key once "
                             "(JSON would silently keep the last value)")
        seen.add(key)
    return dict(pairs)


def read_utf8_text(path: str, what: str, error_type: type = ValueError) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped).

    Raises:
        error_type: a byte that is not UTF-8, naming ``path``, the byte and its offset; ``what``
            names the file's role in the hint ("config", "schema").
    """
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise error_type(f"{path}: byte 0x{error.object[error.start:error.start + 1].hex()} at offset {error.start} "
                         f"is not UTF-8; expected a UTF-8 text file (save the {what} as UTF-8)") from error


def load_raw(path: str) -> Any:
    """The parsed content of a schema file (JSON, or YAML for ``.yaml``/``.yml``), not yet checked.

    Raises:
        SchemaError: a missing file, one that is not UTF-8 text or does not parse, or a key written
            twice in one mapping, naming the file.
    """
    if not os.path.exists(path):
        raise SchemaError(f"{path}: schema file not found")
    found = not_a_regular_file(path)
    if found is not None:  # a FIFO: a read would wait for good
        raise SchemaError(f"{path}: is {found}, not a schema file; expected a schema file (JSON or YAML)")
    with open(path, "rb") as handle:
        if handle.read(4) == b"PAR1":  # a data file where a schema was expected (--data / --schema / data.schema)
            raise SchemaError(f"{path}: a Parquet data file, not a schema; expected a schema file (JSON or YAML) or "
                              "the prepared data's directory holding schema.json (a Parquet file of rows is a --split)")
    text = read_utf8_text(path, "schema", SchemaError)
    try:
        if path.endswith((".yaml", ".yml")):
            return yaml.load(text, Loader=UniqueKeyLoader)
        return json.loads(text, object_pairs_hook=_unique_json_object)
    except Exception as error:  # json.JSONDecodeError / yaml.YAMLError / a repeated key
        raise SchemaError(f"{path}: not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}: "
                          f"{one_line(error)}") from error


def schema_beside(split_path: str) -> Optional[DatasetSchema]:
    """The schema of the prepared output a Parquet path given as a split belongs to: the ``schema.json`` in the
    directory itself, or beside the file; None where there is none (Parquet written otherwise)."""
    directory = split_path if os.path.isdir(split_path) else os.path.dirname(os.path.abspath(split_path))
    path = os.path.join(directory, "schema.json")
    return DatasetSchema.load(path) if os.path.isfile(path) else None


VOCABULARY_DIGEST_ROWS = 1 << 16  # value-text rows made Python objects at a time by _vocabulary_digest: all at once
# held about 230 bytes a value (2.3 GB for a vocabulary of 10^7) beside the table's own Arrow bytes


def _begins_recorded_vocabulary(table: pa.Table, name: str, record: Mapping[str, Any],
                                trained_on: Optional[DatasetSchema]) -> bool:
    """Whether ``table`` (a value-text table sorted by id, fewer rows than ``record`` counts) holds the first ids of
    field ``name``'s vocabulary that ``record`` describes, as ``trained_on`` holds it (checked against ``record``)."""
    if trained_on is None or name not in trained_on._vocabulary_fields():
        return False
    full = trained_on.load_value_text(name).sort_by("id")
    return (full.num_rows >= record["ids"] and _vocabulary_digest(full, record["ids"]) == record.get("digest")
            and _vocabulary_digest(full, table.num_rows) == _vocabulary_digest(table, table.num_rows))


def _vocabulary_digest(table: pa.Table, count: int) -> str:
    """A digest of the first ``count`` rows (``id``, ``text``) of a value-text table sorted by id, read
    :data:`VOCABULARY_DIGEST_ROWS` rows at a time (the same digest as one pass over all of them)."""
    digest = hashlib.sha256()
    count = min(count, table.num_rows)
    for start in range(0, count, VOCABULARY_DIGEST_ROWS):
        part = table.slice(start, min(VOCABULARY_DIGEST_ROWS, count - start))
        for value_id, text in zip(part.column("id").to_pylist(), part.column("text").to_pylist()):
            digest.update(f"{value_id}\t{text}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]
