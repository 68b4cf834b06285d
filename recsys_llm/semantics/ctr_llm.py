"""The CTR-adapted LLM of ELEC (Dong, Ouyang, Liu, SIGIR 2025, arXiv 2509.07594).

Any Hugging Face ``AutoModel`` reads the row text; its last hidden states are
average-pooled over the attention mask, a transformation MLP gives the high-level
representation vector r, and a prediction layer gives the click logit:

.. math::

    h = \\frac{\\sum_t m_t H_t}{\\sum_t m_t}, \\qquad r = \\mathrm{MLP}(h), \\qquad
    \\hat y = \\sigma(w^\\top r + b)

The LLM (LoRA adapters via peft, or its last k transformer layers) and both heads are
fine-tuned with BCE on clicks. Only r is used afterwards (``vector_export``).

Tuning with a :class:`TuneCheckpoint` saves, every N steps and at each epoch's end, what it needs
to go on exactly (trained tensors, AdamW, RNG states, the epoch order's generator, position,
losses) and resumes from it; ``semantics adapt`` keeps it beside its output
(:func:`adapt_checkpoint_dir`) and removes it once the model is saved.

Example::

    config = CTRLLMConfig(model_path=path, representation_dim=64)
    llm = CTRAdaptedLLM.from_config(config)
    losses = tune_ctr_llm(llm, texts, labels, config)
    save_ctr_llm(llm, "runs/ctr_llm")
    r = load_ctr_llm("runs/ctr_llm").encode(["user id is 3. item id is 7."])  # (1, 64)
"""

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from recsys_llm.atomic_dir import atomic_directory, check_own_entries, remove_directory
from recsys_llm.error_text import one_line
from recsys_llm.semantics.encoder import NumberRule, check_number_fields, text_list
from recsys_llm.semantics.lora_targets import default_target_modules
from recsys_llm.semantics.model_dir import model_dir_fingerprint, model_weights_fingerprint, read_json_file
from recsys_llm.semantics.model_loading import load_model, load_tokenizer, position_limited, tokenizer_fits_model
from recsys_llm.semantics.pooling import hidden_states, hidden_width, pool
from recsys_llm.semantics.precision import LowPrecisionSteps
from recsys_llm.semantics.train_checkpoint import (
    CheckpointOwner,
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

TUNING_MODES = ("lora", "last_k", "heads")
LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# in provenance.json: the fingerprint of the base model's config and weights (check_base_model)
BASE_WEIGHTS_KEY = "base_weights"

# CTRLLMConfig numbers: field -> (integer, minimum, above, below, `semantics adapt` option or "")
_NUMBER_RULES: Dict[str, NumberRule] = {
    "representation_dim": (True, 1, None, None, "--representation-dim"),
    "hidden_dim": (True, 1, None, None, "--hidden-dim"),
    "dropout": (False, 0, None, 1, ""),
    "lora_r": (True, 1, None, None, "--lora-r"),
    "lora_alpha": (False, None, 0, None, ""),
    "lora_dropout": (False, 0, None, 1, ""),
    "last_k_layers": (True, 1, None, None, "--last-k"),
    "max_length": (True, 1, None, None, "--max-length"),
    "batch_size": (True, 1, None, None, "--batch-size"),
    "learning_rate": (False, None, 0, None, "--lr"),
    "head_learning_rate": (False, None, 0, None, "--head-lr"),
    "epochs": (True, 1, None, None, "--epochs"),
    "sample_rows": (True, 1, None, None, "--sample-rows"),
    "seed": (True, 0, None, None, "--seed"),
}


@dataclasses.dataclass
class CTRLLMConfig:
    """Model and tuning settings of the CTR-adapted LLM.

    Args:
        model_path (str): any Hugging Face model directory (loaded offline; its own code runs
            only with ``from_config(..., trust_remote_code=True)``).
        pooling (str): ``mean`` (the paper's average pooling), ``last_token`` or ``cls``.
        representation_dim (int): size of r.
        hidden_dim (int): hidden width of the transformation MLP.
        dropout (float): dropout in the MLP.
        tuning (str): ``lora`` (peft adapters), ``last_k`` (unfreeze the last k layers)
            or ``heads`` (LLM frozen, only the MLP and prediction layer train).
        lora_r (int): LoRA rank.
        lora_alpha (int): LoRA scaling numerator.
        lora_dropout (float): dropout on the LoRA path.
        lora_target_modules (Optional[List[str]]): module names to adapt; None: the attention
            query/value projections found by name, else peft's default for the architecture (as SSFT;
            ``lora_targets.default_target_modules``).
        last_k_layers (int): layers unfrozen in ``last_k`` mode.
        max_length (int): tokens per text; a longer text is cut at its end, so the fields written
            last are not read (:func:`tune_ctr_llm` warns with how many of its rows are).
        batch_size (int): texts per step.
        learning_rate (float): AdamW learning rate of the LLM part.
        head_learning_rate (float): AdamW learning rate of the heads.
        epochs (int): passes over the sample.
        sample_rows (Optional[int]): tune on a random sample of this many rows (None: all).
        seed (int): sampling, initialisation and shuffling seed.
        llm_dtype (str): dtype the LLM's weights are loaded in, whatever the checkpoint's own
            (``float32``, ``bfloat16``, ``float16``; Llama-style checkpoints ship in bf16); the
            heads and the vectors stay float32. Trained float16 / bfloat16 weights (``last_k``)
            step through float32 master copies, and a float16 loss is scaled
            (``precision.LowPrecisionSteps``).
    """

    model_path: str
    pooling: str = "mean"
    representation_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.0
    tuning: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: Optional[List[str]] = None
    last_k_layers: int = 1
    max_length: int = 128
    batch_size: int = 16
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3
    epochs: int = 1
    sample_rows: Optional[int] = None
    seed: int = 0
    llm_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.llm_dtype not in LLM_DTYPES:
            raise ValueError(f"CTRLLMConfig.llm_dtype must be one of {sorted(LLM_DTYPES)}, got {self.llm_dtype!r}")
        if self.tuning not in TUNING_MODES:
            raise ValueError(f"CTRLLMConfig.tuning must be one of {TUNING_MODES}, got {self.tuning!r}")
        if self.pooling not in ("mean", "last_token", "cls"):
            raise ValueError(f"CTRLLMConfig.pooling must be 'mean', 'last_token' or 'cls', got {self.pooling!r}")
        check_number_fields(self, _NUMBER_RULES, "semantics adapt", optional=("sample_rows",))


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a Hugging Face model (the longest one)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no transformer layer list found for last_k tuning")
    return max(lists, key=len)


ENCODE_OUTPUTS = ("representation", "pooled")


class CTRAdaptedLLM(nn.Module):
    """LLM + average pooling + transformation MLP + prediction layer.

    Args:
        llm (nn.Module): a Hugging Face base model returning ``last_hidden_state``.
        tokenizer: its tokenizer.
        config (CTRLLMConfig): sizes and tuning mode.

    Example::

        llm = CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=path))
        logits, r = llm(**llm.tokenize(["user id is 3."]))  # (1,), (1, 128)
    """

    def __init__(self, llm: nn.Module, tokenizer: Any, config: CTRLLMConfig) -> None:
        super().__init__()
        self.config = config
        self._tokenizer = tokenizer
        tokenizer_fits_model(tokenizer, llm, config.model_path)
        hidden = hidden_width(llm)
        self.transform = nn.Sequential(
            nn.Linear(hidden, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.representation_dim),
        )
        self.predict = nn.Linear(config.representation_dim, 1)
        self.llm = self._prepare_llm(llm)

    @classmethod
    def from_config(cls, config: CTRLLMConfig, trust_remote_code: bool = False) -> "CTRAdaptedLLM":
        """Loads the base model and tokenizer from ``config.model_path`` (offline).

        Seeds torch's global random stream with ``config.seed`` first (``torch.manual_seed``): the
        heads' and LoRA's initial weights, and the dropout of the tuning that follows, draw from
        it, so a run repeats. A program that needs its own stream afterwards wraps the call in
        ``torch.random.fork_rng()``.

        Args:
            config (CTRLLMConfig): the settings.
            trust_remote_code (bool): run the model directory's own code if its config asks
                for it (off: such a model is refused); not saved with the adapted LLM, so
                each load asks again.
        """
        torch.manual_seed(config.seed)
        # checks the directory and its files, pads decoders
        tokenizer = load_tokenizer(config.model_path, trust_remote_code)
        dtype = LLM_DTYPES[config.llm_dtype]
        llm = load_model(config.model_path, torch.device("cpu"), dtype, trust_remote_code)  # its encoder if enc-dec
        return cls(llm, tokenizer, config)

    def _prepare_llm(self, llm: nn.Module) -> nn.Module:
        for param in llm.parameters():
            param.requires_grad_(False)
        if self.config.tuning == "lora":
            from peft import LoraConfig, get_peft_model

            targets = self.config.lora_target_modules
            if targets is None:
                try:
                    targets = default_target_modules(llm)  # the attention query/value projections, as SSFT
                except ValueError as error:
                    raise ValueError(f"{self.config.model_path}: {error}") from error
            lora = LoraConfig(
                r=self.config.lora_r,
                lora_alpha=self.config.lora_alpha,
                lora_dropout=self.config.lora_dropout,
                target_modules=targets,
            )
            try:
                return get_peft_model(llm, lora)
            except ValueError as error:
                if "target_modules" not in str(error):
                    raise
                raise ValueError(
                    f"{self.config.model_path}: found no attention projections to put LoRA on; name them with "
                    "--target-modules (CTRLLMConfig.lora_target_modules), e.g. q_proj v_proj"
                ) from error
        if self.config.tuning == "last_k":
            layers = _transformer_layers(llm)
            for layer in list(layers)[-self.config.last_k_layers :]:
                for param in layer.parameters():
                    param.requires_grad_(True)
        return llm

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        # right padding: a text's positions, and so its vector, do not depend on its batch
        encoded = self._tokenizer(
            text_list(texts), padding=True, truncation=True,
            max_length=position_limited(self.llm, self.config.max_length), return_tensors="pt", padding_side="right",
        )
        device = next(self.parameters()).device
        return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            input_ids (torch.Tensor): (B, T).
            attention_mask (torch.Tensor): (B, T).

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: click logits (B,) and representations r (B, R).
        """
        hidden = hidden_states(self.llm, input_ids, attention_mask)  # (B, T, H)
        pooled = pool(hidden, attention_mask, self.config.pooling)  # (B, H), the LLM's dtype
        representation = self.transform(pooled.float())  # (B, R)
        logits = self.predict(representation).squeeze(-1)  # (B,)
        return logits, representation

    @torch.no_grad()
    def encode(self, texts: Sequence[str], output: str = "representation") -> torch.Tensor:
        """Vectors of ``texts`` in eval mode, float32 on CPU.

        Args:
            texts (Sequence[str]): N texts.
            output (str): ``representation``: r, (N, R), as in the paper; ``pooled``: the tuned
                LLM's pooled last hidden state, (N, H), before the transformation MLP. With a
                small tuning sample r collapses onto the few directions that predict clicks,
                while the pooled state keeps the text's semantics.
        """
        if output not in ENCODE_OUTPUTS:
            raise ValueError(f"encode output must be one of {ENCODE_OUTPUTS}, got {output!r}")
        was_training = self.training
        self.eval()
        encoded = self.tokenize(texts)
        if output == "pooled":
            hidden = hidden_states(self.llm, encoded["input_ids"], encoded["attention_mask"])  # (N, T, H)
            vectors = pool(hidden, encoded["attention_mask"], self.config.pooling)  # (N, H)
        else:
            _, vectors = self(**encoded)  # (N, R)
        self.train(was_training)
        return vectors.float().cpu()

    def trainable_llm_state(self) -> Dict[str, torch.Tensor]:
        """The tuned LLM tensors (LoRA adapters or the unfrozen last layers)."""
        return {n: p.detach().cpu().contiguous() for n, p in self.llm.named_parameters() if p.requires_grad}

    def provenance(self, output: str = "representation") -> Dict[str, str]:
        """What made the vectors: base model, revision, pooling, tuning, a hash of the tuned weights
        and, for ``encode(output="pooled")``, that output and its width."""
        digest = hashlib.sha256()
        for name, tensor in sorted({**self.trainable_llm_state(), **_heads_state(self)}.items()):
            digest.update(name.encode())
            digest.update(tensor.float().numpy().tobytes())
        path = os.path.normpath(self.config.model_path)
        return {
            "model": "/".join(path.split(os.sep)[-2:]),
            "revision": model_dir_fingerprint(path) if os.path.isdir(path) else "unknown",
            "pooling": self.config.pooling,
            "method": f"elec-ctr-llm/{self.config.tuning}",
            "weights_sha256": digest.hexdigest()[:16],
            "dim": str(self.config.representation_dim),
            **({"output": "pooled", "dim": str(hidden_width(self.llm))} if output == "pooled" else {}),
            # float32 adds no key, so exports written before the setting existed keep their provenance
            **({"llm_dtype": self.config.llm_dtype} if self.config.llm_dtype != "float32" else {}),
        }


def _heads_state(model: CTRAdaptedLLM) -> Dict[str, torch.Tensor]:
    return {
        **{f"transform.{k}": v.detach().cpu().contiguous() for k, v in model.transform.state_dict().items()},
        **{f"predict.{k}": v.detach().cpu().contiguous() for k, v in model.predict.state_dict().items()},
    }


def sample_indices(num_rows: int, config: CTRLLMConfig) -> np.ndarray:
    """Row indices of the tuning sample (all rows when ``sample_rows`` is None), sorted."""
    if config.sample_rows is None or config.sample_rows >= num_rows:
        return np.arange(num_rows)
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(num_rows, size=config.sample_rows, replace=False))


def count_longer_texts(tokenizer: Any, texts: Sequence[str], max_length: int, chunk: int = 1024) -> int:
    """How many of ``texts`` are longer than ``max_length`` tokens (special tokens included), tokenized in chunks."""
    longer = 0
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[start : start + chunk]), truncation=False)["input_ids"]
        longer += sum(len(ids) > max_length for ids in encoded)
    return longer


# ---- resumable tuning ------------------------------------------------------------------
ADAPT_CHECKPOINT = CheckpointOwner("CTR-adapted LLM", "adapt")
CHECKPOINT_SUFFIX = ".checkpoint"  # semantics adapt: <output-dir>.checkpoint, beside the output
# the files of a tuning checkpoint: trained tensors as the optimizer steps them (float32 master copies
# of float16 / bfloat16 weights), AdamW state, torch's RNG states and the epoch order's generator, state
CHECKPOINT_LLM_FILE = "llm_tuned.safetensors"
CHECKPOINT_HEADS_FILE = "heads.safetensors"
CHECKPOINT_OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_RNG_FILE = "rng.safetensors"
CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_FILES = (CHECKPOINT_LLM_FILE, CHECKPOINT_HEADS_FILE, CHECKPOINT_OPTIMIZER_FILE, CHECKPOINT_RNG_FILE,
                    CHECKPOINT_STATE_FILE)
ORDER_RNG_KEY = "order"  # in rng.safetensors: the generator state the epoch's order is drawn from


def adapt_checkpoint_dir(output_dir: str) -> str:
    """Where ``semantics adapt`` keeps the checkpoint of a tuning into ``output_dir``: beside it,
    ``<output_dir>.checkpoint``.

    Not inside: the output directory is written whole at the end (:func:`save_ctr_llm`, a swap that
    replaces every entry of an earlier output) and only an earlier saved CTR-adapted LLM may be
    replaced, so a checkpoint in it would be deleted by that swap, and would make a first run's
    directory look like something else when it is killed.
    """
    return os.path.normpath(output_dir) + CHECKPOINT_SUFFIX


@dataclasses.dataclass
class TuneCheckpoint:
    """Where and how often :func:`tune_ctr_llm` saves what it needs to go on exactly.

    Args:
        directory (str): the checkpoint directory (``semantics adapt``: :func:`adapt_checkpoint_dir`),
            replaced whole at each save.
        every_steps (int): save after every this many steps (counted over all epochs), and at each
            epoch's end; 0: at epoch ends only.
        resume (bool): go on from a checkpoint in ``directory``; off: start over (the first save replaces it).
        settings (Dict[str, Any]): more settings a resumed tuning must share with the checkpoint, besides
            :class:`CTRLLMConfig` (less ``epochs``), the base model and the tuning rows: e.g. the schema,
            split and row-text settings that made the texts, and ``sample_rows`` when the caller sampled.

    Example::

        checkpoint = TuneCheckpoint(adapt_checkpoint_dir("runs/ctr_llm"), every_steps=200)
        losses = tune_ctr_llm(llm, texts, labels, config, checkpoint=checkpoint)
    """

    directory: str
    every_steps: int = 200
    resume: bool = True
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.every_steps, bool) or not isinstance(self.every_steps, int) or self.every_steps < 0:
            raise ValueError("TuneCheckpoint.every_steps (semantics adapt --checkpoint-every) must be an integer >= 0, "
                             f"got {self.every_steps!r}")


def check_checkpoint_dir(directory: str) -> None:
    """Refuses, before any work, a checkpoint path (or its ``.tmp`` / ``.old``) that holds other
    files, which a save would replace.

    Raises:
        FileExistsError: ``directory`` is a file, or holds an entry a checkpoint does not.
    """
    for path in (directory, f"{directory}.tmp", f"{directory}.old"):
        check_own_entries(path, "CTR-adapted LLM tuning checkpoint", CHECKPOINT_FILES.__contains__,
                          ", ".join(CHECKPOINT_FILES))


def remove_checkpoint(directory: str) -> None:
    """Removes a tuning checkpoint (and what a killed swap left of it): once its model is saved it is
    not needed, and the AdamW state of ``last_k`` layers is twice their size."""
    for path in (f"{directory}.tmp", f"{directory}.old", directory):
        remove_directory(path)


def _rows_digest(texts: Sequence[str], labels: np.ndarray) -> str:
    """sha256 (16 hex digits) over the tuning rows' texts and labels, in order."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(json.dumps([text, float(label)]).encode("utf-8"))
    return digest.hexdigest()[:16]


def _resume_signature(config: CTRLLMConfig, texts: Sequence[str], labels: np.ndarray,
                      settings: Dict[str, Any]) -> Dict[str, Any]:
    """What a resumed tuning must share with its checkpoint: the settings less ``epochs`` (more may
    follow), the base model's files, the sampled rows (texts and labels) and the caller's ``settings``."""
    signature = dataclasses.asdict(config)
    signature.pop("epochs")
    path = config.model_path
    signature["base_model_fingerprint"] = model_dir_fingerprint(path) if os.path.isdir(path) else None
    signature["rows_sha256"] = _rows_digest(texts, labels)
    return json.loads(json.dumps({**signature, **settings}))  # as state.json gives it back (tuples as lists)


def _tuning_rows(texts: Sequence[str], labels: Union[Sequence[float], np.ndarray],
                 config: CTRLLMConfig) -> Tuple[np.ndarray, List[str], np.ndarray]:
    """The sample's row indices (sorted), its texts and its labels (float32)."""
    if len(texts) != len(labels):
        raise ValueError(f"tune_ctr_llm: {len(texts)} texts but {len(labels)} labels")
    index = sample_indices(len(texts), config)
    label_array = np.asarray(labels, dtype=np.float32)
    return index, [texts[i] for i in index], label_array[index]


class _Checkpointer:
    """Saves and restores one tuning's state in ``checkpoint.directory``.

    The position saved is (``epoch``, ``step``): epochs done and steps done in the next, with the
    generator state that epoch's order is drawn from (a resumed run draws the same order and skips
    ``step`` batches), every loss so far, AdamW's and the loss scaler's state, torch's RNG states
    (dropout), and the trained tensors.
    """

    def __init__(self, checkpoint: TuneCheckpoint, signature: Dict[str, Any], epochs: int) -> None:
        self._checkpoint = checkpoint
        self._signature = signature
        self._epochs = epochs

    @property
    def directory(self) -> str:
        return self._checkpoint.directory

    def due(self, steps_done: int) -> bool:
        """Whether a save is due after ``steps_done`` steps in all (epoch ends aside)."""
        every = self._checkpoint.every_steps
        return every > 0 and steps_done % every == 0

    def save(self, model: CTRAdaptedLLM, steps: LowPrecisionSteps, position: Tuple[int, int],
             order_state: torch.Tensor, losses: List[float]) -> None:
        """Writes the checkpoint of ``position`` (epochs done, steps done in the next) whole, or leaves the last one."""
        device = next(model.parameters()).device
        with checkpoint_swap(self.directory) as tmp:
            for name, params in _trained_parameters(model).items():
                save_file({key: steps.trained_tensor(p).detach().cpu().contiguous() for key, p in params.items()},
                          os.path.join(tmp, name))
            torch.save(steps.optimizer.state_dict(), os.path.join(tmp, CHECKPOINT_OPTIMIZER_FILE))
            save_file({**rng_state(device), ORDER_RNG_KEY: order_state}, os.path.join(tmp, CHECKPOINT_RNG_FILE))
            state = {"epoch": position[0], "step": position[1], "losses": losses, **grad_scaler_state(steps),
                     "signature": self._signature}
            with open(os.path.join(tmp, CHECKPOINT_STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=2)

    def read_state(self, path: str) -> Dict[str, Any]:
        """``state.json`` of the checkpoint ``path``, checked against these settings and ``epochs``.

        Raises:
            ValueError: a damaged file, other settings (named, with their values), or a checkpoint past ``epochs``.
        """
        state_file = os.path.join(path, CHECKPOINT_STATE_FILE)
        state = read_json_file(state_file, f"; the {ADAPT_CHECKPOINT.name} checkpoint is damaged: "
                                           f"{ADAPT_CHECKPOINT.remedy(path)}")
        if not (isinstance(state, dict) and isinstance(state.get("signature"), dict)
                and all(isinstance(state.get(key), int) and state[key] >= 0 for key in ("epoch", "step"))
                and isinstance(state.get("losses"), list)):
            raise damaged_checkpoint_file(state_file, "expected a JSON object with epoch, step, losses and signature",
                                          ADAPT_CHECKPOINT)
        signature = state.pop("signature")
        if signature != self._signature:
            raise ValueError(
                f"{path}: checkpoint was made with other settings "
                f"({'; '.join(setting_differences(signature, self._signature))}); use the same settings, another "
                "--output-dir, or --no-resume to adapt again from scratch"
            )
        epoch, step = state["epoch"], state["step"]
        if epoch > self._epochs or (epoch == self._epochs and step > 0):
            done = f"{epoch} epoch(s)" + (f" and {step} step(s)" if step else "")
            raise ValueError(
                f"{path}: already tuned for {done}, more than the --epochs {self._epochs} asked for; ask for --epochs "
                f"{epoch + 1 if step else epoch} or more to go on from it, --no-resume to adapt {self._epochs} "
                "epoch(s) again from scratch, or another --output-dir"
            )
        return state

    def precheck(self) -> None:
        """The checks of :meth:`load` that need no model: settings, epochs and whole files."""
        path = find_checkpoint(self.directory, CHECKPOINT_STATE_FILE)
        if path is None:
            return
        self.read_state(path)
        for name in (CHECKPOINT_LLM_FILE, CHECKPOINT_HEADS_FILE, CHECKPOINT_RNG_FILE):
            check_tensor_file(os.path.join(path, name), ADAPT_CHECKPOINT)
        if not os.path.isfile(os.path.join(path, CHECKPOINT_OPTIMIZER_FILE)):
            raise damaged_checkpoint_file(os.path.join(path, CHECKPOINT_OPTIMIZER_FILE), "missing", ADAPT_CHECKPOINT)

    def load(self, model: CTRAdaptedLLM, steps: LowPrecisionSteps,
             generator: torch.Generator) -> Optional[Tuple[int, int, List[float]]]:
        """Restores the trained tensors, AdamW, loss scaler, RNG states and the order's generator from
        the checkpoint (or its ``.old``); every file is read and checked before any is applied.

        Returns:
            Optional[Tuple[int, int, List[float]]]: epochs done, steps done in the next, and the losses
            so far; None when there is no checkpoint.

        Raises:
            ValueError: a damaged checkpoint file (named, with the remedy), other settings, or a
                checkpoint past ``epochs``.
        """
        path = find_checkpoint(self.directory, CHECKPOINT_STATE_FILE)
        if path is None:
            return None
        state = self.read_state(path)
        tensors = {name: self._read_tensors(path, name, steps, params)
                   for name, params in _trained_parameters(model).items()}
        optimizer_file = os.path.join(path, CHECKPOINT_OPTIMIZER_FILE)
        optimizer_state = load_optimizer_file(optimizer_file, ADAPT_CHECKPOINT)
        rng_file = os.path.join(path, CHECKPOINT_RNG_FILE)
        rng = load_checkpoint_tensors(rng_file, ADAPT_CHECKPOINT)
        order_state = rng.pop(ORDER_RNG_KEY, None)
        if order_state is None:
            raise damaged_checkpoint_file(rng_file, f"no {ORDER_RNG_KEY!r} generator state", ADAPT_CHECKPOINT)
        for name, params in _trained_parameters(model).items():
            for key, param in params.items():
                steps.set_trained_tensor(param, tensors[name][key])
        restore_grad_scaler(steps, state, os.path.join(path, CHECKPOINT_STATE_FILE), ADAPT_CHECKPOINT)
        restore_optimizer(steps, optimizer_state, optimizer_file, "AdamW state of this model's trained tensors",
                          ADAPT_CHECKPOINT)
        device = next(model.parameters()).device
        try:
            generator.set_state(order_state)
        except (RuntimeError, TypeError) as error:
            raise damaged_checkpoint_file(rng_file, f"{ORDER_RNG_KEY!r} is not a generator state: {one_line(error)}",
                                          ADAPT_CHECKPOINT) from error
        if not restore_rng_state(rng_file, rng, device, ADAPT_CHECKPOINT):
            warnings.warn(f"{path}: saved without a CUDA RNG state (tuned on CPU), resumed on {device}: the "
                          "CTR-adapted LLM is not bit-identical to one tuned in one go", stacklevel=3)
        return state["epoch"], state["step"], [float(loss) for loss in state["losses"]]

    @staticmethod
    def _read_tensors(path: str, name: str, steps: LowPrecisionSteps,
                      params: Dict[str, nn.Parameter]) -> Dict[str, torch.Tensor]:
        """The tensors of ``name`` in the checkpoint ``path``: those of ``params``, of their trained shapes
        and dtypes."""
        file = os.path.join(path, name)
        tensors = load_checkpoint_tensors(file, ADAPT_CHECKPOINT)
        expected = {key: (tuple(p.shape), steps.trained_tensor(p).dtype) for key, p in params.items()}
        found = {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}
        if found != expected:
            differing = sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))
            raise damaged_checkpoint_file(
                file, f"{len(differing)} tensor(s) missing, unknown or of other shapes or dtypes, e.g. {differing[0]}",
                ADAPT_CHECKPOINT)
        return tensors


