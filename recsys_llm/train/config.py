"""Experiment configuration: typed dataclasses loaded from YAML plus ``key.sub=value`` overrides.

A config file has the sections of :class:`ExperimentConfig`::

    data:     {schema: data/synthetic/schema.json, batch_size: 1024, synthetic_rows: 200000}
    model:    {name: deepfm, embedding_dim: 16, mlp_layer_sizes: [256, 128]}
    optim:    {sparse: row_wise_adagrad, sparse_lr: 0.05, dense: adam, dense_lr: 0.001}
    sharding: {sharding_types: [table_wise, row_wise]}
    train:    {epochs: 3, patience: 1, checkpoint_every: 200, run_dir: runs/synthetic_deepfm}
    llactr:   {...}   # kept as a mapping here, typed by LLaCTRConfig.from_dict when the run builds
    elec:     {...}   # kept as a mapping here, typed by ELECConfig.from_dict when the run builds

Overrides on the command line are ``section.key=value`` (nested: ``elec.distill.alpha=0.5``);
the value is parsed as YAML (``3``, ``0.5``, ``true``, ``[64, 32]``) and then converted to the
field's declared type, so ``train.epochs=3`` is an int and ``model.mlp_layer_sizes=[64,32]``
a tuple; a string setting written as a number is its text (``train.run_dir=2024_01``, not
202401), and a number setting not written in decimal digits (``010``, ``0x10``, ``1:30``, which
YAML 1.1 reads as 8, 16 and 90) is an error. Unknown sections or keys are errors that list the allowed ones.

Example::

    config = load_config("configs/synthetic_deepfm.yaml", ["train.epochs=1", "data.batch_size=512"])
    print(config.train.epochs, config.model.name)
"""

import copy
import dataclasses
import json
import os
import re
from typing import TYPE_CHECKING, Any, Collection, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, TypeVar

import yaml

from recsys_llm import PACKAGED_CONFIGS
from recsys_llm.atomic_dir import write_text_atomically
from recsys_llm.data.schema import UniqueKeyLoader, read_utf8_text, schema_file
from recsys_llm.data.validation import check_number
from recsys_llm.error_text import one_line
from recsys_llm.models.registry import ModelConfig
from recsys_llm.train.mixed_precision import AUTOCAST_DTYPES
from recsys_llm.train.sharding_config import FusedParamsConfig, OptimizerConfig, ShardingConfig
from recsys_llm.typed_config import ConfigError, build_dataclass, check_bool_settings, check_str_settings

if TYPE_CHECKING:  # the plug-in configs, imported where their sections are parsed
    from recsys_llm.modules.elec import ELECConfig
    from recsys_llm.modules.llactr import LLaCTRConfig

T = TypeVar("T")


class _WrittenInt(int):
    """A YAML integer that keeps the text it was read from (``yaml_text``): YAML 1.1 reads ``0123``
    as the octal 83, ``2024_01`` as 202401 and ``1:30`` as 90, which a string setting must not become."""

    yaml_text: str


class _WrittenFloat(float):
    """A YAML float that keeps the text it was read from (``yaml_text``): ``1.10`` is the number 1.1."""

    yaml_text: str


class _ConfigLoader(UniqueKeyLoader):
    """The config files' and overrides' YAML loader: :class:`UniqueKeyLoader` whose numbers keep
    the text they were written as, so a string setting (``train.run_dir: 2024_01``) is that text
    (:func:`~recsys_llm.typed_config.coerce_value`), and a saved config writes them as they were read
    (:class:`_ConfigDumper`)."""

    def construct_written_int(self, node: yaml.ScalarNode) -> int:
        return _written(_WrittenInt(self.construct_yaml_int(node)), node.value)

    def construct_written_float(self, node: yaml.ScalarNode) -> float:
        return _written(_WrittenFloat(self.construct_yaml_float(node)), node.value)


def _written(number: T, text: str) -> T:
    number.yaml_text = text  # type: ignore[attr-defined]
    return number


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_written_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader.construct_written_float)


