"""``export_task``: a trained ``CTRTask`` as a serving artifact (state dict + ``torch.export``
program of its dense part)."""

import contextlib
import io
import json
import os
import uuid
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.atomic_dir import atomic_directory, check_replaceable
from recsys_llm.env import installed_versions, source_commit
from recsys_llm.error_text import telling_line
from recsys_llm.id_rules import id_rules
from recsys_llm.models.base import CTROutput, check_id_weights, weights_in_table_dtype
from recsys_llm.models.pairwise import PairWeightFolding
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.file_hash import file_sha256
from recsys_llm.serving.artifact import (
    CONFIG_DIGEST_KEY,
    DENSE_DTYPE,
    DENSE_NAMES_KEY,
    DIGESTS_KEY,
    EXPORT_FILES,
    EXPORT_ID_KEY,
    EXPORT_MARKER_FILES,
    FORBIDDEN_PARTS,
    FORMAT_VERSION,
    ID_RULES_KEY,
    INFERENCE_FILE,
    MIXED_PRECISION_KEY,
    PROGRAM_FILE,
    SEMANTIC_TABLES_FILE,
    SEMANTIC_TABLES_PREFIX,
    STATE_FILE,
    TABLE_DTYPE_KEY,
    TABLES_FILE,
    TABLES_PREFIX,
    VERSIONS_KEY,
    WEIGHTED_KEY,
    config_digest,
)
from recsys_llm.serving.inference_doc import inference_text
from recsys_llm.serving.raw_ids import RAW_IDS_DIR, RAW_IDS_KEY, write_raw_id_ways
from recsys_llm.serving.quantized_tables import (
    TRAINED,
    check_quantizable,
    check_table_dtype,
    quantized_ebc,
    quantized_state,
)
from recsys_llm.train.mixed_precision import autocast_dtype


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


