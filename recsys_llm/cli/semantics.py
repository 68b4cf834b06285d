"""``recsys-llm semantics tune | encode [| adapt | export]``: field-level LLM work of LLaCTR.

* ``tune``: SSFT (LoRA + InfoNCE field retrieval) on the schema's fields and values;
  writes ``<output-dir>/adapter``, ``checkpoint`` (resumable) and ``metrics.json``.
* ``encode``: one vector per field from the tuned adapter or an untuned model, saved
  with provenance (safetensors); ``--output`` must be absent or an earlier field-vector file.

Other engineers add sub-commands to the ``semantics`` group through a module
``recsys_llm/cli/semantics_export.py`` exposing ``register(group_subparsers)``:
:func:`register` here creates the group and then calls it when the module exists
(ELEC's ``semantics adapt`` and ``semantics export``). Each sub-command sets ``func(args) -> int``.

Example::

    recsys-llm semantics tune --schema data/ml-100k --output-dir runs/ssft --model /models/qwen
    recsys-llm semantics encode --schema data/ml-100k --adapter runs/ssft/adapter --output runs/fields.safetensors
"""

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    import torch

GROUP_EXTENSIONS = ("recsys_llm.cli.semantics_export",)
TRUST_REMOTE_CODE_HELP = ("run the model directory's own Python code when its config.json asks for it (auto_map); "
                          "only for a model you trust (off: such a model is refused)")
GRADIENT_CHECKPOINTING_HELP = ("recompute each LLM layer's activations in the backward instead of keeping them "
                               "(transformers' activation checkpointing): less memory for large models and long "
                               "texts, about a third more compute, the same gradients")
GROUP_COMMANDS_WITH_DEFAULTS = ("tune", "encode", "adapt", "export")  # their --help shows every default
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # --dtype of tune and encode


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Appends ``(default: ...)`` to the ``--help`` line of every option that has a default.

    Options without a value of their own (flags, ``None`` defaults whose help says what
    happens) are left as they are.
    """
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is argparse.SUPPRESS or isinstance(default, bool):
            continue
        if action.help is argparse.SUPPRESS or any(text in (action.help or "") for text in ("%(default)", "(default")):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


# the default LoRA targets (semantics.lora_targets.QUERY_VALUE_NAMES, which imports torch), as --help lists them
LORA_TARGET_HELP = "q_proj v_proj / query value / c_attn / query_key_value / Wqkv / q_lin v_lin / query_proj value_proj / qkv_proj / q v"


# what refuse_several_ranks advises besides running the command without torchrun, by default
LLM_STEP_OVER_RANKS = "`semantics export` is the LLM step that splits its rows over ranks"


def refuse_several_ranks(command: str, instead: str = LLM_STEP_OVER_RANKS) -> None:
    """Raises when torchrun started ``command`` on each of several ranks (``TORCHELASTIC_RUN_ID`` set,
    ``WORLD_SIZE`` > 1, no process group yet): it runs in one process, and every rank would do the whole
    job and write the same output. A program that set up its ranks' group and calls the command on one
    of them (the examples' rank 0) goes on.

    Args:
        command (str): the command as its error names it (``semantics tune``).
        instead (str): what the error advises in parentheses after "run it without torchrun".

    Raises:
        ValueError: naming the command, the world size and ``instead``.
    """
    from recsys_llm.train.distributed import launch_ranks, started_by_torchrun_on_each_rank

    if not started_by_torchrun_on_each_rank():  # the launcher's variables are checked where they are used
        return
    world_size = launch_ranks()[1]
    if world_size > 1:
        raise ValueError(f"{command} runs in one process; under torchrun each of the {world_size} ranks "
                         f"would do the whole job and write the same output: run it without torchrun ({instead})")


def process_device(device: Optional[str]) -> "torch.device":
    """``--device`` resolved (``semantics.model_loading.resolve_device``: under torchrun a bare ``cuda`` is
    ``cuda:LOCAL_RANK``) and, a GPU, made this process's current CUDA device, as the trainer's set-up does: a
    kernel or library call that uses the current device, not its tensors', would otherwise open a CUDA context
    on GPU 0 beside this rank's own.

    Raises:
        ValueError: naming ``--device``: not a device this process sees.
    """
    import torch

    from recsys_llm.semantics.model_loading import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return resolved


def _common(parser: argparse.ArgumentParser, training: bool) -> None:
    """The options ``tune`` (``training``) and ``encode`` share; ``encode``'s max length defaults to None (256, or
    the adapter's)."""
    max_length_default = 256 if training else None
    parser.add_argument("--schema", required=True, help="schema.json (or its directory)")
    parser.add_argument("--model", "--llm", dest="model", default=None,
                        help="local Hugging Face model directory (default: offline MiniLM)")
    parser.add_argument("--pooling", default="auto", choices=["auto", "mean", "last_token", "cls"],
                        help="auto: a sentence-transformers directory's own pooling (1_Pooling/config.json), "
                             "else last token for decoders, mean for encoders")
    parser.add_argument("--max-length", type=int, default=max_length_default,
                        help="tokens per text" + ("" if max_length_default else " (default: 256, or the adapter's)"))
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: CUDA if available)")
    # --llm-dtype as adapt and export name it (export's own --dtype is its output vectors')
    parser.add_argument("--dtype", "--llm-dtype", dest="dtype", default="auto", choices=DTYPE_NAMES,  # resolve_dtype's
                        help="auto (bf16 on an Ampere or newer / ROCm GPU, else fp32), float32, bfloat16, float16"
                             + (" (training scales the loss)" if training else ""))
    parser.add_argument("--include-fields-without-description", action="store_true",
                        help="also use fields the schema does not describe (as their bare name)")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.add_argument("--field-template", default=None,
                        help="str.format template of a field's text with {name}, {description}, {kind} "
                             "(default: '{name}: {description}', or '{name}' without a description)")


