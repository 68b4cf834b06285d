"""Cost growth: samples/s and peak memory per rank as rows, tables and batches grow.

Three curves, each measured in one run on the same machine:

* **rows** (streamed from Parquet): the embedded synthetic data set
  (``recsys_llm.data.synthetic.generate_synthetic``) is generated once at the largest size, its
  train split cut into equal part files of the smallest size, and the data set of ``n`` rows is
  the first ``n / smallest`` parts. DeepFM (sharded with ``shard_model``, fused RowWiseAdagrad +
  Adam) trains from ``ParquetBatchReader`` over those files, read as the trainer reads (shuffled
  row groups and rows, validated, background prefetch), through
  ``recsys_llm.train.pipeline.train_epoch``, for a fixed number of steps. The sizes are measured
  in interleaved rounds (small -> large, large -> small, ...) on one model; each measurement
  opens a fresh reader over its files and resets the process's peak RSS first (Linux
  ``/proc/self/clear_refs``), so its peak RSS is what that measurement needed. A streaming
  reader keeps both flat:
  ``rows_throughput_ratio_largest_vs_smallest`` = samples/s(largest) / samples/s(smallest) and
  ``rows_rss_ratio_largest_vs_smallest`` = peak RSS(largest) / peak RSS(smallest) (both ~1).
* **tables** (sharded over 2 gloo ranks, forked processes, one torch thread each): DeepFM on
  ``num_tables`` sparse fields whose tables grow (``10^5 -> 10^7`` rows each), forced to one
  sharding type (``table_wise`` by default: torchrec 1.8 offers ``row_wise`` on CUDA only) so
  each rank holds about half of the table rows (half of the tables). Per
  size and rank: the table bytes the plan puts on the rank, the fraction of all table rows it
  holds (``tables_shard_fraction_per_rank``, ~0.5), peak RSS (``tables_rss_per_rank_mb``: the
  largest over the ranks, per size) and training samples/s over prebuilt random batches (the
  ranks run on CPU whatever ``--device`` says). Sizes
  run in ascending order, one model at a time (the previous one freed first).
* **batch sizes**: training samples/s (the same project loop, prebuilt batches of the train
  split) and inference samples/s (the project's serving artifact, ``export_task`` ->
  ``ServedModel``, whose dense program has a dynamic batch dimension) at each batch size, in
  interleaved rounds, for plain DeepFM and each LLM method on it (``method_task``): LLaCTR
  (FRE + FIE; served with FIE frozen), the ELEC gain network with user and item vectors in
  frozen entity tables, and ELEC joint KD (training only: the student serves as plain DeepFM);
  ``batch_samples_per_second`` = ``{"train": {B: sps}, "inference": {B: sps}}`` of plain DeepFM
  and ``batch_samples_per_second_by_method`` the same per method (medians over rounds).

The PNG shows, left, samples/s and peak RSS of the rows and tables curves relative to their
smallest size (flat = constant cost per sample), right, samples/s against the batch size.

Usage::

    python benchmarks/scaling.py [--quick|--smoke] [--json PATH] [--plot PATH]
"""

import dataclasses
import gc
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    Stopwatch,
    TrainEpochLoop,
    cycling_step,
    interleaved_repeats,
    median,
    model_config,
    parse_args,
    print_summary,
    replot_json,
    resolve_device,
    result_payload,
    run_main,
    samples_per_second,
    served_logits,
    shard_for_training,
    train_split_batches,
    two_panel_figure,
    write_result,
)

