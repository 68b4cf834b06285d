"""Exceptions as one line of text, for error messages that name a file or option and say why.

Example::

    try:
        load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: damaged ({one_line(error)}); write it again") from error
"""

from typing import Optional


def one_line(error: BaseException) -> str:
    """``str(error)`` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(error).split())


# torch.load(weights_only=True)'s refusal: its first line, and the advice around the reason (to load the
# file with weights_only=False, or to allowlist the global it names), which a refused file must not get
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
_TORCH_LOAD_ADVICE = ("This file can still be loaded", "(1)", "(2)", "In PyTorch 2.6", "Please file an issue",
                      "Check the documentation of torch.load")


def weights_only_reason(error: BaseException) -> Optional[str]:
    """Why ``torch.load(weights_only=True)`` refused a file (``Unsupported global: GLOBAL builtins.exec ...``,
    ``Trying to load unsupported GLOBAL posix.system whose module posix is blocked.``), without torch's
    advice; None when ``error`` is no such refusal."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines or not lines[0].startswith(_WEIGHTS_ONLY_REFUSAL):
        return None
    first = lines[0][len(_WEIGHTS_ONLY_REFUSAL):].lstrip(". ")  # the reason itself in some refusals
    for line in ([first] if first else []) + lines[1:]:
        if not line.startswith(_TORCH_LOAD_ADVICE):
            return line.removeprefix("WeightsUnpickler error:").strip().split(" Please ")[0]
    return None


# nn.Module.load_state_dict's RuntimeError: this line, then one line per missing / unexpected key or size mismatch
_STATE_DICT_ERRORS = "Error(s) in loading state_dict"


def telling_line(error: BaseException) -> str:
    """``error`` as ``Type: message``, cut to its most telling line (at most 500 characters; a ``load_state_dict``
    error's first two: the first names no key)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch.load's weights-only refusal opens with advice; the reason is on a later line
    reason = weights_only_reason(error)
    if reason is None:
        reason = next((line for line in lines if "Unsupported global" in line or "WeightsUnpickler" in line), None)
        if reason is not None:  # drop its advice to allowlist the global: the file is refused, not to be trusted
            reason = reason.split(" Please ")[0]
    if reason is None and len(lines) > 1 and lines[0].startswith(_STATE_DICT_ERRORS):
        reason = f"{lines[0]} {lines[1]}"  # its first line names no key: the first missing key or size mismatch
    return f"{type(error).__name__}: {reason or (lines[0] if lines else '')}"[:500]