class AutocastHead(nn.Module):
    """A dense head whose forward runs under CPU ``torch.autocast`` (``export --mixed-precision bf16``): its
    matmuls and linears in ``dtype``, reductions and element-wise sums as autocast leaves them (float32); the
    logits (B,) come out in float32. ``torch.export`` records the autocast region in the program.

    Args:
        head (nn.Module): a :class:`DenseHead`, ``(dense (B, Dd), pooled (B, sum of dims)[, vectors]) -> (B,)``.
        dtype (torch.dtype): the autocast dtype (``torch.bfloat16``).
    """

    def __init__(self, head: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = head
        self._dtype = dtype

    def forward(
        self, dense_features: torch.Tensor, pooled: torch.Tensor, vectors: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """:meth:`DenseHead.forward`'s inputs and logits (B,), float32."""
        with torch.autocast("cpu", dtype=self._dtype):
            logits = self.head(dense_features, pooled, vectors)
        return logits.float()


@contextlib.contextmanager
def serving_form(task: nn.Module, keys: Sequence[str]) -> Iterator[List[str]]:
    """The task's logit terms in their serving form, for the duration of the block.

    FIE terms (constant weights at serving) are frozen (a term frozen before keeps its
    weights), their weight matrix precomputed in the unsharded EBC's key order, and, where the
    backbone has a pairwise term of its own (FM, FwFM, DeepFM: ``PairWeightFolding``), folded
    into it, so they cost nothing extra. Afterwards the task is as it was: backbone unfolded,
    terms unfrozen if they were, their frozen-weight buffers and serving key orders restored.

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
            "export: the backbone already has pair weights folded in; undo the fold (backbone.fold_pair_weights(None)) "
            "and export the task with its FIE term: export_task folds it into the artifact itself"
        )
    terms = {name: term for name, term in task.logit_terms.items() if isinstance(term, FieldInteractionEnhancement)}
    before = {name: (term.frozen, term.frozen_pair_weights.clone(), term.serving_key_order)
              for name, term in terms.items()}
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
            was_frozen, frozen_weights, serving_keys = before[name]
            term.set_serving_key_order(None)
            if not was_frozen:
                term.unfreeze()
            term.frozen_pair_weights.copy_(frozen_weights)
            term.set_serving_key_order(serving_keys)  # None unless it was frozen with one


def state_to_write(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module``'s state dict as ``model.safetensors`` is written from it: detached, on CPU, contiguous.

    A tensor that already is so is not copied: the tables of a large model (26 Criteo tables of
    1M rows) would otherwise be held twice while safetensors serialises them (a third copy).
    It is written before the module changes. Only a tensor sharing storage with one before it
    is copied, as safetensors refuses tensors that share memory.

    Returns:
        Dict[str, torch.Tensor]: state-dict key -> tensor.
    """
    state: Dict[str, torch.Tensor] = {}
    storages = set()
    for key, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        state[key] = value.clone() if storage in storages else value
        storages.add(storage)
    return state


def _table_dicts(ebc: EmbeddingBagCollection, table_dtype: str = TRAINED) -> List[Dict[str, Any]]:
    """``tables.json``'s entries of ``ebc``: ``data_type`` is the served weights' (FP32, FP16, BF16 as trained;
    INT8 / INT4 when ``table_dtype`` quantizes them, with the training one as ``trained_data_type``)."""
    quantized = table_dtype != TRAINED
    return [
        {
            "name": c.name,
            "num_embeddings": c.num_embeddings,
            "embedding_dim": c.embedding_dim,
            "feature_names": list(c.feature_names),
            "pooling": c.pooling.name,
            "data_type": table_dtype.upper() if quantized else c.data_type.name,
            **({"trained_data_type": c.data_type.name} if quantized else {}),
        }
        for c in ebc.embedding_bag_configs()
    ]


def _with_quantized_tables(state: Dict[str, torch.Tensor], task: nn.Module,
                           table_dtype: str) -> Dict[str, torch.Tensor]:
    """``state`` with each EBC's float table weights replaced by their quantized rows, scales and biases
    (:func:`~recsys_llm.serving.quantized_tables.quantized_ebc`), under the same module prefix."""
    ebcs = {TABLES_PREFIX: task.model.embedding_bag_collection}
    semantic = _semantic_ebc(task)
    if semantic is not None:
        ebcs[SEMANTIC_TABLES_PREFIX] = semantic
    for prefix, ebc in ebcs.items():
        tables = f"{prefix}embedding_bags."
        state = {key: value for key, value in state.items() if not key.startswith(tables)}
        state.update(quantized_state(quantized_ebc(ebc, table_dtype), prefix))
    return state


EXPORT_CONFIG_KEYS = ("state", "dense_program")  # in every export's config.json (state-only ones too)


def check_export_output(directory: str) -> Optional[Dict[str, Any]]:
    """Raises unless ``directory`` may take an export: absent, empty, or an earlier export holding
    only the files an export writes (a re-export replaces the directory whole).

    An earlier export holds ``config.json`` and ``model.safetensors``, and so does a Hugging
    Face model directory (the LLM of ``semantics encode``): it is told by its ``config.json``,
    which must be an export's (``state`` and ``dense_program`` keys), or the export would
    replace the model directory, its tokenizer files included.

    Returns:
        Optional[Dict[str, Any]]: the earlier export's ``config.json``, None where there is none.

    Raises:
        FileExistsError: ``directory`` holds other files, or ``config.json`` and
            ``model.safetensors`` with a ``config.json`` that is not an export's, or an earlier
            export beside files an export does not write (a user's notes, a copied schema...).
    """
    check_replaceable(directory, "export", EXPORT_MARKER_FILES)
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        config = None
    entries = sorted(os.listdir(directory))
    if not isinstance(config, dict) or not all(key in config for key in EXPORT_CONFIG_KEYS):
        raise FileExistsError(
            f"{directory}: holds {' and '.join(EXPORT_MARKER_FILES)} but is not an earlier export: {path} has no "
            f"{' and '.join(repr(key) for key in EXPORT_CONFIG_KEYS)} keys (a Hugging Face model directory?); "
            f"writing the export there would replace its {len(entries)} entries ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); choose another output directory"
        )
    foreign = [name for name in entries if name not in EXPORT_FILES]
    if foreign:
        raise FileExistsError(
            f"{directory}: an earlier export, but it also holds {', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}, which an export does not write; the new export replaces the "
            "directory whole and would delete them: move them out or choose another output directory"
        )
    return config


def _semantic_ebc(task: nn.Module) -> Optional[EmbeddingBagCollection]:
    """The frozen entity-vector EBC of an entity-table gain network, else None."""
    table = getattr(task, "semantic_table", None)
    return table.embedding_bag_collection if table is not None else None


def _check_exportable(task: nn.Module, example_dense: torch.Tensor, example_sparse: KeyedJaggedTensor) -> None:
    """Raises ValueError for what ``export_task`` cannot write a working artifact of."""
    if isinstance(task, DistributedModelParallel):
        raise ValueError(
            "export: pass the unsharded task, not the DistributedModelParallel model: gather its state with "
            "unsharded_state_dict(model) into the same task built on CPU (what `recsys-llm export` does)"
        )
    if isinstance(getattr(task, "student", None), nn.Module):
        raise ValueError(
            f"export: {type(task).__name__} is a teacher and a student; export the student alone, the served part: "
            "export_task(task.student, ...) (`recsys-llm export` keeps the student.* weights of a trained run)"
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
    width = getattr(task.model, "num_dense_features", None)
    if width is not None and example_dense.size(1) != width:
        raise ValueError(
            f"export: the example dense batch has {example_dense.size(1)} column(s); {type(task.model).__name__} was "
            f"built for {width} dense feature(s): pass a batch of the model's own data (its schema's dense fields)"
        )
    # the example is looked up as it is: a feature it lacks fails in torchrec with a bare KeyError
    semantic = _semantic_ebc(task)
    read = _kjt_keys(_table_dicts(ebc), _table_dicts(semantic) if semantic is not None else [])
    missing = [name for name in read if name not in example_sparse.keys()]
    if missing:
        raise ValueError(
            f"export: the example sparse features lack {missing}; {type(task.model).__name__}'s tables read {read}: "
            "pass a batch of the model's own data (its schema's sparse and sequence fields)"
        )
    # and a weighted EBC without weights fails in torchrec with a bare AssertionError
    check_id_weights(example_sparse, bool(ebc.is_weighted()), f"export: {type(task.model).__name__} (example_sparse)")
    if example_sparse.stride() != example_dense.size(0):
        raise ValueError(
            f"export: the example sparse features hold {example_sparse.stride()} row(s), the example dense batch "
            f"{example_dense.size(0)}; pass the dense and sparse features of one batch"
        )
    if example_dense.dtype.is_complex:
        raise ValueError(
            f"export: the example dense batch has dtype {example_dense.dtype}; expected real numbers (float32)"
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
def _children_left_out(children: Sequence[Tuple[nn.Module, str]]) -> Iterator[None]:
    """Each ``(parent, name)`` child out of its parent's module tree for the block, then back in.

    ``torch.export`` lifts every parameter and buffer of the module it captures, used by the
    program or not: what the program never calls is taken out while it is captured.
    """
    removed = [(parent, name, parent._modules[name]) for parent, name in children]
    for parent, name, _ in removed:
        parent._modules[name] = None
    try:
        yield
    finally:
        for parent, name, child in removed:
            parent._modules[name] = child


def _tables_left_out(module: nn.Module) -> "contextlib.AbstractContextManager[None]":
    """``module`` without its ``EmbeddingBagCollection``s for the block: with the tables in the tree the
    dense program carried a second copy of every table (and of the entity tables' LLM vectors), which
    ``ServedModel`` already holds in its eager EBCs."""
    return _children_left_out([(parent, name) for parent in module.modules() for name, child in parent.named_children()
                               if isinstance(child, EmbeddingBagCollection)])


def _training_parts_left_out(task: nn.Module, folded: Sequence[str]) -> "contextlib.AbstractContextManager[None]":
    """``task`` without its loss terms and its folded logit terms for the block: serving never calls
    them (FRE is a training loss; a folded FIE term is part of the backbone's pairwise weights), yet the
    program, and the state file, held FRE's LLM field vectors and projection, and the folded term's
    pair-weight network (:func:`_artifact_state`)."""
    children: List[Tuple[nn.Module, str]] = []
    if isinstance(getattr(task, "loss_terms", None), nn.Module):
        children.append((task, "loss_terms"))
    terms = getattr(task, "logit_terms", None)
    children += [(terms, name) for name in folded if terms is not None and name in terms]
    return _children_left_out(children)


def _artifact_state(task: nn.Module, folded: Sequence[str], with_program: bool,
                    table_dtype: str = TRAINED) -> Dict[str, torch.Tensor]:
    """What ``model.safetensors`` holds: ``task``'s state as served (in :func:`serving_form`: frozen logit-term
    weights included), as :func:`state_to_write` gives it.

    With a dense program, the training-only parts are left out, as they are of the program
    (:func:`_training_parts_left_out`: the loss terms, e.g. FRE's (F, d_llm) LLM field vectors and its
    projection, and the logit terms ``folded`` into the backbone, e.g. FIE's pair-weight network):
    ``ServedModel`` reads the tables from the state and the program holds the dense weights. Without one the
    whole task's state is kept: it is served by loading it into the task built by the model's own code, whose
    ``load_state_dict`` wants every tensor (and the unfolded FIE term's weights).

    Args:
        task (nn.Module): the ``CTRTask`` being exported, in :func:`serving_form`.
        folded (Sequence[str]): the logit terms folded into the backbone.
        with_program (bool): ``torch.export`` captured the dense part.
        table_dtype (str): ``"trained"``, or ``"int8"`` / ``"int4"``: the tables' quantized rows, scales and biases
            replace their float weights (:func:`_with_quantized_tables`).

    Returns:
        Dict[str, torch.Tensor]: state-dict key -> tensor, on CPU.
    """
    parts = _training_parts_left_out(task, folded) if with_program else contextlib.nullcontext()
    with parts:
        state = state_to_write(task)
    if table_dtype != TRAINED:
        state = _with_quantized_tables(state, task, table_dtype)
    return state


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _drop_metadata_asserts(program: torch.export.ExportedProgram) -> None:
    """Removes the program's checks of a tensor's export-time dtype and device (``aten._assert_tensor_metadata``,
    which ``torch.export`` records for a ``.to()`` that was a no-op when traced, e.g. FIE's serving matrix or a
    gain network's vectors cast to the embeddings' dtype): they pin the program to the export's device, so a
    ``ServedModel`` moved with ``.to("cuda")`` would refuse every request. ``ServedModel`` checks the request's
    own dtypes."""
    graph = program.graph_module.graph
    for node in [node for node in graph.nodes if node.target is torch.ops.aten._assert_tensor_metadata.default]:
        graph.erase_node(node)


def _with_vocabularies(metadata: Dict[str, Any], schema: Optional[Any]) -> Dict[str, Any]:
    """``metadata`` with ``schema``'s vocabulary records (which ids meant which values: ``ServedModel.vocabularies``,
    which ``score`` checks data against) unless it has them, or there is no schema."""
    if schema is None or "vocabularies" in metadata:
        return metadata
    return {"vocabularies": schema.vocabulary_records(), **metadata}


def _capture_dense_program(task: nn.Module, folded: List[str], captured: nn.Module, inputs: Tuple[torch.Tensor, ...],
                           export_id: str, directory: str, earlier_program: bool) -> Tuple[Optional[io.BytesIO], str]:
    """``captured`` (the dense head) traced by ``torch.export`` on ``inputs`` and saved into memory, with ``""``;
    ``(None, reason)`` when it cannot be captured, with a warning.

    Raises:
        FileExistsError: it cannot be captured and ``directory`` holds an earlier export with a dense program.
    """
    try:
        batch = torch.export.Dim("batch", min=1)
        # no_grad: the inference kernels (e.g. of weighted_pair_sum)
        with torch.no_grad(), _tables_left_out(task), _training_parts_left_out(task, folded):
            program = torch.export.export(
                captured, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs), strict=False
            )
        _drop_metadata_asserts(program)
        # drop what the logits do not need (e.g. a folded FM's representation)
        program.graph_module.graph.eliminate_dead_code()
        program.graph_module.recompile()
        # into memory, written by the caller outside this ``except``: a full disk or a file-size limit is not a
        # failed capture (torch's zip writer fails a short write as "unexpected pos" and, writing a file, may abort
        # the process when that writer is destroyed)
        program_bytes = io.BytesIO()
        torch.export.save(program, program_bytes, extra_files={EXPORT_ID_KEY: export_id})
    except Exception as error:  # torch.export could not capture this backbone
        if earlier_program:  # a servable artifact is not swapped for one ServedModel cannot load
            raise FileExistsError(
                f"export: torch.export could not capture the dense part ({telling_line(error)}); {directory} "
                f"holds an earlier export with a dense program, left as it was (the new one would hold the "
                "weights and tables only, which ServedModel cannot load): choose another output directory for it"
            ) from error
        warnings.warn(f"export: torch.export could not capture the dense part ({telling_line(error)}); "
                      f"{directory} holds the weights and tables but no dense program, so ServedModel cannot "
                      f"load it: serve it eagerly by loading {STATE_FILE} (serving.load_state_file) into the "
                      "task built by the model's own code (config.json: dense_program_error)", stacklevel=3)
        return None, f"{type(error).__name__}: {error}"[:2000]
    return program_bytes, ""


def export_task(
    task: nn.Module,
    directory: str,
    example_dense: torch.Tensor,
    example_sparse: KeyedJaggedTensor,
    *,
    metadata: Optional[Dict[str, Any]] = None,
    schema: Optional[Any] = None,
    table_dtype: str = TRAINED,
    mixed_precision: str = "fp32",
) -> Dict[str, Any]:
    """Writes the serving artifact of an unsharded ``CTRTask`` (atomically).

    Args:
        task (nn.Module): the student ``CTRTask`` (or an entity-table gain network) with trained
            weights, on CPU.
        directory (str): output directory: an earlier export there is replaced, any other
            non-empty directory refused (:func:`check_export_output`).
        example_dense (torch.Tensor): (B, Dd) example input for ``torch.export`` (B >= 2); another
            real dtype than float32 (numpy's float64) is converted, as ``ServedModel`` converts requests.
        example_sparse (KeyedJaggedTensor): example ids of the same batch.
        metadata (Optional[Dict[str, Any]]): stored in ``config.json`` (model config, schema name...).
        schema (Optional[DatasetSchema]): the training data's schema; its ``hashed``,
            ``max_length`` and single-id kind per feature go to ``config.json`` (``id_rules``), so ``ServedModel``
            treats raw request ids as the reader treated the training ids (without it: bounds
            checks only), and its vocabulary records to ``metadata.vocabularies`` (unless ``metadata`` has them),
            so ``recsys-llm score`` refuses data whose ids mean other values.
        table_dtype (str): the served tables' dtype (``recsys-llm export --table-dtype``): ``"trained"``
            keeps them as trained (FP32 / FP16); ``"int8"`` / ``"int4"`` quantizes every table, the entity tables
            of a gain network too, to 8-bit / 4-bit rows with a per-row scale and bias, torchrec inference's
            quantized tables (:mod:`recsys_llm.serving.quantized_tables`; ``tables.json``: ``data_type`` INT8 /
            INT4 and ``trained_data_type``; ``config.json``: ``table_dtype``).
        mixed_precision (str): the dense program's precision (``recsys-llm export --mixed-precision``): ``"fp32"``,
            or ``"bf16"``: captured under CPU bfloat16 autocast (:class:`AutocastHead`; weights stay float32,
            matmuls and linears run in bfloat16: faster on CPUs with bfloat16 arithmetic, logits within bfloat16's
            rounding of float32's), served on CPU (``config.json``: ``mixed_precision``).

    Returns:
        Dict[str, Any]: the written ``config.json`` (``dense_program`` None, with a warning, when
        ``torch.export`` could not capture the dense part: the artifact then holds the weights
        and tables only, which ``ServedModel`` cannot serve; load ``model.safetensors``
        (``serving.load_state_file``) into the task built by the model's own code instead).

    Raises:
        ValueError: a sharded (DMP) model, a teacher-student pair (export its student), a task without a
            backbone EBC, a weight still on the meta device, an example batch of fewer than 2 rows or of
            another dense width than the backbone's, sparse features lacking a feature the tables read, of
            another batch size than the dense ones or without per-id weights for weighted tables (with them
            for unweighted ones), teacher / LLM parts, a ``table_dtype`` other than ``"trained"`` / ``"int8"`` /
            ``"int4"``, a ``mixed_precision`` other than ``"fp32"`` / ``"bf16"``, or a table whose dim that dtype
            cannot take (INT4: a multiple of 4; INT8: even;
            :func:`~recsys_llm.serving.quantized_tables.check_quantizable`), all before anything is written.
        FileExistsError: ``directory`` may not take an export (:func:`check_export_output`), or
            ``torch.export`` could not capture the dense part and ``directory`` holds an earlier export
            with a dense program, which a weights-only artifact would replace (it is left as it was).
    """
    check_table_dtype(table_dtype)
    dense_autocast = autocast_dtype(mixed_precision, torch.device("cpu"), setting="export: mixed_precision")
    _check_exportable(task, example_dense, example_sparse)
    check_servable(task)
    earlier = check_export_output(directory)
    earlier_program = earlier.get("dense_program") == PROGRAM_FILE if earlier is not None else False
    example_dense = example_dense.to(DENSE_DTYPE)  # the program's input dtype, whatever the example's
    ebc = task.model.embedding_bag_collection
    semantic = _semantic_ebc(task)
    weighted = bool(ebc.is_weighted())  # per-id weights: ServedModel must pool them too
    if semantic is not None and bool(semantic.is_weighted()) != weighted:  # SemanticTableTask refuses this
        raise ValueError(f"export: the backbone's tables have is_weighted={weighted}, the entity tables "
                         f"is_weighted={semantic.is_weighted()}; they read one request and must agree")
    for tables_of in (ebc, semantic):  # a dim the dtype cannot take, before anything is written
        if tables_of is not None:
            check_quantizable(tables_of, table_dtype)
    tables = _table_dicts(ebc, table_dtype)
    semantic_tables = _table_dicts(semantic, table_dtype) if semantic is not None else []
    feature_names = [f for t in tables for f in t["feature_names"]]  # the pooled embeddings' keys, in order
    with _eval_mode(task), atomic_directory(directory, "export", EXPORT_MARKER_FILES) as tmp, \
            serving_form(task, feature_names) as folded:
        export_id = uuid.uuid4().hex  # in config.json, the state file and the program: they belong together
        with open(os.path.join(tmp, TABLES_FILE), "w", encoding="utf-8") as handle:
            json.dump(tables, handle, indent=2)
        if semantic_tables:
            with open(os.path.join(tmp, SEMANTIC_TABLES_FILE), "w", encoding="utf-8") as handle:
                json.dump(semantic_tables, handle, indent=2)
        head = DenseHead(task, folded).eval()
        captured = head if dense_autocast is None else AutocastHead(head, dense_autocast)
        with torch.no_grad():
            # per-id weights in each EBC's table dtype, as ServedModel gives them (FP16 tables take float16 ones)
            pooled = ebc(weights_in_table_dtype(example_sparse, ebc)).values()  # (B, sum dims)
            inputs = (example_dense, pooled)
            if semantic is not None:
                inputs = inputs + (semantic(weights_in_table_dtype(example_sparse, semantic)).values(),)  # (B, K * d)
        program_bytes, reason = _capture_dense_program(task, folded, captured, inputs, export_id, directory,
                                                       earlier_program)
        program_status: Optional[str] = None
        if program_bytes is not None:
            program_status = PROGRAM_FILE
            with open(os.path.join(tmp, PROGRAM_FILE), "wb") as handle:
                handle.write(program_bytes.getbuffer())
            del program_bytes
        # after the capture: what the state holds depends on whether a program serves the dense part
        state = _artifact_state(task, folded, program_status is not None, table_dtype)
        # the flag: a config.json whose digest was removed is refused, not read as one written before digests
        save_file(state, os.path.join(tmp, STATE_FILE), metadata={EXPORT_ID_KEY: export_id, CONFIG_DIGEST_KEY: "1"})
        written = [STATE_FILE, TABLES_FILE] + ([SEMANTIC_TABLES_FILE] if semantic_tables else [])
        written += [program_status] if program_status is not None else []
        id_ways = write_raw_id_ways(schema, tmp) if schema is not None else []
        written += id_ways
        config = {
            "format_version": FORMAT_VERSION,
            EXPORT_ID_KEY: export_id,
            "feature_names": feature_names,
            "num_dense_features": int(example_dense.size(1)),
            # their names in the program's column order: ``recsys-llm score`` checks a data set's against them
            DENSE_NAMES_KEY: list(schema.dense_feature_names) if schema is not None else None,
            "pooled_dim": int(pooled.size(1)),
            WEIGHTED_KEY: weighted,
            TABLE_DTYPE_KEY: table_dtype,
            MIXED_PRECISION_KEY: mixed_precision,
            "state": STATE_FILE,
            "tables": TABLES_FILE,
            "semantic_tables": SEMANTIC_TABLES_FILE if semantic_tables else None,
            "dense_program": program_status,
            "dense_program_error": reason,
            "folded_logit_terms": folded if program_status is not None else [],
            ID_RULES_KEY: id_rules(schema, _kjt_keys(tables, semantic_tables)) if schema is not None else None,
            RAW_IDS_KEY: RAW_IDS_DIR if id_ways else None,  # raw values -> ids (ServedModel.raw_value_ids)
            # checked by ServedModel.load: a bit flipped in a weight loads without any other error
            DIGESTS_KEY: {name: file_sha256(os.path.join(tmp, name)) for name in written},
            VERSIONS_KEY: {**library_versions(), "recsys_llm_commit": source_commit()},
            "num_parameters": int(sum(p.numel() for p in task.parameters())),
            "num_state_tensors": len(state),
            "metadata": _with_vocabularies(metadata or {}, schema),
        }
        config[CONFIG_DIGEST_KEY] = config_digest(config)  # an edit of config.json changes scores silently otherwise
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        with open(os.path.join(tmp, INFERENCE_FILE), "w", encoding="utf-8") as handle:
            handle.write(inference_text(os.path.abspath(directory), config, feature_names, tables, semantic_tables))
    return config


def library_versions() -> Dict[str, str]:
    """This process's torch, torchrec, fbgemm_gpu and recsys_llm versions ('' where one is absent)."""
    from recsys_llm import __version__

    installed = installed_versions()
    return {"torch": torch.__version__, "torchrec": installed["torchrec"],
            "fbgemm_gpu": installed["fbgemm-gpu"] or installed["fbgemm-gpu-cpu"], "recsys_llm": __version__}


def _kjt_keys(*table_lists: List[Dict[str, Any]]) -> List[str]:
    """Every feature the artifact's tables read from the request, once, in table order."""
    return list(dict.fromkeys(f for tables in table_lists for t in tables for f in t["feature_names"]))


def rows_per_feature(*ebcs: Optional[EmbeddingBagCollection]) -> Dict[str, int]:
    """Table rows per feature (the smallest, where a feature feeds several tables)."""
    rows: Dict[str, int] = {}
    for ebc in ebcs:
        for table in ebc.embedding_bag_configs() if ebc is not None else []:
            for feature in table.feature_names:
                rows[feature] = min(rows.get(feature, table.num_embeddings), table.num_embeddings)
    return rows