NAME = "scaling"
TABLE_WORLD_SIZE = 2


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem and measurement sizes of one mode.

    Args:
        rows (Tuple[int, ...]): train rows of the rows curve, ascending multiples of the first.
        rows_batch_size (int): rows per batch of the rows curve.
        rows_warmup (int): untimed steps per rows measurement.
        rows_measured (int): timed steps per rows measurement.
        rows_repeats (int): interleaved rounds of the rows curve.
        table_rows (Tuple[int, ...]): rows per table of the tables curve, ascending.
        num_tables (int): sparse fields (one table each) of the tables curve.
        table_dim (int): embedding dimension of the tables curve.
        table_batch_size (int): rows per batch and rank of the tables curve.
        table_batches (int): distinct prebuilt random batches per rank (cycled).
        table_warmup (int): untimed steps per table size.
        table_measured (int): timed steps per table size.
        table_sharding (str): the one sharding type allowed for the tables curve (CPU:
            ``table_wise`` / ``column_wise``; ``row_wise`` needs CUDA in torchrec 1.8).
        batch_sizes (Tuple[int, ...]): batch sizes of the batch curve.
        batch_memory_batches (int): distinct prebuilt batches per batch size (cycled).
        batch_warmup (int): untimed steps per training / inference measurement.
        batch_measured (int): timed steps per training / inference measurement.
        batch_repeats (int): interleaved rounds of the batch curve.
        batch_backbones (Tuple[str, ...]): registry backbones of the batch curve (each with
            every LLM method); the first one is also ``batch_samples_per_second``.
        smoke_models (bool): the registry's tiny DeepFM (``SMOKE_CONFIGS``) instead of its defaults.
    """

    rows: Tuple[int, ...] = (1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000)
    rows_batch_size: int = 4096
    rows_warmup: int = 5
    rows_measured: int = 30
    rows_repeats: int = 3
    table_rows: Tuple[int, ...] = (100_000, 1_000_000, 10_000_000)
    num_tables: int = 4
    table_dim: int = 16
    table_batch_size: int = 4096
    table_batches: int = 4
    table_warmup: int = 3
    table_measured: int = 15
    table_sharding: str = "table_wise"
    batch_sizes: Tuple[int, ...] = (1024, 4096, 16384)
    batch_memory_batches: int = 3
    batch_warmup: int = 2
    batch_measured: int = 10
    batch_repeats: int = 3
    batch_backbones: Tuple[str, ...] = ("deepfm", "dcnv2", "dlrm")
    smoke_models: bool = False


SIZES: Dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(
        rows=(250_000, 500_000, 1_000_000), rows_batch_size=2048, rows_warmup=3, rows_measured=12, rows_repeats=2,
        table_rows=(100_000, 1_000_000), table_batch_size=2048, table_batches=3, table_warmup=2, table_measured=6,
        batch_sizes=(1024, 4096), batch_memory_batches=2, batch_warmup=1, batch_measured=5, batch_repeats=2,
        batch_backbones=("deepfm",),
    ),
    "smoke": Sizes(
        rows=(4_000, 8_000, 16_000), rows_batch_size=256, rows_warmup=2, rows_measured=3, rows_repeats=1,
        table_rows=(1_000, 10_000), num_tables=2, table_dim=8, table_batch_size=128, table_batches=2,
        table_warmup=2, table_measured=2, batch_sizes=(128, 512), batch_memory_batches=2, batch_warmup=1,
        batch_measured=2, batch_repeats=1, batch_backbones=("deepfm", "dlrm"), smoke_models=True,
    ),
}


# ---- peak memory ----------------------------------------------------------------------------------
class PeakRss:
    """This process's peak resident set size, resettable on Linux.

    ``reset()`` writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), which resets the
    kernel's high-water mark ``VmHWM``; ``peak_mb()`` reads it from ``/proc/self/status``.
    Where that is not possible the figures fall back to ``resource.getrusage``'s
    ``ru_maxrss`` (the peak since the process started) and ``resettable`` is False.
    """

    def __init__(self) -> None:
        self.resettable = self.reset()

    @staticmethod
    def reset() -> bool:
        """Resets the high-water mark to the current RSS; False where the kernel refuses."""
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_mb(field: str) -> Optional[float]:
        try:
            with open("/proc/self/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024.0  # kB -> MiB
        except OSError:
            return None
        return None

    def peak_mb(self) -> float:
        """Peak RSS in MiB since the last ``reset()`` (or since the process started)."""
        value = self._status_mb("VmHWM") if self.resettable else None
        return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def current_mb(self) -> float:
        """Current RSS in MiB (``VmRSS``; the peak where ``/proc`` is unreadable)."""
        value = self._status_mb("VmRSS")
        return value if value is not None else self.peak_mb()


# ---- shared model bits ----------------------------------------------------------------------------
def backbone_config(sizes: Sizes, embedding_dim: Optional[int] = None, name: str = "deepfm"):
    """The registry's backbone ``name`` (DeepFM by default): its defaults, or its tiny smoke config."""
    config = model_config(name, sizes.smoke_models)
    return dataclasses.replace(config, embedding_dim=embedding_dim) if embedding_dim else config


