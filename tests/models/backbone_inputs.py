"""Tiny schema and inputs shared by the backbone tests, plus an explicit embedding lookup."""

from typing import Dict, List

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.schema import DatasetSchema, FieldSpec

# Ids per field and row (B = 4); "genres" is multi-hot and row 1 has none (MEAN of nothing = 0).
TINY_IDS: Dict[str, List[List[int]]] = {
    "user_id": [[1], [2], [3], [9]],
    "item_id": [[0], [5], [11], [7]],
    "genres": [[0, 1, 2], [], [3, 4], [1]],
}


def tiny_schema() -> DatasetSchema:
    return DatasetSchema(
        name="tiny",
        fields=[
            FieldSpec("user_id", "sparse", cardinality=10),
            FieldSpec("item_id", "sparse", cardinality=12),
            FieldSpec("genres", "sequence", cardinality=5, max_length=3),
            FieldSpec("age", "dense"),
            FieldSpec("income", "dense"),
        ],
    )


def make_kjt(ids: Dict[str, List[List[int]]]) -> KeyedJaggedTensor:
    """KJT from per-field, per-row id lists (keys in dict order)."""
    values = [i for rows in ids.values() for row in rows for i in row]
    lengths = [len(row) for rows in ids.values() for row in rows]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(ids), values=torch.tensor(values, dtype=torch.long), lengths=torch.tensor(lengths)
    )


def explicit_fields(ebc: torch.nn.Module, ids: Dict[str, List[List[int]]]) -> torch.Tensor:
    """(B, F, D) pooled embeddings looked up by hand: SUM for one id, MEAN for sequences."""
    rows = []
    for b in range(len(next(iter(ids.values())))):
        per_field = []
        for config in ebc.embedding_bag_configs():
            name = config.feature_names[0]
            weight = ebc.embedding_bags[config.name].weight
            picked = [weight[i] for i in ids[name][b]]
            if not picked:
                per_field.append(torch.zeros(config.embedding_dim))
            elif name == "genres":
                per_field.append(torch.stack(picked).mean(0))
            else:
                per_field.append(torch.stack(picked).sum(0))
        rows.append(torch.stack(per_field))
    return torch.stack(rows)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded N(0, 0.5) values for every parameter (zero-initialised terms then matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def explicit_mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ReLU(W x + b) through every Linear of ``module`` in order (eval mode: no dropout)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            x = torch.relu(x @ layer.weight.T + layer.bias)
    return x


def explicit_pairwise(fields: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B,) sum over i < j of weight[i, j] * <e_i, e_j>, by explicit loops."""
    batch, num_fields, _ = fields.shape
    out = torch.zeros(batch)
    for i in range(num_fields):
        for j in range(i + 1, num_fields):
            out = out + weight[i, j] * (fields[:, i] * fields[:, j]).sum(-1)
    return out


def explicit_first_order(model: torch.nn.Module, fields: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """(B,) b + sum_f <w_f, e_f> + sum_j u_j x_j from a model's ``first_order`` parameters."""
    first = model.first_order
    out = first.bias[0] + torch.einsum("bfd,fd->b", fields, first.field_weight)
    if first.dense_weight is not None:
        out = out + (dense * first.dense_weight).sum(-1)
    return out