class _ConfigDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that writes a number of the free-form ``llactr`` / ``elec`` sections as it was
    read (``0123``), so the saved config reads back as the settings did (a string, or that number)."""


def _represent_as_written(dumper: yaml.SafeDumper, value: Any) -> yaml.ScalarNode:
    tag = "tag:yaml.org,2002:int" if isinstance(value, int) else "tag:yaml.org,2002:float"
    return dumper.represent_scalar(tag, value.yaml_text)


_ConfigDumper.add_representer(_WrittenInt, _represent_as_written)
_ConfigDumper.add_representer(_WrittenFloat, _represent_as_written)


DEFAULT_COLD_ITEM_COLUMN = "is_cold_item"  # data.cold_item_column: the synthetic data's; other data may lack it


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it is batched.

    Args:
        schema (str): schema file (or its directory).
        batch_size (int): per-rank training batch size (>= 1).
        eval_batch_size (int): per-rank eval batch size (0: ``batch_size``).
        extras (List[str]): extra Parquet columns carried in ``Batch.extras`` (LLM vectors, ...).
        shuffle (bool): shuffle training data each epoch (seeded by ``train.seed`` and epoch).
        train_split (str): split names in the schema.
        valid_split (str): used for early stopping ('': none; another name not in the schema is an error).
        test_split (str): reported at the end ('': none).
        cold_item_column (str): 0/1 extra column marking cold items; when the data has it,
            test metrics are also reported for the cold subset (``cold/auc``, ...). The default
            may be absent (data without cold items); another name the data lacks is an error.
        validate (bool): the reader's per-row-group value checks.
        prefetch (int): batches each reader's background thread prepares ahead (>= 0; 0: read in
            the training thread). On a GPU, a shuffle buffer's worth of batches (buffer rows /
            ``batch_size`` + 2, e.g. 18 at 4,096 rows) lets the reading of the next buffer overlap
            the steps (benchmarks/README.md, train_throughput on CUDA).
        synthetic_rows (int): if > 0 (then >= 10) and the schema file is missing, generate the embedded
            synthetic data set with this many rows into the schema's directory first. A config
            file's value applies to that file's ``data.schema``: an override of ``data.schema``
            alone turns it off (:func:`load_config`), so a mistyped path is an error, not new data.
        synthetic_seed (int): seed of that generation (>= 0).
    """

    schema: str = ""
    batch_size: int = 1024
    eval_batch_size: int = 0
    extras: List[str] = dataclasses.field(default_factory=list)
    shuffle: bool = True
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    cold_item_column: str = DEFAULT_COLD_ITEM_COLUMN
    validate: bool = True
    prefetch: int = 2
    synthetic_rows: int = 0
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        # a config built in Python: True, 2.5 or NaN would pass the bounds below (NaN < 1 is False)
        check_str_settings(self, ("train_split", "valid_split", "test_split", "cold_item_column"), "data",
                           paths=("schema",))
        for name in ("batch_size", "eval_batch_size", "prefetch", "synthetic_rows", "synthetic_seed"):
            check_number(f"data.{name}", getattr(self, name), integer=True)
        wrong = []
        if self.batch_size < 1:
            wrong.append(f"data.batch_size={self.batch_size} (must be >= 1)")
        if self.eval_batch_size < 0:
            wrong.append(f"data.eval_batch_size={self.eval_batch_size} (must be >= 1, or 0 for data.batch_size)")
        if self.prefetch < 0:
            wrong.append(f"data.prefetch={self.prefetch} (must be >= 0 batches, 0 to read in the training thread)")
        # what generate_synthetic's SyntheticConfig takes, named as the config's keys, before the run starts
        if self.synthetic_rows != 0 and self.synthetic_rows < 10:
            wrong.append(f"data.synthetic_rows={self.synthetic_rows} (must be 0 for none, or >= 10 rows to generate)")
        if self.synthetic_seed < 0:
            wrong.append(f"data.synthetic_seed={self.synthetic_seed} (must be >= 0)")
        for key in ("valid_split", "test_split"):
            if getattr(self, key) and getattr(self, key) == self.train_split:
                wrong.append(f"data.{key}={self.train_split!r} is also data.train_split (the rows trained on "
                             "would pick the checkpoint or report the metrics; use another split, or '' for none)")
        if wrong:
            raise ConfigError(", ".join(wrong))


DEVICES = ("auto", "cpu", "cuda")
#: ``train.init_scope``: every weight of the init run, or only its embedding tables that this model shares
INIT_SCOPES = ("all", "tables")