def _trained_parameters(model: CTRAdaptedLLM) -> Dict[str, Dict[str, nn.Parameter]]:
    """The trained parameters by checkpoint file: the LLM's (LoRA or last layers) and the heads'."""
    return {
        CHECKPOINT_LLM_FILE: {n: p for n, p in model.llm.named_parameters() if p.requires_grad},
        CHECKPOINT_HEADS_FILE: {**{f"transform.{n}": p for n, p in model.transform.named_parameters()},
                                **{f"predict.{n}": p for n, p in model.predict.named_parameters()}},
    }


def check_tune_checkpoint(checkpoint: TuneCheckpoint, texts: Sequence[str],
                          labels: Union[Sequence[float], np.ndarray], config: CTRLLMConfig) -> None:
    """The checks of resuming :func:`tune_ctr_llm` from ``checkpoint`` that need no model, to run
    before it loads: the checkpoint's settings and epochs, and that its files are whole.

    Raises:
        ValueError: as :func:`tune_ctr_llm` would for this checkpoint (nothing when it resumes nothing).
    """
    if not checkpoint.resume:
        return
    _, sample_texts, sample_labels = _tuning_rows(texts, labels, config)
    signature = _resume_signature(config, sample_texts, sample_labels, checkpoint.settings)
    _Checkpointer(checkpoint, signature, config.epochs).precheck()


