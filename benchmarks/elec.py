"""ELEC costs: the served student vs the plain backbone and vs the gain network with an online LLM,
and joint KD training vs plain training.

Three figures (top level of the JSON), measured in one process on the embedded synthetic data
(``recsys_llm.data.synthetic``), per backbone in interleaved rounds (A B, B A, ...); per backbone
each figure is the ratio of the contenders' best rounds (``best_of_rounds_ratio``: background
load only slows a round down), the headline is the geometric mean over backbones:

* ``student_serve_ratio_vs_backbone``: inference samples/s of the EXPORTED student divided by
  the plain backbone exported the same way (goal >= 0.97). The joint KD task and the plain task
  are trained (below), gathered (``serving.unsharded_state_dict``), the student's tensors
  (``student.*``) loaded into a fresh vanilla network, and both exported with
  ``serving.export_task`` (eager EBC + ``torch.export`` dense program) and run through
  ``ServedModel.logits`` on batches of ``batch_size`` rows.
* ``student_speedup_vs_gain_online_llm``: the exported student's samples/s divided by the gain
  network (the trained teacher, eager, eval, no grad) that computes the LLM vector of every
  request itself: render the request's rows as text (``RowTextRenderer``), encode them with the
  CTR-adapted LLM (``CTRAdaptedLLM.encode``: tokenizer, the LLM, mean pooling, transformation
  MLP), then the gain network (goal >= 50). Both serve the same requests of
  ``request_batch_size`` rows of the test split. The LLM is the same encoder ELEC exports vectors
  with (default: the offline MiniLM, ``max_length`` 128); it runs with ``tuning="heads"`` (no
  LoRA layers), which costs what a LoRA-tuned model costs after merging its adapters, so the gain
  network is not slowed by unmerged adapters.
* ``gain_entity_tables_serve_ratio_vs_backbone`` (no goal): inference samples/s of an exported
  gain network whose user and item vectors sit in frozen entity tables (the deployable form of
  the gain network: the LLM ran offline, once per entity) divided by the plain backbone.
* ``kd_train_ratio_vs_backbone``: training samples/s of the joint KD task
  (``build_elec_task(ELECConfig(task="distill", distill=TeacherStudentConfig(mode="joint")))``:
  gain network + vanilla network, score and representation KD) divided by the plain backbone,
  both sharded with ``shard_model`` (planner, DMP on 1 rank, fused RowWiseAdagrad + Adam) and
  trained by ``recsys_llm.train.pipeline.train_epoch`` (``TrainPipelineSparseDist``) over the same
  prebuilt train batches (goal >= 0.45). The KD batches carry ``extras["llm_vector"]``: real
  CTR-LLM vectors of the first ``vector_pool_rows`` train rows, reused cyclically over the
  batches (the step's cost does not depend on the values; encoding every training row with the
  LLM on a CPU would take longer than the benchmark; its texts/s is in ``details``).

The PNG shows the serving samples/s of every contender (log scale) and the ratios against
their goals.

Usage::

    python benchmarks/elec.py [--quick|--smoke] [--json PATH] [--plot PATH]
                              [--backbones deepfm dcnv2 ...] [--llm MODEL_DIR]
"""

import dataclasses
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RATIO_METHOD,
    Stopwatch,
    best_of_rounds_ratio,
    TrainEpochLoop,
    build_parser,
    check_llm_option,
    cycling_step,
    geometric_mean,
    interleaved_repeats,
    llm_name,
    median,
    model_config,
    parse_args,
    per_round_ratios,
    print_summary,
    ratio_bars,
    replot_json,
    result_payload,
    run_main,
    samples_per_second,
    served_logits,
    shard_for_training,
    single_rank_context,
    tiny_llm_dir,
    train_split_batches,
    two_panel_figure,
    write_result,
)

