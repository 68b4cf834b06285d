"""Serving artifact of a trained CTR task: the ELEC student alone (or any ``CTRTask``).

``export_task`` writes a directory::

    model.safetensors     full (unsharded) state dict of the task: weights only
    tables.json           its EmbeddingBagCollection tables (name, rows, dim, features, pooling)
    dense_program.pt2     torch.export program of everything after the EBC lookup:
                          (dense (B, Dd), pooled (B, F * D)) -> logits (B,)
    config.json           format version, export id, feature names, id rules, model config, program status
    INFERENCE.md          how to call it

The export id (random per export) is also stored in the state file's and the program's
metadata: ``ServedModel.load`` refuses files of two exports copied into one directory.

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
import math
import os
import pickle
import uuid
import warnings
import zipfile
from typing import Any, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.atomic_dir import atomic_directory
from recsys_llm.error_text import telling_line
from recsys_llm.id_rules import IdRules, id_rules
from recsys_llm.models.base import CTROutput
from recsys_llm.models.pairwise import PairWeightFolding
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.semantics.store import first_non_finite_row
from recsys_llm.train.distributed import collective_device

FORMAT_VERSION = 1
STATE_FILE = "model.safetensors"
EXPORT_MARKER_FILES = ("config.json", STATE_FILE)  # every export has them (state-only ones too)
SEMANTIC_TABLES_FILE = "semantic_tables.json"  # frozen entity-vector tables of a gain network
ID_RULES_KEY = "id_rules"  # config.json: per feature, hashed / max_length / single_id (None: not recorded)
EXPORT_ID_KEY = "export_id"  # ties an artifact's files together (absent from artifacts before 2026-12)
DENSE_DTYPE = torch.float32  # the dense features' dtype in training (ParquetBatchReader) and in the program
FORBIDDEN_PARTS = ("teacher", "field_injection", "semantic_table", "llm", "repr_kd", "score_kd")

INFERENCE_EXAMPLE = """# Inference with an exported model

```python
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from recsys_llm.serving import ServedModel

# this artifact's directory as exported; its path now if it was copied or moved. The dense
# program is code: trust_program=True only for artifacts you made or trust
served = ServedModel.load("{path}", trust_program=True)
kjt = KeyedJaggedTensor.from_lengths_sync(
    keys=served.feature_names,                       # {features}
    values=torch.tensor([...], dtype=torch.int64),   # ids, feature-major
    lengths=torch.tensor([...], dtype=torch.int32),  # one length per (feature, row)
)
dense = torch.zeros(batch_size, {num_dense})         # dense features in schema order, finite
probabilities = served.predict(dense, kjt)           # (batch_size,)
```

A request is checked before the model runs: the KeyedJaggedTensor must hold each feature
once (any order; features the model does not have are ignored, as an EBC ignores them), integer ids and one length per (feature, row) summing to the number of ids;
the dense features must be `(batch_size, {num_dense})` and finite (NaN / inf is a ValueError
naming the row). Dense features of another real dtype (float64, integers) are converted to
float32.

Ids go through the training reader's rules first (`config.json`, `id_rules`): ids of a
`hashed` field are folded into its table, sequences keep their first `max_length` ids, a row of
a sparse (single-id) field holds exactly one id (send a missing value as id 0, as in the
training data, not as an empty bag), and any other id outside its table is a ValueError naming
the feature and row. The EBC lookup runs
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


def _torch_load(path: str, mmap: bool) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a refused or unreadable file is named.

    ``mmap``: memory-map the file (the legacy non-zip ``torch.save`` format cannot be mapped
    and is read whole).

    Raises:
        pickle.UnpicklingError: the file holds objects other than tensors and containers
            (nothing from it runs).
        ValueError: the file is damaged (truncated, not a ``torch.save`` file).
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not mmap or "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{path}: refused: the file holds objects other than tensors ({telling_line(error)}); expected a state "
            "dict of tensors only (torch.load with weights_only=True, no code runs): write it with "
            "`recsys-llm export --state-only` or safetensors"
        ) from error
    except (RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path}: damaged or incomplete state file ({telling_line(error)}); expected a complete torch.save or "
            ".safetensors file of tensors: write it again (`recsys-llm export --state-only`)"
        ) from error


