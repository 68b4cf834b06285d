"""Quantized embedding communication (``sharding.qcomms``): settings, sharders, the planner's comm cost, and
training on 2 gloo ranks with FP16 / BF16 all-to-alls against FP32 ones."""

from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.train.config import ConfigError, load_config
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.plan_report import table_placements
from recsys_llm.train.qcomms import QCommsSettings, qcomm_codecs_registry, qcomm_sharders
from recsys_llm.train.sharding import build_optimizer, shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess

BATCH = 8  # rows per rank and step
NARROW, WIDE = 16, 256  # torchrec cuts column-wise shards of at least 128 columns: the wide table splits in two
TABLES = {"t_user": NARROW, "t_item": NARROW, "t_text": WIDE}
PLACEMENT = {"t_user": "table_wise", "t_item": "table_wise", "t_text": "column_wise"}
ROWS = 100
PRECISIONS = {"fp32": ("fp32", "fp32"), "fp16/bf16": ("fp16", "bf16"), "bf16/fp16": ("bf16", "fp16")}


class _PooledLogit(torch.nn.Module):
    """A logit from the concatenated pooled embeddings of three tables (two narrow, one wide)."""

    def __init__(self) -> None:
        super().__init__()
        configs = [EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=ROWS, feature_names=[name[2:]])
                   for name, dim in TABLES.items()]
        self.ebc = EmbeddingBagCollection(configs, device=torch.device("meta"))
        self.head = torch.nn.Linear(sum(TABLES.values()), 1)

    def forward(self, features: KeyedJaggedTensor, labels: torch.Tensor) -> torch.Tensor:
        pooled = self.ebc(features).values()  # (B, 288)
        return torch.nn.functional.binary_cross_entropy_with_logits(self.head(pooled).squeeze(-1), labels)