@dataclasses.dataclass
class TrainConfig:
    """The training loop.

    Args:
        epochs (int): passes over the training split.
        max_steps (int): stop after this many optimizer steps (0: no limit).
        eval_every (int): validate every this many epochs (and after the last).
        patience (int): early stopping: evaluations without a better validation AUC before
            stopping (0: never stop early).
        checkpoint_every (int): also checkpoint every this many steps mid-epoch (0: epoch ends only).
        keep_checkpoints (int): complete checkpoints kept (0: every one; the best model is kept apart).
        seed (int): seeds torch, numpy, Python and the data shuffle.
        run_dir (str): output directory (relative to the working directory).
        resume (bool): continue from the run directory's latest checkpoint when one exists.
        device (str): ``auto`` | ``cpu`` | ``cuda``.
        progress (bool): tqdm bars and a line per epoch (loss, samples/s, valid AUC) on rank 0.
        reshard_mid_epoch (bool): resume a checkpoint taken mid-epoch by another number of
            ranks, or with a ``data.batch_size`` whose shuffle buffer differs (above 8,192 rows),
            after the same number of samples (inexact: the ranks' row shares or the rows' order
            differ, so some rows of that epoch repeat and others are skipped); refused when False.
        flush_denormal (bool): CPU float math treats subnormal numbers as zero
            (``torch.set_flush_denormal``, a setting of the process, set at the start of
            ``train`` / ``evaluate`` / ``export`` / ``teacher-outputs``; it reaches torch's worker
            threads only if no multi-threaded op ran before): Adam's moments of weights that stop
            getting gradients (after a dead ReLU unit) decay into subnormals, on which CPU
            arithmetic is many times slower; a DCNv2 step went from 9 to 20 ms.
        metrics_window (int): windowed training metrics (torchrec's AUC, NE and calibration of the last this
            many training samples over all ranks, :mod:`recsys_llm.train.train_metrics`) on the progress bar and
            in ``metrics.jsonl``; at least ``data.batch_size`` x ranks, twice that with ``elec.distill.swap_fields``
            (a training batch then holds twice the rows) (0: none).
        metrics_every (int): compute them every this many steps (>= 1; a collective, the only host sync they add).
        pipelined_eval (Literal["auto", True, False]): validation, test and ``evaluate`` through torchrec's
            ``EvalPipelineSparseDist`` (the next batch's copy to the device and sparse all-to-all overlap the
            current forward; the same metrics as the plain loop); ``auto``: on CUDA, not on CPU, where it was slower.
        init_from (str): a new run starts from the weights of this run directory (its best, else latest,
            checkpoint) or checkpoint, trained with the same model settings on data of the same schema
            (``prepare tabular --like``); '': fresh weights. Only a run without checkpoints of its own reads it
            (a resume goes on from its own): :mod:`recsys_llm.train.init_from`.
        init_optimizer (bool): with ``init_from``, also take its table and dense optimizer states (the
            same ``optim.sparse`` / ``optim.dense``); False: fresh optimizer state.
        init_scope (str): what ``init_from`` gives: ``all`` (every weight: the same model settings and schema
            fingerprint); ``tables``: only the trained embedding tables both models have (and, with
            ``init_optimizer``, their optimizer states; the same ``optim.sparse``), for data whose fields changed
            (the next day's data with a new feature column) or a model whose dense layers changed. A shared field
            must be as it was (settings, vocabulary) and its table of the same shape (``model.embedding_dim``,
            ``model.embedding_dtype``); new tables, the dense layers and the LLaCTR / ELEC plug-in weights start
            fresh: :mod:`recsys_llm.train.init_from`.
        mixed_precision (str): ``fp32``: every training forward in float32; ``bf16``: under
            ``torch.autocast(dtype=torch.bfloat16)`` (matmuls and linears in bfloat16, the loss, reductions, weights,
            optimizer states and tables in float32; torchrec's ``custom_model_fwd`` of ``TrainPipelineSparseDist``).
            Evaluation, ``export`` and serving compute in float32. fp16 is not offered: it needs a gradient scaler,
            which the tables' fused optimizers, applied in the backward pass, cannot take part in.
    """

    epochs: int = 1
    max_steps: int = 0
    eval_every: int = 1
    patience: int = 2
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    run_dir: str = "runs/default"
    resume: bool = True
    device: str = "auto"
    progress: bool = True
    reshard_mid_epoch: bool = False
    flush_denormal: bool = True
    metrics_window: int = 0
    metrics_every: int = 50
    pipelined_eval: Literal["auto", True, False] = "auto"
    init_from: str = ""
    init_optimizer: bool = True
    init_scope: str = "all"
    mixed_precision: str = "fp32"

    def __post_init__(self) -> None:
        # a config built in Python: "false" or 1 would count as on
        check_bool_settings(self, ("resume", "progress", "reshard_mid_epoch", "flush_denormal", "init_optimizer"),
                            "train")
        check_str_settings(self, ("device", "mixed_precision", "init_scope"), "train", paths=("run_dir", "init_from"))
        for name in ("epochs", "max_steps", "eval_every", "patience", "checkpoint_every", "keep_checkpoints", "seed",
                     "metrics_window", "metrics_every"):  # True, 2.5 or NaN would pass the bounds below
            check_number(f"train.{name}", getattr(self, name), integer=True)
        at_least = {"epochs": 1, "eval_every": 1, "keep_checkpoints": 0, "max_steps": 0, "patience": 0,
                    "checkpoint_every": 0, "metrics_window": 0, "metrics_every": 1}
        wrong = [f"train.{name}={getattr(self, name)} (must be >= {low})" for name, low in at_least.items()
                 if getattr(self, name) < low]
        if not (self.pipelined_eval == "auto" or isinstance(self.pipelined_eval, bool)):  # a config built in Python
            wrong.append(f"train.pipelined_eval={self.pipelined_eval!r} (must be 'auto', True or False)")
        if self.device not in DEVICES:
            wrong.append(f"train.device={self.device!r} (must be one of {', '.join(DEVICES)})")
        if self.init_scope not in INIT_SCOPES:
            wrong.append(f"train.init_scope={self.init_scope!r} (must be one of {', '.join(INIT_SCOPES)})")
        if self.mixed_precision not in AUTOCAST_DTYPES:
            wrong.append(f"train.mixed_precision={self.mixed_precision!r} (must be one of {', '.join(AUTOCAST_DTYPES)}"
                         + ("; fp16 would need a gradient scaler, which the fused table optimizers cannot take part in"
                            if self.mixed_precision == "fp16" else "") + ")")
        if not str(self.run_dir).strip():
            wrong.append("train.run_dir='' (must name a directory)")
        elif os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            wrong.append(f"train.run_dir={self.run_dir!r} (is a file, must be a directory)")
        if wrong:
            raise ValueError(f"{', '.join(wrong)}")


