"""SSFT: self-supervised field-feature tuning of an LLM (LLaCTR, Cui et al. "Field Matters").

For every field, up to S distinct values are sampled (S_train for training and a
disjoint S_valid for held-out evaluation). Each value becomes an Alpaca-style prompt
asking which field it belongs to. The LLM, with LoRA adapters on its attention
query/value projections, is tuned with InfoNCE:

    q_b = h(prompt_b)[last prompt token],  k_f = h(field text_f)[last token]
    loss = -1/B Σ_b log( exp(cos(q_b, k_{y_b}) / τ) / Σ_f exp(cos(q_b, k_f) / τ) )

keys are re-encoded by the same model in every step, with gradients (τ = 0.02).
Encoders (e.g. MiniLM) use mean pooling instead of the last token **(ours)**. A prompt longer
than ``max_length`` tokens gets its value shortened until it fits **(ours)**, so that it still
ends with the candidate set and ``### Response:`` (the tokenizer would cut that end off, and
the query would be read in the middle of the value). Held-out
field-retrieval accuracy (argmax_f cos(q, k_f) == true field) is reported before and
after tuning.

Output directory::

    adapter/        peft adapter (adapter_config.json, adapter_model.safetensors) + ssft.json
    checkpoint/     adapter + optimizer + torch RNG state (rng.safetensors) + state.json (with
                    the loss scale of a float16 model), replaced atomically after each epoch
    metrics.json    before/after accuracy and loss, per-epoch history
    field_retrieval.png   each field's held-out retrieval accuracy before and after (with matplotlib)

A run in an output directory with a checkpoint goes on from it (unless ``resume`` is off):
the adapter, the AdamW state and the torch RNG states (CPU, and the CUDA device's; dropout
draws from them) are restored, so a tune interrupted after an epoch and resumed gives the
adapter of an uninterrupted one, bit for bit (on the same device and software). Asking for
fewer epochs than the checkpoint holds is refused; as many re-saves the adapter. Loading
runs no code: safetensors and JSON, and ``torch.load(weights_only=True)`` for the optimizer
(:mod:`~recsys_llm.semantics.train_checkpoint`, shared with ``semantics adapt``).
The adapter is used through :func:`~recsys_llm.semantics.ssft_adapter.load_tuned_encoder`.

Example::

    config = SSFTConfig(model_path="/models/llama", epochs=2)
    metrics = SSFTTrainer(config, DatasetSchema.load("data/ml-100k"), "runs/ssft").run()
    metrics["after"]["accuracy"]
"""

import dataclasses
import json
import os
import random
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from recsys_llm.atomic_dir import (
    LOCK_FILE,
    check_own_entries,
    directory_locked,
    is_removal_leftover,
    is_temp_file_of,
    write_text_atomically,
)
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.progress import bar_options
from recsys_llm.semantics.encoder import (
    NumberRule, TextEncoder, check_field_texts_fit, check_number_fields, default_model_path
)
from recsys_llm.semantics.lora_targets import with_lora
from recsys_llm.semantics.model_dir import model_dir_fingerprint, module_fingerprint, read_json_file
from recsys_llm.semantics.model_loading import (
    enable_gradient_checkpointing, load_model, load_tokenizer, position_limited, resolve_device, resolve_dtype,
    runs_own_code,
)
from recsys_llm.semantics.pooling import POOLINGS, directory_pooling
from recsys_llm.semantics.precision import LowPrecisionSteps
from recsys_llm.semantics.ssft_adapter import SSFT_INFO_FILE, save_peft_adapter
from recsys_llm.semantics.ssft_examples import (
    SSFTExample,
    build_examples,
    check_distinct_field_texts,
    examples_digest,
    fit_prompts,
)
from recsys_llm.semantics.ssft_figure import FIGURE_FILE, plot_field_retrieval
from recsys_llm.semantics.templates import PromptTemplates, field_text, select_fields
from recsys_llm.semantics.train_checkpoint import (
    CHECKPOINT_OPTIMIZER_FILE,
    CHECKPOINT_RNG_FILE,
    CHECKPOINT_STATE_FILE,
    CheckpointOwner,
    check_checkpoint_tensors,
    check_tensor_file,
    checkpoint_swap,
    damaged_checkpoint_file,
    find_checkpoint,
    grad_scaler_state,
    load_checkpoint_tensors,
    load_optimizer_file,
    restore_grad_scaler,
    restore_optimizer,
    restore_rng_state,
    rng_state,
    setting_differences,
)
from recsys_llm.typed_config import check_bool_settings, check_name_list, check_str_settings

