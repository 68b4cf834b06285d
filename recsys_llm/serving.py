"""Serving artifact of a trained CTR task: the ELEC student alone (or any ``CTRTask``).

``export_task`` writes a directory::

    model.safetensors     full (unsharded) state dict of the task: weights only
    tables.json           its EmbeddingBagCollection tables (name, rows, dim, features, pooling)
    dense_program.pt2     torch.export program of everything after the EBC lookup:
                          (dense (B, Dd), pooled (B, F * D)) -> logits (B,)
    config.json           format version, feature names, id rules, model config, program status
    INFERENCE.md          how to call it

The EBC lookup stays eager (``ServedModel`` rebuilds the EBC from ``tables.json``; on a
serving host with torchrec's inference sharding it would be a TBE lookup) because
``torch.export`` does not capture KeyedJaggedTensor inputs; the dense part is one
exported program, no Python model code needed. When ``torch.export`` cannot capture a
backbone, ``dense_program`` is ``null`` in ``config.json`` (with the reason) and the
state dict serves through the model code.

Only the student of a ``TeacherStudentTask`` is exported (keys ``student.*``): the
artifact holds no teacher, LLM, injection or semantic-table parameter, and
:func:`export_task` refuses a task that reads LLM vectors.

Example (inference)::

    served = ServedModel.load("runs/elec/export", trust_program=True)  # an artifact you exported
    probabilities = served.predict(dense_features, sparse_kjt)  # (B,)
"""

import contextlib
import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.atomic_dir import atomic_directory
from recsys_llm.id_rules import IdRules, id_rules
from recsys_llm.models.base import CTROutput
from recsys_llm.models.pairwise import PairWeightFolding
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.train.distributed import collective_device

FORMAT_VERSION = 1
STATE_FILE = "model.safetensors"
EXPORT_MARKER_FILES = ("config.json", STATE_FILE)  # every export has them (state-only ones too)
SEMANTIC_TABLES_FILE = "semantic_tables.json"  # frozen entity-vector tables of a gain network
ID_RULES_KEY = "id_rules"  # in config.json: per feature, the reader's hashed / max_length (None: not recorded)
FORBIDDEN_PARTS = ("teacher", "field_injection", "semantic_table", "llm", "repr_kd", "score_kd")

INFERENCE_EXAMPLE = """# Inference with an exported model

```python
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from recsys_llm.serving import ServedModel

# the dense program is code: trust_program=True only for artifacts you made or trust
served = ServedModel.load("{path}", trust_program=True)
kjt = KeyedJaggedTensor.from_lengths_sync(
    keys=served.feature_names,                       # {features}
    values=torch.tensor([...], dtype=torch.int64),   # ids, feature-major
    lengths=torch.tensor([...], dtype=torch.int32),  # one length per (feature, row)
)
dense = torch.zeros(batch_size, {num_dense})         # dense features in schema order
probabilities = served.predict(dense, kjt)           # (batch_size,)
```

Ids go through the training reader's rules first (`config.json`, `id_rules`): ids of a
`hashed` field are folded into its table, sequences keep their first `max_length` ids, and any
other id outside its table is a ValueError naming the feature and row. The EBC lookup runs
eagerly; everything after it is `dense_program.pt2` (`torch.export.load`), inputs
`(dense (B, {num_dense}), pooled (B, {pooled}))`.
"""


SEMANTIC_INFERENCE_NOTE = """
This is a gain network: its LLM vectors sit in frozen entity tables {tables}
(`semantic_tables.json`), looked up from the same KeyedJaggedTensor; their values are the
program's third input. No LLM runs at inference.
"""


# ---- state dicts -----------------------------------------------------------------------
def strip_wrappers(key: str) -> str:
    """``key`` without DMP's ``_dmp_wrapped_module.`` and DDP's ``module.`` prefixes."""
    for wrapper in ("_dmp_wrapped_module.", "module."):
        if key.startswith(wrapper):
            key = key[len(wrapper) :]
    return key


