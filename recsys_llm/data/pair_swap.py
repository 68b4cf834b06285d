"""Swapped pairs: unlabeled rows for distillation, made by re-pairing the rows of a batch.

A student distilled on the training rows alone sees each user with only the few items the
user was shown. :class:`SwappedPairs` doubles every training batch: the first B rows are the
batch itself, the next B keep each row's user/context fields and take the *other side*
(e.g. the item fields) from elsewhere. The swapped rows have no label:
``extras[LABEL_WEIGHT_KEY]`` is 1 for the real rows and 0 for the swapped ones, so the BCE
terms skip them while the teacher's scores on them (score-level KD) teach the student how
the teacher ranks items the user never saw. The teacher must run on the swapped rows, so
this needs a teacher in the step (``joint`` or ``frozen`` mode), and its LLM vectors must
follow the swapped ids (``entity_table`` vectors; per-row vectors in ``extras`` cannot).

Where the other side comes from:

* another row of the same batch (default): one fixed permutation per batch size, drawn once
  from ``seed``, that leaves no row in place. The reader already shuffles rows into batches, so
  fixed positions still pair random rows;
* a catalogue (``catalog``): a Parquet file with one row per entity and a column per swap
  field, e.g. every item with its category, tags and price. Each batch draws B catalogue rows
  uniformly, so entities without any impression yet (cold items) are paired with users too.
  Draws are seeded by ``(seed, rank, epoch, batch index)``.

Either way a resumed run builds exactly the batches the uninterrupted one would have.

Example::

    swap = SwappedPairs(schema, ["item_id", "item_category", "item_tags", "item_price_log"])
    reader = ParquetBatchReader(schema, "train", 4096, shuffle=True, transform=swap)
    for batch in reader:  # swapped in the reader's prefetch thread, then pinned on CUDA
        ...  # 2B rows; labels and weights of rows B.. are 0
    # or over any iterable of batches: swap.over(batches, epoch)
"""

import dataclasses
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.row_chunks import categorical_column, dense_column
from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.seeding import seed_entropy
from recsys_llm.data.validation import DataError, check_column_type, check_no_nulls, open_parquet

LABEL_WEIGHT_KEY = "label_weight"


@dataclasses.dataclass
class SwapCatalog:
    """Entities to pair with, one row each, as tensors.

    Args:
        path (str): the Parquet file it was read from.
        num_rows (int): N entities.
        jagged (Dict[str, Tuple[torch.Tensor, torch.Tensor]]): per sparse / sequence field,
            ``(lengths (N,) int32, values (sum lengths,) int64)``.
        dense (torch.Tensor): (N, K) float32, the dense swap fields in their schema order.
    """

    path: str
    num_rows: int
    jagged: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    dense: torch.Tensor


def load_swap_catalog(path: str, schema: DatasetSchema, fields: Sequence[str]) -> SwapCatalog:
    """Reads and validates a catalogue: every field in ``fields`` must be a column of the
    field's kind, without nulls, with ids in the field's range (folded if hashed). Other
    columns are not read.

    Raises:
        DataError: a missing or unreadable file, a missing or mistyped column, a null, a bad id
            or a non-finite value, naming the file, column and row.
    """
    handle = open_parquet(path)
    names = [f.name for f in schema.fields if f.name in fields]
    missing = [name for name in names if name not in handle.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; the swap catalogue needs one column per swap field "
                        f"{list(fields)} (columns: {handle.schema_arrow.names})")
    for name in names:
        check_column_type(path, schema.field(name), handle.schema_arrow.field(name).type)
    table = handle.read(columns=names)
    if table.num_rows == 0:
        raise DataError(f"{path}: the swap catalogue has no rows")
    jagged: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    dense: List[np.ndarray] = []
    for name in names:
        spec = schema.field(name)
        array = table.column(name).combine_chunks()
        check_no_nulls(path, name, array, 0, "a value in every catalogue row")  # null tag lists too
        if spec.kind == FieldKind.DENSE:
            dense.append(dense_column(path, spec, array, 0))
            continue
        values, offsets = categorical_column(path, spec, array, 0)
        lengths = np.ones(table.num_rows, dtype=np.int64) if offsets is None else np.diff(offsets)
        jagged[name] = (torch.from_numpy(lengths.astype(np.int32)), torch.from_numpy(values.astype(np.int64)))
    stacked = np.stack(dense, axis=1) if dense else np.zeros((table.num_rows, 0), dtype=np.float32)
    return SwapCatalog(path, table.num_rows, jagged, torch.from_numpy(stacked))