def _batch(rank: int, step: int) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
    """The seeded batch of ``rank`` at ``step``: 1-3 ids per bag of each feature, 0/1 labels."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    keys = [name[2:] for name in TABLES]
    lengths = torch.randint(1, 4, (len(keys) * BATCH,), generator=generator)
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator).float()
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths), labels


def _train(qcomms: QCommsSettings, steps: int, sparse: str) -> Dict[str, Any]:
    """``steps`` steps of :class:`_PooledLogit` sharded with ``qcomms``, its tables trained by ``sparse``: losses,
    placements, and the dtype and bytes of every float all-to-all message (pooled embeddings, their gradients)."""
    torch.manual_seed(0)
    sharding = ShardingConfig(table_constraints={t: {"sharding_types": [kind]} for t, kind in PLACEMENT.items()},
                              qcomms=qcomms)
    optim = OptimizerConfig(sparse=sparse, sparse_lr=0.01, dense="sgd", dense_lr=0.01)
    planned_with: List[str] = []  # the forward dtype of the EBC sharder the planner was given
    plan_with = EmbeddingShardingPlanner.plan

    def recording(planner: EmbeddingShardingPlanner, module: torch.nn.Module, sharders: List[Any]) -> Any:
        registry = next(s for s in sharders if type(s) is EmbeddingBagCollectionSharder).qcomm_codecs_registry
        planned_with.append(str(registry["POOLED_EMBEDDINGS_ALL_TO_ALL"].forward.quantized_dtype) if registry else "")
        return plan_with(planner, module, sharders)

    EmbeddingShardingPlanner.plan = recording  # type: ignore[method-assign]
    try:
        model, plan = shard_model(_PooledLogit(), torch.device("cpu"), dist.get_world_size(), sharding, optim,
                                  batch_size=BATCH)
    finally:
        EmbeddingShardingPlanner.plan = plan_with  # type: ignore[method-assign]
    optimizer = build_optimizer(model, optim)
    messages: List[Tuple[str, int]] = []
    send = dist.all_to_all_single

    def counting(*args: Any, **kwargs: Any) -> Any:  # torchrec's comm_ops call torch.distributed's
        tensor = kwargs["input"] if "input" in kwargs else args[1]
        if tensor.is_floating_point():  # the pooled embeddings and their gradients, not the ids
            messages.append((str(tensor.dtype).replace("torch.", ""), tensor.numel() * tensor.element_size()))
        return send(*args, **kwargs)

    losses = []
    dist.all_to_all_single = counting
    try:
        for step in range(steps):
            features, labels = _batch(dist.get_rank(), step)
            loss = model(features, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        dist.all_to_all_single = send
    placements = {t: (p["sharding_type"], sorted(s["rank"] for s in p["shards"]))
                  for t, p in table_placements(plan).items()}
    return {"losses": losses, "placements": placements, "messages": messages, "planned_with": planned_with}


def _train_in_each_precision(steps: int) -> Dict[str, Dict[str, Dict[str, Any]]]:
    init_distributed("cpu")
    return {sparse: {name: _train(QCommsSettings(*precisions), steps, sparse)
                     for name, precisions in PRECISIONS.items()}
            for sparse in ("sgd", "row_wise_adagrad")}


@pytest.mark.multiprocess
def test_two_ranks_train_with_fp16_and_bf16_comms_as_with_fp32_sending_half_the_bytes() -> None:
    """Tables split over both ranks (one table-wise table on each, a 256-wide one column-wise in two), 5 steps:
    the float messages under FP16-forward / BF16-backward and BF16 / FP16 are those dtypes and half FP32's bytes,
    and the losses differ from FP32's (the codecs ran) by little: at most 1e-4 with SGD tables. Row-wise Adagrad
    tables move further, within 1e-2: its first updates are near ``lr * sign(g)``, and where a row's gradient, a
    sum over the bags that hold it, nearly cancels, an 8-bit-mantissa (BF16) rounding of the terms can flip its
    sign (FP16 forward with FP32 backward stayed within 1e-4 there too)."""
    tolerance = {"sgd": 1e-4, "row_wise_adagrad": 1e-2}
    results = run_multiprocess(_train_in_each_precision, world_size=2, steps=5)
    for rank, sparse, runs in [(rank, sparse, runs) for rank, result in enumerate(results)
                               for sparse, runs in result.items()]:
        exact = runs["fp32"]
        placements = exact["placements"]
        assert {t: kind for t, (kind, _) in placements.items()} == PLACEMENT
        assert {r for t in ("t_user", "t_item") for r in placements[t][1]} == {0, 1}, placements  # on both ranks
        assert placements["t_text"][1] == [0, 1], placements  # column shards on both ranks
        assert {dtype for dtype, _ in exact["messages"]} == {"float32"}
        assert exact["planned_with"] == ([""] if rank == 0 else [])
        for name, forward in (("fp16/bf16", "torch.float16"), ("bf16/fp16", "torch.bfloat16")):
            run = runs[name]
            assert run["placements"] == placements  # the same plan: the losses compare
            assert {dtype for dtype, _ in run["messages"]} == {"float16", "bfloat16"}
            # the planner (rank 0's) was given the sharders DMP shards with
            assert run["planned_with"] == ([forward] if rank == 0 else [])
            assert [size * 2 for _, size in run["messages"]] == [size for _, size in exact["messages"]]
            assert run["losses"] == pytest.approx(exact["losses"], abs=tolerance[sparse]), (rank, sparse, name)
            assert run["losses"] != exact["losses"], "the messages were not quantized"


def _comm_estimates(qcomms: QCommsSettings, world_size: int) -> Dict[str, Tuple[float, float]]:
    """The planner's forward and backward communication estimate of each table's table-wise option."""
    model = _PooledLogit()
    topology = Topology(world_size=world_size, compute_device="cpu")
    constraints = {t: ParameterConstraints(sharding_types=["table_wise"]) for t in TABLES}
    enumerator = EmbeddingEnumerator(topology, BATCH, constraints, estimator=EmbeddingPerfEstimator(topology))
    options = enumerator.enumerate(model, qcomm_sharders(qcomms, world_size))
    return {option.name: (option.shards[0].perf.fwd_comms, option.shards[0].perf.bwd_comms) for option in options}


def test_the_planner_prices_fp16_and_bf16_comms_at_half_of_fp32() -> None:
    """The planner is given the sharders DMP shards with, so its cost model sees the narrower messages."""
    exact = _comm_estimates(QCommsSettings(), 2)
    assert all(fwd > 0 and bwd > 0 for fwd, bwd in exact.values()), exact
    for table, (fwd, bwd) in _comm_estimates(QCommsSettings("fp16", "bf16"), 2).items():
        assert (fwd, bwd) == pytest.approx((exact[table][0] / 2, exact[table][1] / 2), rel=1e-6), table


def test_fp32_or_one_rank_sends_plain_float32() -> None:
    """No codec where nothing is quantized or one rank sends nothing; the embedding sharders carry the codecs."""
    assert qcomm_codecs_registry(QCommsSettings(), 2) is None
    assert qcomm_codecs_registry(QCommsSettings("fp16", "bf16"), 1) is None
    registry = qcomm_codecs_registry(QCommsSettings("fp16", "bf16"), 2)
    assert registry is not None
    pair = registry["POOLED_EMBEDDINGS_ALL_TO_ALL"]
    assert (pair.forward.quantized_dtype, pair.backward.quantized_dtype) == (torch.float16, torch.bfloat16)
    sharders = {type(s).__name__: s.qcomm_codecs_registry for s in qcomm_sharders(QCommsSettings("bf16"), 2)}
    assert sharders["EmbeddingBagCollectionSharder"]["POOLED_EMBEDDINGS_ALL_TO_ALL"].forward.quantized_dtype \
        == torch.bfloat16


def test_every_embedding_collective_and_sharder_carries_the_codecs() -> None:
    """Row-wise tables reduce-scatter their pooled embeddings, EmbeddingCollections (sequence embeddings) and
    feature-processed EBCs have sharders of their own: each gets the codecs (CUDA plans, or models, the CPU tests'
    table-wise and column-wise EBCs do not reach); the other default sharders stay torchrec's."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import get_default_sharders

    registry = qcomm_codecs_registry(QCommsSettings("bf16", "fp16"), 2)
    assert registry is not None
    assert set(registry) == {"POOLED_EMBEDDINGS_ALL_TO_ALL", "POOLED_EMBEDDINGS_REDUCE_SCATTER",
                             "SEQUENCE_EMBEDDINGS_ALL_TO_ALL"}
    assert all((pair.forward.quantized_dtype, pair.backward.quantized_dtype) == (torch.bfloat16, torch.float16)
               for pair in registry.values())
    # either direction alone quantizes: float32 pooled embeddings forward, bf16 gradients back
    backward_only = qcomm_codecs_registry(QCommsSettings("fp32", "bf16"), 2)
    assert backward_only is not None and QCommsSettings("fp32", "bf16").quantized
    pair = backward_only["POOLED_EMBEDDINGS_ALL_TO_ALL"]
    assert (pair.forward.quantized_dtype, pair.backward.quantized_dtype) == (torch.float32, torch.bfloat16)
    sharders = qcomm_sharders(QCommsSettings("bf16", "fp16"), 2)
    assert [type(s) for s in sharders] == [type(s) for s in get_default_sharders()]
    quantized = (EmbeddingBagCollectionSharder, FeatureProcessedEmbeddingBagCollectionSharder,
                 EmbeddingCollectionSharder)
    for sharder in sharders:
        codecs = getattr(sharder, "qcomm_codecs_registry", None) or {}
        dtypes = {op: (pair.forward.quantized_dtype, pair.backward.quantized_dtype) for op, pair in codecs.items()}
        expected = {op: (torch.bfloat16, torch.float16) for op in registry} if type(sharder) in quantized else {}
        assert dtypes == expected, type(sharder).__name__