def _templates(args: argparse.Namespace):
    from recsys_llm.semantics.templates import PromptTemplates

    return PromptTemplates(field=args.field_template) if args.field_template else PromptTemplates()


def _tune(args: argparse.Namespace) -> int:
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.semantics.ssft import SSFTConfig, SSFTTrainer

    refuse_several_ranks("semantics tune")
    process_device(args.device)
    config = SSFTConfig(
        model_path=args.model, samples_train=args.samples_train, samples_valid=args.samples_valid,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        temperature=args.temperature, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target_modules=args.target_modules, pooling=args.pooling, max_length=args.max_length,
        include_fields_without_description=args.include_fields_without_description, seed=args.seed,
        device=args.device, dtype=args.dtype, resume=not args.no_resume, templates=_templates(args),
        trust_remote_code=args.trust_remote_code, gradient_checkpointing=args.gradient_checkpointing,
    )
    metrics = SSFTTrainer(config, DatasetSchema.load(args.schema), args.output_dir).run()
    from recsys_llm.train.run_records import strict_json

    summary = {k: metrics[k] for k in ("before", "after", "epochs", "num_train", "num_valid", "adapter_dir")}
    print(json.dumps(strict_json(summary), indent=2))
    before, after = metrics["before"], metrics["after"]
    measured = (f"held-out field retrieval accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} (chance "
                f"{after['chance']:.3f})" if metrics["num_valid"] else
                "no held-out values (--samples-valid 0), so no field retrieval accuracy and no field_retrieval.png")
    print(f"semantics tune: {measured}; adapter: {metrics['adapter_dir']}; per field: "
          f"{os.path.join(args.output_dir, 'metrics.json')}", file=sys.stderr)
    return 0