def backbone_task(sizes: Sizes, schema, tables_device, dense_device=None, embedding_dim: Optional[int] = None,
                  name: str = "deepfm"):
    """A plain ``CTRTask`` of backbone ``name`` (tables on ``meta`` for DMP, or a real device for serving)."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.models.task import CTRTask

    backbone = build_backbone(backbone_config(sizes, embedding_dim, name), schema, device=tables_device,
                              dense_device=dense_device)
    return CTRTask(backbone)


# ---- curve 1: rows streamed from Parquet -----------------------------------------------------------
def split_into_parts(source: str, out_dir: str, part_rows: int, num_parts: int) -> List[str]:
    """Cuts the first ``part_rows * num_parts`` rows of ``source`` into ``num_parts`` files.

    Streams record batches (bounded memory) and keeps the source's Arrow schema and row-group size.

    Raises:
        RuntimeError: ``source`` has fewer rows.
    """
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(source)
    needed = part_rows * num_parts
    if handle.metadata.num_rows < needed:
        raise RuntimeError(f"{source}: {handle.metadata.num_rows} rows, need {needed} for {num_parts} parts")
    group_rows = handle.metadata.row_group(0).num_rows
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"part_{index:03d}.parquet") for index in range(num_parts)]
    batches = handle.iter_batches(batch_size=min(part_rows, 65536))
    pending = None
    for path in paths:
        with pq.ParquetWriter(path, handle.schema_arrow, compression="lz4") as writer:
            written = 0
            while written < part_rows:
                batch = pending if pending is not None else next(batches)
                pending = None
                take = min(batch.num_rows, part_rows - written)
                if take < batch.num_rows:
                    pending = batch.slice(take)
                    batch = batch.slice(0, take)
                writer.write_batch(batch, row_group_size=group_rows)
                written += take
    return paths


def make_rows_data(sizes: Sizes, work_dir: str, seed: int):
    """Generates the synthetic set once (train split = the largest size) and its part files.

    Returns:
        Tuple: ``(schema, {rows: [part paths]}, generation seconds)``.
    """
    from recsys_llm.data.synthetic import SPLIT_FRACTIONS, generate_synthetic

    smallest, largest = sizes.rows[0], sizes.rows[-1]
    bad = [n for n in sizes.rows if n % smallest]
    if bad or list(sizes.rows) != sorted(sizes.rows):
        raise ValueError(f"rows sizes must ascend and be multiples of the first ({smallest}); got {sizes.rows}")
    train_fraction = dict(SPLIT_FRACTIONS)["train"]
    start = time.perf_counter()
    schema = generate_synthetic(os.path.join(work_dir, "synthetic"), int(round(largest / train_fraction)) + 16,
                                seed=seed)
    parts = split_into_parts(schema.split_path("train"), os.path.join(work_dir, "parts"), smallest,
                             largest // smallest)
    seconds = time.perf_counter() - start
    return schema, {n: parts[: n // smallest] for n in sizes.rows}, seconds


class RowsMeasurement:
    """One rows-curve contender: trains ``steps`` batches from a fresh reader over ``paths``.

    Every call opens the reader (footer checks of every file: its cost is in
    ``setup_seconds``), resets the peak RSS, runs one :class:`TrainEpochLoop` measurement over
    an endless shuffled stream and closes the stream (its prefetch thread ends) before returning.

    Args:
        schema: the synthetic schema.
        paths (List[str]): the data set's part files.
        model: the DMP-wrapped task (shared by all sizes).
        optimizer: its combined optimizer.
        device: compute device.
        sizes (Sizes): batch size and steps.
        seed (int): shuffle seed.
        rss (PeakRss): the process's peak-RSS meter.
    """

    def __init__(self, schema, paths: List[str], model, optimizer, device, sizes: Sizes, seed: int,
                 rss: PeakRss) -> None:
        self._schema = schema
        self._paths = paths
        self._model = model
        self._optimizer = optimizer
        self._device = device
        self._sizes = sizes
        self._seed = seed
        self._rss = rss
        self.peak_rss_mb: List[float] = []
        self.setup_seconds: List[float] = []

    def _stream(self, reader) -> Iterator:
        for epoch in itertools.count():
            reader.set_epoch(epoch)
            yield from reader

    def __call__(self) -> float:
        from recsys_llm.data.parquet import ParquetBatchReader
        from recsys_llm.train.config import DataConfig

        gc.collect()
        self._rss.reset()
        defaults = DataConfig()
        opened = time.perf_counter()
        reader = ParquetBatchReader(self._schema, self._paths, self._sizes.rows_batch_size, shuffle=defaults.shuffle,
                                    seed=self._seed, validate=defaults.validate, drop_last=True,
                                    pin_memory=self._device.type == "cuda")
        self.setup_seconds.append(time.perf_counter() - opened)
        stream = self._stream(reader)
        try:
            loop = TrainEpochLoop(self._model, self._optimizer, self._device, stream, self._sizes.rows_batch_size,
                                  self._sizes.rows_warmup, self._sizes.rows_measured, description="scaling rows")
            figure = loop()
        finally:
            stream.close()
        self.peak_rss_mb.append(self._rss.peak_mb())
        return figure


def rows_curve(sizes: Sizes, schema, parts: Dict[int, List[str]], device, seed: int, rss: PeakRss) -> Dict[str, Any]:
    """Samples/s and peak RSS of DeepFM trained from Parquet, per data-set size (interleaved rounds)."""
    import torch

    torch.manual_seed(seed)
    model, optimizer = shard_for_training(backbone_task(sizes, schema, torch.device("meta"), device), device,
                                          sizes.rows_batch_size)
    contenders = {n: RowsMeasurement(schema, paths, model, optimizer, device, sizes, seed, rss)
                  for n, paths in parts.items()}
    warmup = RowsMeasurement(schema, parts[sizes.rows[0]], model, optimizer, device, sizes, seed, rss)
    warmup()  # one-time costs (pipeline tracing, caches) land here, not on the first size measured
    rounds = interleaved_repeats({str(n): c for n, c in contenders.items()}, sizes.rows_repeats)
    return {
        "samples_per_second": {n: median(rounds[str(n)]) for n in parts},
        "peak_rss_mb": {n: median(c.peak_rss_mb) for n, c in contenders.items()},
        "reader_setup_seconds": {n: median(c.setup_seconds) for n, c in contenders.items()},
        "files": {n: len(paths) for n, paths in parts.items()},
        "samples_per_second_rounds": {n: rounds[str(n)] for n in parts},
        "peak_rss_mb_rounds": {n: c.peak_rss_mb for n, c in contenders.items()},
    }


# ---- curve 2: tables sharded over 2 ranks ----------------------------------------------------------
def rank_share(plan, rank: int) -> Dict[str, float]:
    """Table rows and float32 weight bytes the plan places on ``rank`` (data_parallel: everything).

    Returns:
        Dict[str, float]: ``rows_on_rank``, ``rows_total``, ``weight_mb_on_rank``.
    """
    from recsys_llm.train.plan_report import table_placements

    rows_on_rank = rows_total = elements_on_rank = 0
    for info in table_placements(plan).values():
        shards = info["shards"]
        table_rows = max(s["offsets"][0] + s["sizes"][0] for s in shards) if shards else 0
        rows_total += table_rows
        for shard in shards:
            if info["sharding_type"] == "data_parallel" or shard["rank"] == rank:
                rows_on_rank += shard["sizes"][0]
                elements_on_rank += shard["sizes"][0] * shard["sizes"][1]
    return {"rows_on_rank": rows_on_rank, "rows_total": rows_total,
            "weight_mb_on_rank": elements_on_rank * 4 / 2**20}


def tables_rank(rank: int, sizes: Sizes, ports: Any, out_dir: str, seed: int) -> None:
    """One rank of the tables curve (a forked process): every table size in ascending order.

    Rank 0 hosts the rendezvous store on a port the system picks and sends it to the other
    ranks through ``ports`` (a multiprocessing queue): no free port is looked up first that
    another process could take. Every rank is a client of that store, as under torchrun's agent.

    Writes ``out_dir/rank{rank}.json`` with, per size: the plan's share of table rows and
    weight bytes on this rank, samples/s of this rank and its peak and baseline RSS.
    """
    import torch
    import torch.distributed as dist

    store = None
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, TABLE_WORLD_SIZE, is_master=True, wait_for_workers=False)
        for _ in range(TABLE_WORLD_SIZE - 1):
            ports.put(store.port)
        port = store.port
    else:
        port = ports.get()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(TABLE_WORLD_SIZE), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(TABLE_WORLD_SIZE), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True",
                       "GLOO_DEVICE_TRANSPORT": "TCP"})

    from benchmarks.train_throughput import Sizes as ThroughputSizes
    from benchmarks.train_throughput import make_batches, make_schema
    from recsys_llm.train.distributed import init_distributed, teardown_distributed
    from recsys_llm.train.sharding import build_optimizer, shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    torch.set_num_threads(1)
    context = init_distributed("cpu")
    rss = PeakRss()
    results: Dict[str, Any] = {"rank": rank, "rss_resettable": rss.resettable, "sizes": {}}
    # The first size is run twice and its first run dropped: one-time costs (pipeline tracing,
    # allocator and library caches) would otherwise count against the smallest size only.
    for index, table_rows in enumerate((sizes.table_rows[0],) + tuple(sizes.table_rows)):
        data = ThroughputSizes(num_tables=sizes.num_tables, rows_per_table=table_rows, num_dense=2,
                               batch_size=sizes.table_batch_size, memory_batches=sizes.table_batches)
        schema = make_schema(data)
        batches = make_batches(schema, data, seed * 1000 + rank)
        gc.collect()
        baseline = rss.current_mb()
        rss.reset()
        torch.manual_seed(seed)
        task = backbone_task(sizes, schema, torch.device("meta"), context.device, embedding_dim=sizes.table_dim)
        optim = OptimizerConfig()
        model, plan = shard_model(task, context.device, context.world_size,
                                  ShardingConfig(sharding_types=[sizes.table_sharding]), optim, sizes.table_batch_size)
        optimizer = build_optimizer(model, optim)
        loop = TrainEpochLoop(model, optimizer, context.device, itertools.cycle(batches), sizes.table_batch_size,
                              sizes.table_warmup, sizes.table_measured, description="scaling tables")
        figure = loop()
        share = rank_share(plan, rank)
        if index == 0:
            del model, optimizer, task, loop, plan, batches
            gc.collect()
            continue
        results["sizes"][str(table_rows)] = {
            **share,
            "shard_fraction": share["rows_on_rank"] / share["rows_total"],
            "samples_per_second": figure,
            "peak_rss_mb": rss.peak_mb(),
            "rss_before_model_mb": baseline,
            "sharding_types": sorted({info.sharding_type for module in plan.plan.values() for info in module.values()}),
        }
        del model, optimizer, task, loop, plan, batches
        gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle)
    teardown_distributed()
    del store  # rank 0 hosts it until every rank has left the group


def tables_curve(sizes: Sizes, work_dir: str, seed: int) -> Dict[str, Any]:
    """Runs :func:`tables_rank` on 2 forked gloo ranks and gathers their per-size figures.

    Call it before this process computes anything with torch (no OpenMP region has run, no
    process group exists): the libraries are imported here once and the ranks fork from it,
    as ``tests/multiprocess.py``'s fork server does, instead of re-importing them for seconds.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp
    import torchrec.distributed  # noqa: F401  (imported once, before forking)

    import benchmarks.train_throughput  # noqa: F401
    import recsys_llm.models.registry  # noqa: F401
    import recsys_llm.train.pipeline  # noqa: F401
    import recsys_llm.train.sharding  # noqa: F401

    if dist.is_initialized():
        raise RuntimeError("tables_curve forks its ranks: call it before init_distributed in this process")
    out_dir = os.path.join(work_dir, "tables")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    ports = mp.get_context("fork").SimpleQueue()
    mp.start_processes(tables_rank, args=(sizes, ports, out_dir, seed), nprocs=TABLE_WORLD_SIZE,
                       join=True, start_method="fork")
    ranks = []
    for rank in range(TABLE_WORLD_SIZE):
        with open(os.path.join(out_dir, f"rank{rank}.json"), encoding="utf-8") as handle:
            ranks.append(json.load(handle))
    keys = [str(n) for n in sizes.table_rows]
    return {
        "rss_per_rank_mb": {k: max(r["sizes"][k]["peak_rss_mb"] for r in ranks) for k in keys},
        "shard_fraction_per_rank": {k: max(r["sizes"][k]["shard_fraction"] for r in ranks) for k in keys},
        "samples_per_second_per_rank": {k: min(r["sizes"][k]["samples_per_second"] for r in ranks) for k in keys},
        "table_weight_mb_per_rank": {k: max(r["sizes"][k]["weight_mb_on_rank"] for r in ranks) for k in keys},
        "ranks": ranks,
        "seconds": time.perf_counter() - start,
    }