def _gather_shards_to_cpu(value: ShardedTensor, dst: int) -> Optional[torch.Tensor]:
    """``value`` as one full CPU tensor on global rank ``dst`` (``None`` on the other ranks).

    Shard by shard: each owner sends its shard to ``dst``, which receives it into a buffer
    of that shard's size on the collective device (NCCL takes CUDA tensors only) and copies
    it into the CPU result. ``ShardedTensor.gather`` instead holds one buffer per rank plus
    the full tensor on ``dst``'s device, which does not fit for a table near GPU memory.
    Every rank of the tensor's process group must call it.
    """
    import torch.distributed as dist

    group = value._process_group
    rank = dist.get_rank()
    full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
    local = {tuple(shard.metadata.shard_offsets): shard.tensor for shard in value.local_shards()}
    device = collective_device()
    for meta in value.metadata().shards_metadata:
        owner = dist.get_global_rank(group, meta.placement.rank())
        offsets = tuple(meta.shard_offsets)
        if 0 in meta.shard_sizes or rank not in (owner, dst):
            continue
        if rank == owner and rank != dst:
            dist.send(local[offsets].detach().to(device).contiguous(), dst, group=group)
            continue
        if owner == dst:
            received = local[offsets]
        else:
            received = torch.empty(meta.shard_sizes, dtype=value.dtype, device=device)
            dist.recv(received, owner, group=group)
        full[tuple(slice(o, o + n) for o, n in zip(offsets, meta.shard_sizes))].copy_(received)
    return full


