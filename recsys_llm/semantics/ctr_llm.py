"""The CTR-adapted LLM of ELEC (Dong, Ouyang, Liu, SIGIR 2025, arXiv 2509.07594).

Any Hugging Face ``AutoModel`` reads the row text; its last hidden states are
average-pooled over the attention mask, a transformation MLP gives the high-level
representation vector r, and a prediction layer gives the click logit:

.. math::

    h = \\frac{\\sum_t m_t H_t}{\\sum_t m_t}, \\qquad r = \\mathrm{MLP}(h), \\qquad
    \\hat y = \\sigma(w^\\top r + b)

The LLM (LoRA adapters via peft, or its last k transformer layers) and both heads are
fine-tuned with BCE on clicks. Only r is used afterwards (``vector_export``).

Tuning with a :class:`~recsys_llm.semantics.ctr_llm_checkpoint.TuneCheckpoint` saves, every N
steps and at each epoch's end, what it needs to go on exactly (trained tensors, AdamW, RNG states,
the epoch order's generator, position, losses) and resumes from it; ``semantics adapt`` keeps it
beside its output and removes it once the model is saved (:mod:`recsys_llm.semantics.ctr_llm_checkpoint`).

Example::

    config = CTRLLMConfig(model_path=path, representation_dim=64)
    llm = CTRAdaptedLLM.from_config(config)
    losses = tune_ctr_llm(llm, texts, labels, config)
    save_ctr_llm(llm, "runs/ctr_llm")  # recsys_llm.semantics.ctr_llm_store
    r = load_ctr_llm("runs/ctr_llm").encode(["user id is 3. item id is 7."])  # (1, 64)
"""

import dataclasses
import hashlib
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recsys_llm.progress import bar_options
from recsys_llm.semantics.encoder import NumberRule, check_every_text_has_tokens, check_number_fields, text_list
from recsys_llm.semantics.lora_targets import language_model_name, with_lora
from recsys_llm.semantics.model_dir import model_dir_fingerprint
from recsys_llm.semantics.model_loading import (
    check_max_length,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    position_limited,
    resolve_device,
    runs_own_code,
    tokenizer_fits_model,
)
from recsys_llm.semantics.pooling import hidden_states, hidden_width, pool
from recsys_llm.semantics.precision import LowPrecisionSteps, long_dtype_name
from recsys_llm.semantics.ctr_llm_checkpoint import TuneCheckpoint, TuneCheckpointer, resume_signature
from recsys_llm.typed_config import check_name_list, check_str_settings