@pytest.mark.parametrize("override, message", [
    ("sharding.qcomms.forward_precision=fp8", r"sharding\.qcomms\.forward_precision must be one of .*got 'fp8'"),
    ("sharding.qcomms.backward_precision=FP16", r"sharding\.qcomms\.backward_precision must be one of .*'FP16'"),
    ("sharding.qcomms.backward=bf16", r"sharding\.qcomms: unknown keys \['backward'\]"),
])
def test_bad_settings_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_resume_keeps_the_comms_precision_of_its_run(tmp_path) -> None:
    """The planner prices the narrower messages, so another precision could plan a table otherwise (replicated then,
    sharded now), whose checkpoint would not load; and a bf16 backward changes what trains: a resume keeps the
    run's own, and a run saved before the setting (no ``sharding.qcomms`` in its config.yaml) resumes under
    float32 messages, as it trained."""
    import yaml

    from recsys_llm.train.config import check_resumable, save_config

    path = str(tmp_path / "config.yaml")
    save_config(load_config(None, ["model.name=fm", "train.run_dir=r"]), path)
    with pytest.raises(ConfigError, match=r"sharding\.qcomms\.backward_precision: 'fp32' -> 'bf16'"):
        check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r",
                                           "sharding.qcomms.backward_precision=bf16"]), path)
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    del raw["sharding"]["qcomms"]  # as runs saved it before the setting
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(raw, handle)
    assert load_config(path).sharding.qcomms == QCommsSettings()
    check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r"]), path)