NAME = "elec"
GOAL_SERVE = 0.97
GOAL_ONLINE = 50.0
GOAL_KD_TRAIN = 0.45
ALL_BACKBONES = ("fm", "fwfm", "deepfm", "dcnv2", "finalmlp", "dlrm")
SERVE_CONTENDERS = ("student", "plain", "gain_entity_tables", "student_request", "gain_online_llm")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem and measurement sizes of one mode.

    Args:
        data_rows (int): synthetic rows generated (80/10/10 train/valid/test).
        backbones (Tuple[str, ...]): registry names of the backbone (plain, gain, student).
        smoke_models (bool): use the registry's tiny ``SMOKE_CONFIGS`` instead of the defaults.
        batch_size (int): rows per training batch and per serving batch of student vs plain.
        memory_batches (int): distinct prebuilt training batches (cycled).
        warmup_steps (int): untimed training steps per measurement.
        measured_steps (int): timed training steps per measurement.
        repeats (int): interleaved rounds per backbone (train and serve).
        serve_warmup (int): untimed inference batches per measurement.
        serve_steps (int): timed inference batches per measurement (student, plain).
        request_batch_size (int): rows per request of the student vs online-gain comparison.
        request_batches (int): distinct test-split requests (cycled).
        online_steps (int): timed requests per measurement of the gain network with the LLM.
        vector_pool_rows (int): train rows whose LLM vectors fill the KD batches (cycled).
        llm (str): ``minilm`` (offline all-MiniLM-L6-v2) or ``tiny`` (random BERT built here).
        vector_dim (int): size r of the CTR-LLM vector (``ELECConfig.vector_dim``).
        max_length (int): tokens per row text (``semantics adapt`` default 128).
    """

    data_rows: int = 100_000
    backbones: Tuple[str, ...] = ("fm", "deepfm", "dcnv2", "finalmlp")
    smoke_models: bool = False
    batch_size: int = 1024
    memory_batches: int = 8
    warmup_steps: int = 5
    measured_steps: int = 100
    repeats: int = 5
    serve_warmup: int = 10
    serve_steps: int = 600
    request_batch_size: int = 64
    request_batches: int = 4
    online_steps: int = 2
    vector_pool_rows: int = 256
    llm: str = "minilm"
    vector_dim: int = 64
    max_length: int = 128


SIZES: Dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(
        data_rows=40_000, backbones=("deepfm", "dcnv2"), memory_batches=6,
        repeats=5, request_batch_size=32, request_batches=2, online_steps=1, vector_pool_rows=32,
    ),
    "smoke": Sizes(
        data_rows=3_000, backbones=("deepfm",), smoke_models=True, batch_size=128, memory_batches=2, warmup_steps=2,
        measured_steps=2, repeats=2, serve_warmup=1, serve_steps=2, request_batch_size=8, request_batches=2,
        online_steps=1, vector_pool_rows=16, llm="tiny", vector_dim=16, max_length=64,
    ),
}


# ---- the LLM and the request data ---------------------------------------------------------------
def load_ctr_llm(sizes: Sizes, override: Optional[str], work_dir: str, seed: int):
    """The CTR-adapted LLM that makes the vectors (and serves them online for the gain network)."""
    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig
    from recsys_llm.semantics.encoder import default_model_path

    if override:
        path = override
    elif sizes.llm == "tiny":
        path = tiny_llm_dir(os.path.join(work_dir, "tiny_llm"), seed)
    else:
        path = default_model_path()
    config = CTRLLMConfig(model_path=path, representation_dim=sizes.vector_dim, max_length=sizes.max_length,
                          tuning="heads", seed=seed)
    return CTRAdaptedLLM.from_config(config).eval()


def split_rows(schema, split: str, columns: List[str], num_rows: int):
    """The first ``num_rows`` rows of a split as an Arrow table (file order, as the reader reads)."""
    import pyarrow.parquet as pq

    table = pq.read_table(schema.split_path(split), columns=columns)
    if table.num_rows < num_rows:
        raise RuntimeError(f"{schema.split_path(split)}: {table.num_rows} rows, need {num_rows}")
    return table.slice(0, num_rows)


def check_row_order(batches: List, table, batch_size: int, row_key: str) -> None:
    """Raises when batch k is not rows [k*B, (k+1)*B) of ``table`` (texts would not match)."""
    import numpy as np

    keys = table.column(row_key).to_numpy()
    for index, batch in enumerate(batches):
        expected = keys[index * batch_size:(index + 1) * batch_size]
        if not np.array_equal(batch.extras["row_id"].numpy(), expected):
            raise RuntimeError(f"batch {index}: row ids differ from the split's rows {index * batch_size}..; "
                               "the reader no longer reads in file order")


def with_vectors(batches: List, pool, batch_size: int, key: str) -> List:
    """Copies of ``batches`` whose ``extras[key]`` holds the pool vector of each row (row i -> pool[i % P])."""
    import torch

    from recsys_llm.data.batch import Batch

    out = []
    for index, batch in enumerate(batches):
        rows = torch.arange(index * batch_size, (index + 1) * batch_size) % pool.size(0)
        extras = {**batch.extras, key: pool[rows].contiguous()}  # (B, d)
        out.append(Batch(batch.dense_features, batch.sparse_features, batch.labels, extras))
    return out


# ---- the tasks -----------------------------------------------------------------------------------
def elec_config(sizes: Sizes):
    """Joint teacher-student distillation with the default KD weights, vectors from ``extras``."""
    from recsys_llm.modules.elec import ELECConfig
    from recsys_llm.modules.teacher_student import TeacherStudentConfig

    return ELECConfig(task="distill", vector_dim=sizes.vector_dim, distill=TeacherStudentConfig(mode="joint"))


def build_plain(name: str, sizes: Sizes, schema, tables_device, dense_device=None):
    """The plain backbone's ``CTRTask``."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.models.task import CTRTask

    return CTRTask(build_backbone(model_config(name, sizes.smoke_models), schema, device=tables_device,
                                  dense_device=dense_device))


