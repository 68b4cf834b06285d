"""``CTRTask``: backbone + plug-ins + BCE, in the shape torchrec's pipeline trains.

``forward(batch)`` returns ``(loss, (loss, logits, labels))`` exactly like torchrec's
``DLRMTrain``, so the same ``TrainPipelineSparseDist`` loop trains a plain backbone,
a LLaCTR-enhanced one, an ELEC gain network or a teacher-student pair.
"""

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from recsys_llm.data.batch import Batch, batch_extras
from recsys_llm.models.base import CTRBackbone, CTROutput


@torch.fx.wrap  # a leaf of the pipeline's trace: it looks into the batch's extras at run time
def required_extra(extras: Dict[str, torch.Tensor], key: str, purpose: str) -> torch.Tensor:
    """``extras[key]``; a missing key is named, with ``purpose`` and the extras there are."""
    if key not in extras:
        raise KeyError(
            f"the batch has no extra {key!r} for {purpose} (its extras: {sorted(extras)}); read the data with "
            f"that column, e.g. ParquetBatchReader(..., extras=[{key!r}]), or, building batches yourself, use "
            f"recsys_llm.data.batch.Batch(..., extras={{{key!r}: ...}}) (torchrec's own Batch carries no extras)"
        )
    return extras[key]


@torch.fx.wrap  # a leaf of the pipeline's trace: the shape is checked at run time
def checked_term(value: torch.Tensor, kind: str, name: str, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``value`` as it is when a ``kind`` ("logit" or "loss") term gives its shape: (B,) for a
    logit term, a scalar for a loss term; raises otherwise, naming the term (a loss term in
    ``logit_terms`` would add its scalar to every logit, silently).

    Args:
        value (torch.Tensor): what the term returned: (B,) or a scalar.
        kind (str): ``"logit"`` or ``"loss"``.
        name (str): the term's key in its dict, for the error.
        logits (Optional[torch.Tensor]): (B,) the logits a logit term is added to; when given, a logit term of
            another length is refused too (a (1,) value, e.g. a batch mean kept with ``keepdim``, would be added
            to every row silently, and one of another length failed in torch's broadcast without the term's name).

    Raises:
        TypeError: the term returned no tensor (a Python number, a tuple).
        ValueError: the term's shape is not (B,) (logit) or () (loss).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{kind} term {name!r} returned a {type(value).__name__}, not a tensor; a logit term returns a tensor "
            "(B,), one value per row, and a loss term a scalar tensor (e.g. output.logits.new_tensor(0.0))"
        )
    if kind == "logit" and logits is not None and value.dim() == 1 and value.shape != logits.shape:
        raise ValueError(
            f"logit term {name!r} returned shape {tuple(value.shape)} for logits of shape {tuple(logits.shape)}; a "
            "logit term returns (B,), one value per row of the batch (expand a shared value, e.g. a bias, with "
            ".expand_as(output.logits))"
        )
    if value.dim() != (1 if kind == "logit" else 0):
        raise ValueError(
            f"{kind} term {name!r} returned shape {tuple(value.shape)}; a logit term returns (B,), one value per row, "
            "and a loss term a scalar: is it in the wrong dict? (LLaCTR's FIE is a logit term and FRE a loss term; "
            "build_llactr_terms returns (logit_terms, loss_terms, provenance) in that order)"
        )
    return value


def check_term_names(terms: Mapping[str, nn.Module], what: str) -> None:
    """Raises naming ``what`` (``logit_terms`` / ``loss_terms``) and the key when a term's name cannot key an
    ``nn.ModuleDict``: not a string, empty, holding a ``.``, or an attribute of the dict (``half``, ``train``,
    ``to``, ... and those each module sets in ``__init__``: ``training``, ``_modules``); torch's own KeyError named
    neither the task nor the dict."""
    taken = nn.ModuleDict()  # an instance: ``training`` and ``_parameters`` are no attributes of the class
    for key in terms:
        if not isinstance(key, str):
            raise TypeError(f"CTRTask: {what} names must be strings, got {key!r}")
        reason = ("it is empty" if not key else "it holds a '.'" if "." in key
                  else "an attribute of nn.ModuleDict" if hasattr(taken, key) else None)
        if reason is not None:
            raise ValueError(f"CTRTask: {what} name {key!r} cannot be a module name ({reason}): name the term "
                             "otherwise, e.g. 'my_l2'")


