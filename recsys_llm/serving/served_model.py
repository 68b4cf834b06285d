"""``ServedModel``: an exported artifact loaded for inference, with per-request checks."""

import bisect
import json
import math
import os
import threading
import time
import warnings
import zipfile
from typing import Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.export.pt2_archive import PT2ArchiveReader
from torch.export.pt2_archive.constants import EXTRA_DIR
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.atomic_dir import swapped_out_path
from recsys_llm.data.criteo import DENSE_NAMES, SPARSE_NAMES
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.tabular.raw_values import prepared_plan, raw_value_ids
from recsys_llm.data.tabular.tokens import FieldPlan, with_lookup
from recsys_llm.error_text import telling_line
from recsys_llm.id_rules import IdRules
from recsys_llm.paths import file_problem, is_plain_file_name
from recsys_llm.serving.artifact import (
    CONFIG_DIGEST_KEY,
    DENSE_DTYPE,
    DENSE_NAMES_KEY,
    DIGESTS_KEY,
    EXPORT_ID_KEY,
    FORMAT_VERSION,
    ID_RULES_KEY,
    MIXED_PRECISION_KEY,
    SEMANTIC_TABLES_PREFIX,
    STATE_FILE,
    STATE_ONLY_PROGRAM,
    TABLE_DTYPE_KEY,
    TABLES_PREFIX,
    VERSION_CHECKED,
    VERSIONS_KEY,
    WEIGHTED_KEY,
    config_digest,
)
from recsys_llm.file_hash import file_sha256
from recsys_llm.serving.export import library_versions, rows_per_feature
from recsys_llm.serving.quantized_tables import (
    QUANTIZED_DATA_TYPES,
    empty_quantized_ebc,
    is_quantized,
    load_quantized_state,
    pooled_in_order,
    pooling_weight_dtype,
    table_order_keys,
    tables_device,
)
from recsys_llm.serving.raw_ids import RAW_IDS_DIR, RAW_IDS_KEY, load_raw_id_ways
from recsys_llm.serving.raw_request import raw_request
from recsys_llm.serving.state import require_finite, check_same_export


# what reading a damaged artifact file raises (json, safetensors, torch.export's zip reader and
# deserializer, a table list or state dict that does not fit); OS errors such as EACCES are not in it
ARTIFACT_READ_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, EOFError,
                        zipfile.BadZipFile, SafetensorError)
# what a run directory (config.yaml, checkpoints/), its best/ (latest, ckpt-N/) or one checkpoint (train_state.json)
# holds
RUN_DIR_MARKERS = ("config.yaml", "train_state.json", "checkpoints", "latest")
CHECKPOINT_PREFIX = "ckpt-"
CONFIG_KEYS = ("feature_names", "num_dense_features", "state", "tables", "dense_program")  # besides format_version
FILE_KEYS = ("state", "tables", "semantic_tables", "dense_program")  # config.json keys that name artifact files
OPTIONAL_FILE_KEYS = ("semantic_tables", "dense_program")  # null: no such file (no entity tables; no program)
# loads of a directory that an export swapped meanwhile (a hot reload beside `recsys-llm export` into the same path)
LOAD_ATTEMPTS = 5
SWAP_WAIT_S = 0.05  # between the two renames of a swap the directory is missing for a moment
# torch.export.load keeps the program being read in one module global (torch._export.serde.serialize's
# _CURRENT_DESERIALIZER): two loads at once in one process (artifacts loaded side by side in threads, a hot reload
# beside another) raised AssertionError("_CURRENT_DESERIALIZER is already set"), or read one program's tensor
# metadata with the other's deserializer; loads of programs take turns (requests of loaded models do not wait)
_PROGRAM_LOAD_LOCK = threading.Lock()


def _directory_identity(directory: str) -> Optional[Tuple[int, int]]:
    """(device, inode) of ``directory``; None while it is missing. An export swaps a new directory in under the
    same name (``atomic_dir.replace_directory``), so another identity means another export."""
    try:
        found = os.stat(directory)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _swapped_meanwhile(directory: str, before: Optional[Tuple[int, int]]) -> bool:
    """Whether an export swapped ``directory`` since its identity was ``before``, or is swapping it now (the
    directory missing while the swap's previous copy, ``.<name>.old``, is beside it)."""
    now = _directory_identity(directory)
    if now is None:
        return os.path.isdir(swapped_out_path(directory))
    return now != before  # another directory under the name (or one that appeared: before None)


def _raise_damaged(path: str, problem: str, error: Optional[BaseException] = None) -> NoReturn:
    """Raises the one error of a damaged or incomplete artifact: its file, what is wrong, the fix."""
    cause = f" ({telling_line(error)})" if error is not None else ""
    raise ValueError(
        f"{path}: {problem}{cause}; the export artifact is damaged or incomplete: export the model again "
        "(`recsys-llm export --output DIR`, or export_task) and load the new directory"
    ) from error


