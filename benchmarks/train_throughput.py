"""Training samples/s: the project's pipeline vs a minimal hand-written TorchRec loop.

Three contenders train the same model, torchrec's ``DLRM_DCN`` (26 tables x 100k rows x 16,
13 dense features, batch 4096, fused RowWiseAdagrad for tables, Adam for the dense part,
``TrainPipelineSparseDist``, ``DistributedModelParallel`` over 1 rank), side by side in one
process, measured in interleaved rounds whose order rotates (A B C, B C A, C A B, C B A, ...):

* ``torchrec_loop``: what a TorchRec user writes by hand (torchrec's ``dlrm_main`` recipe):
  ``DLRMTrain(DLRM_DCN)``, ``_apply_optimizer_in_backward``, planner, DMP,
  ``CombinedOptimizer``, ``TrainPipelineSparseDist.progress`` over prebuilt batches;
* ``project_memory``: the project's stack on the same prebuilt batches, built as the
  trainer builds it (``task_builder.build_task``: ``DLRMBackbone`` around an unmodified
  ``DLRM_DCN`` in a ``CTRTask``; ``sharding.shard_model`` / ``build_optimizer``) and trained
  by the project's loop (``recsys_llm.train.pipeline.train_epoch`` on ``TrainPipelineSparseDist``).
  Its dense Adam is torch's fused kernel (``fused=True``, which ``build_optimizer`` picks where
  torch has one), the hand-written loop's the recipe's plain ``torch.optim.Adam``: the ratio
  measures the two stacks as built, that choice included;
* ``project_parquet``: the same project stack fed by ``ParquetBatchReader`` streaming a
  Parquet file holding the same rows, read as the trainer reads its train split (shuffled,
  validated, background prefetch): end to end with decode, checks and KJT building.

Beside them, in the same rounds, ``parquet_reader_alone``: samples/s that reader yields with
no training at all. When ``project_parquet`` falls behind ``project_memory``, it tells a reader
that cannot keep up (close to ``project_parquet``) from one that competes with the loop for the
host's cores or Python's GIL (well above ``project_memory``). Two variants of the same reader
run in the same rounds too, each with its own copy of the model:

* ``project_parquet_deep_prefetch``: its prefetch thread may run a whole shuffle buffer of
  batches ahead (``prefetch`` = buffer rows / batch size + 2) instead of 2, so the burst of
  reading and shuffling the next buffer overlaps the steps of the current one;
* ``project_parquet_worker_process``: the reader in one ``torch.utils.data.DataLoader`` worker
  process (``batch_size=None, num_workers=1, pin_memory`` on CUDA), so its Python work does not
  hold the training process's GIL; batches come back through shared memory.

Figures (top level of the JSON):

* ``ratio_vs_torchrec_loop`` = project_memory / torchrec_loop samples/s (goal >= 0.95);
* ``ratio_parquet_vs_memory`` = project_parquet / project_memory samples/s;
* ``ratio_parquet_deep_prefetch_vs_memory``, ``ratio_parquet_worker_process_vs_memory``: the same
  for the two variants.

Each ratio is taken between the contenders' best rounds (``best_of_rounds_ratio``: on a
shared machine background load only slows a round down); per-round ratios and medians of
samples/s are in ``details``.

Usage::

    python benchmarks/train_throughput.py [--quick|--smoke] [--json PATH] [--plot PATH]
"""

import dataclasses
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

if TYPE_CHECKING:  # annotations only: torch is imported where it is first used
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RATIO_METHOD,
    best_of_rounds_ratio,
    device_synchronize,
    interleaved_repeats,
    median,
    parse_args,
    print_summary,
    ratio_bars,
    replot_json,
    result_payload,
    run_main,
    single_rank_context,
    timed_steps,
    two_panel_figure,
    value_bars,
    write_result,
)

