"""Plug LLM knowledge into a TorchRec model of your own: sharded, pipelined, then served alone.

:class:`MyRanker` stands for the model you already have: an ``EmbeddingBagCollection`` over
the sparse fields, a bottom MLP over the dense features and a top MLP over both. It takes the
plug-ins after two changes (both marked "contract" below): it hands its EBC to
:class:`~recsys_llm.models.base.CTRBackbone`, whose ``forward`` calls it once where
``TrainPipelineSparseDist`` finds it, and what followed the lookup moves into
``interact(dense, pooled, extra_fields) -> (logits, last hidden layer)``. It then gets:

(a) LLaCTR's FRE (a loss term) and FIE (a logit term, part of the served model) from the
    field vectors of ``semantics encode`` (``build_llactr_terms``);
(b) an LLM vector in its dense input: ELEC's gain network is the same class, reading the
    projected item vector r next to the dense features (its ``check_extra_fields`` says so);
(c) joint distillation from that gain network into the plain ``MyRanker`` (``TeacherStudentTask``),
    everything sharded with ``DistributedModelParallel`` (``shard_model``) and trained with
    ``TrainPipelineSparseDist`` (``train_epoch``);
(d) the student exported alone (``export_task``: its tables and a ``torch.export`` program of the
    rest, no teacher and no LLM parameter) and served by ``ServedModel``, which gives the trained
    student's logits.

Before training, rank 0 runs the offline LLM jobs of ``offline_llm_jobs.py`` (next to this
script) once per work directory, ``--rows`` and ``--llm``: embedded synthetic data, ELEC's
CTR-adapted LLM and its item vectors joined to the splits as the column ``llm_vector``, and
LLaCTR's field vectors. The default LLM is the offline all-MiniLM-L6-v2; ``--llm`` takes any
local Hugging Face model. Measured with MiniLM and ``torchrun --nproc_per_node 2`` on an idle
2-core CPU: 23 s in all, of which the offline jobs take about 15 s; a second run with the same
arguments takes 8 s. Validation AUC of the student: 0.67-0.68.

User code: 72 lines (not blank, a comment, a docstring or an import; ``tests/test_examples.py``
counts them), the model itself, argument parsing and printing included; the offline jobs of
``offline_llm_jobs.py`` are 19 more.

Run::

    python examples/plug_into_own_model.py                             # 1 rank (gloo; NCCL on a GPU)
    torchrun --nproc_per_node 2 examples/plug_into_own_model.py        # tables sharded over 2 ranks

It prints (rank 0) one JSON line: the student's validation metrics (``loss`` there is the whole
training objective, BCE + KD + FRE; ``logloss`` the student's own), the training loss per
epoch, the sharded modules the pipeline overlapped, where the served student was exported and
how far its logits are from the trained student's.
"""

import argparse
import functools
import json
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedTensor

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models import CTRBackbone, CTRTask
from recsys_llm.modules import (
    LLaCTRConfig, TeacherStudentConfig, TeacherStudentTask, VectorFieldInjection, build_llactr_terms,
)
from recsys_llm.serving import ServedModel, export_task, materialize_meta, sub_state, unsharded_state_dict
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.pipeline import evaluate, train_epoch
from recsys_llm.train.sharding import build_optimizer, shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

from offline_llm_jobs import LLM_DIM, offline_outputs  # next to this script

EMBEDDING_DIM, INJECTED_WIDTH, EPOCHS = 16, 16, 3  # every table's width; the projected r in the dense input


class MyRanker(CTRBackbone):
    """Your model: pooled embeddings and a bottom MLP of the dense features (B, Dd + injected
    width), concatenated into a top MLP; representation: its last hidden layer (B, 32)."""

    def __init__(self, ebc: EmbeddingBagCollection, num_dense: int, injected_width: int = 0) -> None:
        super().__init__(ebc, num_dense)  # contract: the EBC the planner shards, called once by forward
        self.injected_width = injected_width
        self.bottom = nn.Sequential(nn.Linear(num_dense + injected_width, 32), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(sum(self.embedding_dims.values()) + 32, 64), nn.ReLU(),
                                 nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)

    @property
    def representation_dim(self) -> int:
        return 32

    def check_extra_fields(self, num_fields: int, embedding_dim: int, source: str) -> None:
        """An injected vector joins the dense input (not the fields): it must fill ``injected_width``."""
        if num_fields * embedding_dim != self.injected_width:
            raise ValueError(f"{source}: {num_fields * embedding_dim} values per row, room for {self.injected_width}")

    def interact(self, dense: torch.Tensor, pooled: KeyedTensor,
                 extra_fields: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:  # contract
        if extra_fields is not None:  # the gain network's projected r, (B, 1, INJECTED_WIDTH)
            dense = torch.cat([dense, extra_fields.flatten(1)], dim=1)
        by_name = pooled.to_dict()  # a sharded EBC's key order depends on the plan: look fields up by name
        sparse = torch.cat([by_name[name] for name in self.feature_names], dim=1)  # (B, sum of widths)
        hidden = self.top(torch.cat([sparse, self.bottom(dense)], dim=1))  # (B, 32)
        return self.head(hidden).squeeze(-1), hidden


def tables(schema: DatasetSchema, prefix: str) -> EmbeddingBagCollection:
    """One table per sparse field, on ``meta``: DMP allocates only each rank's shards."""
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=prefix + f.name, embedding_dim=EMBEDDING_DIM, num_embeddings=f.cardinality,
                           feature_names=[f.name]) for f in schema.categorical_fields], device=torch.device("meta"))


