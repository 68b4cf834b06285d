"""One-line error texts: torch.load's weights-only refusal keeps its reason, not its advice to load the file anyway."""

import os
import pickle
import re

import pytest
import torch

from recsys_llm.error_text import telling_line, weights_only_reason


class _Calls:
    """What a crafted ``.pt`` holds: unpickling it would call ``function(*arguments)``."""

    def __init__(self, function, *arguments) -> None:
        self.function = function
        self.arguments = arguments

    def __reduce__(self):  # noqa: ANN204
        return (self.function, self.arguments)


@pytest.mark.parametrize("function, reason", [
    (exec, r"^Unsupported global: GLOBAL (builtins\.)?exec was not an allowed global by default\.$"),  # not allowlisted
    (os.system, r"^Trying to load unsupported GLOBAL posix\.system whose module posix is blocked\.$"),  # blocked
])
def test_a_weights_only_refusal_gives_its_reason_without_torchs_advice(tmp_path, function, reason) -> None:
    path = tmp_path / "crafted.pt"
    torch.save({"weight": _Calls(function, "true")}, str(path))
    with pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(str(path), weights_only=True)
    assert "weights_only" in str(refused.value)  # torch's own text advises loading it with weights_only=False
    found = weights_only_reason(refused.value)
    assert found is not None
    assert re.match(reason, found), found
    line = telling_line(refused.value)
    assert line == f"UnpicklingError: {found}"
    assert "weights_only" not in line and "Re-running" not in line and "allowlist" not in line


def test_other_errors_are_no_weights_only_refusal() -> None:
    assert weights_only_reason(ValueError("PytorchStreamReader failed reading zip archive")) is None
    assert telling_line(ValueError("first\nsecond")) == "ValueError: first"


def test_a_load_state_dict_error_keeps_its_first_missing_key_or_size_mismatch() -> None:
    """``load_state_dict``'s first line names no key ("Error(s) in loading state_dict for Linear:"): a damaged
    artifact's refusal said nothing more about what does not fit."""
    with pytest.raises(RuntimeError) as mismatch:
        torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)})
    assert telling_line(mismatch.value) == (
        "RuntimeError: Error(s) in loading state_dict for Linear: size mismatch for weight: copying a param with shape "
        "torch.Size([3, 4]) from checkpoint, the shape in current model is torch.Size([3, 2]).")
    with pytest.raises(RuntimeError) as missing:
        torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(3, 2)})
    assert telling_line(missing.value).endswith('Linear: Missing key(s) in state_dict: "bias".')
    # a state-dict error without its detail line (as a wrapper may re-raise it) is its one line, not an IndexError
    alone = RuntimeError("Error(s) in loading state_dict for Linear:")
    assert telling_line(alone) == "RuntimeError: Error(s) in loading state_dict for Linear:"
