"""Peer comparison: the same DeepFM on the same data and batch, this project vs DeepCTR-Torch.

Both sides train DeepFM (embedding dim D, MLP ``mlp_layer_sizes``, no dropout, no weight decay;
Adagrad for the embedding tables, Adam for the rest, same learning rates) on the train split of
the embedded synthetic data (``recsys_llm.data.synthetic``) with the same batch size for the
same number of epochs, then predict its test split:

* ``project``: built as the trainer builds it (``task_builder.build_task`` with ``model.name:
  deepfm``, ``shard_model``: planner + DMP on 1 rank + fused Adagrad tables,
  ``build_optimizer``) and trained by the project's loop
  (``recsys_llm.train.pipeline.train_epoch`` on ``TrainPipelineSparseDist``) reading the train
  split from Parquet with ``ParquetBatchReader`` as the trainer does (shuffled, validated,
  background prefetch): end to end, decode included;
* ``deepctr_fit``: ``deepctr_torch.models.DeepFM`` trained by DeepCTR-Torch's own
  ``model.fit`` (its ``DataLoader`` over in-memory arrays), as its users train it;
* ``deepctr_loop``: the same DeepCTR-Torch model driven by a hand loop over one prebuilt
  tensor (the fastest way we found to drive it), for reference.

DeepCTR-Torch runs in its own venv (``.venv-peers``, made by ``bash scripts/peer_venv.sh``:
the same torch version, ``deepctr-torch`` installed with ``--no-deps``), as a child process
(``benchmarks/peer_deepctr.py``) answering JSON requests over a pipe; both sides use the same
number of torch threads and never run at the same time. Epochs are interleaved (project, fit,
loop; then the reverse order), and each epoch's samples/s is its steady state (clock started
after ``warmup_steps`` steps).

Both comparisons run in one invocation, each on its own synthetic data of the same row count:

* ``small`` tables: the generator's default vocabularies (``rows // 40`` users, ``rows // 100``
  items: 6,250 and 2,500 in quick mode);
* ``large`` tables: 10^6 users and 2.5 * 10^5 items, production-sized id tables. DeepCTR-Torch's
  ``nn.Embedding`` tables get dense gradients, and its optimizer steps over every row of every
  table each batch; the project's fused FBGEMM optimizer updates only the rows in the batch.
  With 0.2 training rows per user (quick mode; 1 in full mode) both models overfit by the last
  epoch (test LogLoss above 1 in quick mode), so this scale compares the implementations, not
  the quality of the data.

Figures (top level of the JSON, from the ``large`` tables; the ``small`` ones are in
``details.by_tables``, and the ``*_by_tables`` entries hold both):

* ``train_speedup_vs_deepctr_torch`` = project / deepctr_fit training samples/s, the ratio of
  the two contenders' best epochs (``best_of_rounds_ratio``; goal >= 3); the ratio against
  ``deepctr_loop`` is in ``details``;
* ``auc_diff_vs_deepctr_torch`` = test AUC of the project's model minus that of DeepCTR-Torch's
  ``fit`` model after the last epoch (goal: about 0, i.e. equal AUC), both computed by the same
  function (``recsys_llm.train.metrics.binary_metrics``).

The project's DeepFM is configured like DeepCTR-Torch's: its FM part reads the sparse fields
only (``dense_as_fields=False``; both feed dense features to the linear part and the MLP) and
its tables start uniform in ±sqrt(3)·1e-4, the spread of DeepCTR's N(0, 1e-4)
(``embedding_init_scale``). Known differences (recorded in ``details``): the init is uniform,
not normal; the project averages the BCE over the batch, DeepCTR-Torch sums it (Adagrad and
Adam are invariant to that scale, up to epsilon).

Without the peer venv the script stops with exit status 75 (``MISSING_PEER_EXIT``) and says how to
create it (no JSON is written: a missing peer is not a result); ``run_all.py`` reports it skipped. Pass
``--peer-python`` to use another interpreter (a path that does not exist is a usage error, exit 2: a typo is no
missing peer).

Usage::

    bash scripts/peer_venv.sh        # once: .venv-peers with DeepCTR-Torch
    python benchmarks/peers.py [--quick|--smoke] [--json PATH] [--plot PATH] [--peer-python PATH]
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # annotations only: torch is imported where it is first used
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    BENCH_DIR,
    RATIO_METHOD,
    REPO_ROOT,
    best_of_rounds_ratio,
    build_parser,
    device_synchronize,
    median,
    parse_args,
    per_round_ratios,
    print_summary,
    replot_json,
    result_payload,
    run_main,
    single_rank_context,
    two_panel_figure,
    write_result,
)

NAME = "peers"
GOAL_SPEEDUP = 3.0
DEEPCTR_INIT_STD = 1e-4  # deepctr_torch.models.DeepFM(init_std=0.0001), the default the peer uses
PEER_SCRIPT = BENCH_DIR / "peer_deepctr.py"
DEFAULT_PEER_VENV = REPO_ROOT / ".venv-peers"
CONTENDERS = ("project", "deepctr_fit", "deepctr_loop")
# EX_TEMPFAIL (sysexits.h): not an argument error (2); run_all.py reports the script skipped, not failed
MISSING_PEER_EXIT = 75


@dataclasses.dataclass(frozen=True)
class TableScale:
    """The id tables of one comparison: user and item vocabulary sizes of the synthetic data.

    Args:
        name (str): ``small`` or ``large``.
        num_users (Optional[int]): users (the ``user_id`` table's rows); None: the generator's
            default for the row count (``rows // 40``).
        num_items (Optional[int]): items; None: the default (``rows // 100``).
    """

    name: str
    num_users: Optional[int] = None
    num_items: Optional[int] = None


SMALL_TABLES = TableScale("small")
# Production-sized id tables: 10^6 users, 2.5 * 10^5 items. DeepCTR-Torch's nn.Embedding
# tables get dense gradients and a dense optimizer step over every row each batch; the
# project's fused TBE optimizer touches only the rows in the batch.
LARGE_TABLES = TableScale("large", num_users=1_000_000, num_items=250_000)
HEADLINE_SCALE = LARGE_TABLES.name


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem and measurement sizes of one mode.

    Args:
        data_rows (int): synthetic rows generated (80% train, 10% test).
        batch_size (int): rows per training batch (both sides).
        epochs (int): training epochs (both sides); each is one interleaved round.
        warmup_steps (int): untimed steps at the start of every epoch.
        embedding_dim (int): D.
        mlp_layer_sizes (Tuple[int, ...]): DeepFM's deep part.
        sparse_lr (float): Adagrad learning rate of the tables.
        dense_lr (float): Adam learning rate of the rest.
        eval_batch_size (int): rows per prediction batch.
        tables (Tuple[TableScale, ...]): the table sizes compared, each on its own data.
    """

    data_rows: int = 1_250_000
    batch_size: int = 1024
    epochs: int = 3
    warmup_steps: int = 10
    embedding_dim: int = 16
    mlp_layer_sizes: Tuple[int, ...] = (256, 128)
    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    eval_batch_size: int = 8192
    tables: Tuple[TableScale, ...] = (SMALL_TABLES, LARGE_TABLES)


SIZES: Dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(data_rows=250_000, epochs=3, warmup_steps=5),
    "smoke": Sizes(data_rows=4_000, batch_size=256, epochs=1, warmup_steps=2, embedding_dim=8,
                   mlp_layer_sizes=(16, 8), eval_batch_size=512,
                   tables=(SMALL_TABLES, TableScale(HEADLINE_SCALE, num_users=20_000, num_items=5_000))),
}


class PeerMissing(RuntimeError):
    """The peer venv (DeepCTR-Torch) is not there."""


def peer_python(override: Optional[str]) -> Path:
    """The interpreter of the peer venv: ``--peer-python``, ``$PEER_VENV/bin/python`` or ``.venv-peers``.

    Raises:
        PeerMissing: it does not exist, with the command that creates it.
    """
    if override:
        path = Path(override)
    else:
        path = Path(os.environ.get("PEER_VENV", str(DEFAULT_PEER_VENV))) / "bin" / "python"
    if not path.exists():
        raise PeerMissing(
            f"{NAME}: no DeepCTR-Torch peer interpreter at {path}. Create the peer venv with "
            "`bash scripts/peer_venv.sh` (needs access to the package registry; see scripts/peer_venv.sh) "
            "or pass --peer-python PATH to a Python that has torch, numpy and deepctr-torch."
        )
    return path


# ---- data ---------------------------------------------------------------------------------------
def field_specs(schema) -> List[Dict[str, Any]]:
    """The fields as the peer sees them: name, kind, cardinality, max length."""
    from recsys_llm.data.schema import FieldKind

    kinds = {FieldKind.SPARSE: "sparse", FieldKind.SEQUENCE: "sequence", FieldKind.DENSE: "dense"}
    return [{"name": f.name, "kind": kinds[f.kind], "cardinality": f.cardinality, "max_length": f.max_length}
            for f in schema.fields]


def export_split(schema, split: str, fields: Sequence[Dict[str, Any]], path: str) -> int:
    """Writes a split as ``.npz`` (one array per field, ``label``), file order; returns its rows.

    Sparse ids (N,) int64, sequences (N, max_length) int64 right-padded with 0, dense (N,) float32.
    """
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(schema.split_path(split), columns=[f["name"] for f in fields] + [schema.label])
    arrays: Dict[str, np.ndarray] = {}
    for field in fields:
        column = table.column(field["name"]).combine_chunks()
        if field["kind"] == "sequence":
            width = int(field["max_length"])
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
            if lengths.size and lengths.max() > width:
                raise ValueError(f"{schema.split_path(split)}: field {field['name']!r} has a list of {lengths.max()} ids, "
                                 f"more than its max_length {width}")
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
            if values.size and values.min() == 0:
                raise ValueError(f"{schema.split_path(split)}: field {field['name']!r} holds id 0, which DeepCTR-Torch's "
                                 "sequence pooling treats as padding")
            padded = np.zeros((len(lengths), width), dtype=np.int64)
            rows = np.repeat(np.arange(len(lengths)), lengths)
            positions = np.arange(values.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            padded[rows, positions] = values
            arrays[field["name"]] = padded
        elif field["kind"] == "sparse":
            arrays[field["name"]] = column.to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            arrays[field["name"]] = column.to_numpy(zero_copy_only=False).astype(np.float32)
    arrays["label"] = table.column(schema.label).to_numpy().astype(np.float32)
    np.savez(path, **arrays)
    return int(table.num_rows)


# ---- the peer process ---------------------------------------------------------------------------
class PeerProcess:
    """``peer_deepctr.py`` in the peer venv, spoken to in JSON lines.

    Args:
        python (Path): the peer venv's interpreter.
        log_path (str): where the peer's stderr (and DeepCTR's prints) go.
    """

    def __init__(self, python: Path, log_path: str) -> None:
        # No project path and no proxy: deepctr_torch's PyPI version check fails at once.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update({"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""})
        self._log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")
        self._process = subprocess.Popen(
            [str(python), str(PEER_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, env=env, cwd=str(REPO_ROOT),
        )

    def request(self, command: str, **fields: Any) -> Dict[str, Any]:
        """Sends one request and returns its answer; raises with the peer's traceback on failure."""
        self._process.stdin.write(json.dumps({"cmd": command, **fields}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            self._log.flush()
            tail = Path(self._log_path).read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(f"{NAME}: the DeepCTR-Torch peer exited during {command!r}; its stderr:\n{tail}")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"{NAME}: the DeepCTR-Torch peer failed {command!r}:\n{answer['error']}")
        return answer

    def close(self) -> None:
        """Asks the peer to quit and waits for it."""
        if self._process.poll() is None:
            try:
                self.request("quit")
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


# ---- the project side ---------------------------------------------------------------------------
def project_config(sizes: Sizes):
    """The experiment config of the project's DeepFM (what ``recsys-llm train`` would read)."""
    from recsys_llm.models.registry import ModelConfig
    from recsys_llm.train.config import DataConfig, ExperimentConfig
    from recsys_llm.train.sharding_config import OptimizerConfig

    return ExperimentConfig(
        data=DataConfig(batch_size=sizes.batch_size),
        model=ModelConfig(name="deepfm", embedding_dim=sizes.embedding_dim, mlp_layer_sizes=sizes.mlp_layer_sizes,
                          dropout=0.0, dense_as_fields=False, embedding_init_scale=DEEPCTR_INIT_STD * math.sqrt(3)),
        optim=OptimizerConfig(sparse="adagrad", sparse_lr=sizes.sparse_lr, dense="adam", dense_lr=sizes.dense_lr),
    )


class ProjectSide:
    """The project's DeepFM, sharded and pipelined, trained epoch by epoch from Parquet."""

    def __init__(self, schema, sizes: Sizes, device, seed: int) -> None:
        import torch

        from recsys_llm.data.parquet import ParquetBatchReader
        from recsys_llm.train.task_builder import build_task
        from recsys_llm.train.sharding import build_optimizer, shard_model

        config = project_config(sizes)
        torch.manual_seed(seed)
        task = build_task(config, schema, device).task
        self.model, _ = shard_model(task, device, 1, config.sharding, config.optim, sizes.batch_size)
        self.optimizer = build_optimizer(self.model, config.optim)
        self._schema, self._sizes, self._device = schema, sizes, device
        self._synchronize = device_synchronize(device)
        self._reader = ParquetBatchReader(schema, "train", sizes.batch_size, shuffle=config.data.shuffle, seed=seed,
                                          validate=config.data.validate, pin_memory=device.type == "cuda")
        self.pipelined_all_sharded_modules = False

    def epoch(self, epoch: int) -> Dict[str, Any]:
        """One epoch of ``train_epoch``; samples/s from the end of step ``warmup_steps`` to the end."""
        from recsys_llm.train.pipeline import train_epoch

        warmup, batch_size = self._sizes.warmup_steps, self._sizes.batch_size
        clock: Dict[str, float] = {}

        def on_step(step: int, loss: "torch.Tensor") -> bool:
            if step == warmup:
                self._synchronize()
                clock["start"] = time.perf_counter()
            return False

        self._reader.set_epoch(epoch)
        begin = time.perf_counter()
        stats = train_epoch(self.model, self.optimizer, self._reader, self._device, on_step=on_step,
                            description="project deepfm", progress=False)
        self._synchronize()
        end = time.perf_counter()
        if "start" not in clock or stats.steps <= warmup:
            raise RuntimeError(f"epoch of {stats.steps} steps is too short for {warmup} warm-up steps")
        measured = stats.samples - warmup * batch_size
        self.pipelined_all_sharded_modules = sorted(stats.pipelined_modules) == sorted(stats.sharded_modules)
        return {"samples_per_second": measured / (end - clock["start"]), "measured_samples": measured,
                "measured_seconds": end - clock["start"], "steps": stats.steps, "epoch_seconds": end - begin,
                "mean_loss": stats.mean_loss}

    def test_metrics(self) -> Dict[str, float]:
        """AUC/LogLoss on the test split through the trainer's ``evaluate``."""
        from recsys_llm.data.parquet import ParquetBatchReader
        from recsys_llm.train.metrics import CTRMetrics
        from recsys_llm.train.pipeline import evaluate

        reader = ParquetBatchReader(self._schema, "test", self._sizes.eval_batch_size, prefetch=0)
        return evaluate(self.model, reader, self._device, CTRMetrics(), progress=False)


def peer_metrics(peer: PeerProcess, driver: str, labels, work_dir: str) -> Dict[str, float]:
    """AUC/LogLoss of a peer model's test predictions, by the project's ``binary_metrics``."""
    import numpy as np
    import torch

    from recsys_llm.train.metrics import binary_metrics

    out = os.path.join(work_dir, f"pred_{driver}.npy")
    answer = peer.request("predict", driver=driver, split="test", out=out)
    probabilities = np.load(out, allow_pickle=False)
    if probabilities.shape != labels.shape:
        raise RuntimeError(f"{driver}: {probabilities.shape[0]} predictions for {labels.shape[0]} test rows")
    metrics = binary_metrics(torch.from_numpy(probabilities), torch.from_numpy(labels))
    metrics["predict_seconds"] = answer["seconds"]
    return metrics


def run_scale(scale: TableScale, sizes: Sizes, python: Path, device, seed: int,
              flush_denormal: bool) -> Dict[str, Any]:
    """Both sides on the synthetic data of one table scale: interleaved epochs, then test metrics.

    ``flush_denormal``: whether this process flushes subnormal floats; the peer does the same.

    Returns:
        Dict: ``train_speedup_vs_deepctr_fit`` / ``speedup_vs_deepctr_loop`` (best-of-rounds
        ratios), ``auc_diff_vs_deepctr_fit``, the per-epoch figures, test metrics and sizes.
    """
    import numpy as np
    import torch

    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic

    with tempfile.TemporaryDirectory(prefix=f"peers_bench_{scale.name}_") as work_dir:
        data_dir = os.path.join(work_dir, "data")
        generate_synthetic(data_dir, sizes.data_rows, seed=seed, num_users=scale.num_users, num_items=scale.num_items)
        schema = DatasetSchema.load(data_dir)
        fields = field_specs(schema)
        splits = {split: os.path.join(work_dir, f"{split}.npz") for split in ("train", "test")}
        rows = {split: export_split(schema, split, fields, path) for split, path in splits.items()}
        with np.load(splits["test"], allow_pickle=False) as data:
            test_labels = data["label"]

        peer = PeerProcess(python, os.path.join(work_dir, "peer_stderr.log"))
        try:
            peer_info = peer.request("setup", spec={
                "fields": fields, "splits": splits, "embedding_dim": sizes.embedding_dim,
                "mlp_layer_sizes": list(sizes.mlp_layer_sizes), "dropout": 0.0, "seed": seed,
                "device": str(device), "threads": torch.get_num_threads(), "batch_size": sizes.batch_size,
                "warmup_steps": sizes.warmup_steps, "eval_batch_size": sizes.eval_batch_size,
                "sparse_lr": sizes.sparse_lr, "dense_lr": sizes.dense_lr, "eps": 1e-8,
                "flush_denormal": flush_denormal,
            })
            project = ProjectSide(schema, sizes, device, seed)
            runs = {
                "project": project.epoch,
                "deepctr_fit": lambda e: peer.request("epoch", driver="fit", epoch=e),
                "deepctr_loop": lambda e: peer.request("epoch", driver="loop", epoch=e),
            }
            epochs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in CONTENDERS}
            for epoch in range(sizes.epochs):
                order = CONTENDERS if epoch % 2 == 0 else tuple(reversed(CONTENDERS))
                for name in order:
                    epochs[name].append(runs[name](epoch))
                print(f"[{NAME}] {scale.name} tables, epoch {epoch + 1}/{sizes.epochs}: " + ", ".join(
                    f"{n} {epochs[n][-1]['samples_per_second']:,.0f} samples/s" for n in CONTENDERS), flush=True)
            metrics = {
                "project": project.test_metrics(),
                "deepctr_fit": peer_metrics(peer, "fit", test_labels, work_dir),
                "deepctr_loop": peer_metrics(peer, "loop", test_labels, work_dir),
            }
        finally:
            peer.close()

    rounds = {name: [e["samples_per_second"] for e in epochs[name]] for name in CONTENDERS}
    vs_fit = per_round_ratios(rounds["project"], rounds["deepctr_fit"])
    vs_loop = per_round_ratios(rounds["project"], rounds["deepctr_loop"])
    aucs = {name: float(metrics[name]["auc"]) for name in CONTENDERS}
    return {
        "train_speedup_vs_deepctr_fit": best_of_rounds_ratio(rounds["project"], rounds["deepctr_fit"]),
        "auc_diff_vs_deepctr_fit": aucs["project"] - aucs["deepctr_fit"],
        "speedup_vs_deepctr_loop": best_of_rounds_ratio(rounds["project"], rounds["deepctr_loop"]),
        "median_of_epoch_ratios": {"vs_fit": median(vs_fit), "vs_loop": median(vs_loop)},
        "speedup_vs_deepctr_fit_rounds": vs_fit,
        "speedup_vs_deepctr_loop_rounds": vs_loop,
        "samples_per_second_median": {name: median(values) for name, values in rounds.items()},
        "samples_per_second_rounds": rounds,
        "epochs": epochs,
        "test_metrics": {name: {k: float(v) for k, v in m.items()} for name, m in metrics.items()},
        "rows": rows,
        "table_rows": {f["name"]: f["cardinality"] for f in fields if f["kind"] != "dense"},
        "peer": peer_info,
        "project_pipelined_all_sharded_modules": project.pipelined_all_sharded_modules,
    }


# ---- plot ---------------------------------------------------------------------------------------
def replot(payload: Mapping[str, Any], png_path: Path) -> None:
    """The PNG of a result ``payload`` (as its JSON holds it). Left: best training samples/s per contender and
    table scale. Right: test AUC, same bars. A run and ``--replot`` both draw it."""
    results, sizes = payload["details"]["by_tables"], payload["details"]["sizes"]
    title = f"DeepFM D={sizes['embedding_dim']} MLP {list(sizes['mlp_layer_sizes'])}, batch {sizes['batch_size']}"
    names = list(results)

    def bars(axis: Any, value: Callable[[Dict[str, Any], str], float], label: str, fmt: str) -> None:
        width = 0.8 / len(CONTENDERS)
        for index, contender in enumerate(CONTENDERS):
            values = [value(results[name], contender) for name in names]
            positions = [i + (index - (len(CONTENDERS) - 1) / 2) * width for i in range(len(names))]
            drawn = axis.bar(positions, values, width, label=contender)
            for bar, v in zip(drawn, values):
                axis.annotate(format(v, fmt), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                              fontsize=7)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels([f"{n} tables\n({max(results[n]['table_rows'].values()):,} rows max)" for n in names],
                             fontsize=8)
        axis.set_ylabel(label)
        axis.legend(fontsize=7)

    def throughput(axis: Any) -> None:
        bars(axis, lambda r, c: max(r["samples_per_second_rounds"][c]), "training samples/s (best epoch)", ",.0f")
        axis.set_title(title, fontsize=9)

    def auc(axis: Any) -> None:
        bars(axis, lambda r, c: r["test_metrics"][c]["auc"], "test AUC", ".4f")
        low = min(r["test_metrics"][c]["auc"] for r in results.values() for c in CONTENDERS)
        axis.set_ylim(max(0.0, low - 0.05), 1.0)
        axis.set_title("test AUC after the last epoch", fontsize=9)

    two_panel_figure(png_path, throughput, auc)


# ---- main ---------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> dict:
    parser = build_parser(NAME, __doc__)
    parser.add_argument("--peer-python", default=None,
                        help="Python of the DeepCTR-Torch venv (default: $PEER_VENV/bin/python or .venv-peers/bin/python)")
    args = parse_args(NAME, __doc__, argv, parser=parser)
    if args.replot:
        return replot_json(args, replot)
    sizes = SIZES[args.mode]
    if args.peer_python is not None and not os.path.isfile(args.peer_python):  # a typo, not a peer not installed
        parser.error(f"--peer-python {args.peer_python}: no such file; expected the Python of a venv with torch, "
                     "numpy and deepctr-torch (scripts/peer_venv.sh makes .venv-peers)")
    try:
        python = peer_python(args.peer_python)
    except PeerMissing as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(MISSING_PEER_EXIT) from None

    from recsys_llm.train.distributed import teardown_distributed

    context = single_rank_context(args)
    started = time.perf_counter()
    results = {scale.name: run_scale(scale, sizes, python, context.device, args.seed, args.flush_denormal)
               for scale in sizes.tables}
    headline = results[HEADLINE_SCALE]
    figures = {
        "train_speedup_vs_deepctr_torch": headline["train_speedup_vs_deepctr_fit"],
        "auc_diff_vs_deepctr_torch": headline["auc_diff_vs_deepctr_fit"],
    }
    details = {
        "goal_train_speedup_vs_deepctr_torch": GOAL_SPEEDUP,
        "goal_auc_diff": "about 0 (equal AUC)",
        "headline_tables": HEADLINE_SCALE,
        "train_speedup_vs_deepctr_torch_by_tables": {
            name: result["train_speedup_vs_deepctr_fit"] for name, result in results.items()},
        "auc_diff_vs_deepctr_torch_by_tables": {
            name: result["auc_diff_vs_deepctr_fit"] for name, result in results.items()},
        "speedup_vs_deepctr_loop_by_tables": {
            name: result["speedup_vs_deepctr_loop"] for name, result in results.items()},
        "tables": {scale.name: dataclasses.asdict(scale) for scale in sizes.tables},
        "ratio_method": RATIO_METHOD + "; epochs interleaved (project, fit, loop / reversed)",
        "by_tables": results,
        "sizes": dataclasses.asdict(sizes),
        "project_setup": "task_builder.build_task (deepfm) + shard_model (planner, DMP 1 rank, fused Adagrad tables) + "
                         "Adam; train_epoch on TrainPipelineSparseDist; ParquetBatchReader (shuffled, validated, "
                         "prefetch) over the train split",
        "peer_setup": "deepctr_torch.models.DeepFM (l2 0, dropout 0), Adagrad tables + Adam rest; 'fit' = "
                      "model.fit(shuffle=True); 'loop' = hand loop over one prebuilt float32 tensor",
        "model_differences": "embedding init uniform ±sqrt(3)·1e-4 (project) vs N(0, 1e-4) (DeepCTR), the same "
                             "spread; BCE mean (project) vs sum (DeepCTR); both FMs read the sparse fields only",
        "total_seconds": time.perf_counter() - started,
    }
    table = [
        {"tables": name, "contender": contender,
         "train samples/s (best)": round(max(result["samples_per_second_rounds"][contender]), 1),
         "project speedup (best/best)": round(best_of_rounds_ratio(result["samples_per_second_rounds"]["project"],
                                                                   result["samples_per_second_rounds"][contender]), 3),
         "test AUC": round(result["test_metrics"][contender]["auc"], 4),
         "test LogLoss": round(result["test_metrics"][contender]["logloss"], 4)}
        for name, result in results.items() for contender in CONTENDERS
    ]
    payload = result_payload(args, figures, details=details, table=table)
    write_result(args, payload, replot)
    print_summary(NAME, payload)
    if args.mode != "smoke" and figures["train_speedup_vs_deepctr_torch"] < GOAL_SPEEDUP:
        print(f"[{NAME}] train_speedup_vs_deepctr_torch={figures['train_speedup_vs_deepctr_torch']:.3g} below the "
              f"goal {GOAL_SPEEDUP}; load average {payload['machine']['load_average_at_end']}", file=sys.stderr)
    teardown_distributed()
    return payload


if __name__ == "__main__":
    run_main(main)