@dataclasses.dataclass
class ExperimentConfig:
    """Everything one training run needs.

    Args:
        data (DataConfig): data set and batching.
        model (ModelConfig): backbone.
        optim (OptimizerConfig): table and dense optimizers.
        sharding (ShardingConfig): planner constraints, frozen tables.
        train (TrainConfig): loop, early stopping, checkpoints, run directory.
        llactr (Dict[str, Any]): free-form settings of the LLaCTR plug-ins.
        elec (Dict[str, Any]): free-form settings of the ELEC plug-ins.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name="deepfm"))
    optim: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    llactr: Dict[str, Any] = dataclasses.field(default_factory=dict)
    elec: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Plain YAML-able mapping (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _comment_of(text: str) -> Optional[str]:
    """The comment YAML drops from an override's value text (a ``#`` at its start or after white space,
    outside every token: ``runs/a #1`` -> ``#1``), or None where the text has none."""
    spans = [(token.start_mark.index, token.end_mark.index) for token in yaml.scan(text)]
    for match in re.finditer(r"(?:^|(?<=\s))#", text):
        if not any(start <= match.start() < end for start, end in spans):
            return text[match.start():].splitlines()[0]
    return None


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping in place, in order (a key given
    twice takes the later value); a mapping value is merged into a mapping that is there (``train={epochs: 4}`` is
    ``train.epochs=4``), any other value, an empty mapping too, replaces what is there (``llactr={}`` turns the
    section off, ``sharding.table_constraints={}`` clears the file's constraints: merged, it changed nothing).

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        key, text = override.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {override!r}: empty key component")
        try:
            value = yaml.load(text, Loader=_ConfigLoader) if text.strip() else ""
            dropped = _comment_of(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: value is not valid YAML: {one_line(error)}") from error
        if dropped is not None:  # a path such as runs/a #1 would silently lose ' #1'
            raise ConfigError(f"override {override!r}: YAML reads {dropped!r} as a comment and drops it; quote the "
                              f"value to keep the '#' ({key.strip()}=\"'...'\" in the shell), or leave the comment out")
        if isinstance(value, dict) and any(isinstance(k, str) and ":" in k and v is None for k, v in value.items()):
            raise ConfigError(f"override {override!r}: YAML reads {{a:b}} as the key 'a:b' with no value; write a space "
                              f"after each colon ({{a: b}}), or one override per key ({key.strip()}.a=b)")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _merged(node.get(parts[-1]), value)  # train={epochs: 4} keeps the other train keys
    return raw


def _merged(existing: Any, value: Any) -> Any:
    """``value`` set over ``existing``: a non-empty mapping merged into a mapping key by key, at every depth, as each
    key's own override would be (a section given whole kept none of the file's other keys: its ``run_dir`` went
    back to the default); anything else, an empty mapping too (``llactr={}``), replaces it."""
    if not (isinstance(value, dict) and value and isinstance(existing, dict)):
        return value
    for key, item in value.items():
        existing[key] = _merged(existing.get(key), item)
    return existing


def config_from_dict(raw: Mapping[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validates and types a raw mapping (see :func:`build_dataclass`); errors start with ``source``."""
    try:
        config = build_dataclass(ExperimentConfig, raw, "")
        parse_plugin_sections(config)
    except ValueError as error:  # ConfigError, and the plug-in configs' own checks
        hint = _misplaced_key_hint(raw, str(error))
        raise ConfigError(f"{source}: {error}{hint}") from error
    return config


def _misplaced_key_hint(raw: Mapping[str, Any], message: str) -> str:
    """`` (KEY is a key of SECTION: SECTION.KEY)`` for the first key that the section ``message`` refuses
    (``data: unknown keys [...]``, ``top level: unknown keys [...]``) lacks and another section has
    (``data: {epochs: 3}``, ``epochs: 3``), else ``""``: a misplaced key of another section is not named beside
    an error about this one."""
    where = message.split(": unknown keys", 1)[0] if ": unknown keys" in message else None
    if not isinstance(raw, Mapping) or where is None:
        return ""
    defaults = ExperimentConfig()
    sections = {name: {f.name for f in dataclasses.fields(value)} for name, value in vars(defaults).items()
                if dataclasses.is_dataclass(value)}
    if where == "top level":
        placed = [(None, key) for key in raw if key not in sections and key not in ("llactr", "elec")]
    elif where in sections and isinstance(raw.get(where), Mapping):
        placed = [(where, key) for key in raw[where] if key not in sections[where]]
    else:  # a nested section (sharding.fused_params) or a plug-in's
        return ""
    for section, key in placed:
        homes = [name for name, keys in sections.items() if name != section and key in keys]
        if homes:
            return f" ({key!r} is a key of {' and '.join(homes)}: {homes[0]}.{key})"
    return ""


def parse_plugin_sections(config: ExperimentConfig) -> "Tuple[Optional[LLaCTRConfig], Optional[ELECConfig]]":
    """The ``llactr`` and ``elec`` sections as their configs (None where a section is empty); loading a
    config checks them so, and the trainer parses them again for a config built in Python.

    Raises:
        ValueError: both sections are set, or a section has unknown keys or bad values.
    """
    from recsys_llm.modules.elec import ELECConfig
    from recsys_llm.modules.llactr import LLaCTRConfig

    if config.llactr and config.elec:
        raise ConfigError("config: 'llactr' and 'elec' sections are both set; train one method per run")
    llactr = LLaCTRConfig.from_dict(config.llactr, source="llactr") if config.llactr else None
    return llactr, ELECConfig.from_dict(config.elec, source="elec") if config.elec else None


EXTENSION_PREFIX = "x-"  # top-level keys of a config file that hold YAML anchors, not settings


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads a YAML config (or none: defaults), applies overrides, returns the typed config.

    Relative paths in the config (``data.schema``, ``train.run_dir``) are relative to the
    working directory (the repository root for the configs in ``configs/``). Top-level keys of the file starting
    with ``x-`` are left out: they hold YAML anchors that the sections merge in (``<<: *common``).

    Raises:
        ConfigError: missing file, a file that is not UTF-8 text, invalid YAML, a key written twice
            in one mapping, unknown keys or wrongly typed values.
    """
    raw: Dict[str, Any] = {}
    source = path or "<defaults>"
    if path is not None:
        if os.path.isdir(path):
            own = os.path.join(path, "config.yaml")  # a run directory: its own config
            raise ConfigError(f"{path}: a directory; expected a YAML config file"
                              + (f", e.g. {own}" if os.path.isfile(own) else ""))
        if os.path.islink(path) and not os.path.exists(path):  # configs/ copied with `cp -r`: a dangling link
            raise ConfigError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist from here; "
                              "copy config directories with `cp -rL` (the link's file itself), or name that file")
        if not os.path.isfile(path):
            packaged = os.path.join(PACKAGED_CONFIGS, os.path.basename(path))
            shipped = f"; the package ships this config as {packaged}" if os.path.isfile(packaged) else ""
            raise ConfigError(f"{path}: config file not found{shipped}")
        text = read_utf8_text(path, "config", ConfigError)
        try:
            raw = yaml.load(text, Loader=_ConfigLoader) or {}  # a key written twice is an error, not last-wins
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {one_line(error)}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        # extension fields (as in Docker Compose files): a place for YAML anchors the sections merge in, read no further
        raw = {key: value for key, value in raw.items()
               if not (isinstance(key, str) and key.startswith(EXTENSION_PREFIX))}
    from_file = copy.deepcopy(raw)
    apply_overrides(raw, overrides)
    if not from_file.get("elec") and isinstance(raw.get("elec"), dict) and raw["elec"] and "task" not in raw["elec"]:
        raise ConfigError(f"command-line override(s) {' '.join(_overrides_of('elec', overrides))}: {source} has no "
                          "elec section, so they would "
                          "turn ELEC on with its default task (distill); name it too (elec.task=gain or "
                          "elec.task=distill), or leave them out for a model without ELEC")
    _expand_home_in_paths(raw)
    _expand_home_in_paths(from_file)
    _generate_only_where_the_file_said(raw, from_file, overrides)
    _follow_moved_entity_vectors(raw, from_file)
    try:
        return config_from_dict(raw, source)
    except ConfigError as merged:
        if not overrides:
            raise
        merged_error = str(merged)
    try:
        config_from_dict(from_file, source)
        file_error = None
    except ConfigError as error:
        file_error = str(error)
    if file_error == merged_error:  # the file's own mistake, which no override changes
        raise ConfigError(file_error)
    # caused by the overrides, or a file mistake left after an override fixed another one
    label = f"command-line override(s) {' '.join(_overrides_of(merged_error[len(source):], overrides))}"
    raise ConfigError(label + merged_error[len(source):] if file_error is None
                      else f"{source} with {label}{merged_error[len(source):]}")


def _overrides_of(error: str, overrides: Sequence[str]) -> List[str]:
    """The overrides whose key the error (``": train.epochs: expected ..."``) is about, a section of it or a
    key in it; all of them when it names none (the demo adds overrides of its own to the user's)."""
    match = re.match(r"[:\s]*([\w.]+)", error)
    named = match.group(1) if match else ""
    own = [item for item in overrides
           if (key := item.split("=", 1)[0].strip()) == named or key.startswith(f"{named}.") or named.startswith(f"{key}.")]
    return own or list(overrides)


def _expand_home_in_paths(raw: Dict[str, Any]) -> None:
    """Expands a leading ``~`` in the path settings (:data:`PATH_KEYS`, ``train.run_dir``,
    ``elec.entity_tables.*``) in place, as a shell would: ``train.run_dir=~/runs/x`` on the command
    line reaches the program unexpanded, since ``train.run_dir`` is no shell variable name."""
    for dotted in (*PATH_KEYS, "train.run_dir", "elec.entity_tables"):
        *sections, key = dotted.split(".")
        parent: Any = raw
        for section in sections:
            parent = parent.get(section) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        holder, names = (parent.get(key), None) if dotted == "elec.entity_tables" else (parent, [key])
        if not isinstance(holder, dict):
            continue
        for name in names or list(holder):
            if isinstance(holder.get(name), str) and holder[name].startswith("~"):
                holder[name] = os.path.expanduser(holder[name])


def _follow_moved_entity_vectors(raw: Dict[str, Any], from_file: Dict[str, Any]) -> None:
    """Where the file names one entity export in both ``elec.entity_vectors`` and ``elec.entity_tables[entity_field]``
    (a run's own ``config.yaml`` records both) and the overrides moved only one of them (``evaluate --checkpoint RUN
    elec.entity_vectors=NEW``), the other follows it, in place; two different directories named by the overrides, or
    by the file, are still refused by ``ELECConfig``."""
    file_elec, elec = from_file.get("elec"), raw.get("elec")
    if not isinstance(file_elec, dict) or not isinstance(elec, dict):
        return
    field, file_tables, tables = elec.get("entity_field"), file_elec.get("entity_tables"), elec.get("entity_tables")
    if not field or not isinstance(file_tables, dict) or not isinstance(tables, dict):
        return
    recorded = file_elec.get("entity_vectors")
    if not recorded or file_tables.get(field) != recorded:
        return
    vectors_moved, table_moved = elec.get("entity_vectors") != recorded, tables.get(field) != recorded
    if vectors_moved and not table_moved:
        tables[field] = elec["entity_vectors"]
    elif table_moved and not vectors_moved and field in tables:  # an override that removed it: ELECConfig names it
        elec["entity_vectors"] = tables[field]


def _generate_only_where_the_file_said(raw: Dict[str, Any], from_file: Dict[str, Any], overrides: Sequence[str]) -> None:
    """Sets ``data.synthetic_rows`` to 0 when the overrides point ``data.schema`` at another file
    but do not set ``data.synthetic_rows`` (``data.synthetic_rows=500``, or ``data={..., synthetic_rows:
    500}``): the file's value was meant for its own data location, and kept it would turn a mistyped
    path to other data into freshly generated synthetic data."""
    data, file_data = raw.get("data"), from_file.get("data")
    if not isinstance(data, dict) or not isinstance(file_data, dict):
        return
    overridden = apply_overrides({}, overrides).get("data")  # what the overrides alone set
    if isinstance(overridden, dict) and "synthetic_rows" in overridden:
        return
    if _schema_location(data.get("schema")) != _schema_location(file_data.get("schema")):
        data["synthetic_rows"] = 0


def _schema_location(value: Any) -> Any:
    """``data.schema`` as the real path of the file it names (``./`` or a trailing slash spell the
    same one), whether it exists yet or not."""
    return os.path.realpath(schema_json_path(value)) if isinstance(value, str) and value else value


def schema_json_path(schema: str) -> str:
    """The schema file ``data.schema`` names: itself when it ends in ``.json`` / ``.yaml`` /
    ``.yml`` or is a file (a split's Parquet file is then named as data, not as a schema-less directory), else
    ``schema.json`` in that data directory (which need not exist yet)."""
    if schema.endswith((".json", ".yaml", ".yml")) or os.path.isfile(schema):
        return schema
    return os.path.join(schema, "schema.json")


def save_config(config: ExperimentConfig, path: str) -> None:
    """Writes the config as YAML (atomically: :func:`~recsys_llm.atomic_dir.write_text_atomically`), every
    setting at its effective value: the free-form ``llactr`` / ``elec`` sections with their defaults filled
    in too (as the other sections are), so a run's ``config.yaml`` trains the same run under a version whose
    defaults differ (``llactr.fre_field_reduction`` was once ``mean``)."""
    write_text_atomically(path, config_text(config))


def config_text(config: ExperimentConfig) -> str:
    """The YAML text ``save_config`` writes: every setting at its effective value (``train --print-config``)."""
    return yaml.dump(_with_plugin_defaults(config), Dumper=_ConfigDumper, sort_keys=False)


# settings a resumed run may change: where and how it runs, its budget and its evaluation, not
# what it trains (a new batch size is converted: ``resume.state_for_world``; the weights a run started
# from are in its own checkpoints, so train.init_from is read only before its first); a ``*`` part stands for
# any one part of a key (a table name: config_differences)
RESUME_FREE_KEYS = frozenset({
    "train.run_dir", "train.resume", "train.device", "train.progress", "train.keep_checkpoints",
    "train.epochs", "train.max_steps", "train.patience", "train.eval_every", "train.checkpoint_every",
    "train.reshard_mid_epoch", "train.flush_denormal", "train.metrics_window", "train.metrics_every",
    "train.pipelined_eval", "train.init_from", "train.init_optimizer", "train.init_scope",
    "sharding.proposer_patience", "sharding.storage_reservation", "sharding.plan_file", "sharding.measure_pooling",
    "sharding.fused_params.cache_load_factor", "sharding.fused_params.bounds_check_mode",
    "sharding.table_constraints.*.fused_params.cache_load_factor",
    "sharding.table_constraints.*.fused_params.bounds_check_mode",
    "data.batch_size", "data.eval_batch_size", "data.validate", "data.prefetch", "data.synthetic_rows",
    "data.valid_split", "data.test_split",
})
# paths a resumed, evaluated or exported run may name elsewhere (moved, or copied with the run
# directory to another host), each with the plugins.json key that vouches for what the new path holds: LLaCTR's
# field vectors (the checkpoint holds them; their provenance is compared, run_records.check_same_field_vectors) and
# the data (its schema and vocabularies are compared by every job, check_trained_on, and a resume compares its
# splits' fingerprints too, check_same_data); they may move only where that record has the key
MOVABLE_PATH_KEYS = {"llactr.vectors_path": "llactr", "data.schema": "data_fingerprints"}
PLUGINS_FILE = "plugins.json"  # beside a run's config.yaml: what its plug-ins were built from
SETTINGS_KEY = "settings"  # in PLUGINS_FILE: the settings the run wrote to its config.yaml (ExperimentConfig.to_dict)
# paths compared as the files they name (relative to the working directory, or absolute)
PATH_KEYS = ("data.schema", "llactr.vectors_path", "elec.entity_vectors", "elec.teacher_checkpoint",
             "elec.distill.swap_catalog", "sharding.plan_file")


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        flat: Dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _with_plugin_defaults(config: ExperimentConfig) -> Dict[str, Any]:
    """``config.to_dict()`` with the free-form ``llactr`` / ``elec`` sections parsed, so a key
    set to its default equals a key left out."""
    from recsys_llm.modules.elec import ELECConfig
    from recsys_llm.modules.llactr import LLaCTRConfig

    raw = config.to_dict()
    for section, parsed in (("llactr", LLaCTRConfig), ("elec", ELECConfig)):
        if raw[section]:
            raw[section] = _plain(dataclasses.asdict(parsed.from_dict(raw[section], section)))
    return raw


def _comparable(config: ExperimentConfig) -> Dict[str, Any]:
    """Dotted key -> value, plug-in defaults filled in, paths resolved (``data.schema`` may
    name the data directory) and a table's fused_params that change nothing (left unset, or set as the global
    ones are) left out."""
    flat = _flatten(_with_plugin_defaults(config))
    unset = dataclasses.asdict(FusedParamsConfig())
    for key in [key for key in flat if _key_within(key, "sharding.table_constraints.*.fused_params")]:
        setting = key.rsplit(".", 1)[1]
        if flat[key] in (unset[setting], flat[f"sharding.fused_params.{setting}"]):  # the global setting's effect
            del flat[key]
    for key, value in flat.items():
        if (key in PATH_KEYS or key.startswith("elec.entity_tables.")) and isinstance(value, str) and value:
            flat[key] = os.path.realpath(schema_file(value) if key == "data.schema" else value)
    return flat


def config_differences(
    saved: ExperimentConfig, current: ExperimentConfig, ignore: Collection[str] = (), movable: Collection[str] = ()
) -> List[str]:
    """``"key: saved -> current"`` for every setting (dotted key) that differs, ``ignore`` (keys or
    sections; a ``*`` part matches any one part of a key, ``sharding.table_constraints.*.fused_params``)
    left out, and the ``movable`` path keys too where both configs set them (a path
    may change, not whether it is set); plug-in settings count with their defaults, paths as the
    files they name."""
    old, new = _comparable(saved), _comparable(current)
    return [
        f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
        for key in sorted(set(old) | set(new))
        if not any(_key_within(key, skip) for skip in ignore) and old.get(key) != new.get(key)
        and not (key in movable and old.get(key) and new.get(key))
    ]


def _key_within(key: str, skip: str) -> bool:
    """Whether dotted ``key`` is ``skip`` or a key inside it; a ``*`` part of ``skip`` matches any one part of
    ``key`` (``sharding.table_constraints.*.fused_params.cache_load_factor``: that setting of every table)."""
    if "*" not in skip:
        return key == skip or key.startswith(f"{skip}.")
    parts, pattern = key.split("."), skip.split(".")
    return len(parts) >= len(pattern) and all(want in ("*", part) for want, part in zip(pattern, parts))


def _record_beside(saved_path: str) -> Dict[str, Any]:
    """The ``plugins.json`` beside ``saved_path``; empty without a readable one (an older run, or a deleted or
    damaged record, which the resume's own read of it names)."""
    try:
        with open(os.path.join(os.path.dirname(saved_path), PLUGINS_FILE), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _movable_in(record: Mapping[str, Any]) -> List[str]:
    """The ``MOVABLE_PATH_KEYS`` whose content a run's ``plugins.json`` ``record`` can vouch for (it records their
    section); none for an empty record (an older run, or a deleted one)."""
    return [key for key, section in MOVABLE_PATH_KEYS.items() if record.get(section)]


def _check_config_file_unedited(saved: ExperimentConfig, saved_path: str, record: Mapping[str, Any],
                                movable: List[str]) -> None:
    """Raises when the run's ``config.yaml`` (``saved``, read from ``saved_path``) holds other settings than the run
    wrote there, as its ``plugins.json`` ``record`` keeps them (``SETTINGS_KEY``): the config a resume is compared
    with was edited (a learning rate), so the checkpoints' settings would be checked against the edit. Settings a
    resume may change (``RESUME_FREE_KEYS``) and moved paths (``movable``) may be edited. Runs without the record
    (before it was kept), or with one this version cannot read, are not checked."""
    recorded = record.get(SETTINGS_KEY)
    if not isinstance(recorded, dict):
        return
    try:
        written = config_from_dict(recorded, PLUGINS_FILE)
    except ConfigError:  # settings of another version's format
        return
    edited = config_differences(written, saved, RESUME_FREE_KEYS, movable)
    if edited:
        raise ConfigError(
            f"{saved_path}: edited after the run wrote it ({'; '.join(edited)}; {PLUGINS_FILE} records what it "
            "held): the checkpoints were trained with those settings, and only some (epochs, budgets, intervals, "
            "paths that moved) may change on a resume. Put the file back as it was, or train into another "
            "train.run_dir"
        )


def check_resumable(config: ExperimentConfig, saved_path: str,
                    new_run: str = "another train.run_dir for a new run") -> None:
    """Raises unless ``config`` trains what the run saved at ``saved_path`` (its config.yaml) trained;
    ``new_run``: the advice for a new run (a command that sets ``train.run_dir`` from a flag names it).

    Raises:
        ConfigError: naming the settings that differ (only ``RESUME_FREE_KEYS`` may, and a moved
            ``MOVABLE_PATH_KEYS`` file whose content ``plugins.json`` records), or naming the edit of a
            config.yaml changed since the run wrote it (``plugins.json``'s ``SETTINGS_KEY`` record).
    """
    saved = load_config(saved_path)
    record = _record_beside(saved_path)  # read once: what may move, and what config.yaml held
    movable = _movable_in(record)
    _check_config_file_unedited(saved, saved_path, record, movable)
    differences = config_differences(saved, config, RESUME_FREE_KEYS, movable)
    if differences:
        raise ConfigError(
            f"{saved_path}: this run directory holds checkpoints of a run with other settings "
            f"({'; '.join(differences)}); resuming would mix them. Use the same settings, or {new_run}"
        )


# plug-in settings added after runs had been written without them: (section, key) -> (what such
# a run did, the switch of its section under which the setting matters). A run that predates a
# setting must not resume under a new default that trains something else.
SETTINGS_OLDER_RUNS_HAD = {("llactr", "fre_field_reduction"): ("mean", "use_fre")}


def check_plugin_history(saved_plugins: Mapping[str, Any], current_plugins: Mapping[str, Any], source: str) -> None:
    """Raises when a resumed run's plug-in would train otherwise than it did before a setting existed.

    Args:
        saved_plugins (Mapping[str, Any]): the run's ``plugins.json`` (section -> ``{"config": resolved
            settings, ...}``).
        current_plugins (Mapping[str, Any]): the same for the config that resumes.
        source (str): the ``plugins.json`` path, for the message.

    Raises:
        ConfigError: naming the setting, the value the run trained with, and the override to pass.
    """
    for (section, key), (older_value, switch) in SETTINGS_OLDER_RUNS_HAD.items():
        saved = saved_plugins.get(section, {}).get("config", {})
        current = current_plugins.get(section, {}).get("config", {})
        if not saved or not current or key in saved or not saved.get(switch):
            continue
        if current.get(key) != older_value:
            raise ConfigError(
                f"{source}: this run was trained before {section}.{key} existed, i.e. with {section}.{key}="
                f"{older_value}; resuming it with {current.get(key)!r} would change what it trains. Pass "
                f"{section}.{key}={older_value} to resume it, or use another train.run_dir for a new run"
            )


MODEL_SECTIONS = ("model.", "llactr.", "elec.")  # what a checkpoint's tensors depend on
# settings of those sections that shape no tensor and no prediction (loss weights, regularisation,
# data pairing); not llactr.lambda_fie, which scales FIE's logit term (and the weights export folds), nor
# model.dropout, whose 0 builds torchrec's MLP and > 0 Perceptron + Dropout layers: other state-dict keys, nor
# elec.distill.beta, whose 0 builds no representation-KD projection
TRAINING_ONLY_KEYS = frozenset({
    "model.embedding_init_scale", "llactr.lambda_fre", "llactr.fre_field_reduction",
    "elec.distill.alpha", "elec.distill.temperature", "elec.distill.temperature_scaling", "elec.distill.score_kd",
    "elec.distill.repr_kd",
    "elec.distill.teacher_loss_weight",
    "elec.distill.swap_fields", "elec.distill.swap_catalog", "elec.teacher_checkpoint", "elec.expected_provenance",
})


def check_same_model(config: ExperimentConfig, saved_path: Optional[str], advice: str = "",
                     free: Collection[str] = ()) -> None:
    """Raises when ``config`` builds another model than the run saved at ``saved_path`` (for
    evaluate / export, which load that run's checkpoint, and a run that starts from it); no-op
    without a saved config. ``advice``: what to do instead (default: pass that run's config);
    ``free``: more settings (keys or sections) that may differ.

    Raises:
        ConfigError: naming the model / llactr / elec settings that differ.
    """
    if saved_path is None:
        return
    differences = config_differences(load_config(saved_path), config, TRAINING_ONLY_KEYS | set(free),
                                     _movable_in(_record_beside(saved_path)))
    differences = [d for d in differences if d.startswith(MODEL_SECTIONS)]
    if differences:
        raise ConfigError(
            f"{saved_path}: the checkpoint's run had other model settings ({'; '.join(differences)}); "
            f"{advice or f'pass its own config (--config {saved_path}) or the same overrides'}"
        )
