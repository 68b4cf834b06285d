"""``recsys-llm semantics adapt | export``: ELEC's CTR-adapted LLM and its vectors.

* ``adapt``: renders a sample of a split's rows as text ("{description} is {value}."),
  fine-tunes any Hugging Face model with a pooling + MLP + prediction head on the clicks
  (LoRA, last-k layers, or heads only) and saves it with its row-text settings. It checkpoints
  into ``<output-dir>.checkpoint`` (every ``--checkpoint-every`` steps and at epoch ends); the
  same command after a kill goes on from there to the uninterrupted result, bit for bit.
* ``export``: the representation vector r of every row (``--granularity row``) or of
  every user/item (``--granularity entity --entity-field item_id``), in resumable Parquet
  chunks with provenance; split over ranks under ``torchrun``. ``--attach-dir`` then
  writes copies of the splits with an ``llm_vector`` column (row vectors, or entity vectors
  joined on the entity field) and a schema that lists them as an extra column.

Example::

    recsys-llm semantics adapt --schema data/ml-100k --output-dir runs/ctr_llm --model /models/qwen --sample-rows 20000
    torchrun --nproc_per_node 2 -m recsys_llm.cli semantics export --schema data/ml-100k \\
        --llm runs/ctr_llm --output-dir runs/vectors --granularity row
    recsys-llm semantics export --schema data/ml-100k --llm runs/ctr_llm --output-dir runs/vectors \\
        --granularity row --attach-dir data/ml-100k-vec
"""

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Dict, List

from recsys_llm.cli.data import integer_at_least, number_above
from recsys_llm.cli.semantics import (
    GRADIENT_CHECKPOINTING_HELP, LORA_TARGET_HELP, TRUST_REMOTE_CODE_HELP, process_device, refuse_several_ranks,
)

ROW_TEXT_FILE = "row_text.json"
ADAPTED_ON_FILE = "adapted_on.json"  # the schema, row-text fields and split a CTR-adapted LLM was tuned on
TUNING_FILE = "tuning.json"  # the BCE of every tuning step
ATTACHED_KIND = "data set with attached vectors"
ATTACHED_MARKER_FILES = ("schema.json",)


def _row_text_config(args: argparse.Namespace):
    """The row-text settings the CTR LLM was tuned with (``row_text.json`` beside it, for
    ``export``), or the defaults (``adapt``), with only ``--fields`` / ``--template`` replaced."""
    from recsys_llm.semantics.row_text import RowTextConfig

    llm = getattr(args, "llm", None)
    config = RowTextConfig()
    if llm and os.path.exists(os.path.join(llm, ROW_TEXT_FILE)):
        from recsys_llm.semantics.ctr_llm_store import ctr_llm_damage, read_ctr_llm_json

        saved = read_ctr_llm_json(llm, ROW_TEXT_FILE)
        settings = {f.name for f in dataclasses.fields(RowTextConfig)}
        unknown = sorted(set(saved) - settings)
        if unknown:
            raise ValueError(f"{os.path.join(llm, ROW_TEXT_FILE)}: unknown keys {unknown}; row-text settings are "
                             f"{sorted(settings)}{ctr_llm_damage(llm)}")
        config = RowTextConfig(**saved)
    if args.fields is not None:
        config = dataclasses.replace(config, fields=args.fields)
    if args.template is not None:
        config = dataclasses.replace(config, template=args.template)
    return config


# the splits `train` validates and tests on by default (data.valid_split / data.test_split)
HELD_OUT_SPLITS = ("valid", "test")