# ---- curve 3: batch sizes ---------------------------------------------------------------------------
BATCH_METHODS = ("plain", "llactr", "elec_gain", "elec_joint_kd")
SERVED_METHODS = ("plain", "llactr", "elec_gain")  # the ELEC student serves as the plain architecture
ENTITY_TABLES = {"user_id": "unused", "item_id": "unused"}  # frozen tables keep their random init here


def method_task(method: str, sizes: Sizes, schema, tables_device, dense_device=None, backbone_name: str = "deepfm"):
    """A backbone plain, with LLaCTR's FRE + FIE, as an ELEC gain network, or as ELEC joint KD.

    The LLM-derived inputs are random (field vectors; entity tables left at their random
    init): the step's cost does not depend on their values.
    """
    import torch

    from recsys_llm.models.registry import build_backbone
    from recsys_llm.modules.elec import ELECConfig, build_elec_task
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
    from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement
    from recsys_llm.modules.llactr import embedded_features
    from recsys_llm.modules.teacher_student import TeacherStudentConfig
    from recsys_llm.models.task import CTRTask

    if method == "plain":
        return backbone_task(sizes, schema, tables_device, dense_device, name=backbone_name)
    config = backbone_config(sizes, name=backbone_name)
    if method == "llactr":
        backbone = build_backbone(config, schema, device=tables_device, dense_device=dense_device)
        names = list(embedded_features(backbone))
        vectors = torch.randn(len(names), 384, generator=torch.Generator().manual_seed(0))
        with torch.device(dense_device or "cpu"):
            fre = FieldRepresentationEnhancement(vectors, names, config.embedding_dim)
            fie = FieldInteractionEnhancement(vectors, names)
        return CTRTask(backbone, logit_terms={"fie": fie}, loss_terms={"fre": fre})
    task = "gain" if method == "elec_gain" else "distill"
    elec = ELECConfig(task=task, vector_dim=32, vector_source="entity_table", entity_tables=dict(ENTITY_TABLES),
                      distill=TeacherStudentConfig(mode="joint"))
    return build_elec_task(elec, schema, config, device=tables_device, dense_device=dense_device)