TUNING_MODES = ("lora", "last_k", "heads")
LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# CTRLLMConfig numbers: field -> its rule (and `semantics adapt` option)
_NUMBER_RULES: Dict[str, NumberRule] = {
    "representation_dim": NumberRule("--representation-dim", integer=True, minimum=1),
    "hidden_dim": NumberRule("--hidden-dim", integer=True, minimum=1),
    "dropout": NumberRule(minimum=0, below=1),
    "lora_r": NumberRule("--lora-r", integer=True, minimum=1),
    "lora_alpha": NumberRule(above=0),
    "lora_dropout": NumberRule(minimum=0, below=1),
    "last_k_layers": NumberRule("--last-k", integer=True, minimum=1),
    "max_length": NumberRule("--max-length", integer=True, minimum=1),
    "batch_size": NumberRule("--batch-size", integer=True, minimum=1),
    "learning_rate": NumberRule("--lr", above=0),
    "head_learning_rate": NumberRule("--head-lr", above=0),
    "epochs": NumberRule("--epochs", integer=True, minimum=1),
    "sample_rows": NumberRule("--sample-rows", integer=True, minimum=1),
    "seed": NumberRule("--seed", integer=True, minimum=0),
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
        check_name_list(self.lora_target_modules, "CTRLLMConfig.lora_target_modules")  # peft: a regex, else
        check_str_settings(self, (), "CTRLLMConfig", paths=("model_path",))
        if long_dtype_name(self.llm_dtype) not in LLM_DTYPES:
            raise ValueError(f"CTRLLMConfig.llm_dtype must be one of {sorted(LLM_DTYPES)} (or bf16, fp16, fp32), got "
                             f"{self.llm_dtype!r}")
        self.llm_dtype = long_dtype_name(self.llm_dtype)  # recorded as torch names it
        if self.tuning not in TUNING_MODES:
            raise ValueError(f"CTRLLMConfig.tuning must be one of {TUNING_MODES}, got {self.tuning!r}")
        if self.pooling not in ("mean", "last_token", "cls"):
            raise ValueError(f"CTRLLMConfig.pooling must be 'mean', 'last_token' or 'cls', got {self.pooling!r}")
        check_number_fields(self, _NUMBER_RULES, "semantics adapt", optional=("sample_rows",))


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a Hugging Face model (the longest one not inside another list: a
    T5 block keeps its attention and feed-forward sublayers in a list of its own, longer than a 1-block stack);
    of a multimodal model, of its language model (SmolVLM-Instruct's vision tower has more layers than its
    language model, and text never runs through it)."""
    language = language_model_name(model)
    scope = model.get_submodule(language) if language else model
    named = [(name, m) for name, m in scope.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    lists = [m for name, m in named if not any(name.startswith(f"{outer}.") for outer, _ in named)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no transformer layer list found for last_k tuning")
    return max(lists, key=len)


ENCODE_OUTPUTS = ("representation", "pooled")


class CTRAdaptedLLM(nn.Module):
    """LLM + pooling (``config.pooling``; ``mean`` is the paper's average) + transformation MLP + prediction layer.

    Args:
        llm (nn.Module): a Hugging Face base model returning ``last_hidden_state``.
        tokenizer (PreTrainedTokenizerBase): its tokenizer (from the same model directory).
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
        check_max_length(tokenizer, config.max_length, config.model_path)
        hidden = hidden_width(llm)
        self.transform = nn.Sequential(
            nn.Linear(hidden, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.representation_dim),
        )
        self.predict = nn.Linear(config.representation_dim, 1)
        self.llm = self._prepare_llm(llm)

    def train(self, mode: bool = True) -> "CTRAdaptedLLM":
        """``nn.Module.train``; with ``tuning`` ``heads`` the frozen LLM stays in eval mode (no dropout),
        so the heads learn from the hidden states that :meth:`encode` exports."""
        super().train(mode)
        if self.config.tuning == "heads":
            self.llm.eval()
        return self

    @classmethod
    def from_config(cls, config: CTRLLMConfig, *, trust_remote_code: bool = False,
                    device: Optional[Union[str, torch.device]] = None) -> "CTRAdaptedLLM":
        """Loads the base model and tokenizer from ``config.model_path`` (offline).

        Seeds torch's global random stream with ``config.seed`` first (``torch.manual_seed``): the
        heads' and LoRA's initial weights, and the dropout of the tuning that follows, draw from
        it, so a run repeats. A program that needs its own stream afterwards wraps the call in
        ``torch.random.fork_rng()``.

        Args:
            config (CTRLLMConfig): the settings.
            trust_remote_code (bool): run the model directory's own code if its config asks
                for it (off: such a model is refused); not saved with the adapted LLM, so
                each load asks again. Keyword-only, as ``device``.
            device (Optional[Union[str, torch.device]]): where the base model's weights load, straight from
                their files (no copy in host memory first); None: the CPU. The heads and LoRA start
                on the CPU's random stream whatever the device.

        Raises:
            ValueError: ``device`` is no device name torch knows, or a GPU this process does not see.
        """
        torch.manual_seed(config.seed)
        # checks the directory and its files, pads decoders
        tokenizer = load_tokenizer(config.model_path, trust_remote_code)
        dtype = LLM_DTYPES[config.llm_dtype]
        device = torch.device("cpu") if device is None else resolve_device(device, "device")
        llm = load_model(config.model_path, device, dtype, trust_remote_code)  # its encoder if enc-dec
        return cls(llm, tokenizer, config).to(device)

    def _prepare_llm(self, llm: nn.Module) -> nn.Module:
        for param in llm.parameters():
            param.requires_grad_(False)
        if self.config.tuning == "lora":
            config = self.config
            return with_lora(llm, config.model_path, config.lora_r, config.lora_alpha, config.lora_dropout,
                             config.lora_target_modules)  # None: the attention query/value projections, as SSFT
        if self.config.tuning == "last_k":
            layers = list(_transformer_layers(llm))
            if self.config.last_k_layers > len(layers):
                raise ValueError(
                    f"{self.config.model_path}: --last-k {self.config.last_k_layers} (CTRLLMConfig.last_k_layers), but "
                    f"the model has {len(layers)} transformer layers; give at most {len(layers)} (all of them tunes "
                    "the whole stack)"
                )
            for layer in layers[-self.config.last_k_layers :]:
                for param in layer.parameters():
                    param.requires_grad_(True)
        return llm

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` (B, L) on the model's device.

        Raises:
            ValueError: a text has no tokens (it would get a zero vector).
        """
        texts = text_list(texts)
        # right padding: a text's positions, and so its vector, do not depend on its batch
        encoded = self._tokenizer(
            texts, padding=True, truncation=True,
            max_length=position_limited(self.llm, self.config.max_length), return_tensors="pt", padding_side="right",
        )
        check_every_text_has_tokens(self.config.model_path, texts, encoded["attention_mask"])
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
        try:  # a failed call (a text without tokens) leaves the model in the mode it was in
            encoded = self.tokenize(texts)
            if output == "pooled":
                hidden = hidden_states(self.llm, encoded["input_ids"], encoded["attention_mask"])  # (N, T, H)
                vectors = pool(hidden, encoded["attention_mask"], self.config.pooling)  # (N, H)
            else:
                _, vectors = self(**encoded)  # (N, R)
        finally:
            self.train(was_training)
        return vectors.float().cpu()

    def trainable_llm_state(self) -> Dict[str, torch.Tensor]:
        """The tuned LLM tensors (LoRA adapters or the unfrozen last layers)."""
        return {n: p.detach().cpu().contiguous() for n, p in self.llm.named_parameters() if p.requires_grad}

    def provenance(self, output: str = "representation") -> Dict[str, str]:
        """What made the vectors: base model, revision, pooling, tuning, a hash of the tuned weights
        and, for ``encode(output="pooled")``, that output and its width."""
        digest = hashlib.sha256()
        for name, tensor in sorted({**self.trainable_llm_state(), **heads_state(self)}.items()):
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
            # the model directory's own code computed the vectors (trust_remote_code): other vectors from the same files
            **({"own_code": "true"} if runs_own_code(self.llm) else {}),
        }


def heads_state(model: CTRAdaptedLLM) -> Dict[str, torch.Tensor]:
    """The state of the transformation MLP and the prediction layer (``transform.*``, ``predict.*``), on the CPU."""
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


def _tuning_rows(texts: Sequence[str], labels: Union[Sequence[float], np.ndarray],
                 config: CTRLLMConfig) -> Tuple[np.ndarray, List[str], np.ndarray]:
    """The sample's row indices (sorted), its texts and its labels (float32)."""
    if len(texts) != len(labels):
        raise ValueError(f"tune_ctr_llm: {len(texts)} texts but {len(labels)} labels")
    if not len(texts):
        raise ValueError("tune_ctr_llm: no rows to tune on (0 texts)")
    index = sample_indices(len(texts), config)
    label_array = np.asarray(labels, dtype=np.float32)
    sample_labels = label_array[index]
    not_clicks = np.flatnonzero((sample_labels != 0) & (sample_labels != 1))  # NaN included
    if not_clicks.size:
        row = int(index[not_clicks[0]])
        raise ValueError(f"tune_ctr_llm: label {label_array[row]} at row {row} ({not_clicks.size} of the "
                         f"{len(index)} sampled rows are not 0 or 1); expected clicks in {{0, 1}} (BCE)")
    return index, [texts[i] for i in index], sample_labels


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
    signature = resume_signature(config, sample_texts, sample_labels, checkpoint.settings, own_code=None)
    TuneCheckpointer(checkpoint, signature, config.epochs).precheck()


def tune_ctr_llm(
    model: CTRAdaptedLLM,
    texts: Sequence[str],
    labels: Union[Sequence[float], np.ndarray],
    config: CTRLLMConfig,
    progress: bool = True,
    checkpoint: Optional[TuneCheckpoint] = None,
    gradient_checkpointing: bool = False,
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
        gradient_checkpointing (bool): recompute the LLM's layer activations in the backward instead of keeping
            them (:func:`~recsys_llm.semantics.model_loading.enable_gradient_checkpointing`; ``lora`` and
            ``last_k`` tuning): less memory, more compute, the same gradients; may change on a resume.

    Returns:
        List[float]: the loss of every step (those before a resume included).

    Raises:
        ValueError: a damaged checkpoint file (named, with the remedy), a checkpoint of other settings
            (the differences named), or one past ``config.epochs``; ``gradient_checkpointing`` with ``heads``
            tuning (the LLM has no gradients) or a model class without it.
    """
    if gradient_checkpointing:
        if config.tuning == "heads":
            raise ValueError("--gradient-checkpointing: --tuning heads trains no LLM weights (the LLM runs without "
                             "gradients and keeps no activations); leave the option out or tune with lora or last_k")
        enable_gradient_checkpointing(model.llm, config.model_path)
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
    steps_per_epoch = (len(index) + config.batch_size - 1) // config.batch_size
    saver = None
    losses: List[float] = []
    first_epoch, first_step = 0, 0
    if checkpoint is not None:
        signature = resume_signature(config, sample_texts, sample_labels, checkpoint.settings, runs_own_code(model.llm))
        saver = TuneCheckpointer(checkpoint, signature, config.epochs)
        resumed = saver.load(model, optimizer, generator) if checkpoint.resume else None
        if resumed is not None:
            first_epoch, first_step, losses = resumed
    model.train()
    with tqdm(total=config.epochs * steps_per_epoch, initial=len(losses), desc="tune CTR-LLM",
              disable=not progress, **bar_options()) as bar:
        for epoch in range(first_epoch, config.epochs):
            order_state = generator.get_state()  # (G,) uint8: this epoch's order is drawn from it
            order = torch.randperm(len(index), generator=generator).numpy()  # (S,) positions in the sample
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