def _adapt(args: argparse.Namespace) -> int:
    """``semantics adapt``, holding ``<output-dir>.lock`` beside its output: a second adapt into the same
    output would share its checkpoint (``<output-dir>.checkpoint``) and swap its own files over this one's."""
    from recsys_llm.atomic_dir import check_replaceable, file_locked
    from recsys_llm.semantics.ctr_llm_store import CTR_LLM_FILES

    refuse_several_ranks("semantics adapt")
    check_replaceable(args.output_dir, "saved CTR-adapted LLM", CTR_LLM_FILES)  # before any work
    output = os.path.abspath(args.output_dir).rstrip(os.sep)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with file_locked(f"{output}.lock", f"{args.output_dir}: another semantics adapt is writing this output (it holds "
                                       f"{output}.lock); wait for it to end (or stop it), or use another --output-dir"):
        return _adapt_locked(args)


def _adapt_locked(args: argparse.Namespace) -> int:
    import numpy as np

    from recsys_llm.atomic_dir import check_replaceable
    from recsys_llm.data.parquet_files import check_split_labels, read_schema_and_check
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.semantics.ctr_llm import (
        CTRAdaptedLLM,
        CTRLLMConfig,
        check_tune_checkpoint,
        sample_indices,
        tune_ctr_llm,
    )
    from recsys_llm.semantics.ctr_llm_store import CTR_LLM_FILES, replaced_base_note, save_ctr_llm
    from recsys_llm.semantics.ctr_llm_checkpoint import (
        TuneCheckpoint,
        adapt_checkpoint_dir,
        check_checkpoint_dir,
        remove_checkpoint,
    )
    from recsys_llm.semantics.encoder import default_model_path
    from recsys_llm.semantics.loss_figure import LOSS_FIGURE_FILE, plot_tuning_loss
    from recsys_llm.semantics.row_text import RowTextRenderer
    from recsys_llm.semantics.schema_export import SplitRows

    check_replaceable(args.output_dir, "saved CTR-adapted LLM", CTR_LLM_FILES)  # before any work
    checkpoint = TuneCheckpoint(adapt_checkpoint_dir(args.output_dir), every_steps=args.checkpoint_every,
                                resume=not args.no_resume)
    check_checkpoint_dir(checkpoint.directory)
    device = process_device(args.device)  # before any work: a device this machine lacks is named at once
    schema = DatasetSchema.load(args.schema)
    text_config = _row_text_config(args)
    config = CTRLLMConfig(
        model_path=os.path.abspath(args.model) if args.model else default_model_path(),
        representation_dim=args.representation_dim, hidden_dim=args.hidden_dim, tuning=args.tuning,
        **_tuning_options(args), max_length=args.max_length, batch_size=args.batch_size, learning_rate=args.lr,
        head_learning_rate=args.head_lr, epochs=args.epochs, sample_rows=args.sample_rows, seed=args.seed,
        llm_dtype=args.llm_dtype,
    )
    note = replaced_base_note(args.output_dir, config.model_path)  # before any work: the old save is still there
    if note:
        warnings.warn(note, stacklevel=2)
    if config.representation_dim % 4:
        print(f"[recsys_llm] note: --representation-dim {config.representation_dim} is no multiple of 4: its vectors "
              "can be row vectors (semantics export --attach-dir), not entity tables (elec.vector_source="
              "entity_table), whose FBGEMM kernels need a multiple of 4", file=sys.stderr)
    renderer = RowTextRenderer(schema, text_config)
    split_path = schema.split_path(args.split)
    if args.split in HELD_OUT_SPLITS:
        warnings.warn(f"--split {args.split}: its labels reach the LLM and every vector exported from it, so a CTR "
                      f"model validated or tested on {args.split!r} with those vectors is scored on labels it has "
                      "seen; tune on the training split", stacklevel=2)
    # as train reads it: a missing column or an empty file is named (no rows would save untrained heads)
    read_schema_and_check(schema, split_path)
    # as train reads them (BCEWithLogitsLoss takes a rating, and a null's NaN, without a word)
    check_split_labels(schema, args.split)
    # a directory's *.parquet files (as train reads it), not a *.tmp a killed write left beside them; only the
    # sample's row groups are read, and only its rows rendered
    split_rows = SplitRows(schema, [args.split], [*renderer.field_names, schema.label], "semantics adapt")
    rows = split_rows.take(sample_indices(split_rows.num_rows, config))
    texts = renderer.render(rows).to_pylist()
    labels = np.asarray(rows.column(schema.label).to_numpy(zero_copy_only=False), dtype=np.float32)
    # the split whose labels the LLM saw (experiments.elec_vector_auc reads it to tell the tuned rows apart)
    adapted_on = {"schema": schema.name, "schema_fingerprint": schema.fingerprint(), "fields": renderer.field_names,
                  "split": args.split}
    row_text = text_config.recorded()  # as earlier versions recorded it, where the settings added since are defaults
    # the rows are sampled here: the checkpoint records the sample size asked for, and what wrote the texts
    checkpoint.settings = {"sample_rows": config.sample_rows, **adapted_on,
                           **{f"row_text.{key}": value for key, value in row_text.items()}}
    tuned_config = dataclasses.replace(config, sample_rows=None)
    check_tune_checkpoint(checkpoint, texts, labels, tuned_config)  # before the LLM loads
    model = CTRAdaptedLLM.from_config(config, trust_remote_code=args.trust_remote_code, device=device)
    losses = tune_ctr_llm(model, texts, labels, tuned_config, checkpoint=checkpoint,
                          gradient_checkpointing=args.gradient_checkpointing)
    steps_per_epoch = len(losses) // tuned_config.epochs
    save_ctr_llm(model, args.output_dir,
                 extra_json={ROW_TEXT_FILE: row_text, ADAPTED_ON_FILE: adapted_on,
                             TUNING_FILE: {"losses": losses, "steps_per_epoch": steps_per_epoch}},
                 extra_files={LOSS_FIGURE_FILE: lambda path: plot_tuning_loss(losses, steps_per_epoch, path)})
    remove_checkpoint(checkpoint.directory)
    window = max(1, len(losses) // 10)
    loss_first, loss_last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    print(json.dumps({"output_dir": args.output_dir, "rows": len(texts), "steps": len(losses),
                      "loss_first": loss_first, "loss_last": loss_last, "provenance": model.provenance()}, indent=2))
    print(f"semantics adapt: BCE {loss_first:.4f} -> {loss_last:.4f} (mean of the first and last {window} of "
          f"{len(losses)} steps; every step's in {TUNING_FILE}, drawn in {LOSS_FIGURE_FILE}); the adapted LLM: "
          f"{args.output_dir}", file=sys.stderr)
    return 0


class _CutTextCounter:
    """``model.encode`` for an export, counting the texts longer than the model's ``max_length``.

    ``semantics adapt`` warns of the row texts it cuts, but only of its sample, and an entity
    export encodes other texts (an entity's fields alone) than the rows it was tuned on.
    """

    def __init__(self, model: Any, output: str) -> None:
        from recsys_llm.semantics.model_loading import position_limited

        self._model, self._output = model, output
        self._limit = position_limited(model.llm, model.config.max_length)
        self.texts = self.longer = 0

    def __call__(self, texts: List[str]) -> Any:
        """Vectors (N, D) of ``texts`` (N,)."""
        from recsys_llm.semantics.ctr_llm import count_longer_texts

        self.texts += len(texts)
        self.longer += count_longer_texts(self._model.tokenizer, texts, self._limit)
        return self._model.encode(texts, output=self._output)

    def warn_of_cut_texts(self) -> None:
        if self.longer:
            warnings.warn(
                f"semantics export: {self.longer} of the {self.texts} texts encoded here are longer than the LLM's "
                f"max_length {self._limit} tokens (semantics adapt --max-length) and were cut at their end: their "
                "vectors miss the fields written last; adapt with a larger --max-length, or write fewer fields "
                "(--fields, --entity-fields)",
                stacklevel=2,
            )


def _next_step(args: argparse.Namespace) -> str:
    """One line on what the export holds and how training reads it (entity vectors) or the rows get it (row
    vectors, exported without ``--attach-dir``)."""
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import vector_dim

    manifest = read_manifest(args.output_dir)
    # the chunks' width: the provenance's dim is the encoder's, before a --projection
    rows, dim = manifest.get("num_rows"), vector_dim(args.output_dir)
    if args.granularity == "entity":
        return (f"semantics export: {rows} {args.entity_field} vectors of {dim} dims in {args.output_dir}; a gain "
                f"network reads them with elec.task=gain elec.vector_source=entity_table elec.vector_dim={dim} "
                f"elec.entity_tables.{args.entity_field}={args.output_dir}")
    return (f"semantics export: {rows} row vectors of {dim} dims in {args.output_dir}; the same command with "
            "--attach-dir DIR writes copies of the splits with them as a column, for training")


def _export(args: argparse.Namespace) -> int:
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.semantics.ctr_llm_store import load_ctr_llm
    from recsys_llm.semantics.entity_reuse import reused_from_record
    from recsys_llm.semantics.row_text import RowTextRenderer
    from recsys_llm.semantics.schema_export import export_rows, export_schema_vectors, splits_of_an_earlier_row_export
    from recsys_llm.semantics.vector_export import VectorExportConfig, check_export_dir, rank_and_world
    from recsys_llm.semantics.vector_projection import load_projection

    schema = DatasetSchema.load(args.schema)
    if args.granularity == "entity" and args.entity_field is None:  # before the LLM loads
        raise ValueError("--granularity entity needs --entity-field, the user or item id field "
                         "whose ids get a vector each (e.g. --entity-field item_id)")
    given = [flag for flag, value in (("--entity-field", args.entity_field), ("--entity-fields", args.entity_fields),
                                      ("--reuse", args.reuse)) if value is not None]
    if args.granularity == "row" and given:  # a forgotten --granularity entity would export a vector per row
        raise ValueError(f"{' and '.join(given)}: only with --granularity entity; --granularity row "
                         "(the default) gives every row a vector: add --granularity entity, or leave them out")
    if args.reuse is not None:
        reused_from_record(args.reuse)  # before the LLM loads: a wrong path or a row export is named
    rank, world = rank_and_world()
    device = process_device(args.device)  # before the LLM loads
    check_export_dir(args.output_dir)  # before the LLM loads
    config = VectorExportConfig(chunk_rows=args.chunk_rows, batch_size=args.batch_size, dtype=args.dtype,
                                projection=args.projection)  # before the LLM loads: --chunk-rows 0 is named
    if config.projection is not None:
        load_projection(config.projection)  # before the LLM loads: a wrong --projection path is named
    renderer = RowTextRenderer(schema, _row_text_config(args))
    missing = [item for item in args.splits or [] if item not in schema.splits and not os.path.exists(item)]
    if missing:  # before the LLM loads
        raise ValueError(f"--splits {' '.join(missing)}: not splits of schema {schema.name!r} (splits: "
                         f"{', '.join(sorted(schema.splits))}) nor Parquet files or directories")
    splits: List[str] = args.splits or list(schema.splits)  # the schema's order: an entity's first row is from train
    earlier_order = None if args.splits else splits_of_an_earlier_row_export(args.output_dir, schema, renderer,
                                                                             args.granularity)
    if earlier_order is not None:
        splits = earlier_order
        warnings.warn(f"semantics export: {args.output_dir} holds an export made by a recsys_llm before 2026-12-05, "
                      f"which read the splits sorted: it is resumed in that order, --splits {' '.join(splits)}",
                      stacklevel=2)
    # before the LLM loads: a split, row key or entity field the data lacks is named
    export_rows(schema, splits, renderer, args.granularity, args.entity_field, args.entity_fields)
    _check_adapted_on(args.llm, schema, renderer.field_names)
    if args.attach_dir:
        _check_attach_dir(schema, args)
    # several ranks attach once all have written their chunks; a process group of the caller's
    # own (an in-process call from a job that has one) is not ours to use: poll for the chunks
    meet = args.attach_dir is not None and world > 1
    own_group = meet and _join_ranks(rank, world, args.attach_timeout)
    if own_group:  # rank 0 attaches every rank's chunks: from where it reads them
        from recsys_llm.train.run_records import check_run_dir_shared

        check_run_dir_shared(args.output_dir, setting="--output-dir",
                             use="Every rank writes its chunks into --output-dir, and rank 0 attaches them all")
    model = load_ctr_llm(args.llm, model_path=os.path.abspath(args.model) if args.model else None,
                         trust_remote_code=args.trust_remote_code, device=device)
    encode = _CutTextCounter(model, args.output)
    written = export_schema_vectors(
        schema, splits, renderer, encode, args.output_dir, model.provenance(args.output), config,
        granularity=args.granularity, entity_field=args.entity_field, entity_fields=args.entity_fields, rank=rank,
        world_size=world, progress=rank == 0,  # one bar: the ranks' bars would overwrite each other's line
        reuse=args.reuse,
    )
    encode.warn_of_cut_texts()
    report = {"rank": rank, "world_size": world, "chunks_written": len(written), "output_dir": args.output_dir}
    # one JSON line per rank (under torchrun, JSON Lines); rank 0's, with --attach-dir, once it has attached
    if not (args.attach_dir and rank == 0):
        print(json.dumps(report))
    if world == 1 and not args.attach_dir:  # a finished export (ranks finish apart); stdout is the JSON alone
        print(_next_step(args), file=sys.stderr)
    if own_group:
        _wait_for_other_ranks(args.attach_timeout)
    elif meet and rank == 0:
        _poll_for_chunks(args.output_dir, args.attach_timeout)
    if args.attach_dir and rank == 0:
        report.update(_attach(schema, splits, args))
        print(json.dumps(report))  # one document: the export's counts and what was attached
    return 0


def _check_adapted_on(llm_dir: str, schema, fields: List[str]) -> None:
    """Refuses row text of fields the CTR-adapted LLM was not tuned on (an LLM adapted on another data
    set); LLMs saved before ``adapted_on.json`` existed are not checked."""
    from recsys_llm.semantics.ctr_llm_store import ctr_llm_damage, read_ctr_llm_json

    path = os.path.join(llm_dir, ADAPTED_ON_FILE)
    if not os.path.isfile(path):
        return
    adapted_on = read_ctr_llm_json(llm_dir, ADAPTED_ON_FILE)
    if not isinstance(adapted_on.get("fields"), list):
        raise ValueError(f"{path}: expected the list of fields the LLM was adapted on under 'fields', got "
                         f"{adapted_on.get('fields')!r}{ctr_llm_damage(llm_dir)}")
    unknown = [name for name in fields if name not in adapted_on["fields"]]
    if unknown:
        raise ValueError(
            f"{llm_dir}: the LLM was adapted on rows of schema {adapted_on.get('schema', '?')!r} "
            f"(fields {adapted_on['fields']}), "
            f"not on {unknown} of schema {schema.name!r}; adapt it on this data (recsys-llm semantics adapt)"
        )


# ``semantics adapt`` options of one --tuning mode: option dest -> (mode, CTRLLMConfig field)
TUNING_OPTIONS = {"lora_r": ("lora", "lora_r"), "target_modules": ("lora", "lora_target_modules"),
                  "last_k": ("last_k", "last_k_layers")}


def _tuning_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``CTRLLMConfig`` settings of the options given for ``--tuning``'s mode (the rest keep their
    defaults); an option of another mode, which the tuning would ignore, is refused."""
    ignored = [f"--{dest.replace('_', '-')}" for dest, (mode, _) in TUNING_OPTIONS.items()
               if getattr(args, dest) is not None and mode != args.tuning]
    if ignored:
        raise ValueError(f"{' '.join(ignored)}: not used by --tuning {args.tuning} (--lora-r and --target-modules "
                         "are --tuning lora's, --last-k is --tuning last_k's); leave them out or choose that --tuning")
    return {field: getattr(args, dest) for dest, (_, field) in TUNING_OPTIONS.items() if getattr(args, dest) is not None}


def _check_attach_dir(schema, args: argparse.Namespace) -> None:
    """Refuses, before any work, an ``--attach-dir`` that holds the data or the vectors it reads, and
    a ``--column`` that is empty or already a column of a split, a split without the key column, or
    a ``--splits`` entry that is no split of the schema (a Parquet path), which attaching would find
    only after the whole export; and ``--splits`` leaving a split out, which training would find."""
    import pyarrow.parquet as pq

    from recsys_llm.atomic_dir import check_replaceable
    from recsys_llm.data.parquet_files import parquet_files
    from recsys_llm.data.parquet_writer import check_inputs_outside

    unknown = [split for split in args.splits or [] if split not in schema.splits]
    if unknown:  # the copies and their schema are made of the schema's splits
        raise ValueError(
            f"--splits {unknown} with --attach-dir: not splits of schema {schema.name!r} (splits "
            f"{sorted(schema.splits)}); --attach-dir writes copies of the schema's splits and a schema naming them: "
            "name splits, or export Parquet files without --attach-dir"
        )
    left_out = [split for split in schema.splits if args.splits and split not in args.splits]
    if left_out:  # the schema written lists the column as every split's extra
        raise ValueError(
            f"--splits {args.splits} with --attach-dir leaves out split(s) {left_out} of schema {schema.name!r}: "
            "the attached schema lists the vector column for every split, and training reads it from each; "
            "export every split (leave --splits out) to attach"
        )
    attach_dir = os.path.realpath(args.attach_dir)
    check_inputs_outside(attach_dir, [schema.root, args.output_dir] + [schema.split_path(s) for s in schema.splits])
    check_replaceable(attach_dir, ATTACHED_KIND, ATTACHED_MARKER_FILES)
    if not args.column.strip():
        raise ValueError(f"--column {args.column!r}: expected the name of the attached vector column (e.g. llm_vector)")
    key = schema.row_key if args.granularity == "row" else args.entity_field
    for split in schema.splits:
        first = parquet_files(schema.split_path(split))[0]
        names = pq.read_schema(first).names
        if args.column in names:
            raise ValueError(f"{first}: already has a column {args.column!r}; --column names the attached vector "
                             "column: choose another name")
        if key not in names:
            raise ValueError(f"{first}: no column {key!r} to join the vectors on; columns {names}")


def _join_ranks(rank: int, world_size: int, timeout_s: float) -> bool:
    """A gloo process group (on CPU, whatever the export's device) that only tells rank 0 when
    every rank has written its chunks, and tells it at once when one has died.

    Returns:
        bool: False (nothing done) when this process already has a process group.
    """
    import datetime

    import torch.distributed as dist

    from recsys_llm.train.distributed import start_process_group

    if dist.is_initialized():
        return False
    start_process_group(backend="gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _poll_for_chunks(output_dir: str, timeout_s: float) -> None:
    """Waits until every rank's chunks are there (the manifest reads as complete)."""
    import time

    from recsys_llm.semantics.vector_export import read_manifest

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            read_manifest(output_dir)
            return
        except (ValueError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _wait_for_other_ranks(timeout_s: float) -> None:
    """Every rank waits here for the others' chunks; rank 0 then attaches.

    Raises:
        RuntimeError: a rank died or did not finish within ``timeout_s``.
    """
    import torch.distributed as dist

    from recsys_llm.train.distributed import leave_process_group

    try:
        dist.barrier()
    except Exception as exc:  # gloo: connection closed by a dead peer, or its timeout
        raise RuntimeError(
            f"--attach-dir: another rank failed or did not finish within --attach-timeout "
            f"{timeout_s:g} s ({str(exc).splitlines()[0]}); its finished chunks are kept: run the export again "
            "to finish it and attach"
        ) from exc
    finally:
        leave_process_group()


def _attach(schema, splits: List[str], args: argparse.Namespace) -> Dict[str, Any]:
    """Copies of the splits with an ``llm_vector`` column, and a schema listing them, written
    whole or not at all: a failure on any split leaves an earlier ``--attach-dir`` as it was; returns the
    splits attached and the new schema's path, for the command's JSON."""
    from recsys_llm.atomic_dir import atomic_directory
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import attach_vectors_to_splits

    read_manifest(args.output_dir)  # complete: every rank's chunks are there
    attach_dir = os.path.realpath(args.attach_dir)
    key = schema.row_key if args.granularity == "row" else args.entity_field
    new_splits = {split: f"{split}.parquet" for split in splits}
    with atomic_directory(attach_dir, ATTACHED_KIND, ATTACHED_MARKER_FILES) as tmp:
        copies = [(schema.split_path(split), os.path.join(tmp, name)) for split, name in new_splits.items()]
        attach_vectors_to_splits(copies, args.output_dir, key, column=args.column, progress=True)  # keys read once
        # split paths relative to the final directory (the temp one is its sibling)
        schema.relocated(attach_dir, new_splits, [args.column]).save(os.path.join(tmp, "schema.json"))
    return {"attached": splits, "schema": os.path.join(args.attach_dir, "schema.json")}


def register(group_subparsers: argparse._SubParsersAction) -> None:
    """Adds ``semantics adapt`` and ``semantics export`` to the ``semantics`` group."""
    adapt = group_subparsers.add_parser("adapt", help="fine-tune a CTR-adapted LLM on row texts (ELEC)")
    adapt.add_argument("--schema", required=True, help="schema.json (or its directory)")
    adapt.add_argument("--split", default="train",
                       help="split to tune on (its labels reach the LLM and every vector exported from it: "
                            "never a split the CTR models are validated or tested on: valid and test are warned of)")
    adapt.add_argument("--output-dir", required=True, help="where the adapter, heads and settings go")
    adapt.add_argument("--model", "--llm", dest="model", default=None,
                       help="local Hugging Face model directory (default: offline MiniLM)")
    adapt.add_argument("--tuning", default="lora", choices=["lora", "last_k", "heads"],
                       help="lora: LoRA adapters; last_k: unfreeze the last layers; heads: only the MLP and "
                            "prediction layer")
    adapt.add_argument("--target-modules", nargs="+", default=None,
                       help="--tuning lora: LoRA target modules (default: the attention query/value projections "
                            f"as the model names them: {LORA_TARGET_HELP}; else peft's default for the architecture)")
    adapt.add_argument("--lora-r", type=int, default=None, help="--tuning lora: LoRA rank (default: 8)")
    adapt.add_argument("--last-k", type=int, default=None, help="--tuning last_k: layers unfrozen (default: 1)")
    adapt.add_argument("--representation-dim", type=int, default=128, help="size of r (multiple of 4 for tables)")
    adapt.add_argument("--hidden-dim", type=int, default=256, help="hidden width of the transformation MLP")
    adapt.add_argument("--sample-rows", type=int, default=None,
                       help="tune on a random sample of this many rows of --split (default: all rows)")
    adapt.add_argument("--epochs", type=int, default=1, help="passes over the sampled rows")
    adapt.add_argument("--batch-size", type=int, default=32, help="row texts per step")
    adapt.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the LLM part")
    adapt.add_argument("--head-lr", type=float, default=1e-3,
                       help="AdamW learning rate of the MLP and prediction layer")
    adapt.add_argument("--max-length", type=int, default=128,
                       help="tokens per row text; a longer one is cut at its end (tuning warns how many are)")
    adapt.add_argument("--seed", type=int, default=0, help="sampling, initialisation and shuffling seed")
    adapt.add_argument("--device", default=None, help="e.g. cuda:0 (default: CUDA if available, else CPU)")
    adapt.add_argument("--llm-dtype", default="float32",
                       choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                       help="dtype of the LLM's weights, whatever the checkpoint's (bfloat16 halves a large "
                            "LLM's memory on a GPU; heads and vectors stay float32)")
    adapt.add_argument("--fields", nargs="+", default=None, help="fields written into the row text (default: all)")
    adapt.add_argument("--template", default=None, help="sentence template, default '{description} is {value}.'")
    adapt.add_argument("--checkpoint-every", type=int, default=200,
                       help="save a checkpoint every this many steps (and at each epoch's end; 0: epoch ends only) "
                            "in <output-dir>.checkpoint, beside the output; the same command after a kill goes on "
                            "from it to the model an uninterrupted run gives, bit for bit, and removes it once the "
                            "model is saved")
    adapt.add_argument("--no-resume", action="store_true",
                       help="ignore a checkpoint in <output-dir>.checkpoint and adapt from scratch (its first save "
                            "replaces it)")
    adapt.add_argument("--gradient-checkpointing", action="store_true", help=GRADIENT_CHECKPOINTING_HELP)
    adapt.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    adapt.set_defaults(func=_adapt, llm=None)

    export = group_subparsers.add_parser("export", help="export CTR-adapted LLM vectors per row or entity (ELEC)")
    export.add_argument("--schema", required=True, help="schema.json (or its directory)")
    export.add_argument("--llm", required=True, help="directory written by 'semantics adapt'")
    export.add_argument("--model", default=None,
                        help="the base model directory --llm was adapted on, where it moved or was copied to (default: "
                             "the one its config.json names); its files are checked against the adapted LLM's record")
    export.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    export.add_argument("--output-dir", required=True, help="chunked Parquet vectors + manifest (resumable)")
    export.add_argument("--splits", nargs="*", default=None,
                        help="splits to cover (default: all, in the schema's order; an entity's text is that of its "
                             "first row in them), or Parquet files of the same ids (an earlier day's, prepared --like)")
    export.add_argument("--granularity", default="row", choices=["row", "entity"],
                        help="a vector per row (keyed by the schema's row key) or per id of --entity-field")
    export.add_argument("--output", default="representation", choices=["representation", "pooled"],
                        help="r of the transformation MLP (the paper), or the tuned LLM's pooled hidden state, which "
                             "keeps the text's semantics when the LLM was tuned on few rows")
    export.add_argument("--entity-field", default=None,
                        help="the user or item id field whose ids get a vector each, e.g. item_id (required with "
                             "--granularity entity)")
    export.add_argument("--entity-fields", nargs="*", default=None,
                        help="fields written into an entity's text (default: the --entity-field alone)")
    export.add_argument("--reuse", default=None, metavar="EXPORT_DIR",
                        help="an earlier day's entity export of the same --llm and settings: the ids it holds keep "
                             "its vectors, only the new ids of the grown vocabulary are encoded")
    export.add_argument("--chunk-rows", type=integer_at_least(1), default=4096, help="rows per chunk (unit of resumption)")
    export.add_argument("--batch-size", type=integer_at_least(1), default=64, help="texts per encoder call")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16", "fp32", "fp16"],
                        help="dtype of the stored vectors")
    export.add_argument("--projection", default=None, help="PCA projection file (fit_projection + save_projection)")
    export.add_argument("--device", default=None,
                        help="e.g. cuda:1 (default: this process's GPU if there is one, cuda:LOCAL_RANK under torchrun)")
    export.add_argument("--fields", nargs="+", default=None, help="override the row-text fields saved by adapt")
    export.add_argument("--template", default=None, help="override the row-text template saved by adapt")
    export.add_argument("--attach-dir", default=None, help="write split copies with the vectors + a schema here")
    export.add_argument("--column", default="llm_vector", help="name of the attached vector column")
    export.add_argument("--attach-timeout", type=number_above(0), default=3600.0,
                        help="with several ranks: seconds every rank waits for the others to finish before rank 0 attaches "
                             "(a rank that dies ends the wait at once)")
    export.set_defaults(func=_export)