def batch_curve(sizes: Sizes, schema, device, seed: int, work_dir: str) -> Dict[str, Any]:
    """Training and inference samples/s of each backbone and LLM method per batch size (interleaved rounds)."""
    import torch

    cpu = torch.device("cpu")
    train_contenders, serve_contenders = {}, {}
    served: Dict[str, Any] = {}
    paths: Dict[str, str] = {}
    for batch_size in sizes.batch_sizes:
        batches = train_split_batches(schema, batch_size, sizes.batch_memory_batches)
        for name, method in itertools.product(sizes.batch_backbones, BATCH_METHODS):
            torch.manual_seed(seed)
            task = method_task(method, sizes, schema, torch.device("meta"), device, name)
            model, optimizer = shard_for_training(task, device, batch_size)
            train_contenders[f"{name}/{method}@{batch_size}"] = TrainEpochLoop(
                model, optimizer, device, itertools.cycle(batches), batch_size, sizes.batch_warmup,
                sizes.batch_measured, description=f"scaling batch {name} {method} {batch_size}")
        for name, method in itertools.product(sizes.batch_backbones, SERVED_METHODS):
            key = f"{name}/{method}"
            if key not in served:
                task = method_task(method, sizes, schema, cpu, backbone_name=name).eval()
                for term in getattr(task, "logit_terms", {}).values():
                    term.freeze()  # FIE's pair weights are constants when served
                served[key], paths[key] = served_logits(task, os.path.join(work_dir, f"export_{name}_{method}"),
                                                        batches[0], schema)
            serve_contenders[f"{key}@{batch_size}"] = samples_per_second(
                cycling_step(served[key], batches), batch_size, sizes.batch_warmup, sizes.batch_measured)
    train_rounds = interleaved_repeats(train_contenders, sizes.batch_repeats)
    serve_rounds = interleaved_repeats(serve_contenders, sizes.batch_repeats)

    def curves(rounds: Dict[str, List[float]], name: str, methods: Tuple[str, ...]) -> Dict[str, Dict[str, float]]:
        return {m: {str(b): median(rounds[f"{name}/{m}@{b}"]) for b in sizes.batch_sizes} for m in methods}

    by_backbone = {
        name: {"train": curves(train_rounds, name, BATCH_METHODS),
               "inference": curves(serve_rounds, name, SERVED_METHODS)}
        for name in sizes.batch_backbones
    }
    by_method = by_backbone[sizes.batch_backbones[0]]
    return {
        "backbone": sizes.batch_backbones[0],
        "train": by_method["train"]["plain"],
        "inference": by_method["inference"]["plain"],
        "by_method": by_method,
        "by_backbone": by_backbone,
        "train_rounds": train_rounds,
        "inference_rounds": serve_rounds,
        "inference_path": paths[f"{sizes.batch_backbones[0]}/plain"],
        "inference_paths": paths,
    }