def _damaged_state_file(path: str, error: BaseException) -> ValueError:
    """The error for a safetensors file that cannot be read."""
    return ValueError(
        f"{path}: damaged or incomplete state file ({telling_line(error)}); expected a complete .safetensors file: "
        "write it again (`recsys-llm export`)"
    )


def _check_finite(path: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself; raises when a floating-point ``tensor`` holds NaN or +-inf.

    Args:
        path (str): the file ``tensor`` comes from, for the message.
        key (str): its key in that file.
        tensor (torch.Tensor): any shape; integer and bool tensors pass unchecked.

    Raises:
        ValueError: names ``path``, ``key`` and the first non-finite value.
    """
    if (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel():
        bad = first_non_finite_row(tensor.reshape(-1, 1))  # one row per value
        if bad is not None:
            first, count, value = bad
            raise ValueError(
                f"{path}: tensor {key!r} holds {count} non-finite value(s) (first: {value} at flat index {first}); "
                "expected finite weights: the model that wrote it diverged or the file is damaged (train it again, "
                "or take an earlier checkpoint)"
            )
    return tensor


def load_state_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from an export directory or a ``.safetensors`` / ``torch.save`` file (weights only, no code).

    Raises:
        pickle.UnpicklingError: a ``torch.save`` file holding other objects than tensors (named).
        ValueError: a damaged file, or a tensor with NaN / inf values (named with its key).
    """
    path = _state_path(path)
    if path.endswith(".safetensors"):
        try:
            state = load_file(path)
        except SafetensorError as error:
            raise _damaged_state_file(path, error) from error
    else:
        state = _torch_load(path, mmap=False)
    for key, value in state.items() if isinstance(state, dict) else ():
        if isinstance(value, torch.Tensor):
            _check_finite(path, key, value)
    return state


class _SafetensorsSlice:
    """One tensor of an open safetensors file: ``shape``, and ``[index]`` reads only that part
    (refused when it holds NaN / inf: :func:`_check_finite`)."""

    def __init__(self, handle: Any, key: str, path: str) -> None:
        self._slice = handle.get_slice(key)
        self._key = key
        self._path = path
        self.shape = torch.Size(self._slice.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        try:
            part = self._slice[index]
        except SafetensorError as error:
            raise _damaged_state_file(self._path, error) from error
        return _check_finite(self._path, self._key, part)


class _CheckedTensor:
    """One tensor of a (memory-mapped) ``torch.save`` file: ``shape``, and ``[index]`` gives that
    part, refused when it holds NaN / inf (:func:`_check_finite`)."""

    def __init__(self, tensor: torch.Tensor, key: str, path: str) -> None:
        self._tensor = tensor
        self._key = key
        self._path = path
        self.shape = tensor.shape

    def __getitem__(self, index: Any) -> torch.Tensor:
        return _check_finite(self._path, self._key, self._tensor[index])


@contextlib.contextmanager
def open_state_file(path: str) -> Iterator[Mapping[str, Any]]:
    """A state file's tensors, read when indexed (weights only, no code).

    ``state[key]`` has ``shape``, and ``state[key][index]`` reads only the rows and columns
    of ``index`` (``[...]`` for all): a rank that copies its shards of a large table out of
    a full state dict never holds the whole table. Safetensors files are sliced in place;
    ``torch.save`` files are memory-mapped (``mmap=True``; files of the legacy non-zip format
    are read whole).

    Every part read is checked: NaN or inf in it is a ValueError naming the file and the
    tensor's key (a frozen teacher that diverged would give NaN losses without an error).

    Args:
        path (str): an export directory or a ``.safetensors`` / ``torch.save`` file.

    Raises:
        pickle.UnpicklingError: a ``torch.save`` file holding other objects than tensors (named).
        ValueError: a damaged file, or a part read that holds NaN / inf values.
    """
    path = _state_path(path)
    if not path.endswith(".safetensors"):
        state = _torch_load(path, mmap=True)
        if isinstance(state, dict):
            state = {key: _CheckedTensor(value, str(key), path) if isinstance(value, torch.Tensor) else value
                     for key, value in state.items()}
        yield state
        return
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as error:
        raise _damaged_state_file(path, error) from error
    with handle:
        yield {key: _SafetensorsSlice(handle, key, path) for key in handle.keys()}


def _check_same_export(config_path: str, config: Mapping[str, Any], path: str, export_id: Optional[str]) -> None:
    """Raises when ``path`` was written by another export than ``config.json`` (files of two
    artifacts copied together); artifacts written before export ids are not checked.

    Raises:
        ValueError: naming both files and their export ids.
    """
    expected = config.get(EXPORT_ID_KEY)
    if expected is not None and export_id != expected:
        raise ValueError(
            f"{path}: written by another export ({EXPORT_ID_KEY} {export_id}) than {config_path} ({expected}); "
            "the artifact mixes files of two exports. Export again, or copy the whole directory of one export"
        )


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


def _check_exportable(task: nn.Module, example_dense: torch.Tensor) -> None:
    """Raises ValueError for what ``export_task`` cannot write a working artifact of."""
    if isinstance(task, DistributedModelParallel):
        raise ValueError(
            "export: pass the unsharded task, not the DistributedModelParallel model: gather its state with "
            "unsharded_state_dict(model) into the same task built on CPU (what `recsys-llm export` does)"
        )
    ebc = getattr(getattr(task, "model", None), "embedding_bag_collection", None)
    if not isinstance(ebc, EmbeddingBagCollection):
        raise ValueError(
            f"export: expected a CTRTask whose model (a CTRBackbone) has an embedding_bag_collection, "
            f"got {type(task).__name__}"
        )
    on_meta = next((name for name, value in [*task.named_parameters(), *task.named_buffers()] if value.is_meta), None)
    if on_meta is not None:
        raise ValueError(
            f"export: {on_meta!r} is on the meta device; export a task on CPU holding the trained weights "
            "(materialize_meta, then load_state_dict)"
        )
    if example_dense.dim() != 2 or example_dense.size(0) < 2:
        raise ValueError(
            f"export: the example dense batch must be (B >= 2, num_dense_features), got {tuple(example_dense.shape)} "
            "(torch.export would fix the program to a batch of 1)"
        )


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
        schema (Optional[DatasetSchema]): the training data's schema; its ``hashed``,
            ``max_length`` and single-id kind per feature go to ``config.json`` (``id_rules``), so ``ServedModel``
            treats raw request ids as the reader treated the training ids (without it: bounds
            checks only).

    Returns:
        Dict[str, Any]: the written ``config.json`` (``dense_program`` None, with a warning, when
        ``torch.export`` could not capture the dense part: the artifact then serves eagerly).

    Raises:
        ValueError: a sharded (DMP) model, a task without a backbone EBC, a weight still on the
            meta device, an example batch of fewer than 2 rows, or teacher / LLM parts.
    """
    _check_exportable(task, example_dense)
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
        export_id = uuid.uuid4().hex  # in config.json, the state file and the program: they belong together
        save_file(state, os.path.join(tmp, STATE_FILE), metadata={EXPORT_ID_KEY: export_id})
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
            torch.export.save(program, os.path.join(tmp, "dense_program.pt2"), extra_files={EXPORT_ID_KEY: export_id})
        except Exception as error:  # torch.export could not capture this backbone
            program_status, reason = None, f"{type(error).__name__}: {error}"[:2000]
            warnings.warn(f"export: torch.export could not capture the dense part ({telling_line(error)}); "
                          f"{directory} serves it eagerly (config.json: dense_program_error)", stacklevel=2)
        config = {
            "format_version": FORMAT_VERSION,
            EXPORT_ID_KEY: export_id,
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


# what reading a damaged artifact file raises (json, safetensors, torch.export's zip reader and
# deserializer, a table list or state dict that does not fit); OS errors such as EACCES are not in it
ARTIFACT_READ_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, EOFError,
                        zipfile.BadZipFile, SafetensorError)
CONFIG_KEYS = ("feature_names", "num_dense_features", "state", "tables", "dense_program")  # besides format_version


def _raise_damaged(path: str, problem: str, error: Optional[BaseException] = None) -> NoReturn:
    """Raises the one error of a damaged or incomplete artifact: its file, what is wrong, the fix."""
    cause = f" ({telling_line(error)})" if error is not None else ""
    raise ValueError(
        f"{path}: {problem}{cause}; the export artifact is damaged or incomplete: export the model again "
        "(`recsys-llm export --output DIR`, or export_task) and load the new directory"
    ) from error


def _read_json(path: str) -> Any:
    """The JSON value of an artifact file (a damaged or missing one is a ValueError naming it)."""
    if not os.path.isfile(path):
        _raise_damaged(path, "file missing")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        _raise_damaged(path, "not valid JSON", error)


def _load_ebc(directory: str, tables_file: str, state: Dict[str, torch.Tensor], prefix: str) -> EmbeddingBagCollection:
    """An EBC from an artifact's table list, its weights taken from ``state`` under ``prefix``."""
    path = os.path.join(directory, tables_file)
    tables = _read_json(path)
    try:
        ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=t["name"], embedding_dim=t["embedding_dim"], num_embeddings=t["num_embeddings"],
                                   feature_names=t["feature_names"], pooling=PoolingType[t["pooling"]])
                for t in tables
            ],
            device=torch.device("cpu"),
        )
    except ARTIFACT_READ_ERRORS as error:
        _raise_damaged(path, "not a list of tables (name, embedding_dim, num_embeddings, feature_names, pooling)", error)
    try:
        ebc.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as error:  # missing / unexpected keys, other shapes
        _raise_damaged(os.path.join(directory, STATE_FILE), f"its tables do not match {tables_file}", error)
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

        A damaged or incomplete artifact (a file truncated, missing, or not what ``export_task``
        writes; weights with NaN / inf) is one ValueError naming the file: export again.

        Raises:
            FileNotFoundError: ``directory`` is no directory.
            PermissionError: ``trust_program`` is False.
            ValueError: another format version, no program was exported, or the artifact is
                damaged or incomplete.
        """
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such directory; expected an export artifact (`recsys-llm export`)")
        config_path = os.path.join(directory, "config.json")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            _raise_damaged(config_path, f"holds a JSON {type(config).__name__}, expected an object")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: export format {config.get('format_version')}, this code reads {FORMAT_VERSION}")
        missing = [key for key in CONFIG_KEYS if key not in config]
        if missing:
            _raise_damaged(config_path, f"lacks the keys {missing}")
        if config["dense_program"] is None:
            raise ValueError(
                f"{directory}: no dense program was exported ({config.get('dense_program_error')}); "
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
        state_path = os.path.join(directory, config["state"])
        if not os.path.isfile(state_path):
            _raise_damaged(state_path, "file missing")
        try:
            with safe_open(state_path, framework="pt") as handle:  # weights only
                state = {key: handle.get_tensor(key) for key in handle.keys()}
                state_export_id = (handle.metadata() or {}).get(EXPORT_ID_KEY)
        except ARTIFACT_READ_ERRORS as error:
            _raise_damaged(state_path, "cannot be read as the model's weights", error)
        for key, value in state.items():
            _check_finite(state_path, key, value)
        _check_same_export(config_path, config, state_path, state_export_id)
        ebc = _load_ebc(directory, config["tables"], state, "model.embedding_bag_collection.")
        semantic = None
        if config.get("semantic_tables"):
            semantic = _load_ebc(directory, config["semantic_tables"], state, "semantic_table.embedding_bag_collection.")
        if not os.path.isfile(program_path):
            _raise_damaged(program_path, "file missing")
        program_extra = {EXPORT_ID_KEY: ""}  # filled by load: "" when the program has none
        try:
            program = torch.export.load(program_path, extra_files=program_extra).module()
        except ARTIFACT_READ_ERRORS as error:
            _raise_damaged(program_path, "cannot be read as a torch.export program", error)
        _check_same_export(config_path, config, program_path, program_extra[EXPORT_ID_KEY] or None)
        return cls(ebc, program, config, semantic)

    def _checked_dense(self, dense_features: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The request's dense features as the program takes them: (B, Dd) float32, all finite.

        Other real dtypes (float64, float16, integers, bool) are converted to float32, as the
        training reader gives them; a float64 beyond float32's range becomes inf and is refused.

        Args:
            dense_features (torch.Tensor): (B, Dd).
            batch_size (int): B of the sparse features.

        Raises:
            TypeError: not a tensor.
            ValueError: another shape, a complex dtype, an empty batch, or a NaN / inf value
                (named with its row and column).
        """
        width = int(self._config["num_dense_features"])
        if not isinstance(dense_features, torch.Tensor):
            raise TypeError(f"dense_features: expected a (B, {width}) float32 torch.Tensor, "
                            f"got {type(dense_features).__name__}")
        shape = tuple(dense_features.shape)
        if dense_features.dim() != 2 or shape[1] != width or shape[0] != batch_size:
            raise ValueError(f"dense_features: expected (B, {width}) with B = {batch_size}, the sparse features' batch "
                             f"size, got {shape}")
        if batch_size == 0:
            raise ValueError("empty batch: dense_features and the sparse features have 0 rows; expected at least one")
        if dense_features.dtype != DENSE_DTYPE:
            if dense_features.dtype.is_complex:
                raise ValueError(f"dense_features: dtype {dense_features.dtype}; expected real numbers (float32)")
            converted = dense_features.to(DENSE_DTYPE)  # (B, Dd)
        else:
            converted = dense_features
        # one reduction: a NaN or inf anywhere makes the sum one (a sum that only overflows is no error)
        bad = () if math.isfinite(float(converted.sum())) else (~torch.isfinite(converted)).nonzero()  # (n, 2)
        if len(bad):
            row, column = (int(i) for i in bad[0])
            value = dense_features[row, column].item()
            as_float32 = converted[row, column].item()
            shown = f"{value}" if converted is dense_features else f"{value} (as float32: {as_float32})"
            raise ValueError(f"dense_features row {row}, column {column}: value {shown}; expected finite values, as in "
                             "training (fill or drop NaN / inf before the request)")
        return converted

    @torch.no_grad()
    def logits(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """(B, Dd), KJT of raw ids -> logits (B,).

        The request is checked before anything runs, with a few whole-tensor checks (no loop
        over rows): the KJT holds each of the model's features once (others are dropped), integer ids and lengths
        that count them (:meth:`~recsys_llm.id_rules.IdRules.check_structure`); the dense
        features are (B, Dd) with the KJT's B, B > 0, and finite. Dense features of another
        real dtype (float64, integers) are converted to float32; NaN / inf is refused, as the
        training reader refuses it. Each problem is a ValueError saying what was expected.

        The ids then go through the training reader's rules (:class:`~recsys_llm.id_rules.IdRules`):
        hashed features folded, sequences cut to ``max_length``, a row without an id or with
        several of a sparse (single-id) feature and other out-of-table ids refused (ValueError
        naming the feature and row).

        Args:
            dense_features (torch.Tensor): (B, Dd), in schema order.
            sparse_features (KeyedJaggedTensor): raw ids of the model's features (any key order).

        Returns:
            torch.Tensor: logits (B,).
        """
        if not isinstance(sparse_features, KeyedJaggedTensor):
            raise TypeError(f"sparse_features: expected a KeyedJaggedTensor of the features {self.feature_names}, "
                            f"got {type(sparse_features).__name__}")
        sparse_features = self._id_rules(sparse_features)  # checks its structure first
        strides = set(sparse_features.stride_per_key())
        if len(strides) != 1:
            raise ValueError(f"sparse features: batch sizes {sorted(strides)} differ per feature; expected one B for all")
        dense_features = self._checked_dense(dense_features, strides.pop())  # (B, Dd) float32
        pooled = self.embedding_bag_collection(sparse_features).values()  # (B, sum dims)
        if self.semantic_embedding_bag_collection is None:
            return self.dense_program(dense_features, pooled)
        vectors = self.semantic_embedding_bag_collection(sparse_features).values()  # (B, K * d)
        return self.dense_program(dense_features, pooled, vectors)

    def predict(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Click probabilities (B,)."""
        return torch.sigmoid(self.logits(dense_features, sparse_features))