def _require_file(path: str) -> None:
    """Raises (damaged) when the artifact file ``path`` is missing, or no regular file (a directory, a FIFO, whose
    read would wait for good, a dangling link), naming what it is."""
    problem = file_problem(path)
    if problem is not None:
        _raise_damaged(path, "file missing" if problem == "missing" else f"is {problem}, not a file")


def _read_json(path: str) -> Any:
    """The JSON value of an artifact file (a damaged or missing one is a ValueError naming it)."""
    _require_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; nested past Python's limit
        _raise_damaged(path, "not valid JSON", error)


def _check_config_types(config_path: str, config: Dict[str, Any]) -> None:
    """Raises (damaged) when ``config.json``'s feature names, dense width or digests have another type
    than ``export`` writes: a bad width would fail only at the first request, and digests that are not
    a name -> sha256 object would skip every digest check."""
    names = config["feature_names"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        _raise_damaged(config_path, f"'feature_names' is {names!r}, expected a list of feature names")
    width = config["num_dense_features"]
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        _raise_damaged(config_path, f"'num_dense_features' is {width!r}, expected an integer >= 0")
    digests = config.get(DIGESTS_KEY, {})
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        _raise_damaged(config_path, f"{DIGESTS_KEY!r} is {digests!r}, expected an object of file name -> sha256")
    rules = config.get(ID_RULES_KEY)
    # None: an export before id rules were recorded; otherwise feature -> rule ('where' None: the whole value)
    entries = [] if rules is None else rules.items() if isinstance(rules, dict) else [(None, rules)]
    for name, rule in entries:
        if not _is_id_rule(rule):
            where = f"'{ID_RULES_KEY}'" + ("" if name is None else f"[{name!r}]")
            _raise_damaged(config_path, f"{where} is {rule!r}, expected an object of hashed (true / false), "
                                        "max_length (an integer) and single_id (true / false)")


def _load_raw_id_ways(directory: str, config_path: str, config: Dict[str, Any]) -> Optional[DatasetSchema]:
    """The training data's id ways the artifact holds (``raw_ids``, :mod:`~recsys_llm.serving.raw_ids`), their
    files checked against their digests; None for an artifact without them."""
    recorded = config.get(RAW_IDS_KEY)
    if recorded not in (None, RAW_IDS_DIR):
        _raise_damaged(config_path, f"{RAW_IDS_KEY!r} is {recorded!r}; expected {RAW_IDS_DIR!r} or null")
    if recorded is None:
        return None
    for name in sorted(config.get(DIGESTS_KEY, {})):
        if name.startswith(f"{RAW_IDS_DIR}/"):
            _require_file(os.path.join(directory, name))
            _check_digest(directory, config, name)
    try:
        return load_raw_id_ways(directory, recorded)
    except (OSError, ValueError) as error:  # SchemaError is a ValueError
        _raise_damaged(os.path.join(directory, recorded, "schema.json"), "cannot be read as the data's id ways", error)


def _is_id_rule(rule: Any) -> bool:
    """Whether ``rule`` is one feature's id rule as ``export`` writes it: ``hashed`` and ``single_id``
    booleans, ``max_length`` an integer >= 0 (each may be absent)."""
    if not isinstance(rule, dict):
        return False
    flags_ok = all(isinstance(rule.get(key, False), bool) for key in ("hashed", "single_id"))
    max_length = rule.get("max_length", 0)
    return flags_ok and isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 0


def _check_config_digest(config_path: str, config: Dict[str, Any]) -> None:
    """Raises when ``config.json``'s keys are not those its export wrote (its ``config_sha256``): an edited id rule,
    feature list or digest would otherwise change the scores, or what is checked, without a word. Artifacts written
    before 2026-12-06 have no such digest (their state file has no flag saying one was written)."""
    expected = config.get(CONFIG_DIGEST_KEY)
    if expected is not None and expected != config_digest(config):
        _raise_damaged(config_path, f"its keys changed after the export ({CONFIG_DIGEST_KEY} does not match them: an "
                                    "edit or a flipped bit)")


def _check_digest(directory: str, config: Dict[str, Any], name: str) -> None:
    """Raises when ``name``'s bytes are not those ``config.json`` recorded at export (artifacts
    written before digests were recorded, or files without one, are not checked)."""
    digests = config.get(DIGESTS_KEY)
    expected = digests.get(name) if isinstance(digests, dict) else None
    if expected is None:
        return
    path = os.path.join(directory, name)
    actual = file_sha256(path)
    if actual != expected:
        _raise_damaged(path, f"its bytes changed after the export (sha256 {actual[:16]}..., config.json recorded "
                             f"{str(expected)[:16]}...; a copy cut short, a flipped bit or an edit)")


def _program_export_id(path: str) -> Optional[str]:
    """The export id ``export_task`` stored among a program's extra files, read from the archive's zip
    entries alone (nothing in the file runs); None where it has none (artifacts before export ids).

    Raises:
        RuntimeError: ``path`` is no readable zip archive (torch's stream reader).
    """
    reader = PT2ArchiveReader(path)
    name = f"{EXTRA_DIR}{EXPORT_ID_KEY}"
    return reader.read_string(name) if name in reader.get_file_names() else None


def _check_file_names(config_path: str, config: Dict[str, Any]) -> None:
    """Refuses a file entry of ``config.json`` that is not a plain file name: ``export_task`` writes
    every file into the artifact directory, so ``../x`` or ``/abs/x`` would read another file; only the
    entries of :data:`OPTIONAL_FILE_KEYS` may be null."""
    for key in FILE_KEYS:
        name = config.get(key)
        if (name is None and key in OPTIONAL_FILE_KEYS) or is_plain_file_name(name):
            continue
        _raise_damaged(config_path, f"{key!r} is {name!r}; expected a file name inside the artifact directory")


def _release(version: Any) -> str:
    """A version without its local build tag (``2.13.0+cpu`` -> ``2.13.0``)."""
    return str(version).split("+")[0]


def _warn_on_other_versions(directory: str, config: Dict[str, Any]) -> None:
    """Warns when torch, torchrec or fbgemm_gpu differ from those that exported the artifact
    (local build tags such as ``+cpu`` / ``+cu126`` aside); older artifacts record none."""
    recorded = config.get(VERSIONS_KEY)
    if not isinstance(recorded, dict):
        return
    here = library_versions()
    differ = [name for name in VERSION_CHECKED
              if recorded.get(name) and _release(recorded[name]) != _release(here[name])]
    if differ:
        warnings.warn(
            f"{directory}: exported with {', '.join(f'{n} {recorded[n]}' for n in differ)}; this process has "
            f"{', '.join(f'{n} {here[n] or None}' for n in differ)}. A torch.export program and torchrec's tables are "
            "not guaranteed to load or compute the same across versions: serve with the exporting versions "
            f"(config.json: {VERSIONS_KEY}), or export again with these and compare predictions",
            stacklevel=3,
        )


def _load_ebc(directory: str, config: Dict[str, Any], tables_file: str, state: Dict[str, torch.Tensor],
              prefix: str, weighted: bool = False) -> nn.Module:
    """An EBC from an artifact's table list, its weights taken from ``state`` under ``prefix``; ``weighted``:
    it pools the request's per-id weights (the exported EBC had ``is_weighted=True``). Each table's weights
    have its ``data_type`` (FP32 where ``tables.json`` records none, as before it was recorded); INT8 / INT4 tables
    (``export --table-dtype int8 | int4``) are torchrec's quantized EBC (``recsys_llm.serving.quantized_tables``;
    an INT4 table's packed bytes are wrapped in torchrec's ``UInt4Tensor`` again, no code from the file runs)."""
    path = os.path.join(directory, tables_file)
    tables = _read_json(path)
    _check_digest(directory, config, tables_file)
    try:
        configs = [
            EmbeddingBagConfig(name=t["name"], embedding_dim=t["embedding_dim"], num_embeddings=t["num_embeddings"],
                               feature_names=t["feature_names"], pooling=PoolingType[t["pooling"]],
                               data_type=DataType[t.get("data_type", DataType.FP32.name)])
            for t in tables
        ]
        quantized = [c.data_type in QUANTIZED_DATA_TYPES for c in configs]
        if any(quantized) and not all(quantized):  # export quantizes every table or none
            raise ValueError(f"data_types {[c.data_type.name for c in configs]} mix quantized and float tables")
        if any(quantized):  # allocated on CPU, filled by load_state_dict below
            ebc: nn.Module = empty_quantized_ebc(configs, weighted)
        else:  # no storage: the tables become the loaded tensors themselves
            ebc = EmbeddingBagCollection(tables=configs, is_weighted=weighted, device=torch.device("meta"))
    except ARTIFACT_READ_ERRORS as error:
        _raise_damaged(path, "not a list of tables (name, embedding_dim, num_embeddings, feature_names, pooling, "
                             "data_type)", error)
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    dtypes = {key: value.dtype for key, value in ebc.state_dict().items()}  # each table's data_type
    other = {k: v.dtype for k, v in weights.items() if k in dtypes and v.dtype != dtypes[k]}
    if other:  # taken as they are (assign), not cast into the tables' dtype
        expected = sorted({str(dtypes[k]).replace("torch.", "") for k in other})
        _raise_damaged(os.path.join(directory, STATE_FILE),
                       f"table weights {[f'{k} ({dtype})' for k, dtype in list(other.items())[:3]]} are not "
                       f"{' / '.join(expected)}, as export writes them ({tables_file}: data_type)")
    try:  # a quant EBC's rows are copied into FBGEMM's (padded) layout
        if is_quantized(ebc):
            load_quantized_state(ebc, weights)
        else:
            ebc.load_state_dict(weights, assign=True)
    except RuntimeError as error:  # missing / unexpected keys, other shapes
        _raise_damaged(os.path.join(directory, STATE_FILE), f"its tables do not match {tables_file}", error)
    if not is_quantized(ebc):
        ebc._device = torch.device("cpu")  # torchrec keeps the construction device apart from the weights
    return ebc.eval()


def _finite_logits(logits: torch.Tensor, dense_features: torch.Tensor) -> torch.Tensor:
    """``logits`` (B,) when all are finite; else a ValueError naming the first row: finite dense values far
    beyond what training saw (1e20), or diverged weights, overflow the model's float32 arithmetic into NaN / inf."""
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        largest = float(dense_features[row].abs().max()) if dense_features.numel() else 0.0
        raise ValueError(f"row {row}: the model's logit is {float(logits[row])} for finite inputs (its largest dense "
                         f"value is {largest:.3g} in absolute value): values far beyond the training data "
                         "overflow the model's float32 arithmetic (scale the dense features as the training data "
                         "was), and so do weights that diverged in training (a learning rate too high), with "
                         "ordinary values too")
    return logits


class ServedModel(nn.Module):
    """An exported model for inference: eager EBC lookups + the exported dense program.

    Args:
        ebc (nn.Module): the tables with trained weights: an ``EmbeddingBagCollection``, or torchrec's quantized
            one for an artifact of INT8 / INT4 tables (``export --table-dtype int8 | int4``; it serves on CPU).
        dense_program (nn.Module): ``(dense, pooled[, vectors]) -> logits`` (``torch.export`` module).
        config (Dict[str, Any]): the artifact's ``config.json``.
        semantic_ebc (Optional[nn.Module]): a gain network's frozen entity-vector
            tables (their LLM vectors were computed offline, once per entity).

    Example::

        served = ServedModel.load("runs/elec/export", trust_program=True)  # a `recsys-llm export` directory
        probabilities = served.predict(dense_features, sparse_kjt)  # dense (B, Dd), a KJT -> (B,)
    """

    def __init__(
        self,
        ebc: nn.Module,
        dense_program: nn.Module,
        config: Dict[str, Any],
        semantic_ebc: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = ebc
        self.semantic_embedding_bag_collection = semantic_ebc
        self.dense_program = dense_program
        self._config = config
        self._id_rules = IdRules.from_config(config.get(ID_RULES_KEY), rows_per_feature(ebc, semantic_ebc))
        # the pooled keys in table order, as the program takes them (a quant EBC groups its tables by pooling)
        self._pooled_keys = table_order_keys(ebc)
        self._vector_keys = table_order_keys(semantic_ebc) if semantic_ebc is not None else []
        # the training data's way from raw values to ids, when the artifact holds it (ServedModel.load sets it)
        self.raw_id_ways = None
        self.train(False)

    @property
    def raw_id_ways(self) -> Optional[DatasetSchema]:
        """The training data's id ways (the artifact's ``ids/schema.json``), or None for an artifact without them."""
        return self._raw_id_ways

    @raw_id_ways.setter
    def raw_id_ways(self, schema: Optional[DatasetSchema]) -> None:
        """Sets the id ways and reads every field's vocabulary into memory once, as a token -> id dict (about
        250 bytes a value: 250 MB for 10^6 values): :meth:`raw_value_ids` reads no file per request, costs what its
        values cost (not the vocabulary's size), and keeps the vocabularies of the export it was loaded from when
        another export replaces the artifact's directory (or the directory is deleted) while this model serves."""
        plans: Dict[str, FieldPlan] = {}
        if schema is not None:
            for spec in schema.fields:
                if spec.is_categorical and spec.name in schema.ids:
                    plans[spec.name] = with_lookup(prepared_plan(schema, spec.name, "raw_value_ids"))
        # both set once every plan is built: a vocabulary that cannot be read leaves the model's earlier id ways
        # and their plans as they were (not the earlier ways beside the fields the new ones read before it)
        self._raw_id_plans: Dict[str, FieldPlan] = plans
        self._raw_id_ways = schema

    def raw_value_ids(self, field: str, values: Sequence[object],
                      sequence_separator: str = "|") -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The ids the model was trained on for raw values of one sparse or sequence field (strings, the source's
        own numbers; None for a missing value), from the training data's vocabularies and ways the artifact holds
        (``ids/``), as :func:`~recsys_llm.data.tabular.raw_values.raw_value_ids` gives them from the prepared data.

        Returns:
            Tuple[np.ndarray, Optional[np.ndarray]]: ``(ids (N,) int64, None)`` for a sparse field, ``(flat ids,
            lengths (N,))`` for a sequence field; a value the vocabulary lacks gets id 0 (a sequence drops it).

        Raises:
            ValueError: the artifact holds no id ways (its data was not prepared by ``prepare tabular``, or it
                was exported before artifacts held them), or a field or value the preparation would refuse.
        """
        if self.raw_id_ways is None:
            raise self._without_raw_id_ways(f"raw_value_ids({field!r})")
        return raw_value_ids(self.raw_id_ways, field, values, sequence_separator, plan=self._raw_id_plans.get(field))

    def _without_raw_id_ways(self, caller: str) -> ValueError:
        """The error for ``caller`` (a raw-value method) on an artifact without id ways (``config.json`` ``raw_ids``
        null): for ``prepare criteo`` data (its export names the schema ``criteo``, or its features are Criteo's
        ``C1..C26`` and ``I1..I13``), how that preparation made its ids, which no export holds."""
        of_criteo = ((self._config.get("metadata") or {}).get("schema") == "criteo"
                     or (self.feature_names == SPARSE_NAMES and self.dense_feature_names == DENSE_NAMES))
        if of_criteo:
            return ValueError(
                f"{caller}: this artifact's training data was prepared by `recsys-llm prepare criteo`, whose ids "
                "come from no vocabulary and are not held in the artifact (config.json: raw_ids null; exporting "
                "again gives none either): build them as that preparation did, each C_k token lower-cased and "
                "hashed by recsys_llm.data.hashing.hash_strings(tokens, <C_k's cardinality in the prepared "
                "schema.json>, salt=k - 1), empty -> 0, and each dense I_k as log(1 + max(x, 0)), empty -> 0 "
                "(docs/usage.md: \"`prepare criteo` turns a line into the model's inputs\"; the artifact's "
                "INFERENCE.md)")
        return ValueError(f"{caller}: this artifact holds no way from raw values to ids (config.json: raw_ids null): "
                          "its training data was not prepared by `recsys-llm prepare tabular`, or it was exported "
                          "before artifacts held them; export the run again, or use recsys_llm.data.tabular."
                          "raw_values.raw_value_ids(DatasetSchema.load(<prepared data>), field, values) and build the "
                          "KeyedJaggedTensor of ids as INFERENCE.md shows")

    def raw_request(self, columns: Mapping[str, Sequence[object]], *,
                    sequence_separator: str = "|") -> Tuple[torch.Tensor, KeyedJaggedTensor]:
        """A whole request from raw values by field name, for :meth:`predict` / :meth:`logits`:
        :func:`~recsys_llm.serving.raw_request.raw_request` (every feature's ids through :meth:`raw_value_ids`,
        the dense fields in column order).

        Returns:
            Tuple[torch.Tensor, KeyedJaggedTensor]: dense (B, num_dense_features) float32 and the features' ids, on
            the model's device (``served.to("cuda")``: on the GPU).
        """
        # before the columns are checked: sending them would not help (weighted tables are named by raw_request)
        if self.raw_id_ways is None and self.feature_names and not self.weighted:
            raise self._without_raw_id_ways("raw_request")
        dense, kjt = raw_request(self, columns, sequence_separator=sequence_separator)
        device = tables_device(self.embedding_bag_collection)
        if device.type == "cpu":
            return dense, kjt
        return dense.to(device), kjt.to(device)

    def train(self, mode: bool = True) -> "ServedModel":
        """Inference only: it stays in eval mode (the dense program was exported in it, and a ``torch.export``
        module refuses ``train``). ``train(True)`` warns and changes nothing, so a module that holds it (a
        frozen scorer inside another model) still switches its own mode."""
        if mode:
            warnings.warn("ServedModel serves a program exported in eval mode and cannot train: it stays in eval "
                          "mode (train the task with `recsys-llm train` and export it again)", stacklevel=2)
        self.training = False
        for tables in (self.embedding_bag_collection, self.semantic_embedding_bag_collection):
            if tables is not None:
                tables.train(False)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "ServedModel":
        """``to`` / ``cuda`` / ``half`` ...; refused for quantized tables, which serve on CPU in float32: torchrec's
        quantized EBC keeps its FBGEMM rows outside the module tree, so ``.to("cuda")`` would move copies only; and
        for a dense program captured under CPU bfloat16 autocast (``export --mixed-precision bf16``), whose autocast
        region a GPU would not apply."""
        tables = (self.embedding_bag_collection, self.semantic_embedding_bag_collection)
        quantized = any(is_quantized(ebc) for ebc in tables)
        if quantized or self.mixed_precision != "fp32":
            try:
                moved = fn(torch.zeros(1))
                asked, stays = f"{moved.device.type} / {moved.dtype}", (moved.device.type, moved.dtype) == (
                    "cpu", torch.float32)
            except (AssertionError, RuntimeError) as error:  # .to("cuda") with a torch built without CUDA
                asked, stays = f"a device this torch cannot use: {telling_line(error)}", False
            if not stays:
                why, how = ((f"its tables are quantized ({TABLE_DTYPE_KEY} {self._config.get(TABLE_DTYPE_KEY)!r})",
                             "`--table-dtype trained`") if quantized else
                            (f"its dense program runs under CPU autocast ({MIXED_PRECISION_KEY} "
                             f"{self.mixed_precision!r})", "`--mixed-precision fp32`"))
                raise ValueError(f"ServedModel: {why}, so it serves on CPU in float32; it stays there (asked for "
                                 f"{asked}): export with {how} to serve on a GPU or in another dtype")
        return super()._apply(fn, recurse)

    @property
    def mixed_precision(self) -> str:
        """The dense program's precision (``config.json`` ``mixed_precision``): ``fp32``, or ``bf16``: its matmuls
        under CPU bfloat16 autocast (``export --mixed-precision bf16``)."""
        return str(self._config.get(MIXED_PRECISION_KEY, "fp32"))

    @property
    def feature_names(self) -> List[str]:
        return list(self._config["feature_names"])

    @property
    def export_id(self) -> Optional[str]:
        """The id that ties the artifact's files together (``config.json`` ``export_id``, new at each export); None
        for an artifact exported before they had one (2026-12)."""
        export_id = self._config.get(EXPORT_ID_KEY)
        return str(export_id) if export_id else None

    @property
    def weighted(self) -> bool:
        """The tables pool per-id weights (``config.json`` ``weighted``): a request's KJT carries them."""
        return bool(self._config.get(WEIGHTED_KEY, False))

    @property
    def num_dense_features(self) -> int:
        """Columns of the dense features a request carries."""
        return int(self._config["num_dense_features"])

    @property
    def dense_feature_names(self) -> Optional[List[str]]:
        """The dense features' names in column order, as exported; None for an artifact exported without a
        schema or before they were recorded (2026-12-06)."""
        names = self._config.get(DENSE_NAMES_KEY)
        return list(names) if isinstance(names, list) else None

    @property
    def vocabularies(self) -> Dict[str, Any]:
        """Which value each id of the vocabularies the model was trained on meant (``config.json``
        ``metadata.vocabularies``, :meth:`~recsys_llm.data.schema.DatasetSchema.vocabulary_records`); empty for an
        artifact exported before they were recorded."""
        recorded = (self._config.get("metadata") or {}).get("vocabularies")
        return dict(recorded) if isinstance(recorded, dict) else {}

    @classmethod
    def load(cls, directory: str, trust_program: bool = False) -> "ServedModel":
        """Loads an artifact: the tables from ``model.safetensors``, the dense part from
        ``dense_program.pt2``.

        The dense program is code: ``torch.export.load`` evaluates expressions and guard
        code stored in the file (and unpickles some payload kinds), so like Hugging Face's
        ``trust_remote_code`` it is read only when asked. Pass ``trust_program=True`` for an
        artifact you exported or trust; without it nothing from the file runs.

        A damaged or incomplete artifact (a file truncated, missing, or not what ``export_task``
        writes; weights with NaN / inf; bytes other than the SHA-256 that ``config.json`` recorded
        at export) is one ValueError naming the file: export again.

        A load that overlaps an export into the same directory (a hot reload while ``recsys-llm export
        --output`` replaces the artifact) reads the files of one export: the export swaps the new directory in whole,
        and a load that saw the swap (files of both exports, or the directory missing between the swap's two
        renames) loads again, up to a few times, instead of calling the artifact damaged.
        Loads in several threads at once take turns reading their dense programs (``torch.export.load`` is not
        thread-safe); requests to models already loaded do not wait for them.

        Warns (UserWarning) when the artifact was exported with another torch, torchrec or
        fbgemm_gpu version (``config.json``: ``versions``).

        Raises:
            FileNotFoundError: no such ``directory``.
            NotADirectoryError: ``directory`` is a file.
            PermissionError: ``trust_program`` is False.
            ValueError: another format version, a ``--state-only`` export, a training run or checkpoint
                directory (export it first), no program was exported, or the artifact is damaged or incomplete.
            TypeError: ``trust_program`` is no bool (``"false"`` would count as True).
        """
        if not isinstance(trust_program, bool):
            raise TypeError(f"ServedModel.load: trust_program must be True or False, got {trust_program!r} (True loads "
                            "the artifact's program, which runs code)")
        for _ in range(LOAD_ATTEMPTS - 1):
            before = _directory_identity(directory)
            try:
                served = cls._load_once(directory, trust_program)
            except (ValueError, OSError):  # a mix of two exports reads as damage; a missing directory as absent
                if not _swapped_meanwhile(directory, before):
                    raise
            else:
                if not _swapped_meanwhile(directory, before):
                    return served
            time.sleep(SWAP_WAIT_S)
        return cls._load_once(directory, trust_program)  # swapped at every try: whatever this one reads

    @classmethod
    def _load_once(cls, directory: str, trust_program: bool) -> "ServedModel":
        """One pass of :meth:`load` over ``directory``'s files."""
        if os.path.isfile(directory):
            raise NotADirectoryError(f"{directory}: a file; expected an export artifact's directory (`recsys-llm "
                                     f"export --output`), e.g. {os.path.dirname(directory) or '.'}")
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"{directory}: no such directory; expected an export artifact (`recsys-llm export`)"
            )
        config_path = os.path.join(directory, "config.json")
        if not os.path.lexists(config_path) and any(name in RUN_DIR_MARKERS or name.startswith(CHECKPOINT_PREFIX)
                                                    for name in os.listdir(directory)):
            raise ValueError(f"{directory}: a training run or checkpoint directory, not an export artifact: export it "
                             f"first (`recsys-llm export --checkpoint {directory} --output DIR`) and load DIR")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            _raise_damaged(config_path, f"holds a JSON {type(config).__name__}, expected an object")
        if "format_version" not in config and config.get("dense_program") == STATE_ONLY_PROGRAM:
            raise ValueError(
                f"{directory}: a `recsys-llm export --state-only` directory: the trained task's weights only "
                f"({STATE_FILE}), no tables.json or dense program to serve; load it with serving.load_state_file into "
                "the task built by the model's code (e.g. as elec.teacher_checkpoint), or export the run without "
                "--state-only to serve it"
            )
        if "format_version" not in config:
            _raise_damaged(config_path, "no format_version: not an export's config.json, or a damaged one")
        if config["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{directory}: export format {config['format_version']!r}, this code reads "
                             f"{FORMAT_VERSION}; export the run again with this version")
        missing = [key for key in CONFIG_KEYS if key not in config]
        if missing:
            _raise_damaged(config_path, f"lacks the keys {missing}")
        _check_config_types(config_path, config)
        _check_file_names(config_path, config)
        _check_config_digest(config_path, config)
        _warn_on_other_versions(directory, config)
        if config["dense_program"] is None:
            # its first line: config.json keeps the whole error (torch.export's runs to many lines of advice)
            reason = next(iter(str(config.get("dense_program_error")).splitlines()), "")
            raise ValueError(
                f"{directory}: no dense program was exported ({reason}); "
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
        _require_file(state_path)
        try:
            with safe_open(state_path, framework="pt") as handle:  # weights only
                state = {key: handle.get_tensor(key) for key in handle.keys()}
                state_metadata = handle.metadata() or {}
        except ARTIFACT_READ_ERRORS as error:
            _raise_damaged(state_path, "cannot be read as the model's weights", error)
        check_same_export(config_path, config, state_path, state_metadata.get(EXPORT_ID_KEY))
        if state_metadata.get(CONFIG_DIGEST_KEY) and CONFIG_DIGEST_KEY not in config:
            _raise_damaged(config_path, f"has no {CONFIG_DIGEST_KEY}, which its export wrote ({STATE_FILE} records "
                                        "it): config.json was edited after the export")
        _check_digest(directory, config, config["state"])  # before the values: a flipped bit is damage, not divergence
        for key, value in state.items():
            require_finite(state_path, key, value)
        weighted = config.get(WEIGHTED_KEY, False)
        if not isinstance(weighted, bool):
            _raise_damaged(config_path, f"{WEIGHTED_KEY!r} is {weighted!r}, expected true or false")
        ebc = _load_ebc(directory, config, config["tables"], state, TABLES_PREFIX, weighted)
        semantic = None
        if config.get("semantic_tables"):
            semantic = _load_ebc(directory, config, config["semantic_tables"], state, SEMANTIC_TABLES_PREFIX, weighted)
        _require_file(program_path)
        # the export id and the digest before torch.export.load, which runs code stored in the file
        try:
            program_export_id = _program_export_id(program_path)
        except ARTIFACT_READ_ERRORS as error:
            _check_digest(directory, config, config["dense_program"])  # a copy cut short, where a digest is recorded
            _raise_damaged(program_path, "cannot be read as a torch.export program", error)
        check_same_export(config_path, config, program_path, program_export_id)
        _check_digest(directory, config, config["dense_program"])  # after the export id: "mixes two exports" says more
        try:
            with _PROGRAM_LOAD_LOCK:
                program = torch.export.load(program_path).module()
        except ARTIFACT_READ_ERRORS as error:
            _raise_damaged(program_path, "cannot be read as a torch.export program", error)
        served = cls(ebc, program, config, semantic)
        raw_id_ways = _load_raw_id_ways(directory, config_path, config)  # its files checked against their digests
        try:  # every vocabulary read into memory now: no file is read per request
            served.raw_id_ways = raw_id_ways
        except (OSError, ValueError) as error:
            _raise_damaged(os.path.join(directory, RAW_IDS_DIR), "cannot be read as the data's id ways", error)
        return served

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

    @staticmethod
    def _weights_in_table_dtype(features: KeyedJaggedTensor, batch_size: int, request: KeyedJaggedTensor,
                                ebc: nn.Module) -> KeyedJaggedTensor:
        """``features`` with its per-id weights in the tables' dtype (``embedding_bag`` refuses weights of
        another dtype than its table): float32, or float16 / bfloat16 for tables of that ``data_type``;
        float64 (numpy's default), float16 and integer weights are converted, as dense features are.

        Args:
            features (KeyedJaggedTensor): the request after the id rules (sequences cut to ``max_length``).
            batch_size (int): B.
            request (KeyedJaggedTensor): the request as sent, to name a bad weight by its place there.
            ebc (nn.Module): the EBC the weights are for (the backbone's tables may be FP16 while a gain
                network's entity tables are float32: each gets the weights in its own dtype).

        Raises:
            ValueError: complex weights, or a NaN / inf weight (after the conversion), named by feature, its
                position among that feature's weights in the request, and row.
        """
        weights = features.weights()  # (N,)
        dtype = pooling_weight_dtype(ebc)
        if weights.dtype.is_complex:
            raise ValueError(f"sparse features: weights are {weights.dtype}; expected real per-id weights (float32)")
        converted = weights.to(dtype)  # (N,)
        finite = torch.isfinite(converted)
        if not bool(finite.all()):
            position = int(torch.argmin(finite.int()))
            offsets = features.offset_per_key()  # (F + 1,)
            index = bisect.bisect_right(offsets, position) - 1
            key, in_key = features.keys()[index], position - offsets[index]
            bags = features[key].offsets()  # (B + 1,)
            row = int(torch.searchsorted(bags, torch.tensor(in_key, device=bags.device), right=True)) - 1
            # a sequence cut to max_length keeps its first ids: the weight's place in its row is the one sent
            as_sent = int(request[key].offsets()[row]) + in_key - int(bags[row])
            raise ValueError(f"sparse features: weight {as_sent} of {key!r} is {converted[position].item()} (as "
                             f"{dtype}) in row {row} of the batch; expected finite per-id weights")
        if weights.dtype == dtype:
            return features
        return KeyedJaggedTensor(keys=features.keys(), values=features.values(), lengths=features.lengths(),
                                 weights=converted, stride=batch_size)

    def _check_device(self, dense_features: Any, sparse_features: KeyedJaggedTensor) -> None:
        """Raises ValueError when a request's tensors are not on the model's device (torchrec or the program would
        fail deep inside, naming neither)."""
        device = tables_device(self.embedding_bag_collection)
        for what, tensor in (("sparse features", sparse_features.values()), ("dense features", dense_features)):
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise ValueError(f"{what}: on {tensor.device}, the model on {device}; move the request "
                                 f"(.to({str(device)!r})) or the model (served.to({str(tensor.device)!r}))")

    @torch.no_grad()
    def logits(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """(B, Dd), KJT of raw ids -> logits (B,).

        The request is checked before anything runs, with a few whole-tensor checks (no loop
        over rows): the KJT holds each of the model's features once (others are dropped), integer ids and lengths
        that count them (:meth:`~recsys_llm.id_rules.IdRules.check_structure`); the dense
        features are (B, Dd) with the KJT's B, B > 0, and finite. Dense features of another
        real dtype (float64, integers) are converted to float32 (the per-id weights of a weighted
        model to its tables' dtype, float32 unless they are FP16 / BF16); NaN / inf is refused (in
        dense features as the training reader refuses it; in weights, which would give NaN
        predictions). Each problem is a ValueError saying what was expected; inputs of another type
        than a tensor and a KJT, a TypeError.

        The ids then go through the training reader's rules (:class:`~recsys_llm.id_rules.IdRules`):
        hashed features folded, sequences cut to ``max_length``, a row without an id or with
        several of a sparse (single-id) feature and other out-of-table ids refused (ValueError
        naming the feature and row).

        Args:
            dense_features (torch.Tensor): (B, Dd), in schema order.
            sparse_features (KeyedJaggedTensor): raw ids of the model's features (any key order).

        Returns:
            torch.Tensor: logits (B,).

        Raises:
            TypeError: ``dense_features`` is no tensor, or ``sparse_features`` no ``KeyedJaggedTensor``.
            ValueError: a request that does not fit (above), or finite inputs the model overflows on (a
                NaN / inf logit, named with its row).
        """
        if not isinstance(sparse_features, KeyedJaggedTensor):
            raise TypeError(f"sparse_features: expected a KeyedJaggedTensor of the features {self.feature_names}, "
                            f"got {type(sparse_features).__name__}")
        self._check_device(dense_features, sparse_features)
        if self._config.get(WEIGHTED_KEY, False) and sparse_features.weights_or_none() is None:
            raise ValueError(f"sparse features: no weights; this model's tables pool per-id weights (its EBC was "
                             f"is_weighted=True in training): pass weights=, one float per id of {self.feature_names}")
        request, sparse_features = sparse_features, self._id_rules(sparse_features)  # checks its structure first
        strides = set(sparse_features.stride_per_key())
        if len(strides) != 1:
            raise ValueError(
                f"sparse features: batch sizes {sorted(strides)} differ per feature; expected one B for all"
            )
        batch_size = strides.pop()
        dense_features = self._checked_dense(dense_features, batch_size)  # (B, Dd) float32
        semantic = self.semantic_embedding_bag_collection
        semantic_features = sparse_features
        if self._config.get(WEIGHTED_KEY, False):
            if semantic is not None:
                semantic_features = self._weights_in_table_dtype(sparse_features, batch_size, request, semantic)
            sparse_features = self._weights_in_table_dtype(sparse_features, batch_size, request,
                                                           self.embedding_bag_collection)
        pooled = pooled_in_order(self.embedding_bag_collection(sparse_features), self._pooled_keys)  # (B, sum dims)
        if semantic is None:
            logits = self.dense_program(dense_features, pooled)
        else:
            vectors = pooled_in_order(semantic(semantic_features), self._vector_keys)  # (B, K * d)
            logits = self.dense_program(dense_features, pooled, vectors)
        return _finite_logits(logits, dense_features)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``served(dense, kjt)``: :meth:`logits` (B,), through the module call (hooks run)."""
        return self.logits(dense_features, sparse_features)

    def predict(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Click probabilities (B,)."""
        return torch.sigmoid(self.logits(dense_features, sparse_features))