# checkpoint/ holds this beside train_checkpoint's state, optimizer and RNG files (the RNG file is
# missing from those of older versions)
CHECKPOINT_ADAPTER_FILE = "adapter.safetensors"
RESOLVED_POOLING_KEY = "resolved_pooling"  # in state.json's signature
# also there: the dtype --dtype resolved to (auto: bf16 on a GPU that computes in it, else float32), compared instead
# of the option as typed (auto, fp32 and float32 are one dtype on a CPU; auto is another on such a GPU)
RESOLVED_DTYPE_KEY = "resolved_dtype"
# in state.json's signature: what the tune reads of the schema and data (examples_digest)
DATA_DIGEST_KEY = "data_sha256"
SSFT_CHECKPOINT = CheckpointOwner("SSFT", "tune")
# what an SSFT output directory holds (with the temp and previous copies of its swaps)
SSFT_OUTPUT_ENTRIES = frozenset(
    name + suffix for name in ("adapter", "checkpoint") for suffix in ("", ".tmp", ".old")
) | {"metrics.json", FIGURE_FILE, LOCK_FILE}  # and the files' temp files (_is_ssft_entry)


SCHEDULE_EPOCHS_KEY = "schedule_epochs"  # state.json: the --epochs the learning-rate schedule spans


def _is_ssft_entry(name: str) -> bool:
    """An entry an SSFT output holds, or one its swaps leave when killed mid-deletion."""
    return (name in SSFT_OUTPUT_ENTRIES or any(is_temp_file_of(name, file) for file in ("metrics.json", FIGURE_FILE))
            or any(is_removal_leftover(name, kind) for kind in ("adapter", "checkpoint")))


