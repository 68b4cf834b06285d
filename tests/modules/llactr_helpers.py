"""Small real TorchRec pieces shared by the FRE / FIE / LLaCTR tests."""

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.models.base import CTRBackbone, stack_fields

FEATURES = ["user_id", "item_id", "genre"]


def make_ebc(dim: int = 8, features: List[str] = FEATURES) -> EmbeddingBagCollection:
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=20, feature_names=[f]) for f in features]
    return EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))


def make_kjt(batch_size: int = 4, features: List[str] = FEATURES, seed: int = 0) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.ones(batch_size * len(features), dtype=torch.int32)
    lengths[1] = 2  # one multi-hot bag
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=generator)
    return KeyedJaggedTensor.from_lengths_sync(keys=features, values=values, lengths=lengths)


class LinearBackbone(CTRBackbone):
    """Logistic regression over the concatenated field embeddings and dense features."""

    def __init__(self, ebc: EmbeddingBagCollection, num_dense_features: int) -> None:
        super().__init__(ebc, num_dense_features)
        self._representation_dim = len(self.feature_names) * self.embedding_dim + num_dense_features
        self.head = nn.Linear(self._representation_dim, 1)

    @property
    def representation_dim(self) -> int:
        return self._representation_dim

    def interact(self, dense_features: torch.Tensor, embeddings: KeyedTensor,
                 extra_fields: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F, D)
        representation = torch.cat([fields.flatten(1), dense_features], dim=1)  # (B, F*D + Dd)
        return self.head(representation).squeeze(-1), representation