def tune_ctr_llm(
    model: CTRAdaptedLLM,
    texts: Sequence[str],
    labels: Union[Sequence[float], np.ndarray],
    config: CTRLLMConfig,
    progress: bool = True,
    checkpoint: Optional[TuneCheckpoint] = None,
) -> List[float]:
    """Fine-tunes the LLM part and both heads with BCE on clicks.

    Warns with how many of the sampled texts are longer than ``max_length`` tokens (cut at their end).

    With a ``checkpoint`` it saves every ``checkpoint.every_steps`` steps and at each epoch's end,
    and goes on from a checkpoint already there: the trained tensors, AdamW (and float16 loss
    scaler) state, torch's RNG states, the generator of the epochs' order, the position in the epoch
    and the losses so far are restored, so a tuning killed and resumed ends with the tensors and
    losses of an uninterrupted one, bit for bit (same device and software). Loading runs no code
    (safetensors, JSON, ``torch.load(weights_only=True)``).

    Args:
        model (CTRAdaptedLLM): the model to tune (in place).
        texts (Sequence[str]): row texts (N,).
        labels (Union[Sequence[float], np.ndarray]): clicks (N,) in {0, 1}.
        config (CTRLLMConfig): sample size, batch size, learning rates, epochs.
        progress (bool): show a tqdm bar.
        checkpoint (Optional[TuneCheckpoint]): where to save and resume from; None: no checkpoint.

    Returns:
        List[float]: the loss of every step (those before a resume included).

    Raises:
        ValueError: a damaged checkpoint file (named, with the remedy), a checkpoint of other settings
            (the differences named), or one past ``config.epochs``.
    """
    index, sample_texts, sample_labels = _tuning_rows(texts, labels, config)
    limit = position_limited(model.llm, config.max_length)
    longer = count_longer_texts(model.tokenizer, sample_texts, limit)
    if longer:
        warnings.warn(
            f"tune CTR-LLM: {longer} of {len(index)} row texts are longer than max_length {limit} tokens and are cut "
            "at their end: the LLM does not read the fields written last (raise --max-length, or write fewer fields)",
            stacklevel=2,
        )
    llm_params = [p for p in model.llm.parameters() if p.requires_grad]
    head_params = list(model.transform.parameters()) + list(model.predict.parameters())
    groups = [{"params": head_params, "lr": config.head_learning_rate}]
    if llm_params:
        groups.append({"params": llm_params, "lr": config.learning_rate})
    optimizer = LowPrecisionSteps(groups, torch.optim.AdamW, model)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(config.seed)
    label_tensor = torch.as_tensor(sample_labels)  # (S,), by position in the sample
    positions = np.arange(len(index))
    steps_per_epoch = (len(index) + config.batch_size - 1) // config.batch_size
    saver = None
    losses: List[float] = []
    first_epoch, first_step = 0, 0
    if checkpoint is not None:
        saver = _Checkpointer(checkpoint, _resume_signature(config, sample_texts, sample_labels, checkpoint.settings),
                              config.epochs)
        resumed = saver.load(model, optimizer, generator) if checkpoint.resume else None
        if resumed is not None:
            first_epoch, first_step, losses = resumed
    model.train()
    with tqdm(total=config.epochs * steps_per_epoch, initial=len(losses), desc="tune CTR-LLM",
              disable=not progress) as bar:
        for epoch in range(first_epoch, config.epochs):
            order_state = generator.get_state()  # (G,) uint8: this epoch's order is drawn from it
            order = positions[torch.randperm(len(index), generator=generator).numpy()]
            step = first_step if epoch == first_epoch else 0
            while step < steps_per_epoch:
                rows = order[step * config.batch_size : (step + 1) * config.batch_size]  # (B,)
                logits, _ = model(**model.tokenize([sample_texts[i] for i in rows]))
                loss = loss_fn(logits, label_tensor[torch.as_tensor(rows)].to(logits.device))
                optimizer.zero_grad()
                optimizer.backward(loss)
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update(1)
                if saver is not None and step == steps_per_epoch:
                    saver.save(model, optimizer, (epoch + 1, 0), generator.get_state(), losses)
                elif saver is not None and saver.due(len(losses)):
                    saver.save(model, optimizer, (epoch, step), order_state, losses)
    model.eval()
    return losses


