"""The vectors of a data set's splits: their rows read a row group at a time (:class:`SplitRows`), the keys and
texts an export covers (a row's, or an entity's: a user's or an item's), and the export itself
(:func:`export_schema_vectors`, what ``recsys-llm semantics export`` runs) through
:class:`~recsys_llm.semantics.vector_export.VectorExport`."""

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from recsys_llm.data.parquet_files import resolve_paths
from recsys_llm.data.schema import DatasetSchema, FieldKind, schema_beside
from recsys_llm.semantics.entity_reuse import reused_from_record, reused_vectors
from recsys_llm.semantics.row_text import RowTextRenderer, check_entity_fields
from recsys_llm.semantics.vector_export import (
    REUSED_KEY,
    VectorExport,
    VectorExportConfig,
    check_export_dir,
    keys_sha256,
    load_manifest,
    manifest_path,
)


GRANULARITIES = ("row", "entity")


class SplitRows:
    """The rows of ``splits`` (their files sorted, then row groups, in order), read a range at a time.

    Only the footers are read up front; :meth:`column` reads one column of every row (the
    keys of a row export: 8 bytes per row), :meth:`rows` the ``columns`` of rows
    ``[start, stop)`` alone, and :meth:`first_rows` the first row of each entity, a row
    group at a time: no rank holds the splits' text columns, only what it renders.

    Args:
        schema (DatasetSchema): the data set.
        splits (Sequence[str]): split names, in order.
        columns (Sequence[str]): the columns :meth:`rows` reads.
        purpose (str): what the columns are for, in the error of a file without them.

    Raises:
        ValueError: a file lacks one of ``columns`` (naming the file, the columns and
            ``purpose``), or stores a column with another type than the first file (naming
            both files, the column and both types), or no split is given.
    """

    def __init__(self, schema: DatasetSchema, splits: Sequence[str], columns: Sequence[str], purpose: str) -> None:
        self._files = [path for split in splits for path in resolve_paths(schema, split)]
        if not self._files:
            raise ValueError(f"schema {schema.name!r}: no split to read (splits {sorted(schema.splits)})")
        self._columns = list(columns)
        first: Optional[pa.Schema] = None
        groups: List[Tuple[int, int]] = []  # (file, row group) in row order
        sizes: List[int] = []
        for index, path in enumerate(self._files):
            handle = pq.ParquetFile(path)
            available = handle.schema_arrow.names
            missing = [c for c in self._columns if c not in available]
            if missing:
                raise ValueError(f"{path}: no column(s) {missing} for {purpose}; its columns are {available}")
            types = pa.schema([handle.schema_arrow.field(c) for c in self._columns])
            if first is None:
                first = types
            for field, want in zip(types, first.types):
                if not field.type.equals(want):
                    raise ValueError(
                        f"{path}: column {field.name!r} is {field.type}, but {self._files[0]} has it as {want}; every "
                        f"split must store a column with one type (write it as {want})"
                    )
            for group in range(handle.num_row_groups):
                groups.append((index, group))
                sizes.append(handle.metadata.row_group(group).num_rows)
        assert first is not None
        # splits re-saved by other tools may differ in nullability only: every column is read as nullable
        self._schema = pa.schema([field.with_nullable(True) for field in first])
        self._groups = groups
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # (G + 1,)
        self._decoded: Optional[Tuple[int, pa.Table]] = None  # the last row group read: (its index, its columns)
        self._opened: Optional[Tuple[int, pq.ParquetFile]] = None  # the file it came from: (its index, it open)

    @property
    def num_rows(self) -> int:
        """Rows of all the splits together."""
        return int(self._starts[-1])

    def column(self, name: str) -> pa.ChunkedArray:
        """Column ``name`` (one of ``columns``) of every row, in row order."""
        chunks = [pq.read_table(path, columns=[name]).column(name).cast(self._schema.field(name).type)
                  for path in self._files]
        return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=self._schema.field(name).type)

    def rows(self, start: int, stop: int) -> pa.Table:
        """The ``columns`` of rows ``[start, stop)``: only the row groups they lie in are read,
        and the last one read is kept, so ranges read in order decode each row group once."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        group = max(first, 0)
        while group < len(self._groups) and self._starts[group] < stop:
            table = self._row_group(group)
            begin = max(start - int(self._starts[group]), 0)
            end = min(stop - int(self._starts[group]), table.num_rows)
            pieces.append(table.slice(begin, end - begin))
            group += 1
        return pa.concat_tables(pieces) if pieces else self._schema.empty_table()

    def take(self, indices: np.ndarray) -> pa.Table:
        """The ``columns`` of the rows at ``indices`` ((n,), sorted ascending), in that order: only the row
        groups holding one are read, each once."""
        groups = np.searchsorted(self._starts, indices, side="right") - 1  # (n,) ascending
        touched, first = np.unique(groups, return_index=True)
        pieces = [self._row_group(int(group)).take(pa.array(rows - self._starts[group]))
                  for group, rows in zip(touched, np.split(indices, first[1:]))]
        return pa.concat_tables(pieces) if pieces else self._schema.empty_table()

    def _row_group(self, group: int) -> pa.Table:
        """The ``columns`` of row group ``group`` (an index of ``self._groups``), cast to the
        splits' schema: read, or the last one read."""
        if self._decoded is None or self._decoded[0] != group:
            file, index = self._groups[group]
            if self._opened is None or self._opened[0] != file:  # its footer is parsed once for its row groups
                self._opened = (file, pq.ParquetFile(self._files[file]))
            self._decoded = (group, self._opened[1].read_row_group(index, columns=self._columns).cast(self._schema))
        return self._decoded[1]

    def first_rows(self, key: str) -> pa.Table:
        """The ``columns`` of the first row (in row order) of every distinct non-null id of
        ``key``, in the order the ids first appear.

        Reads one row group at a time: memory grows with the distinct ids (their first rows,
        and one byte per id up to the largest), not with the rows.

        Raises:
            ValueError: a negative id, naming the file and the column.
        """
        seen = np.zeros(0, dtype=bool)
        pieces = []
        for path in self._files:
            handle = pq.ParquetFile(path)
            for group in range(handle.num_row_groups):
                table = handle.read_row_group(group, columns=self._columns).cast(self._schema)
                column = table.column(key)
                rows = np.flatnonzero(pc.is_valid(column).to_numpy(zero_copy_only=False))
                ids = pc.drop_null(column).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                distinct, first = np.unique(ids, return_index=True)  # (U,) sorted, where each is first in the group
                if len(distinct) and distinct[0] < 0:
                    raise ValueError(f"{path}: column {key!r} holds the negative id {distinct[0]}; ids are >= 0")
                if len(distinct) and distinct[-1] >= len(seen):
                    seen = np.concatenate([seen, np.zeros(max(int(distinct[-1]) + 1, 2 * len(seen)) - len(seen), bool)])
                new = ~seen[distinct]
                seen[distinct[new]] = True
                pieces.append(table.take(np.sort(rows[first[new]])))
        return pa.concat_tables(pieces) if pieces else self._schema.empty_table()


