"""Every registered backbone learns an easy synthetic signal (unsharded, plain Adam, seconds)."""

import time
from typing import Iterator, List, Tuple

import pytest
import torch
from torchrec.metrics.auc import compute_auc
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.registry import MODEL_NAMES, SMOKE_CONFIGS, build_backbone

NUM_USERS, NUM_ITEMS, NUM_TAGS = 40, 50, 6


def _schema() -> DatasetSchema:
    return DatasetSchema(
        name="signal",
        fields=[
            FieldSpec("user", "sparse", cardinality=NUM_USERS),
            FieldSpec("item", "sparse", cardinality=NUM_ITEMS),
            FieldSpec("tags", "sequence", cardinality=NUM_TAGS, max_length=3),
            FieldSpec("price", "dense"),
            FieldSpec("noise", "dense"),
        ],
    )


Batch = Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]


def _batches(rows: int, seed: int, batch_size: int) -> List[Batch]:
    """Click if item quality + user-item affinity + tag effect - price (+ noise) is high."""
    world = torch.Generator().manual_seed(1234)  # the same "world" for train and test
    item_quality = torch.randn(NUM_ITEMS, generator=world)
    user_taste, item_style = torch.randn(NUM_USERS, 2, generator=world), torch.randn(NUM_ITEMS, 2, generator=world)
    tag_effect = torch.randn(NUM_TAGS, generator=world)
    draw = torch.Generator().manual_seed(seed)
    users = torch.randint(NUM_USERS, (rows,), generator=draw)
    items = torch.randint(NUM_ITEMS, (rows,), generator=draw)
    tag_lengths = torch.randint(0, 4, (rows,), generator=draw)
    tags = torch.randint(NUM_TAGS, (rows, 3), generator=draw)
    tag_mask = torch.arange(3) < tag_lengths.unsqueeze(1)  # (rows, 3)
    tag_score = (tag_effect[tags] * tag_mask).sum(1) / tag_lengths.clamp(min=1)
    dense = torch.rand(rows, 2, generator=draw)
    score = (item_quality[items] + (user_taste[users] * item_style[items]).sum(-1) + 0.5 * tag_score
             - 2.0 * (dense[:, 0] - 0.5) + 0.5 * torch.randn(rows, generator=draw))
    labels = (score > score.median()).float()
    batches = []
    for start in range(0, rows, batch_size):
        part = slice(start, start + batch_size)
        size = labels[part].numel()
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item", "tags"],
            values=torch.cat([users[part], items[part], tags[part][tag_mask[part]]]),
            lengths=torch.cat([torch.ones(2 * size, dtype=torch.long), tag_lengths[part]]),
        )
        batches.append((dense[part], kjt, labels[part]))
    return batches


@pytest.fixture(scope="module")
def data() -> Tuple[List[Batch], Batch]:
    return _batches(8192, seed=1, batch_size=256), _batches(4096, seed=2, batch_size=4096)[0]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backbone_learns_synthetic_signal(name: str, data, one_thread) -> None:
    train, (dense, kjt, labels) = data
    torch.manual_seed(0)
    model = build_backbone(SMOKE_CONFIGS[name], _schema(), device=torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for epoch in range(10):  # 10 x 32 = 320 steps
        for dense, kjt, labels in train:
            optimizer.zero_grad()
            loss_fn(model(dense, kjt).logits, labels).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(dense, kjt).logits)
    auc = compute_auc(1, [scores.view(1, -1)], [labels.view(1, -1)], [torch.ones(1, labels.numel())]).item()
    elapsed = time.perf_counter() - start
    assert auc > 0.8, f"{name}: held-out AUC {auc:.3f} after 320 Adam steps ({elapsed:.1f}s)"