CTR_LLM_FILES = ("config.json", "heads.safetensors")  # every saved CTR-adapted LLM has them


def save_ctr_llm(model: CTRAdaptedLLM, directory: str, extra_json: Optional[Dict[str, Any]] = None) -> None:
    """Saves config, heads and tuned LLM tensors atomically (temp dir renamed into place).

    Files: ``config.json``, ``heads.safetensors``, ``llm_tuned.safetensors`` (LoRA adapters
    or the unfrozen layers, by parameter name), ``provenance.json``, and one JSON file per
    ``extra_json`` entry (file name -> content, e.g. the row-text settings), in the same swap.
    """
    with atomic_directory(directory, "saved CTR-adapted LLM", CTR_LLM_FILES) as tmp:
        for name, content in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as handle:
                json.dump(content, handle, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(model.config), handle, indent=2)
        save_file(_heads_state(model), os.path.join(tmp, "heads.safetensors"))
        save_file(model.trainable_llm_state(), os.path.join(tmp, "llm_tuned.safetensors"))
        base = model.config.model_path
        base_weights = {BASE_WEIGHTS_KEY: model_weights_fingerprint(base)} if os.path.isdir(base) else {}
        with open(os.path.join(tmp, "provenance.json"), "w", encoding="utf-8") as handle:
            json.dump({**model.provenance(), **base_weights}, handle, indent=2)