NAME = "train_throughput"
LEARNING_RATES = {"sparse": 0.05, "dense": 1e-3}  # fused RowWiseAdagrad of the tables, Adam of the dense part
GOAL_RATIO_VS_TORCHREC_LOOP = 0.95


def _ratio_label(key: str) -> str:
    """A bar's label for a ``ratio_*`` figure of the JSON."""
    name = key[len("ratio_"):]
    if name == "vs_torchrec_loop":
        return "project\nvs torchrec loop"
    contender, baseline = name.split("_vs_")
    if contender != "parquet":  # a reader variant: parquet_deep_prefetch
        contender = contender.removeprefix("parquet_")
    return f"{contender.replace('_', ' ')}\nvs {baseline}"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem and measurement sizes of one mode.

    Args:
        num_tables (int): sparse fields, one table each.
        rows_per_table (int): rows of every table.
        embedding_dim (int): D.
        num_dense (int): dense features.
        batch_size (int): rows per batch.
        memory_batches (int): distinct prebuilt batches (cycled).
        parquet_batches (int): batches of rows in the Parquet file (cycled by epochs).
        warmup_steps (int): untimed steps before each measurement.
        measured_steps (int): timed steps per measurement.
        repeats (int): interleaved rounds.
        dense_arch (Sequence[int]): DLRM dense arch (ends in D).
        over_arch (Sequence[int]): DLRM over arch (ends in 1).
        dcn_num_layers (int): low-rank cross layers.
        dcn_low_rank_dim (int): rank of the cross layers.
    """

    num_tables: int = 26
    rows_per_table: int = 100_000
    embedding_dim: int = 16
    num_dense: int = 13
    batch_size: int = 4096
    memory_batches: int = 8
    parquet_batches: int = 32
    warmup_steps: int = 8
    measured_steps: int = 40
    repeats: int = 5
    dense_arch: Sequence[int] = (512, 256, 16)
    over_arch: Sequence[int] = (512, 256, 1)
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 16


SIZES: Dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(memory_batches=8, parquet_batches=48, warmup_steps=4, measured_steps=16, repeats=5),
    "smoke": Sizes(
        num_tables=4, rows_per_table=1000, embedding_dim=8, num_dense=3, batch_size=128, memory_batches=2,
        parquet_batches=3, warmup_steps=3, measured_steps=3, repeats=2, dense_arch=(16, 8), over_arch=(16, 1),
        dcn_num_layers=1, dcn_low_rank_dim=4,
    ),
}


# ---- data ---------------------------------------------------------------------------------------
def make_schema(sizes: Sizes):
    """The Criteo-like schema: ``dense_{i}`` float fields then ``cat_{i}`` sparse fields, no row key."""
    from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec

    fields = [FieldSpec(f"dense_{i}", FieldKind.DENSE) for i in range(sizes.num_dense)]
    fields += [FieldSpec(f"cat_{i}", FieldKind.SPARSE, cardinality=sizes.rows_per_table) for i in range(sizes.num_tables)]
    return DatasetSchema(name="dlrm_dcn_bench", fields=fields, label="label", row_key=None)


def make_batches(schema, sizes: Sizes, seed: int, pin_memory: bool = False) -> List:
    """``sizes.memory_batches`` random batches: dense U(0,1), one uniform id per field, 0/1 labels; in pinned
    memory with ``pin_memory`` (for a CUDA device)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_llm.data.batch import Batch

    generator = torch.Generator().manual_seed(seed)
    keys = schema.sparse_feature_names
    batch_size, num_keys = sizes.batch_size, len(keys)
    batches = []
    for _ in range(sizes.memory_batches):
        dense = torch.rand(batch_size, sizes.num_dense, generator=generator)  # (B, Dd)
        ids = torch.randint(0, sizes.rows_per_table, (num_keys, batch_size), generator=generator)  # (F, B)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=ids.reshape(-1), lengths=torch.ones(num_keys * batch_size, dtype=torch.int32)
        )
        labels = torch.randint(0, 2, (batch_size,), generator=generator).float()  # (B,)
        batches.append(Batch(dense, kjt, labels))
    return [batch.pin_memory() for batch in batches] if pin_memory else batches


