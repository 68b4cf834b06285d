"""Every backbone reads the pooled embeddings by name: a sharded EBC's key order (grouped by
sharding type, so set by the plan) leaves its logits and representation unchanged."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.models.registry import MODEL_NAMES, SMOKE_CONFIGS, build_backbone
from backbone_inputs import randomize


def _reordered(pooled: KeyedTensor) -> KeyedTensor:
    """The same pooled embeddings with the keys in reverse order."""
    by_name = pooled.to_dict()
    keys = list(reversed(pooled.keys()))
    return KeyedTensor.from_tensor_list(keys, [by_name[key] for key in keys])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_interact_does_not_depend_on_the_key_order(schema, kjt, dense, name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(SMOKE_CONFIGS[name], schema, num_extra_fields=1, device=torch.device("cpu"))
    randomize(model)
    model.eval()
    extra = torch.randn(4, 1, SMOKE_CONFIGS[name].embedding_dim, generator=torch.Generator().manual_seed(3))
    pooled = model.embedding_bag_collection(kjt)
    reordered = _reordered(pooled)
    assert reordered.keys() != pooled.keys()
    with torch.no_grad():
        logits, representation = model.interact(dense, pooled, extra)
        reordered_logits, reordered_representation = model.interact(dense, reordered, extra)
        torch.testing.assert_close(reordered_logits, logits)
        torch.testing.assert_close(reordered_representation, representation)
        if hasattr(model, "fold_pair_weights"):  # the serving path of FM, FwFM, DeepFM reads them by name too
            model.fold_pair_weights(torch.randn(3, 3, generator=torch.Generator().manual_seed(4)).triu(1))
            folded_logits, _ = model.interact(dense, pooled, extra)
            torch.testing.assert_close(model.interact(dense, reordered, extra)[0], folded_logits)
