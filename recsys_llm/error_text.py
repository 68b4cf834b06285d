"""Exceptions as one line of text, for error messages that name a file or option and say why.

Example::

    try:
        load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: damaged ({one_line(error)}); write it again") from error
"""


def one_line(error: BaseException) -> str:
    """``str(error)`` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(error).split())


def telling_line(error: BaseException) -> str:
    """``error`` as ``Type: message``, cut to its most telling line (at most 500 characters)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch.load's weights-only refusal opens with advice; the reason is on a later line
    reason = next((line for line in lines if "Unsupported global" in line or "WeightsUnpickler" in line), None)
    if reason is not None:  # drop its advice to allowlist the global: the file is refused, not to be trusted
        reason = reason.split(" Please ")[0]
    return f"{type(error).__name__}: {reason or (lines[0] if lines else '')}"[:500]