def write_parquet(schema, batches: List, num_batches: int, path: str) -> str:
    """Writes ``num_batches`` batches' rows (cycling ``batches``) to one Parquet file."""
    import numpy as np

    from recsys_llm.data.parquet_writer import SplitWriter, arrow_schema_for

    batch_size = batches[0].labels.numel()
    with SplitWriter(path, arrow_schema_for(schema), row_group_size=8 * batch_size) as writer:
        for index in range(num_batches):
            batch = batches[index % len(batches)]
            columns: Dict[str, np.ndarray] = {}
            dense = batch.dense_features.numpy()
            for j, name in enumerate(schema.dense_feature_names):
                columns[name] = dense[:, j]
            by_key = batch.sparse_features.to_dict()
            for name in schema.sparse_feature_names:
                columns[name] = by_key[name].values().numpy()
            columns[schema.label] = batch.labels.numpy().astype(np.int8)
            writer.write(columns)
    return path


def parquet_stream(reader, worker_process: bool = False, pin_memory: bool = False) -> Iterator:
    """Endless batches from ``reader``, one epoch after the other; with ``worker_process``, read in
    one DataLoader worker process per epoch (``reader`` is then built with ``prefetch=0`` and
    ``pin_memory=False``: the DataLoader pins, in this process, when ``pin_memory``)."""
    import torch

    for epoch in itertools.count():
        reader.set_epoch(epoch)
        if worker_process:
            yield from torch.utils.data.DataLoader(reader, batch_size=None, num_workers=1, pin_memory=pin_memory)
        else:
            yield from reader