# ---- plot ---------------------------------------------------------------------------------------------
def replot(payload: Mapping[str, Any], png_path: Path) -> None:
    """The PNG of a result ``payload`` (as its JSON holds it). Left: rows/tables samples/s and peak RSS relative to
    their smallest size. Right: batch curve. A run and ``--replot`` both draw it."""
    details = payload["details"]
    rows, tables, batch = details["rows"], details["tables"], details["batch"]

    def relative(values: Dict[Any, float]) -> Tuple[List[float], List[float]]:
        keys = list(values)
        base_x, base_y = float(keys[0]), float(values[keys[0]])
        return [float(k) / base_x for k in keys], [float(values[k]) / base_y for k in keys]

    def growth(axis: Any) -> None:
        for label, values, style in (
            ("rows: samples/s", rows["samples_per_second"], "o-"),
            ("rows: peak RSS", rows["peak_rss_mb"], "o--"),
            ("tables: samples/s per rank", tables["samples_per_second_per_rank"], "s-"),
            ("tables: peak RSS per rank", tables["rss_per_rank_mb"], "s--"),
        ):
            xs, ys = relative(values)
            axis.plot(xs, ys, style, label=label)
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("size / smallest size (rows streamed, rows per table)")
        axis.set_ylabel("figure / figure at smallest size")
        axis.set_title("cost growth (flat = constant cost per sample)", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)

    def batches(axis: Any) -> None:
        for label, style in (("train", "o-"), ("inference", "s--")):
            for method, curve in batch["by_method"][label].items():
                axis.plot([int(k) for k in curve], list(curve.values()), style, label=f"{label}: {method}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size")
        axis.set_ylabel("samples/s")
        axis.set_title(f"{batch['backbone']} and the LLM methods: samples/s by batch size", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)

    two_panel_figure(png_path, growth, batches)


