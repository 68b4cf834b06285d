"""Swapped pairs: unlabeled rows for distillation, made by re-pairing the rows of a batch.

A student distilled on the training rows alone sees each user with only the few items the
user was shown. :class:`SwappedPairs` doubles every training batch: the first B rows are the
batch itself, the next B keep each row's user/context fields and take the *other side*
(e.g. the item fields) from another row of the same batch. The swapped rows have no label:
``extras[LABEL_WEIGHT_KEY]`` is 1 for the real rows and 0 for the swapped ones, so the BCE
terms skip them while the teacher's scores on them (score-level KD) teach the student how
the teacher ranks items the user never saw. The teacher must run on the swapped rows, so
this needs a teacher in the step (``joint`` or ``frozen`` mode), and its LLM vectors must
follow the swapped ids (``entity_table`` vectors; per-row vectors in ``extras`` cannot).

The pairing is one fixed permutation per batch size, drawn once from ``seed``: the reader
already shuffles rows into batches, so fixed positions still pair random rows, and a resumed
run builds exactly the batches the uninterrupted one would have.

Example::

    swap = SwappedPairs(schema, ["item_id", "item_category", "item_tags", "item_price_log"])
    for batch in reader:
        batch = swap(batch)  # 2B rows; labels and weights of rows B.. are 0
"""

from typing import Dict, List, Sequence

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldKind

LABEL_WEIGHT_KEY = "label_weight"


class SwappedPairs:
    """Appends B label-free rows whose ``swap_fields`` come from other rows of the batch.

    Args:
        schema (DatasetSchema): the data set; ``swap_fields`` are its field names.
        swap_fields (Sequence[str]): the fields that move together (one side of the pair,
            e.g. every item field); sparse, sequence and dense fields alike.
        seed (int): seed of the pairing permutation.

    Raises:
        ValueError: no field, an unknown field, or every field (nothing would stay put).
    """

    def __init__(self, schema: DatasetSchema, swap_fields: Sequence[str], seed: int = 0) -> None:
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
        self._dense_columns = torch.tensor([dense_names.index(n) for n in swap_fields if n in dense_names],
                                           dtype=torch.long)
        self._seed = int(seed)
        self._permutations: Dict[int, torch.Tensor] = {}

    @property
    def sparse_fields(self) -> List[str]:
        return list(self._sparse)

    def permutation(self, batch_size: int) -> torch.Tensor:
        """(B,) int64: swapped row i takes its ``swap_fields`` from real row ``permutation[i]``."""
        if batch_size not in self._permutations:
            generator = torch.Generator().manual_seed(self._seed * 1_000_003 + batch_size)
            self._permutations[batch_size] = torch.randperm(batch_size, generator=generator)
        return self._permutations[batch_size]

    def __call__(self, batch: Batch) -> Batch:
        """
        Args:
            batch (Batch): B labeled rows.

        Returns:
            Batch: 2B rows: ``batch``, then the swapped rows (label 0), with
            ``extras[LABEL_WEIGHT_KEY]`` (2B,) = 1 for real and 0 for swapped rows; the other
            extras are repeated (they describe the row's untouched side).
        """
        size = batch.batch_size
        order = self.permutation(size).to(batch.labels.device)
        dense = batch.dense_features
        swapped_dense = dense.clone()
        if self._dense_columns.numel():
            columns = self._dense_columns.to(dense.device)
            swapped_dense[:, columns] = dense[order][:, columns]
        features = batch.sparse_features.to_dict()
        doubled: Dict[str, JaggedTensor] = {}
        for key, jagged in features.items():
            lengths, values = jagged.lengths(), jagged.values()
            if key in self._sparse:
                swapped_lengths, swapped_values, _ = torch.ops.fbgemm.permute_1D_sparse_data(
                    order.to(lengths.dtype), lengths, values, None, None
                )
            else:
                swapped_lengths, swapped_values = lengths, values
            doubled[key] = JaggedTensor(values=torch.cat([values, swapped_values]),
                                        lengths=torch.cat([lengths, swapped_lengths]))
        weight = torch.cat([torch.ones_like(batch.labels), torch.zeros_like(batch.labels)])
        extras = {key: torch.cat([value, value]) for key, value in batch.extras.items()}
        extras[LABEL_WEIGHT_KEY] = weight
        return Batch(
            dense_features=torch.cat([dense, swapped_dense]),
            sparse_features=KeyedJaggedTensor.from_jt_dict(doubled),
            labels=torch.cat([batch.labels, torch.zeros_like(batch.labels)]),
            extras=extras,
        )