# ---- contenders ---------------------------------------------------------------------------------
def build_torchrec_loop(schema, sizes: Sizes, device, lr: Dict[str, float], batches: List) -> Callable[[], None]:
    """The hand-written TorchRec loop; returns its ``step()``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec import optim as trec_optim
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRM_DCN, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    tables = [
        EmbeddingBagConfig(name=f"t_{name}", embedding_dim=sizes.embedding_dim,
                           num_embeddings=sizes.rows_per_table, feature_names=[name])
        for name in schema.sparse_feature_names
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = DLRMTrain(DLRM_DCN(
        embedding_bag_collection=ebc,
        dense_in_features=sizes.num_dense,
        dense_arch_layer_sizes=list(sizes.dense_arch),
        over_arch_layer_sizes=list(sizes.over_arch),
        dcn_num_layers=sizes.dcn_num_layers,
        dcn_low_rank_dim=sizes.dcn_low_rank_dim,
        dense_device=device,
    ))
    _apply_optimizer_in_backward(
        trec_optim.RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": lr["sparse"], "eps": 1e-8}
    )
    planner = EmbeddingShardingPlanner(
        topology=TopologyFactory.create_topology(TrainerConfig(world_size=1, local_world_size=1),
                                                 kernel_config=KernelConfig(compute_device=device.type)),
        batch_size=sizes.batch_size,
    )
    plan = planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=device, plan=plan)
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=lr["dense"], eps=1e-8),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    iterator = itertools.cycle(batches)
    return lambda: pipeline.progress(iterator)


def project_config(sizes: Sizes, lr: Dict[str, float], embedding_dtype: str = "fp32"):
    """The ``ExperimentConfig`` of the project's ``DLRM_DCN`` run at ``sizes``: tables of ``model.embedding_dtype``
    ``embedding_dtype``, fused RowWiseAdagrad (tables) and Adam (dense) at ``lr``."""
    from recsys_llm.models.registry import ModelConfig
    from recsys_llm.train.config import DataConfig, ExperimentConfig
    from recsys_llm.train.sharding_config import OptimizerConfig

    return ExperimentConfig(
        data=DataConfig(batch_size=sizes.batch_size),
        model=ModelConfig(
            name="dlrm_dcn",
            embedding_dim=sizes.embedding_dim,
            mlp_layer_sizes=tuple(sizes.over_arch[:-1]),
            dense_arch_hidden=tuple(sizes.dense_arch[:-1]),
            cross_layers=sizes.dcn_num_layers,
            low_rank=sizes.dcn_low_rank_dim,
            embedding_dtype=embedding_dtype,
        ),
        optim=OptimizerConfig(sparse="row_wise_adagrad", sparse_lr=lr["sparse"], dense="adam", dense_lr=lr["dense"]),
    )


def build_project_model(schema, sizes: Sizes, device, lr: Dict[str, float], embedding_dtype: str = "fp32"):
    """The project's stack exactly as ``recsys_llm.train.runner.run_training`` builds it:
    ``build_task`` (``CTRTask`` around ``DLRMBackbone(DLRM_DCN)``), ``shard_model``,
    ``build_optimizer``; tables of ``model.embedding_dtype`` ``embedding_dtype`` (:func:`project_config`).
    Returns ``(model, optimizer)``."""
    from recsys_llm.train.task_builder import build_task
    from recsys_llm.train.sharding import build_optimizer, shard_model

    config = project_config(sizes, lr, embedding_dtype)
    task = build_task(config, schema, device).task
    model, _plan = shard_model(task, device, 1, config.sharding, config.optim, config.data.batch_size)
    return model, build_optimizer(model, config.optim)


class ProjectLoop:
    """Measures the project's training loop, ``recsys_llm.train.pipeline.train_epoch``, as is.

    Each measurement is one ``train_epoch`` call (a fresh ``TrainPipelineSparseDist``, as
    every epoch of the trainer gets) whose ``on_step`` callback starts the clock after
    ``warmup_steps`` steps and stops the epoch after ``measured_steps`` more: the figure is
    the loop's steady state, with its per-step work (loss read-back, progress bar, sample
    counting) included. The pipeline set-up (fx tracing) is recorded apart.

    Args:
        model: the DMP-wrapped ``CTRTask``.
        optimizer: its combined optimizer.
        device: compute device.
        batches: endless batch iterator.
        sizes (Sizes): steps and batch size.
        synchronize: called before reading the clock (``device_synchronize(device)``).
        autocast_dtype: ``train_epoch``'s (``torch.bfloat16``: ``train.mixed_precision=bf16``); None: float32.
    """

    def __init__(self, model, optimizer, device, batches: Iterator, sizes: Sizes,
                 synchronize: Callable[[], None], autocast_dtype: Optional["torch.dtype"] = None) -> None:
        self._model = model
        self._optimizer = optimizer
        self._device = device
        self._batches = batches
        self._sizes = sizes
        self._synchronize = synchronize
        self._autocast_dtype = autocast_dtype
        self.setup_seconds: List[float] = []
        self.pipelined_modules: List[str] = []
        self.sharded_modules: List[str] = []

    def __call__(self) -> float:
        """One measurement; returns samples/s."""
        from recsys_llm.train.config import TrainConfig
        from recsys_llm.train.pipeline import train_epoch

        warmup, measured = self._sizes.warmup_steps, self._sizes.measured_steps
        clock: Dict[str, float] = {}

        def on_step(step: int, loss: "torch.Tensor") -> bool:
            if step == 1:
                clock["first_step"] = time.perf_counter()
            if step == warmup:
                self._synchronize()
                clock["start"] = time.perf_counter()
            if step == warmup + measured:
                self._synchronize()
                clock["stop"] = time.perf_counter()
                return True
            return False

        called = time.perf_counter()
        stats = train_epoch(self._model, self._optimizer, self._batches, self._device, on_step=on_step,
                            description="project loop", progress=TrainConfig().progress,
                            autocast_dtype=self._autocast_dtype)
        if "stop" not in clock:
            raise RuntimeError(f"train_epoch stopped after {stats.steps} steps, before {warmup + measured}")
        self.setup_seconds.append(clock["first_step"] - called)
        self.pipelined_modules = stats.pipelined_modules
        self.sharded_modules = stats.sharded_modules
        return self._sizes.batch_size * measured / (clock["stop"] - clock["start"])


def reader_alone(batches: Iterator, sizes: Sizes) -> Callable[[], float]:
    """One measurement of ``batches`` read and dropped, nothing trained: returns samples/s."""

    return lambda: sizes.batch_size / timed_steps(lambda: next(batches), sizes.warmup_steps, sizes.measured_steps)


# ---- plot ---------------------------------------------------------------------------------------
def replot(payload: Mapping[str, Any], png_path: Path) -> None:
    """The PNG of a result ``payload`` (as its JSON holds it): samples/s of every contender (median, bars min-max
    of rounds; log) and the JSON's ``ratio_*`` figures with the goal. A run and ``--replot`` both draw it."""
    details = payload["details"]
    rounds, sizes = details["samples_per_second_rounds"], details["sizes"]
    figures = {key: value for key, value in payload.items() if key.startswith("ratio_")}
    two_panel_figure(
        png_path,
        lambda left: value_bars(
            left, {name: median(values) for name, values in rounds.items()},
            ylabel="samples/s: median, bars min-max of rounds (log)",
            title=f"DLRM_DCN {sizes['num_tables']}x{sizes['rows_per_table']}x{sizes['embedding_dim']}, batch "
                  f"{sizes['batch_size']}; {payload['device']}, {payload['mode']}",
            errors={name: (min(values), max(values)) for name, values in rounds.items()}, log=True),
        lambda right: ratio_bars(right, {_ratio_label(key): value for key, value in figures.items()},
                                 {_ratio_label("ratio_vs_torchrec_loop"): details["goal_ratio_vs_torchrec_loop"]},
                                 "ratios of the best rounds (the JSON's headline figures)"),
    )