def without_fixed_points(order: torch.Tensor) -> torch.Tensor:
    """``order`` (B,), a permutation, with no row left in place: rows with ``order[i] == i`` take each
    other's sources in a cycle, and a single such row swaps its source with the next row's. The other
    rows keep theirs. A one-row permutation is returned as it is (it has no other row)."""
    fixed = (order == torch.arange(len(order))).nonzero().flatten()  # (k,)
    if len(order) < 2 or not len(fixed):
        return order
    order = order.clone()
    if len(fixed) > 1:
        order[fixed] = fixed.roll(-1)
    else:
        row, neighbour = int(fixed[0]), (int(fixed[0]) + 1) % len(order)
        order[row], order[neighbour] = int(order[neighbour]), row
    return order


class SwappedPairs:
    """Appends B label-free rows whose ``swap_fields`` come from other rows or a catalogue.

    Args:
        schema (DatasetSchema): the data set; ``swap_fields`` are its field names.
        swap_fields (Sequence[str]): the fields that move together (one side of the pair,
            e.g. every item field); sparse, sequence and dense fields alike.
        seed (int): seed of the pairing.
        catalog (Optional[str]): Parquet file of entities to pair with (see the module
            docstring); None pairs rows of the same batch.
        rank (int): this process's rank: catalogue draws differ per rank, so the ranks of one
            step pair their users with different entities.

    Raises:
        ValueError: no field, an unknown field, or every sparse field (nothing would stay put).
        DataError: a bad catalogue.
    """

    def __init__(self, schema: DatasetSchema, swap_fields: Sequence[str], seed: int = 0,
                 catalog: Optional[str] = None, rank: int = 0) -> None:
        names = [field.name for field in schema.fields]
        unknown = [name for name in swap_fields if name not in names]
        if not swap_fields or unknown:
            raise ValueError(
                f"swapped pairs: swap_fields must name fields of the schema, got {list(swap_fields)} "
                f"(unknown: {unknown}); fields: {names}"
            )
        if set(swap_fields) >= {f.name for f in schema.fields if f.kind != FieldKind.DENSE}:
            raise ValueError(f"swapped pairs: swap_fields {list(swap_fields)} hold every sparse field; keep the "
                             "other side (e.g. the user fields) out of it")
        self._sparse: List[str] = [n for n in swap_fields if schema.field(n).kind != FieldKind.DENSE]
        dense_names = [f.name for f in schema.fields if f.kind == FieldKind.DENSE]
        self._dense_columns = torch.tensor(sorted(dense_names.index(n) for n in swap_fields if n in dense_names),
                                           dtype=torch.long)
        self._seed = int(seed)
        self._rank = int(rank)
        self._permutations: Dict[int, torch.Tensor] = {}
        self._catalog = load_swap_catalog(catalog, schema, swap_fields) if catalog else None
        self._catalog_on: Dict[torch.device, SwapCatalog] = {}

    @property
    def sparse_fields(self) -> List[str]:
        return list(self._sparse)

    @property
    def catalog(self) -> Optional[SwapCatalog]:
        return self._catalog

    def permutation(self, batch_size: int) -> torch.Tensor:
        """(B,) int64: swapped row i takes its ``swap_fields`` from real row ``permutation[i]``, another
        row than i (a one-row batch, which has no other, pairs its row with itself)."""
        if batch_size not in self._permutations:
            # torch takes seeds in [-2**63, 2**64) and reads a negative one modulo 2**64: taking this one
            # modulo 2**64 keeps the pairing of every seed that fitted and lets a large seed fit too
            generator = torch.Generator().manual_seed((self._seed * 1_000_003 + batch_size) % 2**64)
            self._permutations[batch_size] = without_fixed_points(torch.randperm(batch_size, generator=generator))
        return self._permutations[batch_size]

    def catalog_rows(self, batch_size: int, epoch: int, index: int) -> torch.Tensor:
        """(B,) int64: the catalogue rows the swapped rows of batch ``index`` of ``epoch`` take."""
        if self._catalog is None:
            raise ValueError("swapped pairs: no catalogue was given")
        seed = int(np.random.SeedSequence([seed_entropy(self._seed), self._rank, epoch, index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self._catalog.num_rows, (batch_size,), generator=generator)

    def _catalog_on_device(self, device: torch.device) -> SwapCatalog:
        """The catalogue's tensors on ``device``, copied once."""
        if device not in self._catalog_on:
            catalog = self._catalog
            self._catalog_on[device] = dataclasses.replace(
                catalog, dense=catalog.dense.to(device),
                jagged={key: (lengths.to(device), values.to(device)) for key, (lengths, values) in catalog.jagged.items()},
            )
        return self._catalog_on[device]

    def over(self, batches: Iterable[Batch], epoch: int = 0) -> Iterator[Batch]:
        """``batches`` with swapped rows appended, batch ``index`` seeded by ``(epoch, index)``."""
        for index, batch in enumerate(batches):
            yield self(batch, epoch, index)

    def __call__(self, batch: Batch, epoch: int = 0, index: int = 0) -> Batch:
        """
        Args:
            batch (Batch): B labeled rows.
            epoch (int): epoch of the batch (catalogue draws only).
            index (int): position of the batch in its epoch (catalogue draws only).

        Returns:
            Batch: 2B rows: ``batch``, then the swapped rows (label 0), with
            ``extras[LABEL_WEIGHT_KEY]`` (2B,) = 1 for real and 0 for swapped rows; the other
            extras are repeated as they are (an extra that describes the swapped side, such as
            ``is_cold_item``, then no longer fits the swapped rows: training reads none). Per-id
            weights of the KJT move with their ids.

        Raises:
            ValueError: the KJT carries per-id weights and the swapped side comes from a catalogue
                (which holds ids only), or the extras hold per-row vectors ((B, d): they would stay with the
                original rows).
        """
        row_vectors = sorted(key for key, value in batch.extras.items() if value.dim() > 1)
        if row_vectors:
            raise ValueError(
                f"swapped pairs: the batch carries per-row vectors in its extras {row_vectors} (B, d), which describe "
                "each row's own pair: a swapped row would carry the vector of the row it came from, and a teacher "
                "reading it would score the pair it never saw; swap rows whose LLM vectors come from entity tables "
                "(SemanticTable, elec.vector_source=entity_table), or leave those extras out of the batches"
            )
        size = batch.batch_size
        device = batch.labels.device
        features = batch.sparse_features.to_dict()
        weighted = batch.sparse_features.weights_or_none() is not None
        if self._catalog is None:
            rows = self.permutation(size).to(device)
            dense_source = batch.dense_features[:, self._dense_columns.to(device)]
            jagged_source = {key: (features[key].lengths(), features[key].values(), features[key].weights_or_none())
                             for key in self._sparse}
        else:
            if weighted:
                raise ValueError(
                    f"swapped pairs: the batch's sparse features carry per-id weights, but the catalogue "
                    f"{self._catalog.path} holds ids only, so the swapped rows' {self._sparse} would have none; pair "
                    "rows of the same batch (no catalogue), or leave the weights out"
                )
            rows = self.catalog_rows(size, epoch, index).to(device)
            catalog = self._catalog_on_device(device)
            dense_source = catalog.dense
            jagged_source = {key: (lengths, values, None) for key, (lengths, values) in catalog.jagged.items()}
        swapped_dense = batch.dense_features.clone()
        if self._dense_columns.numel():
            swapped_dense[:, self._dense_columns.to(device)] = dense_source[rows]
        doubled: Dict[str, JaggedTensor] = {}
        for key, jagged in features.items():
            lengths, values, weights = jagged.lengths(), jagged.values(), jagged.weights_or_none()
            if key in jagged_source:
                source_lengths, source_values, source_weights = jagged_source[key]
                # per-id weights (a weighted model's KJT) move with their ids
                swapped_lengths, swapped_values, swapped_weights = torch.ops.fbgemm.permute_1D_sparse_data(
                    rows.int(), source_lengths, source_values, source_weights, None
                )
                swapped_lengths = swapped_lengths.to(lengths.dtype)
                swapped_values = swapped_values.to(values.dtype)
            else:
                swapped_lengths, swapped_values, swapped_weights = lengths, values, weights
            doubled[key] = JaggedTensor(values=torch.cat([values, swapped_values]),
                                        lengths=torch.cat([lengths, swapped_lengths]),
                                        weights=torch.cat([weights, swapped_weights]) if weighted else None)
        weight = torch.cat([torch.ones_like(batch.labels), torch.zeros_like(batch.labels)])
        extras = {key: torch.cat([value, value]) for key, value in batch.extras.items()}
        extras[LABEL_WEIGHT_KEY] = weight
        return Batch(
            dense_features=torch.cat([batch.dense_features, swapped_dense]),
            sparse_features=KeyedJaggedTensor.from_jt_dict(doubled),
            labels=torch.cat([batch.labels, torch.zeros_like(batch.labels)]),
            extras=extras,
        )