def build_kd(name: str, sizes: Sizes, schema, device):
    """The joint KD task, tables on ``meta`` for DMP, dense weights on ``device``."""
    import torch

    from recsys_llm.modules.elec import build_elec_task

    return build_elec_task(elec_config(sizes), schema, model_config(name, sizes.smoke_models),
                           device=torch.device("meta"), dense_device=device)


def served_tasks(name: str, sizes: Sizes, schema, plain_dmp, kd_dmp) -> Dict[str, Any]:
    """Unsharded CPU copies of the trained plain task, student and gain network (eval mode)."""
    import torch

    from recsys_llm.modules.elec import build_gain_network, build_student
    from recsys_llm.serving import sub_state, unsharded_state_dict

    cpu = torch.device("cpu")
    config, model = elec_config(sizes), model_config(name, sizes.smoke_models)
    plain = build_plain(name, sizes, schema, cpu)
    plain.load_state_dict(unsharded_state_dict(plain_dmp))
    full = unsharded_state_dict(kd_dmp)
    student = build_student(schema, model, device=cpu)
    student.load_state_dict(sub_state(full, "student."))
    gain = build_gain_network(config, schema, model, device=cpu)
    gain.load_state_dict(sub_state(full, "teacher."))
    # the deployable gain network: user and item vectors from frozen entity tables (random here:
    # serving cost does not depend on the values), exported like the student
    entity_config = dataclasses.replace(config, vector_source="entity_table",
                                        entity_tables={"user_id": "unused", "item_id": "unused"})
    gain_entity = build_gain_network(entity_config, schema, model, device=cpu)
    return {"plain": plain.eval(), "student": student.eval(), "gain": gain.eval(),
            "gain_entity_tables": gain_entity.eval()}


def online_gain_step(gain, llm, renderer, requests: List[Tuple[Any, Any]], key: str) -> Callable[[], Any]:
    """One request served by the gain network that runs the LLM itself: text -> r -> gain logits."""
    import torch

    from recsys_llm.data.batch import Batch

    iterator = itertools.cycle(requests)

    def step() -> Any:
        batch, rows = next(iterator)
        texts = renderer.render(rows).to_pylist()
        vectors = llm.encode(texts)  # (B, d)
        request = Batch(batch.dense_features, batch.sparse_features, batch.labels, {key: vectors})
        with torch.no_grad():
            return gain.predict(request).logits

    return step


