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


def _cuda_stack(monkeypatch: pytest.MonkeyPatch, torch_minor: str, fbgemm: str, torchrec: str) -> None:
    """PyTorch's CUDA index gives local versions (``fbgemm-gpu 1.8.0+cu128``), PyPI's none."""
    monkeypatch.setattr(env, "installed_versions", lambda: {
        "torch": f"{torch_minor}.0+cu128", "fbgemm-gpu": f"{fbgemm}+cu128", "fbgemm-gpu-cpu": "",
        "torchrec": f"{torchrec}+cu128",
    })


def test_cuda_builds_say_how_far_they_were_verified(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The CUDA build of a set whose CPU build passed the suite (what scripts/install.sh installs on a GPU) was called
    known good, and the set that ran on the H200 not verified."""
    torchrec, (fbgemm, torch_minors) = next(iter(env.KNOWN_GOOD.items()))
    _cuda_stack(monkeypatch, torch_minors[0], fbgemm, torchrec)
    env.check_versions(verbose=True)
    out = capsys.readouterr().out
    assert (f"fbgemm-gpu {fbgemm}+cu128, torchrec {torchrec}+cu128 (CUDA build, not verified on a GPU: the whole "
            "suite passed with the CPU build of these versions)") in out, out
    torchrec, (fbgemm, torch_minors) = next(iter(env.RAN_ON_A_GPU.items()))
    _cuda_stack(monkeypatch, torch_minors[0], fbgemm, torchrec)
    env.check_versions(verbose=True)
    assert "(CUDA build: ran the demo and tests/train/test_cuda.py on a GPU, not the whole suite)" in capsys.readouterr().out
    _cuda_stack(monkeypatch, "1.0", "0.0.1", "0.0.1")
    env.check_versions(verbose=True)
    assert "(CUDA build, not verified; the CPU builds known to work: torch 2.13" in capsys.readouterr().out


def _copied_env(package_dir):
    """``recsys_llm/env.py`` copied into ``package_dir`` (made here) and imported from there."""
    import importlib.util
    import shutil

    import recsys_llm.env

    package_dir.mkdir(parents=True)
    shutil.copy(recsys_llm.env.__file__, package_dir / "env.py")
    spec = importlib.util.spec_from_file_location("copied_env", package_dir / "env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_commit_is_this_checkouts_not_that_of_a_repository_the_package_is_installed_in(tmp_path) -> None:
    """Installed into a venv inside a user's git repository, exports recorded the user's project commit as
    `versions.recsys_llm_commit`. A copy the repository tracks (a vendored checkout) is its code: its commit."""
    import subprocess

    project = tmp_path / "project"
    project.mkdir()
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@x", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "user's project"], cwd=project, check=True)
    assert _copied_env(project / ".venv" / "site" / "recsys_llm").source_commit() == ""
    assert _copied_env(tmp_path / "no_repository" / "recsys_llm").source_commit() == ""
    vendored = _copied_env(project / "third_party" / "recsys_llm")
    subprocess.run(git + ["add", "third_party"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "vendored"], cwd=project, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True,
                            text=True).stdout.strip()
    assert vendored.source_commit() == commit


def test_a_package_copied_untracked_beside_tracked_files_records_no_commit(tmp_path) -> None:
    """What git tracks is this package's own file, not its directory's: a user's `vendor/` that commits a README
    and holds an untracked copy of the package recorded the user's commit as this code's."""
    import subprocess

    project = tmp_path / "project"
    (project / "vendor").mkdir(parents=True)
    (project / "vendor" / "README").write_text("third-party code\n")
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@x", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=project, check=True)
    subprocess.run(git + ["add", "vendor/README"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "user's project"], cwd=project, check=True)
    assert _copied_env(project / "vendor" / "recsys_llm").source_commit() == ""