def _encode(args: argparse.Namespace) -> int:
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.semantics.field_vectors import FieldVectorConfig, encode_field_vectors
    from recsys_llm.semantics.store import check_cache_dir, check_vector_output

    refuse_several_ranks("semantics encode")
    check_vector_output(args.output)  # before any work: only its own earlier vector file is replaced
    check_cache_dir(args.cache_dir)
    process_device(args.device)
    config = FieldVectorConfig(
        model_path=args.model, adapter_dir=args.adapter, templates=_templates(args),
        override_templates=args.field_template is not None, pooling=args.pooling,
        include_fields_without_description=args.include_fields_without_description, batch_size=args.batch_size,
        max_length=args.max_length, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
        trust_remote_code=args.trust_remote_code,
    )
    stored = encode_field_vectors(config, DatasetSchema.load(args.schema), args.output)
    provenance = dataclasses.asdict(stored.provenance)
    # the file's metadata keeps all of it; the summary names the schema once (the fields are listed above it)
    for repeated in ("extra", "schema_fields", "schema_contents"):
        provenance.pop(repeated, None)
    print(json.dumps({"output": args.output, "fields": stored.keys, "shape": list(stored.vectors.shape),
                      "provenance": provenance}, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Adds the ``semantics`` group with ``tune`` and ``encode`` (and extensions); returns its subparsers."""
    group = subparsers.add_parser("semantics", help="offline LLM work: SSFT tuning, field vectors, exports")
    commands = group.add_subparsers(dest="semantics_command", required=True)

    tune = commands.add_parser("tune", help="SSFT: LoRA-tune an LLM to tell which field a value belongs to")
    _common(tune, training=True)
    tune.add_argument("--output-dir", required=True,
                      help="adapter/, checkpoint/, metrics.json and field_retrieval.png go here")
    tune.add_argument("--samples-train", type=int, default=1000, help="S_train distinct values per field")
    tune.add_argument("--samples-valid", type=int, default=100, help="S_valid held-out values per field")
    tune.add_argument("--epochs", type=int, default=2, help="passes over the training prompts")
    tune.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    tune.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the LoRA weights")
    tune.add_argument("--lr-schedule", default="constant",
                      help="learning rate over the tune's steps after --warmup-steps: constant, linear (decays to 0; "
                           "the public code's) or cosine")
    tune.add_argument("--warmup-steps", type=int, default=0,
                      help="steps of linear warmup from 0 (the public code: 20, with --batch-size 128)")
    tune.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    tune.add_argument("--temperature", type=float, default=0.02, help="InfoNCE temperature")
    tune.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    tune.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling numerator")
    tune.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    tune.add_argument("--target-modules", nargs="+", default=None,
                      help="LoRA target modules (default: the attention query/value projections as the model "
                           f"names them: {LORA_TARGET_HELP}; a model without them needs this option)")
    tune.add_argument("--seed", type=int, default=0, help="sampling, shuffling and LoRA initialisation")
    tune.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    tune.add_argument("--gradient-checkpointing", action="store_true", help=GRADIENT_CHECKPOINTING_HELP)
    tune.set_defaults(func=_tune)

    encode = commands.add_parser("encode", help="one vector per field (tuned or untuned model), with provenance")
    _common(encode, training=False)
    encode.add_argument("--adapter", default=None,
                        help="SSFT adapter directory (<tune output-dir>/adapter); it names its base model, pooling "
                             "and max length, so --model, --pooling and --max-length are left out (or the same; "
                             "--model may name the base model where it moved: its files are checked)")
    encode.add_argument("--output", required=True,
                        help="field-vector file (.safetensors): new, or an earlier one of encode (replaced)")
    encode.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    encode.add_argument("--cache-dir", default=None, help="encoded-text cache directory (default: no cache)")
    encode.set_defaults(func=_encode)

    for name in GROUP_EXTENSIONS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(commands)
    for name in GROUP_COMMANDS_WITH_DEFAULTS:
        if name in commands.choices:
            show_defaults(commands.choices[name])
    return commands


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the ``semantics`` group alone (``python -m recsys_llm.cli.semantics tune ...``), as
    ``recsys-llm semantics ...`` runs it: a user error is its one line and exit code 2."""
    from recsys_llm.cli import main as cli_main

    return cli_main(["semantics", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