# ---- main ---------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(NAME, __doc__, argv)
    if args.replot:
        return replot_json(args, replot)
    sizes = SIZES[args.mode]

    import torch

    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.train.config import DataConfig
    from recsys_llm.train.distributed import teardown_distributed

    context = single_rank_context(args)
    device = context.device
    synchronize = device_synchronize(device)
    lr = LEARNING_RATES

    schema = make_schema(sizes)
    batches = make_batches(schema, sizes, args.seed, pin_memory=device.type == "cuda")
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        parquet_path = write_parquet(schema, batches, sizes.parquet_batches, os.path.join(tmp, "train.parquet"))
        # Read the way the trainer reads its train split (DataConfig defaults: shuffled, validated).
        data_defaults = DataConfig()
        def trainer_reader(**overrides) -> ParquetBatchReader:
            options = dict(shuffle=data_defaults.shuffle, seed=args.seed, validate=data_defaults.validate,
                           pin_memory=device.type == "cuda")
            return ParquetBatchReader(schema, parquet_path, sizes.batch_size, **{**options, **overrides})

        reader = trainer_reader()
        buffer_batches = -(-reader.shuffle_buffer_rows // sizes.batch_size)
        variant_streams = {
            "project_parquet_deep_prefetch": parquet_stream(trainer_reader(prefetch=buffer_batches + 2)),
            "project_parquet_worker_process": parquet_stream(trainer_reader(prefetch=0, pin_memory=False),
                                                             worker_process=True, pin_memory=device.type == "cuda"),
        }

        torch.manual_seed(args.seed)
        loop_step = build_torchrec_loop(schema, sizes, device, lr, batches)
        torch.manual_seed(args.seed)
        memory_model, memory_optimizer = build_project_model(schema, sizes, device, lr)
        memory_loop = ProjectLoop(memory_model, memory_optimizer, device, itertools.cycle(batches), sizes, synchronize)
        torch.manual_seed(args.seed)
        parquet_model, parquet_optimizer = build_project_model(schema, sizes, device, lr)
        parquet_loop = ProjectLoop(parquet_model, parquet_optimizer, device, parquet_stream(reader), sizes, synchronize)
        variant_loops = {}
        for name, stream in variant_streams.items():
            torch.manual_seed(args.seed)
            variant_loops[name] = ProjectLoop(*build_project_model(schema, sizes, device, lr), device, stream, sizes,
                                              synchronize)

        def samples_per_second(step: Callable[[], None]) -> Callable[[], float]:
            return lambda: sizes.batch_size / timed_steps(step, sizes.warmup_steps, sizes.measured_steps, synchronize)

        rounds = interleaved_repeats(
            {
                "torchrec_loop": samples_per_second(loop_step),
                "project_memory": memory_loop,
                "project_parquet": parquet_loop,
                "parquet_reader_alone": reader_alone(parquet_stream(trainer_reader()), sizes),
                **variant_loops,
            },
            sizes.repeats,
        )

    vs_loop = [p / t for p, t in zip(rounds["project_memory"], rounds["torchrec_loop"])]
    parquet_vs_memory = [q / p for q, p in zip(rounds["project_parquet"], rounds["project_memory"])]
    medians = {name: median(values) for name, values in rounds.items()}
    details = {
        "samples_per_second_median": medians,
        "samples_per_second_rounds": rounds,
        "ratio_vs_torchrec_loop_rounds": vs_loop,
        "ratio_parquet_vs_memory_rounds": parquet_vs_memory,
        "ratio_method": RATIO_METHOD,
        "median_of_round_ratios": {"vs_torchrec_loop": median(vs_loop), "parquet_vs_memory": median(parquet_vs_memory)},
        "goal_ratio_vs_torchrec_loop": GOAL_RATIO_VS_TORCHREC_LOOP,
        "sizes": dataclasses.asdict(sizes),
        "model": "torchrec DLRM_DCN, fused RowWiseAdagrad (tables) + Adam (dense), TrainPipelineSparseDist, DMP 1 rank",
        "world_size": context.world_size,
        "parquet_reader": {"shuffle": data_defaults.shuffle, "validate": data_defaults.validate,
                           "rows": sizes.parquet_batches * sizes.batch_size, "prefetch": 2,
                           "deep_prefetch": buffer_batches + 2, "shuffle_buffer_batches": buffer_batches},
        "project_pipeline_setup_seconds": {"memory": memory_loop.setup_seconds, "parquet": parquet_loop.setup_seconds},
        "project_sharded_modules": memory_loop.sharded_modules,
        "project_pipelined_modules": memory_loop.pipelined_modules,
    }
    table = [
        {"contender": name, "samples/s (median)": round(value, 1),
         "vs torchrec_loop": round(value / medians["torchrec_loop"], 3)}
        for name, value in medians.items()
    ]
    payload = result_payload(
        args,
        {"ratio_vs_torchrec_loop": best_of_rounds_ratio(rounds["project_memory"], rounds["torchrec_loop"]),
         "ratio_parquet_vs_memory": best_of_rounds_ratio(rounds["project_parquet"], rounds["project_memory"]),
         **{f"ratio_{name[len('project_'):]}_vs_memory": best_of_rounds_ratio(rounds[name], rounds["project_memory"])
            for name in variant_loops}},
        details=details,
        table=table,
    )
    write_result(args, payload, replot)
    print_summary(NAME, payload)
    if args.mode != "smoke" and payload["ratio_vs_torchrec_loop"] < GOAL_RATIO_VS_TORCHREC_LOOP:
        print(f"[{NAME}] below the goal {GOAL_RATIO_VS_TORCHREC_LOOP}: per-round ratios {vs_loop}; "
              f"load average {payload['machine']['load_average_at_end']}", file=sys.stderr)
    teardown_distributed()
    return payload


if __name__ == "__main__":
    run_main(main)