def compare_backbone(name: str, sizes: Sizes, schema, train_batches: List, requests: List[Tuple[Any, Any]],
                     llm, renderer, device, work_dir: str) -> Dict[str, Any]:
    """Train plain vs joint KD, then serve student vs plain and student vs online gain, side by side."""
    import torch

    torch.manual_seed(0)
    plain_dmp, plain_optimizer = shard_for_training(build_plain(name, sizes, schema, torch.device("meta"), device),
                                                    device, sizes.batch_size)
    torch.manual_seed(0)
    kd_dmp, kd_optimizer = shard_for_training(build_kd(name, sizes, schema, device), device, sizes.batch_size)
    loops = {
        label: TrainEpochLoop(model, optimizer, device, itertools.cycle(train_batches), sizes.batch_size,
                              sizes.warmup_steps, sizes.measured_steps, description=f"elec {name} {label}")
        for label, model, optimizer in (("plain", plain_dmp, plain_optimizer), ("joint_kd", kd_dmp, kd_optimizer))
    }
    train_rounds = interleaved_repeats(loops, sizes.repeats, f"elec {name} train")

    tasks = served_tasks(name, sizes, schema, plain_dmp, kd_dmp)
    serve_batches = train_batches
    student_logits, student_path = served_logits(tasks["student"], os.path.join(work_dir, f"export_{name}_student"),
                                                 serve_batches[0], schema)
    plain_logits, plain_path = served_logits(tasks["plain"], os.path.join(work_dir, f"export_{name}_plain"),
                                             serve_batches[0], schema)
    entity_logits, entity_path = served_logits(tasks["gain_entity_tables"],
                                               os.path.join(work_dir, f"export_{name}_gain_entity"), serve_batches[0],
                                               schema)
    request_batches = [batch for batch, _ in requests]
    key = elec_config(sizes).vector_key
    online = online_gain_step(tasks["gain"], llm, renderer, requests, key)
    online()  # tokenizer and LLM warm-up, once (a measurement of the online path runs no untimed request)
    contenders = {
        "student": samples_per_second(cycling_step(student_logits, serve_batches), sizes.batch_size,
                                      sizes.serve_warmup, sizes.serve_steps),
        "plain": samples_per_second(cycling_step(plain_logits, serve_batches), sizes.batch_size,
                                    sizes.serve_warmup, sizes.serve_steps),
        "gain_entity_tables": samples_per_second(cycling_step(entity_logits, serve_batches), sizes.batch_size,
                                                 sizes.serve_warmup, sizes.serve_steps),
        "student_request": samples_per_second(cycling_step(student_logits, request_batches), sizes.request_batch_size,
                                              sizes.serve_warmup, sizes.serve_steps),
        "gain_online_llm": samples_per_second(online, sizes.request_batch_size, 0, sizes.online_steps),
    }
    serve_rounds = interleaved_repeats(contenders, sizes.repeats, f"elec {name} serve")

    kd_ratios = per_round_ratios(train_rounds["joint_kd"], train_rounds["plain"])
    serve_ratios = per_round_ratios(serve_rounds["student"], serve_rounds["plain"])
    online_ratios = per_round_ratios(serve_rounds["student_request"], serve_rounds["gain_online_llm"])
    return {
        "kd_train_ratio": best_of_rounds_ratio(train_rounds["joint_kd"], train_rounds["plain"]),
        "student_serve_ratio": best_of_rounds_ratio(serve_rounds["student"], serve_rounds["plain"]),
        "student_speedup_vs_gain_online_llm": best_of_rounds_ratio(serve_rounds["student_request"],
                                                                   serve_rounds["gain_online_llm"]),
        "gain_entity_tables_serve_ratio": best_of_rounds_ratio(serve_rounds["gain_entity_tables"],
                                                               serve_rounds["plain"]),
        "median_of_round_ratios": {"kd_train": median(kd_ratios), "student_serve": median(serve_ratios),
                                   "student_speedup": median(online_ratios)},
        "kd_train_ratio_rounds": kd_ratios,
        "student_serve_ratio_rounds": serve_ratios,
        "student_speedup_rounds": online_ratios,
        "train_samples_per_second_rounds": train_rounds,
        "serve_samples_per_second_rounds": serve_rounds,
        "serve_path": {"student": student_path, "plain": plain_path, "gain_entity_tables": entity_path,
                       "gain": "eager CTRTask.predict (LLM input)"},
        "pipelined_all_sharded_modules": {label: loop.pipelined_all_sharded_modules for label, loop in loops.items()},
        "parameters": {label: int(sum(p.numel() for p in task.parameters())) for label, task in tasks.items()},
    }