def _check_prepared_like(schema: DatasetSchema, path: str) -> None:
    """Raises ValueError when the Parquet ``path`` belongs to a prepared output (a ``schema.json`` beside it) whose
    ids mean other values than ``schema``'s: other fields or sizes, or vocabularies that are no prefix of
    ``schema``'s (prepared afresh instead of ``--like``); an earlier day prepared ``--like`` passes."""
    other = schema_beside(path)
    if other is None or os.path.abspath(other.root) == os.path.abspath(schema.root):
        return
    if other.fingerprint() != schema.fingerprint():
        changed = "its fields or sizes differ"
    else:
        fields = schema.changed_vocabularies(other.vocabulary_records())
        changed = f"the vocabulary of field(s) {fields} differs" if fields else ""
    if changed:
        raise ValueError(
            f"--splits {path}: prepared as {other.root} (schema {other.name!r}), and {changed} from {schema.root}'s, "
            f"so its ids would read other values' texts ({other.other_ids_cause()}); read only files of data whose "
            f"ids are this data's: {other.same_ids_advice(schema.root)}"
        )


def export_rows(
    schema: DatasetSchema,
    splits: Sequence[str],
    renderer: RowTextRenderer,
    granularity: str = "row",
    entity_field: Optional[str] = None,
    entity_fields: Optional[List[str]] = None,
) -> SplitRows:
    """The rows :func:`export_schema_vectors` reads, checked from the schema and the Parquet
    footers alone (no rows are read): the CLI calls it before the LLM loads.

    Args:
        schema (DatasetSchema): the data set.
        splits (Sequence[str]): splits to cover.
        renderer (RowTextRenderer): row/entity text (its fields are read for ``row``).
        granularity (str): ``row`` or ``entity``.
        entity_field (Optional[str]): the user or item field for ``entity``.
        entity_fields (Optional[List[str]]): fields written into an entity's text.

    Returns:
        SplitRows: the key and text columns of ``splits``.

    Raises:
        TypeError: ``splits`` is a single string.
        ValueError: an unknown granularity, a schema without a row key (``row``), a missing,
            non-sparse or hashed entity field or an entity text field the schema lacks or that is named
            twice (``entity``), a split that is neither a split of the schema nor a Parquet path, or a
            file without a column.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if isinstance(splits, str):  # iterated, "valid" would be the splits 'v', 'a', 'l', ...
        raise TypeError(f"splits must be a sequence of split names or Parquet paths, got the single string "
                        f"{splits!r}; pass [{splits!r}]")
    for split in splits:
        if split not in schema.splits:
            _check_prepared_like(schema, split)
    if granularity == "row":
        if schema.row_key is None:
            raise ValueError(f"schema {schema.name!r} has no row_key; per-row vectors need one")
        columns = list(dict.fromkeys([schema.row_key, *renderer.field_names]))
        return SplitRows(schema, splits, columns, "the row key / row text fields")
    if entity_field is None:
        raise ValueError("entity granularity needs entity_field (semantics export --entity-field), e.g. 'item_id'")
    kind = next((f.kind for f in schema.fields if f.name == entity_field), FieldKind.SPARSE)  # unknown: named below
    if kind != FieldKind.SPARSE:
        # a dense value is no id (its values were read as ids, truncated), a sequence holds several per row
        raise ValueError(
            f"entity field {entity_field!r} (semantics export --entity-field) is a {kind.value} field; entity "
            "vectors are keyed by the ids of a sparse field, one id per row (the user or item id, e.g. 'item_id'); "
            "its other fields go into the entity's text with --entity-fields"
        )
    if any(f.hashed for f in schema.fields if f.name == entity_field):
        # training refuses its entity table (elec.entity_tables), and its raw ids may reach 2**63
        raise ValueError(
            f"entity field {entity_field!r} (semantics export --entity-field) is hashed: its ids are folded modulo "
            "its cardinality, so one table row stands for several entities and no entity table holds one vector "
            "per id; export per-row vectors for it (--granularity row), or name a field that is not hashed"
        )
    check_entity_fields(entity_fields)
    for name in entity_fields or []:
        schema.field(name)  # a column that is no field (the label) has no description to write
    columns = list(dict.fromkeys([entity_field, *(entity_fields or [])]))
    return SplitRows(schema, splits, columns, "the entity field / entity text fields")


def splits_of_an_earlier_row_export(directory: str, schema: DatasetSchema, renderer: RowTextRenderer,
                                    granularity: str) -> Optional[List[str]]:
    """The schema's splits in sorted order when ``directory`` holds a row export of them read in that order
    (what ``semantics export`` read by default before 2026-12-05; the schema's own order since), else None:
    resumed in the schema's order, its finished chunks would hold other rows than this run's."""
    path = manifest_path(directory)
    in_schema_order, in_sorted_order = list(schema.splits), sorted(schema.splits)
    if granularity != "row" or in_sorted_order == in_schema_order or not os.path.isfile(path):
        return None
    made = load_manifest(path).get("keys_sha256")
    keys = {split: export_rows(schema, [split], renderer, "row").column(schema.row_key).to_numpy()
            for split in in_schema_order}  # each split's keys read once, for both orders

    def digest(splits: List[str]) -> str:
        return keys_sha256(np.concatenate([keys[split] for split in splits]))

    if made != digest(in_schema_order) and made == digest(in_sorted_order):
        return in_sorted_order
    return None


def export_schema_vectors(
    schema: DatasetSchema,
    splits: Sequence[str],
    renderer: RowTextRenderer,
    encode_fn: Callable[[List[str]], torch.Tensor],
    directory: str,
    provenance: Dict[str, str],
    config: VectorExportConfig,
    *,
    granularity: str = "row",
    entity_field: Optional[str] = None,
    entity_fields: Optional[List[str]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    progress: bool = True,
    reuse: Optional[str] = None,
) -> List[int]:
    """Exports row or entity vectors of a data set's splits (what the CLI runs).

    Args:
        schema (DatasetSchema): the data set.
        splits (Sequence[str]): splits to cover (entity export: all splits an id may appear in).
        renderer (RowTextRenderer): row/entity text.
        encode_fn (Callable[[List[str]], torch.Tensor]): texts -> (n, d), e.g. ``CTRAdaptedLLM.encode``.
        directory (str): output directory.
        provenance (Dict[str, str]): from the encoder; granularity, template and schema
            fingerprint are added.
        config (VectorExportConfig): chunking, dtype, projection.
        granularity (str): ``row`` (keyed by the schema's row key) or ``entity`` (keyed by
            ``entity_field`` ids).
        entity_field (Optional[str]): the user or item field for ``entity``.
        entity_fields (Optional[List[str]]): fields written into an entity's text.
        rank (Optional[int]): this rank (default torchrun's).
        world_size (Optional[int]): ranks (default torchrun's).
        progress (bool): tqdm bar.
        reuse (Optional[str]): an earlier entity export of the same LLM and settings whose vectors the ids it
            holds keep (:mod:`~recsys_llm.semantics.entity_reuse`): only the other ids are encoded.

    Returns:
        List[int]: chunks written by this rank.

    Raises:
        ValueError: ``reuse`` with row granularity, or as :func:`~recsys_llm.semantics.entity_reuse.reused_vectors`.
    """
    check_export_dir(directory)  # before the splits are read
    if reuse is not None and granularity != "entity":
        raise ValueError(f"--reuse {reuse}: only with --granularity entity (a day's rows are new: none to reuse)")
    rows = export_rows(schema, splits, renderer, granularity, entity_field, entity_fields)
    provenance = dict(provenance, granularity=granularity, template=renderer.config.fingerprint(),
                      schema=schema.fingerprint())
    if granularity == "row":
        keys = rows.column(schema.row_key)

        def texts(start: int, stop: int) -> List[str]:
            return renderer.render(rows.rows(start, stop)).to_pylist()

    else:
        provenance["entity_field"] = entity_field
        provenance["entity_fields"] = ",".join(entity_fields or [entity_field])
        vocabulary = schema.vocabulary_records().get(entity_field)
        if vocabulary is not None:  # which value each id meant: training checks its data still means it
            provenance["vocabulary"] = json.dumps(vocabulary, sort_keys=True)
        entities = renderer.entity_text(rows.first_rows(entity_field), entity_field, entity_fields)
        keys = entities.column("id")
        text_column = entities.column("text")

        def texts(start: int, stop: int) -> List[str]:
            return text_column.slice(start, stop - start).to_pylist()

    if reuse is not None:
        provenance[REUSED_KEY] = reused_from_record(reuse)
    export = VectorExport(directory, provenance, config)
    reused = reused_vectors(reuse, export.provenance, schema, str(entity_field)) if reuse is not None else None
    return export.run(keys, texts, encode_fn, rank=rank, world_size=world_size, progress=progress, reuse=reused)