def unsharded_state_dict(model: nn.Module, dst: int = 0) -> Dict[str, torch.Tensor]:
    """The full state dict of a (possibly DMP-sharded) model, gathered on rank ``dst``.

    Every rank must call it (the gather is collective). Sharded tables travel one shard at
    a time into CPU memory on ``dst`` (a table need not fit on one GPU); plain tensors are
    cloned; wrapper prefixes (``_dmp_wrapped_module.``, DDP's ``module.``) are removed.

    Returns:
        Dict[str, torch.Tensor]: full CPU tensors on ``dst``; an empty dict on other ranks.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = strip_wrappers(key)
        if isinstance(value, ShardedTensor):
            full = _gather_shards_to_cpu(value, dst)
            if rank == dst:
                out[name] = full
        elif hasattr(value, "full_tensor"):  # DTensor
            full = value.full_tensor()
            if rank == dst:
                out[name] = full.detach().cpu().clone()
        elif rank == dst:
            out[name] = value.detach().cpu().clone()
    return out


def materialize_meta(module: nn.Module, device: torch.device) -> nn.Module:
    """Gives every parameter and buffer still on ``meta`` uninitialised storage on ``device``.

    Tensors already on a real device are left as they are. ``nn.Module.to_empty`` would
    empty them too, including non-persistent buffers that no state dict restores (torchrec
    DLRM's ``triu_indices``), so a model whose tables were built on ``meta`` is made
    loadable with this, then filled by ``load_state_dict``.

    Returns:
        nn.Module: ``module``, changed in place.
    """
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None and param.is_meta:
                submodule._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.is_meta:
                submodule._buffers[name] = torch.empty_like(buffer, device=device)
    return module


def sub_state(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed (e.g. ``student.`` of a TeacherStudentTask)."""
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise KeyError(f"no state under prefix {prefix!r}; prefixes present: {sorted({k.split('.')[0] for k in state})}")
    return picked


def _state_path(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: state file not found")
    return path


def load_state_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from an export directory or a ``.safetensors`` file (weights only, no code)."""
    path = _state_path(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class _SafetensorsSlice:
    """One tensor of an open safetensors file: ``shape``, and ``[index]`` reads only that part."""

    def __init__(self, handle: Any, key: str) -> None:
        self._slice = handle.get_slice(key)
        self.shape = torch.Size(self._slice.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._slice[index]


@contextlib.contextmanager
def open_state_file(path: str) -> Iterator[Mapping[str, Any]]:
    """A state file's tensors, read when indexed (weights only, no code).

    ``state[key]`` has ``shape``, and ``state[key][index]`` reads only the rows and columns
    of ``index`` (``[...]`` for all): a rank that copies its shards of a large table out of
    a full state dict never holds the whole table. Safetensors files are sliced in place;
    ``torch.save`` files are memory-mapped (``mmap=True``; files of the legacy non-zip format
    are read whole).

    Args:
        path (str): an export directory or a ``.safetensors`` / ``torch.save`` file.
    """
    path = _state_path(path)
    if not path.endswith(".safetensors"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # the legacy (non-zip) torch.save format cannot be mapped
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
        yield state
        return
    with safe_open(path, framework="pt", device="cpu") as handle:
        yield {key: _SafetensorsSlice(handle, key) for key in handle.keys()}


# ---- the dense program -----------------------------------------------------------------
class DenseHead(nn.Module):
    """Everything of a ``CTRTask`` after the EBC lookups: ``(dense, pooled[, vectors]) -> logits``.

    Args:
        task (nn.Module): a ``CTRTask`` without field injection, or a gain network whose
            vectors come from frozen entity tables (``SemanticTableTask``): then ``vectors``
            is that table's EBC output and the projection to extra fields is part of the
            program.
        folded_terms (Sequence[str]): logit terms already folded into the backbone (see
            :func:`serving_form`); they are not added again.
    """

    def __init__(self, task: nn.Module, folded_terms: Sequence[str] = ()) -> None:
        super().__init__()
        self.task = task
        self._terms: List[str] = [name for name in task.logit_terms if name not in folded_terms]
        configs = task.model.embedding_bag_collection.embedding_bag_configs()
        self._keys: List[str] = [f for c in configs for f in c.feature_names]
        self._lengths: List[int] = [c.embedding_dim for c in configs for _ in c.feature_names]

    def forward(
        self, dense_features: torch.Tensor, pooled: torch.Tensor, vectors: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Args:
            dense_features (torch.Tensor): (B, Dd).
            pooled (torch.Tensor): (B, sum of table dims), the EBC output values.
            vectors (Optional[torch.Tensor]): (B, K * d), the entity tables' EBC output values
                (gain network only).

        Returns:
            torch.Tensor: logits (B,).
        """
        embeddings = KeyedTensor(keys=self._keys, length_per_key=self._lengths, values=pooled)
        extra_fields = self.task.field_injection(vectors) if vectors is not None else None  # (B, E, D)
        logits, representation = self.task.model.interact(dense_features, embeddings, extra_fields)
        output = CTROutput(logits, representation, embeddings)
        for name in self._terms:
            logits = logits + self.task.logit_terms[name](output)
        return logits


@contextlib.contextmanager
def serving_form(task: nn.Module, keys: Sequence[str]) -> Iterator[List[str]]:
    """The task's logit terms in their serving form, for the duration of the block.

    FIE terms (constant weights at serving) are frozen (a term frozen before keeps its
    weights), their weight matrix precomputed in the unsharded EBC's key order, and, where the
    backbone has a pairwise term of its own (FM, FwFM, DeepFM: ``PairWeightFolding``), folded
    into it, so they cost nothing extra. Afterwards the task is as it was: backbone unfolded,
    terms unfrozen if they were, their frozen-weight buffers restored.

    Raises:
        ValueError: the backbone already has folded pair weights (its FIE would count twice).

    Args:
        task (nn.Module): a ``CTRTask`` in eval mode.
        keys (Sequence[str]): the pooled embeddings' keys, in order.

    Yields:
        List[str]: names of the folded logit terms (the backbone now computes them).
    """
    model = task.model
    if isinstance(model, PairWeightFolding) and model.folded_pair_weight is not None:
        raise ValueError(
            "export: the backbone already has pair weights folded in; export the task with its FIE term "
            "unfolded (export_task folds it), or the folded backbone without that term"
        )
    terms = {name: term for name, term in task.logit_terms.items() if isinstance(term, FieldInteractionEnhancement)}
    before = {name: (term.frozen, term.frozen_pair_weights.clone()) for name, term in terms.items()}
    folded: List[str] = []
    try:
        for name, term in terms.items():
            if not term.frozen:
                term.freeze()
            term.set_serving_key_order(keys)
            if term.fold_into(model):
                folded.append(name)
        yield folded
    finally:
        if isinstance(model, PairWeightFolding):
            model.fold_pair_weights(None)
        for name, term in terms.items():
            was_frozen, frozen_weights = before[name]
            term.set_serving_key_order(None)
            if not was_frozen:
                term.unfreeze()
            term.frozen_pair_weights.copy_(frozen_weights)


def _table_dicts(ebc: EmbeddingBagCollection) -> List[Dict[str, Any]]:
    return [
        {
            "name": c.name,
            "num_embeddings": c.num_embeddings,
            "embedding_dim": c.embedding_dim,
            "feature_names": list(c.feature_names),
            "pooling": c.pooling.name,
        }
        for c in ebc.embedding_bag_configs()
    ]


def _semantic_ebc(task: nn.Module) -> Optional[EmbeddingBagCollection]:
    """The frozen entity-vector EBC of an entity-table gain network, else None."""
    table = getattr(task, "semantic_table", None)
    return table.embedding_bag_collection if table is not None else None


def check_servable(task: nn.Module) -> None:
    """Raises when the task would need an LLM or a teacher at inference.

    A gain network whose vectors are per-row inputs (``extras``) needs the LLM for every
    request and is refused; one that looks its vectors up in frozen entity tables serves
    like any model (the LLM ran offline, once per entity).
    """
    semantic = _semantic_ebc(task) is not None
    if getattr(task, "field_injection", None) is not None and not semantic:
        raise ValueError(
            "export: the task injects per-row LLM vectors (a gain network reading extras); export the student, "
            "or train the gain network on entity tables (elec.vector_source=entity_table)"
        )
    allowed = ("field_injection", "semantic_table") if semantic else ()
    forbidden = [part for part in FORBIDDEN_PARTS if part not in allowed]
    names = [n for n, _ in task.named_parameters()] + [n for n, _ in task.named_buffers()]
    bad = sorted({n.split(".")[0] for n in names if any(p in n.split(".") for p in forbidden)})
    if bad:
        raise ValueError(f"export: the task holds teacher/LLM parts {bad}; export the student only")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def export_task(
    task: nn.Module,
    directory: str,
    example_dense: torch.Tensor,
    example_sparse: KeyedJaggedTensor,
    metadata: Optional[Dict[str, Any]] = None,
    schema: Optional[Any] = None,
) -> Dict[str, Any]:
    """Writes the serving artifact of an unsharded ``CTRTask`` (atomically).

    Args:
        task (nn.Module): the student ``CTRTask`` (or an entity-table gain network) with trained
            weights, on CPU.
        directory (str): output directory: an earlier export there is replaced, any other
            non-empty directory refused (``atomic_dir.check_replaceable``).
        example_dense (torch.Tensor): (B, Dd) example input for ``torch.export`` (B >= 2).
        example_sparse (KeyedJaggedTensor): example ids of the same batch.
        metadata (Optional[Dict[str, Any]]): stored in ``config.json`` (model config, schema name...).
        schema (Optional[DatasetSchema]): the training data's schema; its ``hashed`` and
            ``max_length`` per feature go to ``config.json`` (``id_rules``), so ``ServedModel``
            treats raw request ids as the reader treated the training ids (without it: bounds
            checks only).

    Returns:
        Dict[str, Any]: the written ``config.json``.
    """
    check_servable(task)
    ebc = task.model.embedding_bag_collection
    semantic = _semantic_ebc(task)
    tables = _table_dicts(ebc)
    semantic_tables = _table_dicts(semantic) if semantic is not None else []
    feature_names = [f for t in tables for f in t["feature_names"]]  # the pooled embeddings' keys, in order
    with _eval_mode(task), atomic_directory(directory, "export", EXPORT_MARKER_FILES) as tmp, \
            serving_form(task, feature_names) as folded:
        # the state as served: frozen logit-term weights included
        state = {k: v.detach().cpu().contiguous().clone() for k, v in task.state_dict().items()}
        save_file(state, os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, "tables.json"), "w", encoding="utf-8") as handle:
            json.dump(tables, handle, indent=2)
        if semantic_tables:
            with open(os.path.join(tmp, SEMANTIC_TABLES_FILE), "w", encoding="utf-8") as handle:
                json.dump(semantic_tables, handle, indent=2)
        program_status: Optional[str] = "dense_program.pt2"
        reason = ""
        head = DenseHead(task, folded).eval()
        with torch.no_grad():
            pooled = ebc(example_sparse).values()  # (B, sum dims)
            inputs = (example_dense, pooled)
            if semantic is not None:
                inputs = inputs + (semantic(example_sparse).values(),)  # (B, K * d)
        try:
            batch = torch.export.Dim("batch", min=1)
            with torch.no_grad():  # the inference kernels (e.g. of weighted_pair_sum)
                program = torch.export.export(
                    head, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs), strict=False
                )
            # drop what the logits do not need (e.g. a folded FM's representation)
            program.graph_module.graph.eliminate_dead_code()
            program.graph_module.recompile()
            torch.export.save(program, os.path.join(tmp, "dense_program.pt2"))
        except Exception as error:  # torch.export could not capture this backbone
            program_status, reason = None, f"{type(error).__name__}: {error}"[:2000]
        config = {
            "format_version": FORMAT_VERSION,
            "feature_names": feature_names,
            "num_dense_features": int(example_dense.size(1)),
            "pooled_dim": int(pooled.size(1)),
            "state": STATE_FILE,
            "tables": "tables.json",
            "semantic_tables": SEMANTIC_TABLES_FILE if semantic_tables else None,
            "dense_program": program_status,
            "dense_program_error": reason,
            "folded_logit_terms": folded if program_status is not None else [],
            ID_RULES_KEY: id_rules(schema, _kjt_keys(tables, semantic_tables)) if schema is not None else None,
            "num_parameters": int(sum(p.numel() for p in task.parameters())),
            "num_state_tensors": len(state),
            "metadata": metadata or {},
        }
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        with open(os.path.join(tmp, "INFERENCE.md"), "w", encoding="utf-8") as handle:
            handle.write(INFERENCE_EXAMPLE.format(path=os.path.abspath(directory), features=feature_names,
                                                  num_dense=config["num_dense_features"], pooled=config["pooled_dim"]))
            if semantic_tables:
                handle.write(SEMANTIC_INFERENCE_NOTE.format(tables=[t["name"] for t in semantic_tables]))
    return config


