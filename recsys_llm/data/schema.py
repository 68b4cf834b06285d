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
import enum
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def schema_file(path: str) -> str:
    """``path`` itself, or ``path/schema.json`` when ``path`` is a data directory."""
    return os.path.join(path, "schema.json") if os.path.isdir(path) else path


class SchemaError(ValueError):
    """A schema file, or data that does not match its schema."""


class FieldKind(str, enum.Enum):
    SPARSE = "sparse"
    DENSE = "dense"
    SEQUENCE = "sequence"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One input field.

    Args:
        name (str): column name in the Parquet files and feature name in the KJT.
        kind (FieldKind): sparse (one id), sequence (list of ids) or dense (one float).
        cardinality (int): number of ids (embedding table rows) for sparse/sequence.
        hashed (bool): ids were hashed into ``[0, cardinality)``; readers then fold
            out-of-range ids with a modulo instead of rejecting them.
        description (str): human-readable meaning of the field, read by the LLM methods.
        value_text (Optional[str]): Parquet file (relative to the schema) mapping ids to text.
        max_length (int): sequences are truncated to this many ids.
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
        object.__setattr__(self, "kind", FieldKind(self.kind))
        if self.kind != FieldKind.DENSE and self.cardinality <= 0:
            raise SchemaError(f"field {self.name!r}: a {self.kind.value} field needs cardinality > 0, got {self.cardinality}")

    @property
    def is_categorical(self) -> bool:
        return self.kind in (FieldKind.SPARSE, FieldKind.SEQUENCE)

    def to_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, 0, False, "") or k == "name"}
        out["kind"] = self.kind.value
        return out


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
    """

    name: str
    fields: List[FieldSpec]
    label: str = "label"
    row_key: Optional[str] = "row_id"
    splits: Dict[str, str] = dataclasses.field(default_factory=dict)
    extra_columns: List[str] = dataclasses.field(default_factory=list)
    root: str = "."

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(f"schema {self.name!r}: duplicate field names {duplicates}")
        if self.label in names:
            raise SchemaError(f"schema {self.name!r}: the label {self.label!r} is also listed as an input field")

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
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"schema {self.name!r} has no field {name!r}; fields: {[f.name for f in self.fields]}")

    def split_path(self, split: str) -> str:
        if split not in self.splits:
            raise SchemaError(f"schema {self.name!r} has no split {split!r}; splits: {sorted(self.splits)}")
        return os.path.join(self.root, self.splits[split])

    def value_text_path(self, field_name: str) -> Optional[str]:
        spec = self.field(field_name)
        return os.path.join(self.root, spec.value_text) if spec.value_text else None

    def load_value_text(self, field_name: str) -> Optional[pa.Table]:
        """Returns the id -> text table of a field (columns ``id``, ``text``), or None."""
        path = self.value_text_path(field_name)
        if path is None:
            return None
        table = pq.read_table(path)
        missing = {"id", "text"} - set(table.column_names)
        if missing:
            raise SchemaError(f"{path}: value-text file of field {field_name!r} lacks columns {sorted(missing)}")
        return table

    def fingerprint(self) -> str:
        """Hash of everything a model or vector file depends on: field names, kinds, sizes, descriptions.

        Where files live is left out (``value_text`` paths, splits), so copies of the data
        written elsewhere (``semantics export --attach-dir``, ``teacher-outputs``) keep the
        fingerprint and the vectors made for the original stay valid.
        """
        fields = [{k: v for k, v in f.to_dict().items() if k != "value_text"} for f in self.fields]
        payload = json.dumps({"fields": fields, "label": self.label}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ---- io ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "row_key": self.row_key,
            "splits": dict(self.splits),
            "extra_columns": list(self.extra_columns),
            "fields": [f.to_dict() for f in self.fields],
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
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], root: str = ".", source: str = "<dict>") -> "DatasetSchema":
        if not isinstance(raw, dict) or "fields" not in raw:
            raise SchemaError(f"{source}: a schema must be a mapping with a 'fields' list")
        allowed = {f.name for f in dataclasses.fields(FieldSpec)}
        fields = []
        for i, item in enumerate(raw["fields"]):
            if not isinstance(item, dict) or "name" not in item:
                raise SchemaError(f"{source}: fields[{i}] must be a mapping with a 'name'")
            unknown = set(item) - allowed
            if unknown:
                raise SchemaError(f"{source}: field {item['name']!r} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            try:
                fields.append(FieldSpec(**item))
            except ValueError as error:
                raise SchemaError(f"{source}: field {item['name']!r}: {error}") from error
        return cls(
            name=raw.get("name", os.path.basename(root)),
            fields=fields,
            label=raw.get("label", "label"),
            row_key=raw.get("row_key", "row_id"),
            splits=dict(raw.get("splits", {})),
            extra_columns=list(raw.get("extra_columns", [])),
            root=root,
        )

    @classmethod
    def load(cls, path: str) -> "DatasetSchema":
        """Reads a schema from JSON or YAML; ``path`` may also be the directory holding ``schema.json``."""
        path = schema_file(path)
        if not os.path.exists(path):
            raise SchemaError(f"{path}: schema file not found")
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as error:  # json.JSONDecodeError / yaml.YAMLError
            raise SchemaError(f"{path}: not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}: {error}") from error
        return cls.from_dict(raw, root=os.path.dirname(os.path.abspath(path)), source=path)
