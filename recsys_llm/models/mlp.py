"""The hidden-layer stack the backbones share: torchrec's ``MLP`` with optional dropout."""

from typing import Optional, Sequence

import torch
from torch import nn
from torchrec.modules.mlp import MLP, Perceptron

from recsys_llm.data.validation import check_number


def build_mlp(
    in_features: int,
    layer_sizes: Sequence[int],
    dropout: float = 0.0,
    device: Optional[torch.device] = None,
) -> nn.Module:
    """ReLU perceptrons ``in_features -> layer_sizes[0] -> ... -> layer_sizes[-1]``.

    Without dropout this is torchrec's :class:`~torchrec.modules.mlp.MLP` itself; with
    dropout, the same torchrec ``Perceptron`` layers each followed by ``nn.Dropout``.

    Args:
        in_features (int): input width.
        layer_sizes (Sequence[int]): output width of each layer (non-empty).
        dropout (float): dropout probability after each layer, in [0, 1).
        device (Optional[torch.device]): where the weights live.

    Returns:
        nn.Module: (B, in_features) -> (B, layer_sizes[-1]).
    """
    sizes = [int(s) for s in layer_sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"MLP layer sizes must be a non-empty list of positive ints, got {list(layer_sizes)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout == 0.0:
        return MLP(in_features, sizes, bias=True, activation="relu", device=device)
    layers = []
    for in_size, out_size in zip([in_features] + sizes[:-1], sizes):
        layers.append(Perceptron(in_size, out_size, bias=True, activation=torch.relu, device=device))
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def check_layer_sizes(where: str, layer_sizes: Sequence[int], allow_empty: bool = False) -> None:
    """Raises ValueError naming ``where`` (e.g. ``"FinalMLPConfig.mlp2_layer_sizes"``) unless ``layer_sizes``
    is a sequence of integers >= 1, non-empty unless ``allow_empty``.

    For a config that builds several MLPs: :func:`build_mlp`'s own error cannot tell which one it was.
    """
    if isinstance(layer_sizes, str) or not hasattr(layer_sizes, "__len__"):
        raise ValueError(f"{where} must be a list of layer sizes, got {layer_sizes!r}")
    if len(layer_sizes) == 0 and not allow_empty:
        raise ValueError(f"{where} is empty; expected at least one layer size, e.g. (256, 128)")
    for i, size in enumerate(layer_sizes):
        check_number(f"{where}[{i}]", size, integer=True, minimum=1)