# ---- plot ---------------------------------------------------------------------------------------
def replot(payload: Mapping[str, Any], png_path: Path) -> None:
    """The PNG of a result ``payload`` (as its JSON holds it). Left: serving samples/s per contender and backbone
    (log). Right: the ratios and their goals. A run and ``--replot`` both draw it."""
    details = payload["details"]
    per_backbone, sizes = details["per_backbone"], details["sizes"]
    figures = {"serve": "student_serve_ratio_vs_backbone", "vs online LLM": "student_speedup_vs_gain_online_llm",
               "KD train": "kd_train_ratio_vs_backbone",
               "gain (entity tables)\nserve": "gain_entity_tables_serve_ratio_vs_backbone"}
    ratios = {label: payload[key] for label, key in figures.items()}
    goals = {label: details["goals"][key] for label, key in figures.items() if key in details["goals"]}
    title = f"{llm_name(details['llm'])}: serve batch {sizes['batch_size']}, request {sizes['request_batch_size']}"
    names = list(per_backbone)
    width = 0.8 / len(SERVE_CONTENDERS)

    def serving(axis: Any) -> None:
        for offset, contender in enumerate(SERVE_CONTENDERS):
            values = [median(per_backbone[n]["serve_samples_per_second_rounds"][contender]) for n in names]
            axis.bar([i + offset * width for i in range(len(names))], values, width, label=contender)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        axis.set_xticklabels(names, fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("inference samples/s")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them

    two_panel_figure(png_path, serving, lambda right: ratio_bars(right, ratios, goals, "ELEC ratios"))


# ---- main ---------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> dict:
    parser = build_parser(NAME, __doc__)
    parser.add_argument("--backbones", nargs="+", choices=ALL_BACKBONES, default=None,
                        help="backbones to compare (default: per mode)")
    parser.add_argument("--llm", default=None, help="local Hugging Face model directory (default: offline MiniLM)")
    args = parse_args(NAME, __doc__, argv, parser=parser)
    if args.replot:
        return replot_json(args, replot)
    check_llm_option(parser, args.llm)  # before the data is made and the LLM loaded
    sizes = SIZES[args.mode]
    if args.backbones:
        sizes = dataclasses.replace(sizes, backbones=tuple(args.backbones))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.semantics.row_text import RowTextRenderer
    from recsys_llm.train.distributed import teardown_distributed

    context = single_rank_context(args)
    device = context.device
    started = time.perf_counter()
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="elec_bench_") as work_dir:
        data_dir = os.path.join(work_dir, "data")
        generate_synthetic(data_dir, sizes.data_rows, seed=args.seed)
        schema = DatasetSchema.load(data_dir)
        renderer = RowTextRenderer(schema)
        columns = [schema.row_key, *renderer.field_names]
        with watch("llm_load"):
            # on the run's device, as `semantics export` runs it there: the online gain network's LLM of a GPU server
            llm = load_ctr_llm(sizes, args.llm, work_dir, args.seed).to(device)

        # KD training batches: train rows in file order, LLM vectors of a pool of them.
        train_batches = train_split_batches(schema, sizes.batch_size, sizes.memory_batches)
        check_row_order(train_batches, split_rows(schema, "train", columns, len(train_batches) * sizes.batch_size),
                        sizes.batch_size, schema.row_key)
        pool_texts = renderer.render(split_rows(schema, "train", columns, sizes.vector_pool_rows)).to_pylist()
        with watch("pool_encode"):
            pool = llm.encode(pool_texts)  # (P, d)
        train_batches = with_vectors(train_batches, pool, sizes.batch_size, elec_config(sizes).vector_key)

        # Requests: test rows in file order, each with its Arrow rows for rendering.
        reader = ParquetBatchReader(schema, "test", sizes.request_batch_size, drop_last=True, prefetch=0)
        request_batches = list(itertools.islice(iter(reader), sizes.request_batches))
        request_rows = split_rows(schema, "test", columns, len(request_batches) * sizes.request_batch_size)
        check_row_order(request_batches, request_rows, sizes.request_batch_size, schema.row_key)
        requests = [(batch, request_rows.slice(i * sizes.request_batch_size, sizes.request_batch_size))
                    for i, batch in enumerate(request_batches)]

        per_backbone = {}
        for name in sizes.backbones:
            per_backbone[name] = compare_backbone(name, sizes, schema, train_batches, requests, llm, renderer, device,
                                                  work_dir)
            result = per_backbone[name]
            print(f"[{NAME}] {name}: serve ratio {result['student_serve_ratio']:.3f}, speedup vs online gain "
                  f"{result['student_speedup_vs_gain_online_llm']:.4g}, KD train ratio {result['kd_train_ratio']:.3f}",
                  flush=True)
        tokens = llm.tokenizer(pool_texts, truncation=False)["input_ids"]

    figures = {
        "student_serve_ratio_vs_backbone": geometric_mean([r["student_serve_ratio"] for r in per_backbone.values()]),
        "student_speedup_vs_gain_online_llm": geometric_mean(
            [r["student_speedup_vs_gain_online_llm"] for r in per_backbone.values()]),
        "kd_train_ratio_vs_backbone": geometric_mean([r["kd_train_ratio"] for r in per_backbone.values()]),
        "gain_entity_tables_serve_ratio_vs_backbone": geometric_mean(
            [r["gain_entity_tables_serve_ratio"] for r in per_backbone.values()]),
    }
    goals = {"student_serve_ratio_vs_backbone": GOAL_SERVE, "student_speedup_vs_gain_online_llm": GOAL_ONLINE,
             "kd_train_ratio_vs_backbone": GOAL_KD_TRAIN}  # the entity-table gain figure has no goal
    details = {
        "goals": goals,
        "headline_method": "geometric mean over backbones of the per-backbone ratio; " + RATIO_METHOD,
        "per_backbone": per_backbone,
        "llm": llm.config.model_path,
        "llm_setup": f"CTRAdaptedLLM(tuning='heads', pooling={llm.config.pooling!r}, representation_dim="
                     f"{sizes.vector_dim}, max_length={sizes.max_length}); untuned (inference cost does not depend "
                     "on the weights; 'heads' = no adapter layers, the cost of a LoRA model after merging)",
        "llm_device": str(next(llm.parameters()).device),
        "llm_load_seconds": watch.seconds["llm_load"],
        "llm_pool_encode_texts_per_second": len(pool_texts) / watch.seconds["pool_encode"],
        "mean_row_text_tokens": sum(len(t) for t in tokens) / len(tokens),
        "row_text_example": pool_texts[0],
        "kd_vectors": f"real CTR-LLM vectors of the first {sizes.vector_pool_rows} train rows, row i of the KD "
                      f"batches gets vector i % {sizes.vector_pool_rows}",
        "kd_setup": "build_elec_task(ELECConfig(task='distill', distill=TeacherStudentConfig(mode='joint'))): gain "
                    "network (teacher_ tables + VectorFieldInjection) + vanilla network (student_ tables), score KD "
                    "(BCE, alpha 1) + representation KD (MSE, beta 0.1) + teacher BCE; shard_model (planner, DMP 1 "
                    "rank, fused RowWiseAdagrad) + Adam; train_epoch on TrainPipelineSparseDist",
        # the exported artifacts (student, plain, entity-table gain) are unsharded and served on CPU,
        # whatever --device the training used
        "serve_device": "cpu",
        "serve_setup": "student: unsharded_state_dict -> sub_state('student.') -> build_student -> export_task -> "
                       "ServedModel.logits; plain: the same export of the plain task; gain_online_llm: per request "
                       "RowTextRenderer.render -> CTRAdaptedLLM.encode -> gain CTRTask.predict (eager, no_grad); "
                       "student_request: the exported student on the same requests; gain_entity_tables: a gain "
                       "network with user_id and item_id vectors in frozen entity tables, exported with them "
                       "(export_task -> ServedModel.logits), no LLM at request time",
        "sizes": dataclasses.asdict(sizes),
        "total_seconds": time.perf_counter() - started,
    }
    table = [
        {"backbone": name,
         "student serve ratio": round(r["student_serve_ratio"], 4),
         "speedup vs online gain": round(r["student_speedup_vs_gain_online_llm"], 1),
         "KD train ratio": round(r["kd_train_ratio"], 4),
         "entity-table gain serve ratio": round(r["gain_entity_tables_serve_ratio"], 4),
         "plain serve samples/s (median of rounds)": round(median(r["serve_samples_per_second_rounds"]["plain"]), 1),
         "online gain samples/s (median of rounds)": round(median(r["serve_samples_per_second_rounds"]["gain_online_llm"]), 2),
         "plain train samples/s (median of rounds)": round(median(r["train_samples_per_second_rounds"]["plain"]), 1)}
        for name, r in per_backbone.items()
    ]
    payload = result_payload(args, figures, details=details, table=table)
    write_result(args, payload, replot)
    print_summary(NAME, payload)
    if args.mode != "smoke":
        for key, value in figures.items():
            if key in goals and value < goals[key]:
                print(f"[{NAME}] {key}={value:.4g} below the goal {goals[key]}; load average "
                      f"{payload['machine']['load_average_at_end']}", file=sys.stderr)
    teardown_distributed()
    return payload


if __name__ == "__main__":
    run_main(main)