def ctr_llm_damage(directory: str) -> str:
    """What to say after naming a damaged or incomplete file of the CTR-adapted LLM saved in ``directory``."""
    return f"; {directory} is a damaged or incomplete CTR-adapted LLM: run `recsys-llm semantics adapt` again"


def read_ctr_llm_json(directory: str, name: str) -> Dict[str, Any]:
    """The JSON object in the file ``name`` of a saved CTR-adapted LLM.

    Raises:
        ValueError: the file is not valid JSON, or not a JSON object (named, with what to do).
    """
    path = os.path.join(directory, name)
    content = read_json_file(path, ctr_llm_damage(directory))
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}{ctr_llm_damage(directory)}")
    return content


def _read_ctr_llm_tensors(directory: str, name: str) -> Dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``name`` of a saved CTR-adapted LLM.

    Raises:
        FileNotFoundError: the file is missing (named, with what to do).
        ValueError: the file is damaged or truncated (named, with what to do).
    """
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing{ctr_llm_damage(directory)}")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(
            f"{path}: not a complete safetensors file ({one_line(error)}){ctr_llm_damage(directory)}"
        ) from error


def read_ctr_llm_config(directory: str) -> CTRLLMConfig:
    """The :class:`CTRLLMConfig` saved in ``directory/config.json``.

    Raises:
        ValueError: the file is not JSON, has unknown or missing keys, or invalid settings.
    """
    config_path = os.path.join(directory, "config.json")
    saved = read_json_file(config_path, ctr_llm_damage(directory))
    if not isinstance(saved, dict):
        raise ValueError(f"{config_path}: expected a JSON object of CTRLLMConfig settings, got {type(saved).__name__}")
    fields = {f.name: f for f in dataclasses.fields(CTRLLMConfig)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown}; a CTRLLMConfig has {sorted(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in saved]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}")
    try:
        return CTRLLMConfig(**saved)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from error


def check_base_model(directory: str, model_path: str) -> None:
    """Refuses a base model other than the one the CTR-adapted LLM in ``directory`` was tuned on.

    The tuned heads and LoRA tensors only mean something on the base model they were tuned with:
    ``provenance.json`` records the fingerprint of its config and weights
    (:func:`~recsys_llm.semantics.model_dir.model_weights_fingerprint`), which must match the
    files at ``model_path`` now. Saves written before it was recorded are not checked.

    Raises:
        ValueError: the fingerprints differ (the base model was replaced, or ``model_path`` names
            another model).
    """
    provenance_path = os.path.join(directory, "provenance.json")
    if not os.path.isfile(provenance_path):
        return
    provenance = read_json_file(provenance_path, ctr_llm_damage(directory))
    recorded = provenance.get(BASE_WEIGHTS_KEY) if isinstance(provenance, dict) else None
    if not isinstance(recorded, str):
        return
    current = model_weights_fingerprint(model_path)
    if current != recorded:
        raise ValueError(
            f"{directory}: adapted on base model {provenance.get('model', '?')!r} whose config and weights have "
            f"fingerprint {recorded}, but those at {model_path} have {current} (replaced, or another model); point "
            "model_path in config.json at the model it was adapted on, or run `semantics adapt` again"
        )


def load_ctr_llm(directory: str, model_path: Optional[str] = None, trust_remote_code: bool = False) -> CTRAdaptedLLM:
    """Rebuilds a saved CTR-adapted LLM (weights only; nothing executed unless ``trust_remote_code``).

    Args:
        directory (str): written by :func:`save_ctr_llm`.
        model_path (Optional[str]): override of the base model location (e.g. another machine);
            its files must be those the LLM was adapted on (same fingerprint).
        trust_remote_code (bool): run the base model directory's own code if its config asks
            for it (off: such a model is refused).

    Raises:
        FileNotFoundError: ``directory`` is not a saved CTR-adapted LLM, ``llm_tuned.safetensors`` is
            missing, or the base model is gone.
        ValueError: a damaged (truncated, not JSON / safetensors, tensors that do not fit) file of
            ``directory``, named with what to do, or a base model other than the one it was adapted on.
    """
    if not all(os.path.isfile(os.path.join(directory, name)) for name in CTR_LLM_FILES):
        raise FileNotFoundError(
            f"{directory}: not a CTR-adapted LLM saved by `recsys-llm semantics adapt` (no config.json and "
            "heads.safetensors); a plain Hugging Face model directory goes to `semantics adapt --model` first"
        )
    config = read_ctr_llm_config(directory)
    if model_path is not None:
        config.model_path = model_path
    check_base_model(directory, config.model_path)
    # both files are read before the base model loads: a damaged one is named at once
    tuned = _read_ctr_llm_tensors(directory, "llm_tuned.safetensors")
    heads = _read_ctr_llm_tensors(directory, "heads.safetensors")
    model = CTRAdaptedLLM.from_config(config, trust_remote_code)
    named = dict(model.llm.named_parameters())
    unknown = sorted(set(tuned) - set(named))
    if unknown:
        raise ValueError(f"{directory}: tuned tensors {unknown[:5]} do not exist in {config.model_path}")
    tuned_path = os.path.join(directory, "llm_tuned.safetensors")
    missing = sorted({n for n, p in named.items() if p.requires_grad} - set(tuned))
    if missing:
        raise ValueError(f"{tuned_path}: no tensors {missing[:5]} of the tuned LLM{ctr_llm_damage(directory)}")
    with torch.no_grad():
        for name, tensor in tuned.items():
            if tensor.shape != named[name].shape:
                raise ValueError(
                    f"{tuned_path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                    f"{tuple(named[name].shape)}{ctr_llm_damage(directory)}"
                )
            named[name].copy_(tensor)
    try:
        model.transform.load_state_dict(
            {k[len("transform.") :]: v for k, v in heads.items() if k.startswith("transform.")})
        model.predict.load_state_dict({k[len("predict.") :]: v for k, v in heads.items() if k.startswith("predict.")})
    except RuntimeError as error:  # missing, unexpected or misshapen head tensors
        raise ValueError(
            f"{os.path.join(directory, 'heads.safetensors')}: does not fit the heads of config.json "
            f"({one_line(error)[:300]}){ctr_llm_damage(directory)}"
        ) from error
    model.eval()
    return model
