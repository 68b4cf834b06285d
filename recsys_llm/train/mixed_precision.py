"""Mixed-precision training forwards (``train.mixed_precision``).

With ``bf16`` each training forward runs under ``torch.autocast(dtype=torch.bfloat16)``: the
dense part's matmuls and linears compute in bfloat16, while the weights, the optimizer states,
the tables (FBGEMM's lookups are not autocast ops) and the losses (autocast keeps them in
float32) stay float32. The backward runs outside autocast, as torch recommends: each op's
gradient takes the dtype its forward ran in. The forward is handed to torchrec's
``TrainPipelineSparseDist`` as its ``custom_model_fwd``, so the model, its state dict and its
checkpoints are those of a float32 run; evaluation and serving compute in float32.

Example::

    dtype = autocast_dtype("bf16", torch.device("cpu"))  # torch.bfloat16
    forward = autocast_forward(model, device, dtype)
    pipeline = TrainPipelineSparseDist(model, optimizer, device, custom_model_fwd=forward)
"""

from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from recsys_llm.typed_config import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast_dtype(mixed_precision: str, device: torch.device,
                   setting: str = "train.mixed_precision") -> Optional[torch.dtype]:
    """The autocast dtype of ``mixed_precision`` (``fp32`` | ``bf16``) on ``device``; None for ``fp32``.

    Args:
        setting (str): the setting's name in errors (``export_task``'s ``mixed_precision``).

    Raises:
        ConfigError: an unknown name, or ``bf16`` on a GPU without bfloat16 support.
    """
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"{setting}={mixed_precision!r} (must be one of {', '.join(AUTOCAST_DTYPES)})")
    dtype = AUTOCAST_DTYPES[mixed_precision]
    if dtype is torch.bfloat16 and device.type == "cuda":
        # not torch.cuda.is_bf16_supported(): it says yes to GPUs that only emulate bfloat16 (V100, T4)
        from recsys_llm.semantics.model_loading import computes_in_bf16

        if not computes_in_bf16(device):
            raise ConfigError(f"{setting}=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                              f"arithmetic (NVIDIA: compute capability 8.0 or newer); use {setting}=fp32")
    return dtype


def autocast_forward(
    model: nn.Module, device: torch.device, dtype: torch.dtype
) -> Callable[[Any], Tuple[torch.Tensor, Any]]:
    """``model``'s forward under ``torch.autocast(device.type, dtype)``, for ``custom_model_fwd``.

    Args:
        model (nn.Module): the DMP-wrapped task; ``model(batch) -> (loss, output)``.
        device (torch.device): where the model computes (autocast is per device type).
        dtype (torch.dtype): ``torch.bfloat16``.
    """

    def forward(batch: Any) -> Tuple[torch.Tensor, Any]:
        with torch.autocast(device.type, dtype=dtype):
            return model(batch)

    return forward