class CTRTask(nn.Module):
    """Trains a backbone with optional field injection, logit terms and loss terms.

    ``logits = backbone.logits + Σ logit_terms(output)``;
    ``loss = BCE(logits, labels) + Σ loss_terms(output, batch)``.

    Args:
        model (CTRBackbone): the backbone (holds the EBC the planner shards); any module with
            ``forward(dense, kjt, extra_fields) -> CTROutput`` and ``representation_dim`` trains
            here too, but only a ``CTRBackbone`` exports (``recsys_llm.serving.export_task``).
        field_injection (Optional[nn.Module]): maps ``batch.extras[injection_key]`` (B, d)
            to extra field embeddings (B, E, D) (e.g. ELEC's projected LLM vector).
        injection_key (str): which extra carries the injected vector.
        logit_terms (Optional[Dict[str, nn.Module]]): ``term(output) -> (B,)`` added to the
            logits (e.g. LLaCTR's FIE); part of the served model.
        loss_terms (Optional[Dict[str, nn.Module]]): ``term(output, batch) -> scalar``
            added to the loss, already weighted (e.g. LLaCTR's FRE); training only.

    Example::

        from recsys_llm.data.batch import Batch
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_item_id", embedding_dim=8, num_embeddings=100, feature_names=["item_id"])])
        fre = FieldRepresentationEnhancement(torch.randn(1, 384), ["item_id"], embedding_dim=8)
        task = CTRTask(DeepFM(ebc, num_dense_features=2), loss_terms={"fre": fre})
        kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([3, 7, 1]), torch.tensor([1, 1, 1]))
        batch = Batch(torch.rand(3, 2), kjt, torch.tensor([1.0, 0.0, 1.0]))
        loss, (loss_detached, logits, labels) = task(batch)  # scalar, (3,), (3,)
    """

    def __init__(
        self,
        model: CTRBackbone,
        *,
        field_injection: Optional[nn.Module] = None,
        injection_key: str = "llm_vector",
        logit_terms: Optional[Dict[str, nn.Module]] = None,
        loss_terms: Optional[Dict[str, nn.Module]] = None,
    ) -> None:
        super().__init__()
        if not hasattr(model, "representation_dim"):  # e.g. torchrec's DLRM: forward(dense, kjt) -> (B, 1)
            raise TypeError(
                f"CTRTask: {type(model).__name__} is no CTRBackbone (it has no representation_dim, and CTRTask calls "
                "model(dense, kjt, extra_fields) -> CTROutput); wrap a torchrec DLRM in "
                "recsys_llm.models.DLRMBackbone(dlrm, num_dense_features), or make your model a CTRBackbone "
                "(docs/usage.md, 'Your own model as a backbone')"
            )
        if field_injection is not None and not isinstance(field_injection, nn.Module):
            raise TypeError(f"CTRTask: field_injection must be a module (e.g. VectorFieldInjection) or None, got "
                            f"{type(field_injection).__name__}; logit and loss terms go in logit_terms= / loss_terms=")
        if not isinstance(injection_key, str):
            raise TypeError(f"CTRTask: injection_key must be the extras key (a string) of the injected vector, got "
                            f"{injection_key!r}")
        for name, terms in (("logit_terms", logit_terms), ("loss_terms", loss_terms)):
            if terms is not None and not isinstance(terms, (Mapping, nn.ModuleDict)):  # another task's ModuleDict
                raise TypeError(f"CTRTask: {name} must be a mapping of name -> module, got {type(terms).__name__}")
            check_term_names(terms or {}, name)
        if field_injection is None and getattr(model, "num_extra_fields", 0) > 0:
            raise ValueError(
                f"CTRTask: {type(model).__name__} was built for {model.num_extra_fields} extra field(s) "
                "(num_extra_fields) but the task has no field_injection to make them; pass one (e.g. "
                "VectorFieldInjection), or build the backbone with num_extra_fields=0"
            )
        check = getattr(model, "check_extra_fields", None)  # CTRBackbone's; a duck-typed model may lack it
        if check is not None and hasattr(field_injection, "num_fields") and hasattr(field_injection, "embedding_dim"):
            check(field_injection.num_fields, field_injection.embedding_dim,
                  f"CTRTask: the field injection ({type(field_injection).__name__})")
        self.model = model
        self.field_injection = field_injection
        self._injection_key = injection_key
        self.logit_terms = nn.ModuleDict(logit_terms or {})
        self.loss_terms = nn.ModuleDict(loss_terms or {})
        self.loss_fn = nn.BCEWithLogitsLoss()

    def predict(self, batch: Batch) -> CTROutput:
        """Backbone output with the logit terms applied; ``logits`` (B,)."""
        extra_fields = None
        if self.field_injection is not None:
            vector = required_extra(batch_extras(batch), self._injection_key, "the field injection")  # (B, d)
            extra_fields = self.field_injection(vector)  # (B, E, D)
        return self.with_logit_terms(self.model(batch.dense_features, batch.sparse_features, extra_fields))

    def with_logit_terms(self, output: CTROutput) -> CTROutput:
        """``output`` with every logit term (each (B,), checked) added to its ``logits`` (B,)."""
        logits = output.logits
        for name, term in self.logit_terms.items():
            logits = logits + checked_term(term(output), "logit", name, output.logits)
        return CTROutput(logits, output.representation, output.embeddings)

    def with_loss_terms(self, loss: torch.Tensor, output: CTROutput, batch: Batch) -> torch.Tensor:
        """``loss`` (a scalar) plus every loss term (each a scalar, checked) of ``output`` and ``batch``."""
        for name, term in self.loss_terms.items():
            loss = loss + checked_term(term(output, batch), "loss", name)
        return loss

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """
        Args:
            batch (Batch): dense (B, Dd), sparse KJT, labels (B,) (0/1 of any dtype, taken as floats) and the
                injected vector in ``extras``.

        Returns:
            Tuple: ``(loss, (loss_detached, logits, labels))``: a scalar, then the detached scalar,
            logits (B,) and labels (B,), as torchrec's ``DLRMTrain`` returns them.
        """
        output = self.predict(batch)
        # as torchrec's DLRMTrain: 0/1 labels of an integer or bool dtype are targets too
        loss = self.with_loss_terms(self.loss_fn(output.logits, batch.labels.float()), output, batch)
        return loss, (loss.detach(), output.logits.detach(), batch.labels)
