"""LLaCTR for any TorchRec model: field vectors -> FRE loss term + FIE logit term.

The training runner reads an ``llactr`` config section into :class:`LLaCTRConfig` and
calls :func:`build_llactr_terms`, which loads the field vectors (checking that they
were made for this schema), keeps the fields the model embeds, and returns the terms
to hand to ``CTRTask(logit_terms=..., loss_terms=...)`` plus the provenance to record
in the run directory. Ablations are config changes (``use_fre`` / ``use_fie``).

Example::

    config = LLaCTRConfig.from_dict({"vectors_path": "runs/fields.safetensors", "lambda_fre": 0.1})
    logit_terms, loss_terms, provenance = build_llactr_terms(config, schema, backbone)
    task = CTRTask(backbone, logit_terms=logit_terms, loss_terms=loss_terms)
"""

import dataclasses
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.host_memory import host_memory, ranks_on_host
from recsys_llm.models.base import check_one_table_per_feature
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.modules.field_semantics import FIELD_REDUCTIONS, FieldRepresentationEnhancement
from recsys_llm.modules.random_stream import own_random_stream
from recsys_llm.semantics.store import load_vectors
from recsys_llm.typed_config import ConfigError, build_dataclass, check_bool_settings, check_str_settings


@dataclasses.dataclass
class LLaCTRConfig:
    """The ``llactr`` section of a training config.

    Args:
        vectors_path (str): field-vector file from ``recsys-llm semantics encode``.
        use_fre (bool): add the FRE loss term.
        use_fie (bool): add the FIE logit term.
        lambda_fre (float): FRE weight (paper tunes 0.01-0.5).
        lambda_fie (float): FIE weight (paper tunes 0.01-0.5).
        normalize_vectors (bool): L2-normalise field vectors before FRE's projection
            **(ours)**; FIE uses cosine similarities either way.
        fre_field_reduction (str): ``sum`` FRE's per-field KL terms, as the public code does
            (the paper's lambda range applies), or take their ``mean`` (lambda / F) **(ours)**.
        fields (List[str]): the fields FRE and FIE take (empty: every field with a vector that
            the model embeds), e.g. the item fields of a model whose user tables are wider.
    """

    vectors_path: str
    _: dataclasses.KW_ONLY  # LLaCTRConfig(path, ["item_id"]) would have set use_fre to a truthy list
    use_fre: bool = True
    use_fie: bool = True
    lambda_fre: float = 0.1
    lambda_fie: float = 0.1
    normalize_vectors: bool = False
    fre_field_reduction: str = "sum"
    fields: List[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        # here, not only in from_dict: a config built in Python (LLaCTRConfig(path, lambda_fre=...)) is checked too
        for name in ("lambda_fre", "lambda_fie"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"llactr.{name}: expected a finite number >= 0, got {value!r}")
        if self.fre_field_reduction not in FIELD_REDUCTIONS:
            raise ValueError(
                f"llactr.fre_field_reduction: expected one of {FIELD_REDUCTIONS}, got {self.fre_field_reduction!r}"
            )
        check_bool_settings(self, ("use_fre", "use_fie", "normalize_vectors"), "llactr")  # "false" would count as on
        check_str_settings(self, (), "llactr", paths=("vectors_path",))
        if isinstance(self.fields, str):
            raise ValueError(f"llactr.fields: expected a list of field names, got the string {self.fields!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "llactr") -> "LLaCTRConfig":
        """From a config-file mapping, typed like the rest of the config; unknown keys, a
        missing or empty ``vectors_path`` and negative or non-finite lambdas are errors naming the key
        (the last also when the config is built directly)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known) if isinstance(raw, Mapping) else []
        if unknown:  # first: a misspelt vectors_path is named, not reported as missing
            raise ConfigError(f"{source}: unknown keys {unknown}; allowed: {sorted(known)}")
        if isinstance(raw, Mapping) and "vectors_path" not in raw:
            raise ConfigError(f"{source}: 'vectors_path' (path of the field-vector file) is required")
        config = build_dataclass(cls, raw, source)
        if not config.vectors_path:
            raise ConfigError(
                f"{source}.vectors_path: empty; give the field-vector file of `recsys-llm semantics encode` "
                f"(or leave the {source} section out for a model without LLaCTR)"
            )
        return config


def _find_ebc(model: nn.Module) -> EmbeddingBagCollection:
    """The EBC of a CTRBackbone (``embedding_bag_collection``), a torchrec DLRM or DeepFM
    (``sparse_arch``) or a CTRTask (``model``)."""
    if isinstance(model, EmbeddingBagCollection):
        return model
    paths = ("embedding_bag_collection", "sparse_arch.embedding_bag_collection", "model.embedding_bag_collection")
    for path in paths:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, EmbeddingBagCollection):
            return module
    raise ValueError(
        f"{type(model).__name__}: found no EmbeddingBagCollection at {', '.join('.' + p for p in paths)}; pass the "
        "backbone whose embeddings the terms read (a TeacherStudentTask's student.model), or the EBC itself"
    )


def embedded_features(model: nn.Module) -> Dict[str, int]:
    """Feature name -> embedding dim of the pooled EBC output of ``model``.

    Raises:
        ValueError: a feature is read by several tables (its pooled keys are then ``feature@table``).
    """
    configs = _find_ebc(model).embedding_bag_configs()
    check_one_table_per_feature(configs, f"LLaCTR on {type(model).__name__}")
    return {name: config.embedding_dim for config in configs for name in config.feature_names}


# FIE's Linear(P, P) while training: its weight, its gradient and an Adam optimizer's two moments
FIE_TRAINING_COPIES = 4


def check_fie_fits(num_fields: int, device: Optional[torch.device] = None) -> None:
    """Refuses FIE over more fields than the memory it would train in holds.

    FIE's Linear(P, P) on the P = F (F - 1) / 2 field pairs has P^2 + P weights, about F^4 / 4:
    100 fields 24.5 million (98 MB in float32), 200 fields 396 million (1.6 GB), 500 fields
    15.6 billion (62 GB), held about ``FIE_TRAINING_COPIES`` times while training. Without this
    check such a term fails in torch's allocator (or the process is killed) without naming FIE.

    Args:
        num_fields (int): F, the fields FIE pairs.
        device (Optional[torch.device]): where its weights train; a CUDA device's memory, else
            the host's (its cgroup limit where lower; no check where the OS does not say), shared by
            the ranks torchrun starts on it (``LOCAL_WORLD_SIZE``), each holding a copy of the term.

    Raises:
        ValueError: naming F, P, the bytes, the memory and what to change.
    """
    num_pairs = num_fields * (num_fields - 1) // 2
    needed = FIE_TRAINING_COPIES * (num_pairs * num_pairs + num_pairs) * 4  # float32 bytes
    shared_by = 1
    if device is not None and torch.device(device).type == "cuda":
        memory: Optional[int] = torch.cuda.get_device_properties(torch.device(device)).total_memory
        owner = f"{device}'s"
    else:
        memory, owner = host_memory(), "the host's"
        shared_by = ranks_on_host()  # every rank trains its own copy
    if memory is not None and needed > memory // shared_by:
        room = f"{owner} {memory / 2**30:,.1f} GiB" + (f", shared by {shared_by} ranks" if shared_by > 1 else "")
        raise ValueError(
            f"FIE over {num_fields} fields learns a Linear(P, P) on their P = {num_pairs:,} field pairs: "
            f"{num_pairs * num_pairs:,} weights, about {needed / 2**30:,.1f} GiB while training (weight, gradient "
            f"and Adam's two moments in float32), over {room}; its size grows as F^4: name fewer fields in "
            "llactr.fields (LLaCTRConfig.fields; 100 fields take about 0.4 GiB), or set llactr.use_fie=false (FRE "
            "alone is linear in the fields)"
        )


def build_llactr_terms(
    config: LLaCTRConfig,
    schema: DatasetSchema,
    backbone: nn.Module,
    device: Optional[torch.device] = None,
) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Module], Dict[str, Any]]:
    """Loads field vectors and builds FIE (logit term) and FRE (loss term) for ``backbone``.

    Only fields that both have a vector and are embedded by the backbone's EBC take part
    (dense fields, and fields left out for lack of text, are skipped and listed).

    Args:
        config (LLaCTRConfig): vectors path, lambdas, switches.
        schema (DatasetSchema): the data's schema; the vectors must have been made for it.
        backbone (nn.Module): a CTRBackbone, a torchrec DLRM (or SimpleDeepFMNN), a CTRTask, or an EBC.
        device (Optional[torch.device]): where the terms' weights go (a device or its name, e.g. ``"cpu"``): the
            backbone's dense device (on one rank DMP moves no dense module); None: torch's default device (CPU
            unless set).

    Returns:
        Tuple: ``(logit_terms {"fie": ...}, loss_terms {"fre": ...}, provenance)``; a term
        is absent when switched off.

    Raises:
        ValueError: FIE's Linear(P, P) over the fields used would not fit where it trains (:func:`check_fie_fits`).
    """
    try:
        stored = load_vectors(config.vectors_path, schema=schema)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error} (llactr.vectors_path); if it moved, pass its new path as llactr.vectors_path=PATH: a trained "
            "run's checkpoint holds its vectors, and a resume checks that the file still holds them"
        ) from None
    dims = embedded_features(backbone)
    unusable = [name for name in config.fields if name not in stored.keys or name not in dims]
    if unusable:
        left_out = [name for name in unusable if name in stored.provenance.left_out]
        why = (f"; `semantics encode` left out {left_out} (no description in the schema): describe them, or encode "
               "with --include-fields-without-description" if left_out else "")
        raise ValueError(
            f"llactr.fields: {unusable} are not both in {config.vectors_path} (fields {stored.keys}) and embedded by "
            f"the model (features {sorted(dims)}){why}"
        )
    wanted = set(config.fields or stored.keys)
    used: List[str] = [k for k in stored.keys if k in dims and k in wanted]
    skipped = [k for k in stored.keys if k not in used]
    if not used and (config.use_fre or config.use_fie):
        raise ValueError(
            f"{config.vectors_path}: none of its fields {stored.keys} is embedded by the model "
            f"(features {sorted(dims)})"
        )
    # on the vectors' device: under an ambient torch.device("meta") a meta index selected uninitialised memory
    index = torch.tensor([stored.keys.index(k) for k in used], dtype=torch.long, device=stored.vectors.device)
    vectors = stored.vectors.index_select(0, index)  # (F, d_llm)
    target = torch.device(device) if device is not None else torch.get_default_device()  # "cpu" too
    # built on CPU from their own random streams, then moved; for meta (materialised later, e.g. by DMP) built
    # there, where the terms keep their constants (field vectors, pair indices) on CPU and their weights on meta
    build_on = torch.device("meta") if target.type == "meta" else torch.device("cpu")
    logit_terms: Dict[str, nn.Module] = {}
    loss_terms: Dict[str, nn.Module] = {}
    used_dims = {dims[k] for k in used}
    if len(used_dims) > 1 and (config.use_fre or config.use_fie):
        by_dim = {name: dims[name] for name in used}
        raise ValueError(
            f"FRE and FIE compare or pair the fields' embeddings, which need one dim; the fields with vectors "
            f"have {by_dim}; name the fields of one dim in llactr.fields (LLaCTRConfig.fields)"
        )
    if config.use_fre:
        fre_vectors = F.normalize(vectors, dim=-1) if config.normalize_vectors else vectors
        with own_random_stream("llactr.fre"), build_on:
            loss_terms["fre"] = FieldRepresentationEnhancement(
                fre_vectors, used, next(iter(used_dims)), config.lambda_fre, config.fre_field_reduction
            )
    if config.use_fie:
        if len(used) < 2:
            raise ValueError(
                f"FIE pairs fields, and only {used} of {config.vectors_path} (fields {stored.keys}) is embedded by the "
                f"model (features {sorted(dims)}) and wanted; use FRE alone (llactr.use_fie=false) or vectors of more "
                "of the model's fields"
            )
        check_fie_fits(len(used), target)
        with own_random_stream("llactr.fie"), build_on:
            logit_terms["fie"] = FieldInteractionEnhancement(vectors, used, config.lambda_fie)
    if target.type not in ("cpu", "meta"):
        logit_terms = {name: term.to(target) for name, term in logit_terms.items()}
        loss_terms = {name: term.to(target) for name, term in loss_terms.items()}
    provenance = {
        "vectors": os.path.abspath(config.vectors_path),
        "config": dataclasses.asdict(config),
        "fields_used": used,
        "fields_skipped": skipped,
        **stored.provenance.to_dict(),
    }
    return logit_terms, loss_terms, provenance
