import sys

import pytest

from recsys_llm import env


def test_the_installed_stack_imports_and_is_reported(capsys: pytest.CaptureFixture) -> None:
    versions = env.check_versions(verbose=True)
    assert versions["torchrec"]
    assert f"torchrec {versions['torchrec']}" in capsys.readouterr().out


def test_a_stack_that_does_not_import_names_the_versions_found_and_those_that_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "fbgemm_gpu", None)
    with pytest.raises(RuntimeError) as raised:
        env.check_versions()
    message = str(raised.value)
    assert f"torch {env.installed_versions()['torch']}" in message
    for torchrec, (fbgemm, torch_minors) in env.KNOWN_GOOD.items():
        assert f"torch {' or '.join(torch_minors)} + fbgemm-gpu {fbgemm} + torchrec {torchrec}" in message


def test_an_unverified_stack_is_reported_with_the_known_good_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(env, "KNOWN_GOOD", {"0.0.1": ("0.0.1", ("1.0",))})
    env.check_versions(verbose=True)
    assert "not verified; known to work: torch 1.0 + fbgemm-gpu 0.0.1 + torchrec 0.0.1" in capsys.readouterr().out


def test_cuda_builds_of_a_known_good_stack_are_reported_known_good(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """PyTorch's CUDA index gives local versions (``fbgemm-gpu 1.8.0+cu128``, ``torchrec 1.8.0+cu128``):
    the release is what ``KNOWN_GOOD`` lists, so scripts/install.sh's CUDA stack is not "not verified"."""
    torchrec, (fbgemm, torch_minors) = next(iter(env.KNOWN_GOOD.items()))
    monkeypatch.setattr(env, "installed_versions", lambda: {
        "torch": f"{torch_minors[0]}.0+cu128", "fbgemm-gpu": f"{fbgemm}+cu128", "fbgemm-gpu-cpu": "",
        "torchrec": f"{torchrec}+cu128",
    })
    env.check_versions(verbose=True)
    out = capsys.readouterr().out
    assert f"fbgemm-gpu {fbgemm}+cu128, torchrec {torchrec}+cu128 (known good)" in out, out