# SSFTConfig numbers: field -> its rule (and `semantics tune` option)
_NUMBER_RULES: Dict[str, NumberRule] = {
    "samples_train": NumberRule("--samples-train", integer=True, minimum=1),
    "samples_valid": NumberRule("--samples-valid", integer=True, minimum=0),
    "epochs": NumberRule("--epochs", integer=True, minimum=1),
    "batch_size": NumberRule("--batch-size", integer=True, minimum=1),
    "learning_rate": NumberRule("--lr", above=0),
    "weight_decay": NumberRule("--weight-decay", minimum=0),
    "temperature": NumberRule("--temperature", above=0),
    "lora_r": NumberRule("--lora-r", integer=True, minimum=1),
    "lora_alpha": NumberRule("--lora-alpha", above=0),
    "lora_dropout": NumberRule("--lora-dropout", minimum=0, below=1),
    "max_length": NumberRule("--max-length", integer=True, minimum=1),
    "seed": NumberRule("--seed", integer=True, minimum=0),
    "eval_batch_size": NumberRule(integer=True, minimum=1),
    "warmup_steps": NumberRule("--warmup-steps", integer=True, minimum=0),
}
# learning-rate schedules over the tune's steps (transformers.get_scheduler's, with warmup_steps from 0)
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass
class SSFTConfig:
    """Settings of one SSFT run.

    LoRA, learning rate, temperature and S follow the paper's public code; its training loop
    (HF Trainer: 4 x 32 prompts per step, 20 warmup steps, linear decay, 3 epochs) is
    ``batch_size=128, warmup_steps=20, lr_schedule="linear", epochs=3`` here. The defaults
    (16 prompts, constant rate, 2 epochs) are **ours**: the tables in docs/results.md were
    tuned with them.

    Args:
        model_path (Optional[str]): local HF model directory; None -> offline MiniLM.
        samples_train (int): S_train, distinct values per field for training.
        samples_valid (int): S_valid, held-out values per field (disjoint from training).
        epochs (int): passes over the training prompts (the paper finds 1-3 best).
        batch_size (int): prompts per step.
        learning_rate (float): AdamW learning rate of the LoRA weights.
        lr_schedule (str): ``constant``, ``linear`` (decays to 0 at the last step of ``epochs``) or
            ``cosine``, after ``warmup_steps`` (``transformers.get_scheduler``). A resume with more
            ``epochs`` than the tune began with goes on at the longer schedule's rate.
        warmup_steps (int): steps of linear warmup from 0.
        weight_decay (float): AdamW weight decay.
        temperature (float): InfoNCE temperature τ.
        lora_r (int): LoRA rank.
        lora_alpha (int): LoRA scaling numerator.
        lora_dropout (float): dropout on the LoRA input.
        lora_target_modules (Optional[List[str]]): None -> the attention query/value projections
            found in the model (``q_proj``/``v_proj``, ``query``/``value``, ``c_attn``, ...;
            ``lora_targets.default_target_modules``).
        pooling (str): ``auto`` (a sentence-transformers directory's own pooling, else last token
            for decoders, mean for encoders) or explicit.
        max_length (int): tokens per prompt.
        include_fields_without_description (bool): also tune on fields the schema does not
            describe (their field text is the bare name).
        seed (int): sampling, shuffling and LoRA initialisation.
        device (Optional[str]): None -> CUDA if available.
        dtype (str): ``auto`` -> bf16 base weights on a GPU that computes in it (Ampere or newer, or
            ROCm), else fp32 (CPU and older GPUs).
        trust_remote_code (bool): allow model code from the model directory.
        eval_batch_size (int): prompts per forward pass in evaluation.
        resume (bool): continue from ``output_dir/checkpoint`` when it exists.
        templates (PromptTemplates): field and SSFT prompt templates.
        gradient_checkpointing (bool): recompute each layer's activations in the backward instead of keeping them
            (:func:`~recsys_llm.semantics.model_loading.enable_gradient_checkpointing`): less memory, more compute,
            the same gradients; may change on a resume.
    """

    model_path: Optional[str] = None
    samples_train: int = 1000
    samples_valid: int = 100
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    temperature: float = 0.02
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: Optional[List[str]] = None
    pooling: str = "auto"
    max_length: int = 256
    include_fields_without_description: bool = False
    seed: int = 0
    device: Optional[str] = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    eval_batch_size: int = 64
    resume: bool = True
    templates: PromptTemplates = dataclasses.field(default_factory=PromptTemplates)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_number_fields(self, _NUMBER_RULES, "semantics tune")
        check_bool_settings(self, ("include_fields_without_description", "trust_remote_code", "resume",
                                   "gradient_checkpointing"), "SSFTConfig")  # "false" would count as True
        check_name_list(self.lora_target_modules, "SSFTConfig.lora_target_modules")
        check_str_settings(self, ("device", "dtype"), "SSFTConfig", paths=("model_path",))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"SSFTConfig.lr_schedule (semantics tune --lr-schedule) must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"SSFTConfig.pooling (semantics tune --pooling) must be one of {POOLINGS}, got {self.pooling!r}"
            )
        if not isinstance(self.templates, PromptTemplates):
            raise ValueError(f"SSFTConfig.templates must be a PromptTemplates, got {type(self.templates).__name__}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def infonce_loss(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over all fields: the true field is the positive, every field is in the denominator.

    Args:
        queries (torch.Tensor): (B, H) prompt vectors.
        keys (torch.Tensor): (F, H) field vectors.
        labels (torch.Tensor): (B,) index of the true field.
        temperature (float): τ.

    Returns:
        torch.Tensor: scalar mean loss.
    """
    logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t() / temperature  # (B, F)
    return F.cross_entropy(logits, labels)


def retrieval_metrics(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, temperature: float) -> Dict[str, Any]:
    """Field-retrieval accuracy (nearest field by cosine) and InfoNCE loss of (N, H) ``queries`` against (F, H) ``keys``.

    Returns:
        Dict[str, Any]: ``accuracy`` over the N examples, ``per_field`` accuracy by field index (the fields
        with examples), ``macro_accuracy`` (their mean: fields count alike, whatever their number of
        values), ``chance`` (1 / F, what guessing gets), ``loss`` and ``count`` (N).
    """
    chance = 1.0 / keys.size(0)
    if queries.numel() == 0:
        return {"accuracy": float("nan"), "macro_accuracy": float("nan"), "chance": chance, "per_field": {},
                "loss": float("nan"), "count": 0}
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t()  # (N, F)
    hits = (sims.argmax(dim=1) == labels).float()  # (N,)
    per_field = {int(field): hits[labels == field].mean().item() for field in labels.unique()}
    loss = F.cross_entropy(sims / temperature, labels).item()
    return {"accuracy": hits.mean().item(), "macro_accuracy": sum(per_field.values()) / len(per_field),
            "chance": chance, "per_field": per_field, "loss": loss, "count": int(labels.numel())}


class SSFTTrainer:
    """Runs SSFT for one schema and writes the adapter, checkpoints and metrics.

    Args:
        config (SSFTConfig): settings.
        schema (DatasetSchema): fields, descriptions and value texts.
        output_dir (str): where ``adapter/``, ``checkpoint/`` and ``metrics.json`` go: absent,
            empty or an earlier SSFT output (resumed); anything else is refused before any work.

    Building it seeds torch's global random stream with ``config.seed`` (``torch.manual_seed``,
    for LoRA's initial weights and the tuning's dropout), so a run repeats; wrap it in
    ``torch.random.fork_rng()`` to keep a stream of your own.

    Example::

        metrics = SSFTTrainer(SSFTConfig(epochs=1), schema, "runs/ssft").run()
    """

    def __init__(self, config: SSFTConfig, schema: DatasetSchema, output_dir: str) -> None:
        check_own_entries(output_dir, "SSFT output", _is_ssft_entry,
                          f"adapter/, checkpoint/, metrics.json and {FIGURE_FILE}")  # before the model is loaded
        self._config = config
        self._schema = schema
        self._output_dir = output_dir
        self._fields = select_fields(schema, config.include_fields_without_description)
        if len(self._fields) < 2:
            raise ValueError(
                f"schema {schema.name!r}: SSFT needs >= 2 fields with text, got {[f.name for f in self._fields]} "
                "(describe the fields in the schema or set include_fields_without_description)"
            )
        self._field_texts = [field_text(f, config.templates) for f in self._fields]
        check_distinct_field_texts(self._fields, self._field_texts)
        self._train, self._valid = build_examples(schema, self._fields, config)
        self._data_digest = examples_digest(self._field_texts, self._train, self._valid)
        self._model_path = config.model_path or default_model_path()
        self._base_hash = model_dir_fingerprint(self._model_path)
        if config.resume:  # a damaged checkpoint, or one of other settings or more epochs: before the model loads
            self._precheck_checkpoint()
        self._encoder = self._build_encoder()
        names = [f.name for f in self._fields]
        check_field_texts_fit(self._encoder, names, self._field_texts, "SSFT", refuse_alike=True)  # InfoNCE keys
        limit = self._encoder.max_length  # --max-length capped at the model's positions: where the encoder cuts
        taken = {e.value for e in self._train + self._valid}  # a shortened value is none of these
        positions = position_limited(self._encoder.model, sys.maxsize)  # the model's own limit, if it has one
        fit = [fit_prompts(examples, names, config.templates, self._encoder.tokenizer, limit, taken, config.max_length,
                           positions if positions < sys.maxsize else None)
               for examples in (self._train, self._valid)]
        (self._train, shortened_train), (self._valid, shortened_valid) = fit
        self._shortened = shortened_train + shortened_valid
        if self._shortened:
            warnings.warn(
                f"SSFT: {self._shortened} prompt(s) longer than max_length {limit} tokens (--max-length "
                f"{config.max_length}, at most the model's positions): their values were shortened to fit (the prompt "
                "must end where the answer starts); those shortened to another prompt's value were left out",
                stacklevel=2,
            )
        if not self._train:
            raise ValueError(f"schema {schema.name!r}: no SSFT prompt fits in max_length {limit} tokens")
        model = self._encoder.model
        self._steps = LowPrecisionSteps(
            [{"params": [p for p in model.parameters() if p.requires_grad]}],
            lambda groups: torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay),
            model,
        )
        self._optimizer = self._steps.optimizer
        self._scheduler = self._lr_scheduler()

    def _steps_per_epoch(self) -> int:
        return -(-len(self._train) // self._config.batch_size)

    def _lr_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule over every step of ``epochs`` (stepped after each optimizer step)."""
        from transformers import get_scheduler

        config = self._config
        name = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
        return get_scheduler(name, self._optimizer, num_warmup_steps=config.warmup_steps,
                             num_training_steps=config.epochs * self._steps_per_epoch())

    def _advance_lr_scheduler(self, epochs_done: int) -> None:
        """Puts the schedule where it is after ``epochs_done`` epochs (a resume: it follows from the step count)."""
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no step is taken here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(epochs_done * self._steps_per_epoch()):
                self._scheduler.step()

    def _build_encoder(self) -> TextEncoder:
        config = self._config
        torch.manual_seed(config.seed)
        device = resolve_device(config.device)
        tokenizer = load_tokenizer(self._model_path, config.trust_remote_code)
        base = load_model(self._model_path, device, resolve_dtype(config.dtype, device), config.trust_remote_code)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(base, self._model_path)
        model = with_lora(base, self._model_path, config.lora_r, config.lora_alpha, config.lora_dropout,
                          config.lora_target_modules or None)
        return TextEncoder.from_model(
            model, tokenizer, pooling=directory_pooling(config.pooling, self._model_path),
            batch_size=config.eval_batch_size, max_length=config.max_length, model_id=os.path.abspath(self._model_path),
            model_hash=self._base_hash,
        )

    # ---- properties ------------------------------------------------------------------
    @property
    def fields(self) -> List[str]:
        return [f.name for f in self._fields]

    @property
    def examples(self) -> Tuple[List[SSFTExample], List[SSFTExample]]:
        return self._train, self._valid

    @property
    def shortened_values(self) -> int:
        """How many prompts (training and held-out) had their value shortened, or left out, to fit ``max_length``."""
        return self._shortened

    @property
    def encoder(self) -> TextEncoder:
        return self._encoder

    # ---- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: Optional[Sequence[SSFTExample]] = None) -> Dict[str, float]:
        """Field-retrieval accuracy and InfoNCE loss on held-out (default) examples."""
        examples = self._valid if examples is None else examples
        keys = self._encoder.encode(self._field_texts, progress=False)  # (F, H)
        queries = self._encoder.encode([e.prompt for e in examples])  # (N, H), with a bar
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        metrics = retrieval_metrics(queries, keys, labels, self._config.temperature)
        metrics["per_field"] = {self.fields[index]: accuracy for index, accuracy in metrics["per_field"].items()}
        return metrics

    # ---- training --------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> float:
        """One pass over the shuffled training prompts; returns the mean InfoNCE loss."""
        config = self._config
        model = self._encoder.model
        model.train()
        order = list(range(len(self._train)))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
        total, steps = 0.0, 0
        device = next(model.parameters()).device
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"ssft epoch {epoch + 1}", unit="step",
                   **bar_options())
        for start in bar:
            batch = [self._train[i] for i in order[start : start + config.batch_size]]
            labels = torch.tensor([e.label for e in batch], dtype=torch.long, device=device)
            queries = self._encoder.embed([e.prompt for e in batch])  # (B, H)
            keys = self._encoder.embed(self._field_texts)  # (F, H), with gradients
            loss = infonce_loss(queries, keys, labels, config.temperature)
            self._steps.zero_grad()
            self._steps.backward(loss)
            self._steps.step()
            with warnings.catch_warnings():
                # a float16 loss scaler skips a step whose gradients overflowed (the first ones, at its initial
                # scale), and torch then warns of "lr_scheduler.step() before optimizer.step()"; the schedule follows
                # the step count, as a resume puts it (_advance_lr_scheduler), so it steps anyway
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self._scheduler.step()
            total += loss.item()
            steps += 1
            bar.set_postfix(loss=f"{total / steps:.4f}", refresh=False)
        model.eval()
        return total / max(steps, 1)

    def _adapter_state(self) -> Dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self._encoder.model).items()}

    def _resume_signature(self, with_pooling: bool = True, with_dtype: bool = True) -> Dict[str, Any]:
        """What a resumed tune must share with the checkpoint (settings, base model, fields, and the digest of
        the field texts and sampled prompts, :func:`examples_digest`); ``with_pooling``: also the pooling
        ``auto`` resolved to (known once the model is loaded; the option alone would not tell a
        change of what ``auto`` picks); ``with_dtype``: the dtype ``--dtype`` resolved to on this device, in place
        of the option as typed (checkpoints of earlier versions recorded the option only)."""
        config = self._config.to_dict()
        # the model: by base_hash; gradient checkpointing gives the same gradients
        for key in ("epochs", "resume", "device", "eval_batch_size", "model_path", "gradient_checkpointing"):
            config.pop(key)
        signature = {"config": config, "base_hash": self._base_hash, "fields": self.fields,
                     DATA_DIGEST_KEY: self._data_digest}
        if with_pooling:
            signature[RESOLVED_POOLING_KEY] = self._encoder.pooling
        if with_dtype:
            config.pop("dtype")
            resolved = resolve_dtype(self._config.dtype, resolve_device(self._config.device))
            signature[RESOLVED_DTYPE_KEY] = str(resolved).removeprefix("torch.")
        return signature

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        """Adapter + optimizer + RNG states + state, written to a temp dir then renamed into place.

        Call it right after an epoch: the RNG states saved are where the next epoch's dropout starts.
        """
        device = next(self._encoder.model.parameters()).device
        with checkpoint_swap(os.path.join(self._output_dir, "checkpoint")) as tmp:
            save_file(self._adapter_state(), os.path.join(tmp, CHECKPOINT_ADAPTER_FILE))
            torch.save(self._optimizer.state_dict(), os.path.join(tmp, CHECKPOINT_OPTIMIZER_FILE))
            save_file(rng_state(device), os.path.join(tmp, CHECKPOINT_RNG_FILE))
            with open(os.path.join(tmp, CHECKPOINT_STATE_FILE), "w", encoding="utf-8") as handle:
                # the epochs a decaying learning-rate schedule spans: a resume with other --epochs would change it
                json.dump({**state, **grad_scaler_state(self._steps), SCHEDULE_EPOCHS_KEY: self._config.epochs,
                           "signature": self._resume_signature()}, handle, indent=2)

    def _checkpoint_dir(self) -> Optional[str]:
        """``checkpoint/``, else ``checkpoint.old`` (a kill during the swap), when it holds a state; else None."""
        return find_checkpoint(os.path.join(self._output_dir, "checkpoint"), CHECKPOINT_STATE_FILE)

    def _read_checkpoint_state(self, path: str, with_pooling: bool = True) -> Dict[str, Any]:
        """``state.json`` of the checkpoint ``path``, checked against these settings and ``epochs``
        (and the resolved pooling, ``with_pooling``)."""
        state_file = os.path.join(path, CHECKPOINT_STATE_FILE)
        state = read_json_file(state_file, f"; the SSFT checkpoint is damaged: {SSFT_CHECKPOINT.remedy(path)}")
        if not (isinstance(state, dict) and isinstance(state.get("signature"), dict)
                and isinstance(state.get("epoch"), int) and isinstance(state.get("history"), list)
                and isinstance(state.get("before"), dict)):
            raise damaged_checkpoint_file(state_file, "expected a JSON object with epoch, before, history and "
                                          "signature", SSFT_CHECKPOINT)
        signature = state.pop("signature")
        compare_pooling = with_pooling and RESOLVED_POOLING_KEY in signature  # earlier versions: the option only
        compare_dtype = RESOLVED_DTYPE_KEY in signature  # likewise
        current = self._resume_signature(compare_pooling, compare_dtype)
        if not compare_pooling:
            signature.pop(RESOLVED_POOLING_KEY, None)
        if DATA_DIGEST_KEY not in signature:  # earlier versions recorded no digest of the data
            current.pop(DATA_DIGEST_KEY)
        signature.get("config", {}).pop("model_path", None)  # the path as written: the same model by another path
        for key, default in (("lr_schedule", "constant"), ("warmup_steps", 0)):  # what earlier versions always did
            signature.get("config", {}).setdefault(key, default)
        if signature != current:
            differing = setting_differences(signature.get("config", {}), current["config"])
            if signature.get("base_hash") != current["base_hash"]:  # the files at the path: another model, or edited
                differing.append(f"base_hash: {signature.get('base_hash')!r} -> {current['base_hash']!r} (the files of "
                                 f"{self._config.model_path}: another model, or this one edited in place)")
            if signature.get("fields") != current["fields"]:
                differing.append(f"fields: {signature.get('fields')!r} -> {current['fields']!r}")
            if DATA_DIGEST_KEY in current and signature[DATA_DIGEST_KEY] != current[DATA_DIGEST_KEY]:
                differing.append(f"{DATA_DIGEST_KEY}: the field texts or the sampled values differ (the schema's "
                                 "descriptions, value texts or data changed, or a newer recsys_llm samples them "
                                 "otherwise: since 2026-12-05 the ids of fields without value texts come from the "
                                 "data, and values differing only in case count as one)")
            for resolved in (RESOLVED_POOLING_KEY, RESOLVED_DTYPE_KEY):
                now = current.get(resolved)
                if now is not None and signature[resolved] != now:
                    differing.append(f"{resolved}: {signature[resolved]!r} -> {now!r}")
            raise ValueError(
                f"{path}: checkpoint was made with other settings ({'; '.join(differing)}); "
                "use the same settings, another output directory, or --no-resume"
            )
        scheduled = state.get(SCHEDULE_EPOCHS_KEY)  # absent in checkpoints of earlier versions
        if (self._config.lr_schedule != "constant" and isinstance(scheduled, int)
                and scheduled != self._config.epochs):
            raise ValueError(
                f"{path}: checkpoint was made with --lr-schedule {self._config.lr_schedule} over --epochs {scheduled}, "
                f"not {self._config.epochs}: its learning rate decays over the steps of {scheduled} epoch(s), so going "
                f"on with --epochs {self._config.epochs} would tune an adapter of neither schedule; use --epochs "
                f"{scheduled}, another output directory, or --no-resume"
            )
        if state["epoch"] > self._config.epochs:
            raise ValueError(
                f"{self._output_dir}: already tuned for {state['epoch']} epochs, more than the --epochs "
                f"{self._config.epochs} asked for (its adapter/ is the {state['epoch']}-epoch one); ask for --epochs "
                f"{state['epoch']} or more to keep (or go on from) it, --no-resume to tune {self._config.epochs} "
                "epoch(s) again from scratch there, or another --output-dir"
            )
        return state

    def _read_checkpoint_adapter(self, path: str, device: torch.device) -> Dict[str, torch.Tensor]:
        """The adapter tensors of the checkpoint ``path``, whole and of this model's LoRA shapes."""
        from peft import get_peft_model_state_dict

        adapter_file = os.path.join(path, CHECKPOINT_ADAPTER_FILE)
        adapter = load_checkpoint_tensors(adapter_file, SSFT_CHECKPOINT, str(device))
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(self._encoder.model).items()}
        check_checkpoint_tensors(adapter_file, {k: tuple(v.shape) for k, v in adapter.items()}, expected,
                                 "LoRA tensor(s) missing, unknown or of other shapes", SSFT_CHECKPOINT)
        return adapter

    def _read_checkpoint_rng(self, path: str) -> Optional[Dict[str, torch.Tensor]]:
        """The RNG states of the checkpoint ``path``; None (warned) for one of an older version without them."""
        rng_file = os.path.join(path, CHECKPOINT_RNG_FILE)
        if not os.path.exists(rng_file):
            warnings.warn(
                f"{path}: no RNG state ({CHECKPOINT_RNG_FILE}; a checkpoint of an older version): resuming from it, "
                "but dropout draws other masks than an uninterrupted run would, so the adapter is not bit-identical "
                "to one tuned in one go",
                stacklevel=3,
            )
            return None
        return load_checkpoint_tensors(rng_file, SSFT_CHECKPOINT)

    def _precheck_checkpoint(self) -> None:
        """The checks of :meth:`load_checkpoint` that need no model: state, settings, epochs, whole files."""
        path = self._checkpoint_dir()
        if path is None:
            return
        self._read_checkpoint_state(path, with_pooling=False)
        for name in (CHECKPOINT_ADAPTER_FILE, CHECKPOINT_OPTIMIZER_FILE):
            if not os.path.isfile(os.path.join(path, name)):
                raise damaged_checkpoint_file(os.path.join(path, name), "missing", SSFT_CHECKPOINT)
        for name in (CHECKPOINT_ADAPTER_FILE, CHECKPOINT_RNG_FILE):  # an older version wrote no RNG state
            if os.path.exists(os.path.join(path, name)):
                check_tensor_file(os.path.join(path, name), SSFT_CHECKPOINT)

    def load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """Restores adapter, optimizer and RNG states from ``checkpoint/`` (or ``checkpoint.old``); None if absent.

        Every file is read before any is applied.

        Raises:
            ValueError: a damaged checkpoint file (named), a checkpoint of other settings, or one
                of more epochs than ``epochs``.
        """
        from peft import set_peft_model_state_dict

        path = self._checkpoint_dir()
        if path is None:
            return None
        state = self._read_checkpoint_state(path)
        device = next(self._encoder.model.parameters()).device
        adapter = self._read_checkpoint_adapter(path, device)
        optimizer_file = os.path.join(path, CHECKPOINT_OPTIMIZER_FILE)
        optimizer_state = load_optimizer_file(optimizer_file, SSFT_CHECKPOINT)
        rng = self._read_checkpoint_rng(path)
        set_peft_model_state_dict(self._encoder.model, adapter)
        restore_grad_scaler(self._steps, state, os.path.join(path, CHECKPOINT_STATE_FILE), SSFT_CHECKPOINT)
        restore_optimizer(self._steps, optimizer_state, optimizer_file, "AdamW state of this adapter", SSFT_CHECKPOINT)
        if rng is not None:
            complete = restore_rng_state(os.path.join(path, CHECKPOINT_RNG_FILE), rng, device, SSFT_CHECKPOINT)
            if not complete:
                warnings.warn(
                    f"{path}: saved without a CUDA RNG state (tuned on CPU), resumed on {device}: the adapter is not "
                    "bit-identical to one tuned in one go",
                    stacklevel=2,
                )
        return state

    def save_adapter(self) -> str:
        """Writes the final adapter and ``ssft.json`` (base model, fields, templates, pooling)."""
        final = os.path.join(self._output_dir, "adapter")
        # peft writes the base in adapter_config.json as --model was typed: a relative path would name
        # another directory (or a Hub id) from any other working directory; the absolute one, as ssft.json has it
        for peft_config in getattr(self._encoder.model, "peft_config", {}).values():
            peft_config.base_model_name_or_path = os.path.abspath(self._model_path)
        with checkpoint_swap(final) as tmp:  # Ctrl-C or SIGTERM while writing: no half-written adapter.tmp is left
            save_peft_adapter(self._encoder.model, tmp)
            info = {
                "base_model_path": os.path.abspath(self._model_path),
                "base_model_hash": self._base_hash,
                "adapter_hash": module_fingerprint(self._encoder.model, trainable_only=True),
                "pooling": self._encoder.pooling,
                "max_length": self._config.max_length,
                "fields": self.fields,
                "field_texts": self._field_texts,
                "schema_fingerprint": self._schema.fingerprint(),
                "templates": dataclasses.asdict(self._config.templates),
                # only when true: adapters tuned before it was recorded, or on transformers' class, say nothing
                **({"own_code": True} if runs_own_code(self._encoder.model) else {}),
            }
            with open(os.path.join(tmp, SSFT_INFO_FILE), "w", encoding="utf-8") as handle:
                json.dump(info, handle, indent=2)
        return final

    def run(self) -> Dict[str, Any]:
        """Evaluates, tunes for the remaining epochs (resuming if possible), saves; returns metrics.

        Raises:
            FileExistsError: another tune is writing the output directory (it holds its ``.lock``).
        """
        with directory_locked(self._output_dir, f"{self._output_dir}: another semantics tune is writing this SSFT "
                              f"output (it holds {LOCK_FILE} there); wait for it to end (or stop it), or use another "
                              "--output-dir"):
            return self._run_locked()

    def _run_locked(self) -> Dict[str, Any]:
        """:meth:`run` while this tune holds the output directory."""
        state = self.load_checkpoint() if self._config.resume else None
        if state is None:
            state = {"epoch": 0, "before": self.evaluate(), "history": []}
        self._advance_lr_scheduler(state["epoch"])
        after: Optional[Dict[str, Any]] = None  # the held-out scores of the weights trained last
        for epoch in range(state["epoch"], self._config.epochs):
            train_loss = self.train_epoch(epoch)
            after = self.evaluate()
            state["history"].append({"epoch": epoch + 1, "train_loss": train_loss,
                                     **{f"valid_{k}": v for k, v in after.items()}})
            state["epoch"] = epoch + 1
            self.save_checkpoint(state)
            measured = (f", held-out field retrieval accuracy {after['accuracy']:.3f} (before tuning "
                        f"{state['before']['accuracy']:.3f}, chance {after['chance']:.3f})" if self._valid else "")
            print(f"ssft epoch {epoch + 1}/{self._config.epochs}: train loss {train_loss:.4f}{measured}",
                  file=sys.stderr, flush=True)
        if after is None:  # every epoch was trained by an earlier job
            after = self.evaluate()
        adapter_dir = self.save_adapter()
        metrics = {
            "before": state["before"],
            "after": after,
            "history": state["history"],
            "epochs": state["epoch"],
            "fields": self.fields,
            "num_train": len(self._train),
            "num_valid": len(self._valid),
            "shortened_values": self._shortened,
            "adapter_dir": adapter_dir,
            "config": self._config.to_dict(),
        }
        from recsys_llm.train.run_records import strict_json  # no held-out values: accuracy NaN, written null

        write_text_atomically(os.path.join(self._output_dir, "metrics.json"), json.dumps(strict_json(metrics), indent=2))
        plot_field_retrieval(metrics, os.path.join(self._output_dir, FIGURE_FILE))
        return metrics
