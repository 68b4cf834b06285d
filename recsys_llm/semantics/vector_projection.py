"""A PCA projection that shrinks exported LLM vectors: fitted on a sample, saved as safetensors,
loaded (with its hash, for the provenance) by :class:`~recsys_llm.semantics.vector_export.VectorExport`."""

import hashlib
import os
from typing import Tuple

import torch

from recsys_llm.atomic_dir import write_bytes_atomically
from recsys_llm.error_text import one_line


def fit_projection(sample: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fits a PCA projection on a sample of vectors.

    Args:
        sample (torch.Tensor): (N, d) vectors, N >= dim.
        dim (int): k, the number of components kept.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: mean (d,) and components (d, k); project with
        ``(x - mean) @ components``.
    """
    if sample.dim() != 2 or sample.size(0) < dim or sample.size(1) < dim:
        raise ValueError(f"fit_projection: need a (N >= {dim}, d >= {dim}) sample, got {tuple(sample.shape)}")
    sample = sample.double()
    mean = sample.mean(0)  # (d,)
    _, _, vh = torch.linalg.svd(sample - mean, full_matrices=False)  # vh: (min(N, d), d)
    components = vh[:dim].T.contiguous()  # (d, k)
    signs = torch.sign(components[components.abs().argmax(0), torch.arange(dim)])  # deterministic signs
    return mean.float(), (components * signs).float()


def save_projection(path: str, mean: torch.Tensor, components: torch.Tensor) -> None:
    """Writes a projection as safetensors (atomically: fsynced, then renamed over ``path``)."""
    from safetensors.torch import save

    write_bytes_atomically(path, save({"mean": mean.contiguous(), "components": components.contiguous()}))


def load_projection(path: str) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """Returns ``(mean (d,), components (d, k), sha256 of the file)``.

    Raises:
        FileNotFoundError: no file at ``path`` (nothing, or a directory).
        ValueError: ``path`` is no (complete) safetensors file, or holds other tensors, or tensors
            of other shapes or dtypes than a projection's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no projection file there (expected a file written by save_projection)")
    try:
        tensors = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a projection file of save_projection ({one_line(error)}); expected a "
                         "safetensors file holding 'mean' and 'components'") from error
    if set(tensors) != {"mean", "components"}:
        raise ValueError(f"{path}: a projection file holds 'mean' and 'components', found {sorted(tensors)}")
    mean, components = tensors["mean"], tensors["components"]
    if (mean.dim() != 1 or components.dim() != 2 or components.size(0) != mean.size(0) or components.size(1) == 0
            or not (mean.is_floating_point() and components.is_floating_point())):
        raise ValueError(f"{path}: a projection file holds a float 'mean' of shape (d,) and float 'components' of "
                         f"shape (d, k >= 1), found mean {tuple(mean.shape)} {mean.dtype} and components "
                         f"{tuple(components.shape)} {components.dtype}")
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:16]
    return mean.float(), components.float(), digest