def student_task(schema: DatasetSchema, fields: str, device: torch.device) -> CTRTask:
    """The served model: a plain ``MyRanker`` with LLaCTR's FIE (served) and FRE (training only)."""
    with torch.device(device):
        ranker = MyRanker(tables(schema, "student_"), len(schema.dense_fields))
    fie, fre, _ = build_llactr_terms(LLaCTRConfig(fields), schema, ranker, device)
    return CTRTask(ranker, logit_terms=fie, loss_terms=fre)


def main(work_dir: str = "runs/plug_into_own_model", llm: Optional[str] = None, rows: int = 8000) -> Dict[str, Any]:
    ctx = init_distributed("auto")  # rank and world size from torchrun's environment; one rank without it
    work_dir = offline_outputs(work_dir, rows, llm, ctx.rank)  # data, LLM vectors (rank 0 makes them once)
    schema = DatasetSchema.load(f"{work_dir}/data_llm")  # the splits with the llm_vector column
    with torch.device(ctx.device):
        gain = CTRTask(MyRanker(tables(schema, "teacher_"), len(schema.dense_fields), INJECTED_WIDTH),
                       field_injection=VectorFieldInjection(LLM_DIM, INJECTED_WIDTH))  # reads llm_vector
    student = student_task(schema, f"{work_dir}/fields.safetensors", ctx.device)
    task = TeacherStudentTask(gain, student, TeacherStudentConfig(mode="joint", alpha=0.5, beta=0.1))
    optim = OptimizerConfig(sparse="row_wise_adagrad", sparse_lr=0.05, dense="adam", dense_lr=3e-3)
    model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(["table_wise", "row_wise"]), optim)
    optimizer = build_optimizer(model, optim)  # the fused table optimizer + Adam for the dense part
    batches = functools.partial(ParquetBatchReader, schema, batch_size=128, extras=["llm_vector"])
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}
    epochs = [train_epoch(model, optimizer, batches("train", shuffle=True, seed=e, **shard), ctx.device)
              for e in range(EPOCHS)]
    valid = evaluate(model, batches("valid", equal_batches=False, **shard), ctx.device, CTRMetrics())  # the student
    result = {"world_size": ctx.world_size, "valid": valid, "train_loss": [e.mean_loss for e in epochs],
              "pipelined": epochs[-1].pipelined_modules, "sharded": epochs[-1].sharded_modules, "work_dir": work_dir}
    state = unsharded_state_dict(model)  # collective: rank 0 gathers every shard
    if ctx.rank == 0:  # (d) the student alone, on CPU, exported and served
        served = materialize_meta(student_task(schema, f"{work_dir}/fields.safetensors", torch.device("cpu")),
                                  torch.device("cpu"))
        served.load_state_dict(sub_state(state, "student."))
        served.eval()
        request = next(iter(batches("valid", rank=0, world_size=1)))
        export_task(served, f"{work_dir}/served_student", request.dense_features, request.sparse_features,
                    schema=schema)
        program = ServedModel.load(f"{work_dir}/served_student", trust_program=True)
        with torch.no_grad():  # the trained student (eval mode) vs the served artifact, on one request
            gap = program.logits(request.dense_features, request.sparse_features) - served.predict(request).logits
        result.update(export=f"{work_dir}/served_student", served_max_abs_logit_gap=gap.abs().max().item())
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/plug_into_own_model", help="data and LLM vectors (made if missing)")
    parser.add_argument("--llm", default=None, help="local Hugging Face model directory (default: offline MiniLM)")
    parser.add_argument("--rows", type=int, default=8000, help="synthetic impressions to generate")
    main(**vars(parser.parse_args()))