def _kjt_keys(*table_lists: List[Dict[str, Any]]) -> List[str]:
    """Every feature the artifact's tables read from the request, once, in table order."""
    return list(dict.fromkeys(f for tables in table_lists for t in tables for f in t["feature_names"]))


def _rows_per_feature(*ebcs: Optional[EmbeddingBagCollection]) -> Dict[str, int]:
    """Table rows per feature (the smallest, where a feature feeds several tables)."""
    rows: Dict[str, int] = {}
    for ebc in ebcs:
        for table in ebc.embedding_bag_configs() if ebc is not None else []:
            for feature in table.feature_names:
                rows[feature] = min(rows.get(feature, table.num_embeddings), table.num_embeddings)
    return rows


def _load_ebc(directory: str, tables_file: str, state: Dict[str, torch.Tensor], prefix: str) -> EmbeddingBagCollection:
    """An EBC from an artifact's table list, its weights taken from ``state`` under ``prefix``."""
    with open(os.path.join(directory, tables_file), encoding="utf-8") as handle:
        tables = json.load(handle)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=t["name"], embedding_dim=t["embedding_dim"], num_embeddings=t["num_embeddings"],
                               feature_names=t["feature_names"], pooling=PoolingType[t["pooling"]])
            for t in tables
        ],
        device=torch.device("cpu"),
    )
    ebc.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return ebc.eval()