# ---- main -----------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(NAME, __doc__, argv)
    if args.replot:
        return replot_json(args, replot)
    sizes = SIZES[args.mode]

    from recsys_llm.train.distributed import init_distributed, teardown_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise RuntimeError(f"{NAME} starts its own ranks; run it without torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']})")
    args.resolved_device = resolve_device(args.device)
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="scaling_") as work_dir:
        with watch("tables"):
            tables = tables_curve(sizes, work_dir, args.seed)  # first: its ranks fork from this process
        device = init_distributed(args.resolved_device).device
        rss = PeakRss()
        with watch("data"):
            schema, parts, generate_seconds = make_rows_data(sizes, work_dir, args.seed)
        with watch("rows"):
            rows = rows_curve(sizes, schema, parts, device, args.seed, rss)
        with watch("batch"):
            batch = batch_curve(sizes, schema, device, args.seed, work_dir)

    smallest, largest = sizes.rows[0], sizes.rows[-1]
    figures = {
        "rows_throughput_ratio_largest_vs_smallest":
            rows["samples_per_second"][largest] / rows["samples_per_second"][smallest],
        "rows_rss_ratio_largest_vs_smallest": rows["peak_rss_mb"][largest] / rows["peak_rss_mb"][smallest],
    }
    first, last = str(sizes.table_rows[0]), str(sizes.table_rows[-1])
    figures["tables_throughput_ratio_largest_vs_smallest"] = (
        tables["samples_per_second_per_rank"][last] / tables["samples_per_second_per_rank"][first])
    table = [
        {"curve": "rows (Parquet, 1 rank)", "size": n, "samples/s": round(rows["samples_per_second"][n], 1),
         "peak RSS MB": round(rows["peak_rss_mb"][n], 1), "files": rows["files"][n],
         "reader open s": round(rows["reader_setup_seconds"][n], 3)}
        for n in sizes.rows
    ]
    table += [
        {"curve": f"tables ({sizes.num_tables} x rows, {sizes.table_sharding}, 2 ranks)", "size": int(k),
         "samples/s": round(tables["samples_per_second_per_rank"][k], 1),
         "peak RSS MB": round(tables["rss_per_rank_mb"][k], 1),
         "table MB per rank": round(tables["table_weight_mb_per_rank"][k], 1),
         "shard fraction": round(tables["shard_fraction_per_rank"][k], 3)}
        for k in tables["rss_per_rank_mb"]
    ]
    table += [
        {"curve": f"batch ({label}, {name} {method})", "size": int(k), "samples/s": round(v, 1),
         "vs plain": round(v / parts[label]["plain"][k], 3)}
        for name, parts in batch["by_backbone"].items() for label in ("train", "inference")
        for method, curve in parts[label].items() for k, v in curve.items()
    ]
    details = {
        "rows": {**rows, "batch_size": sizes.rows_batch_size, "generate_seconds": generate_seconds,
                 "reader": "ParquetBatchReader as the trainer reads (DataConfig defaults: shuffle, validate, prefetch)",
                 "rss_method": "VmHWM after /proc/self/clear_refs=5" if rss.resettable else "ru_maxrss (not resettable)"},
        "tables": tables,
        "batch": batch,
        "model": "recsys_llm DeepFM (registry " + ("SMOKE_CONFIGS" if sizes.smoke_models else "defaults") + "), "
                 "shard_model + fused RowWiseAdagrad + Adam, train_epoch (TrainPipelineSparseDist)",
        "sizes": dataclasses.asdict(sizes),
        "phase_seconds": watch.seconds,
    }
    payload = result_payload(args, figures, details=details, table=table)
    payload["tables_rss_per_rank_mb"] = tables["rss_per_rank_mb"]
    payload["tables_shard_fraction_per_rank"] = tables["shard_fraction_per_rank"]
    payload["batch_samples_per_second"] = {"train": batch["train"], "inference": batch["inference"]}
    payload["batch_samples_per_second_by_method"] = batch["by_method"]
    payload["batch_samples_per_second_by_backbone"] = batch["by_backbone"]
    write_result(args, payload, replot)
    print_summary(NAME, payload)
    teardown_distributed()
    return payload


if __name__ == "__main__":
    run_main(main)