class ServedModel(nn.Module):
    """An exported model for inference: eager EBC lookups + the exported dense program.

    Args:
        ebc (EmbeddingBagCollection): the tables with trained weights.
        dense_program (nn.Module): ``(dense, pooled[, vectors]) -> logits`` (``torch.export`` module).
        config (Dict[str, Any]): the artifact's ``config.json``.
        semantic_ebc (Optional[EmbeddingBagCollection]): a gain network's frozen entity-vector
            tables (their LLM vectors were computed offline, once per entity).
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        dense_program: nn.Module,
        config: Dict[str, Any],
        semantic_ebc: Optional[EmbeddingBagCollection] = None,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = ebc
        self.semantic_embedding_bag_collection = semantic_ebc
        self.dense_program = dense_program
        self._config = config
        self._id_rules = IdRules.from_config(config.get(ID_RULES_KEY), _rows_per_feature(ebc, semantic_ebc))

    @property
    def feature_names(self) -> List[str]:
        return list(self._config["feature_names"])

    @classmethod
    def load(cls, directory: str, trust_program: bool = False) -> "ServedModel":
        """Loads an artifact: the tables from ``model.safetensors``, the dense part from
        ``dense_program.pt2``.

        The dense program is code: ``torch.export.load`` evaluates expressions and guard
        code stored in the file (and unpickles some payload kinds), so like Hugging Face's
        ``trust_remote_code`` it is read only when asked. Pass ``trust_program=True`` for an
        artifact you exported or trust; without it nothing from the file runs.

        Raises:
            PermissionError: ``trust_program`` is False.
            ValueError: another format version, or no program was exported.
        """
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: export format {config.get('format_version')}, this code reads {FORMAT_VERSION}")
        if config["dense_program"] is None:
            raise ValueError(
                f"{directory}: no dense program was exported ({config['dense_program_error']}); "
                "load model.safetensors into the model code instead"
            )
        program_path = os.path.join(directory, config["dense_program"])
        if not trust_program:
            raise PermissionError(
                f"{program_path} is a torch.export program, i.e. code (torch.export.load evaluates "
                "expressions and guards stored in it): load it with ServedModel.load(..., "
                "trust_program=True) only if you exported it or trust its source; model.safetensors "
                "alone holds weights only (safetensors.torch.load_file)"
            )
        state = load_file(os.path.join(directory, config["state"]))
        ebc = _load_ebc(directory, config["tables"], state, "model.embedding_bag_collection.")
        semantic = None
        if config.get("semantic_tables"):
            semantic = _load_ebc(directory, config["semantic_tables"], state, "semantic_table.embedding_bag_collection.")
        program = torch.export.load(program_path).module()
        return cls(ebc, program, config, semantic)

    @torch.no_grad()
    def logits(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """(B, Dd), KJT of raw ids -> logits (B,).

        The ids go through the training reader's rules first (:class:`~recsys_llm.id_rules.IdRules`):
        hashed features folded, sequences cut to ``max_length``, other out-of-table ids refused
        (ValueError naming the feature and row).
        """
        sparse_features = self._id_rules(sparse_features)
        pooled = self.embedding_bag_collection(sparse_features).values()  # (B, sum dims)
        if self.semantic_embedding_bag_collection is None:
            return self.dense_program(dense_features, pooled)
        vectors = self.semantic_embedding_bag_collection(sparse_features).values()  # (B, K * d)
        return self.dense_program(dense_features, pooled, vectors)

    def predict(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Click probabilities (B,)."""
        return torch.sigmoid(self.logits(dense_features, sparse_features))
