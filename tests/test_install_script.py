"""scripts/install.sh picks the index of the CUDA builds by the CUDA version the NVIDIA driver supports.

No GPU here: each case puts an ``nvidia-smi`` first on ``PATH`` that prints the header a driver of that
CUDA version prints (or fails, as on a machine without a driver). ``--print-cuda-index`` stops before
the script creates or installs anything. The whole-run cases (stamp, venv, torch replacement) give the script a
venv whose ``python`` logs its arguments instead of installing (``fake_install_env``), so no registry is asked.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADER = ("| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     "
          "CUDA Version: {cuda}     |")


def cuda_index(tmp_path: Path, driver_cuda: Optional[str], override: Optional[str] = None) -> str:
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    body = f"echo '{HEADER.format(cuda=driver_cuda)}'" if driver_cuda else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "TORCH_CUDA_INDEX_URL"}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    if override:
        env["TORCH_CUDA_INDEX_URL"] = override
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install.sh"), "--print-cuda-index"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("driver_cuda, index", [
    ("13.0", "https://pypi.org/simple"),  # PyPI's wheels are CUDA 13.0 builds
    ("13.2", "https://pypi.org/simple"),
    ("12.9", "https://download.pytorch.org/whl/cu128"),
    ("12.8", "https://download.pytorch.org/whl/cu128"),
    ("12.6", "https://download.pytorch.org/whl/cu126"),
    (None, "https://pypi.org/simple"),  # no driver to ask (an image build): PyPI's
])
def test_the_cuda_index_follows_the_drivers_cuda_version(tmp_path: Path, driver_cuda: Optional[str],
                                                         index: str) -> None:
    assert cuda_index(tmp_path, driver_cuda) == index


def test_a_driver_older_than_every_cuda_build_gets_no_index(tmp_path: Path) -> None:
    assert cuda_index(tmp_path, "12.4") == "none: the driver supports CUDA 12.4"


def test_torch_cuda_index_url_overrides_the_choice(tmp_path: Path) -> None:
    mirror = "https://mirror.example/whl/cu129"
    assert cuda_index(tmp_path, "13.0", override=mirror) == mirror


def fake_install_env(tmp_path: Path, driver_cuda: Optional[str]) -> dict:
    """Environment for a whole install.sh run that reaches no network: ``nvidia-smi`` as in ``cuda_index``,
    and a venv (``VENV``) whose ``bin/python`` logs its arguments to ``python.log`` and succeeds."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    body = f"echo '{HEADER.format(cuda=driver_cuda)}'" if driver_cuda else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    site = tmp_path / "site"
    # `-c "import torch..."` runs with the fake torch of ``fake_torch`` when there is one; all else succeeds
    python.write_text(f"#!/bin/sh\necho \"$*\" >> '{tmp_path / 'python.log'}'\n"
                      # FAIL_PIP_ON: a pip command holding that text fails (an install cut off half way)
                      "if [ -n \"$FAIL_PIP_ON\" ]; then case \"$*\" in *\"$FAIL_PIP_ON\"*) exit 1 ;; esac; fi\n"
                      # FAKE_PIP_CONFIG: what `pip config list` prints (the settings of pip.conf and PIP_*)
                      "if [ -n \"$FAKE_PIP_CONFIG\" ]; then case \"$*\" in *\"pip config list\"*)"
                      " printf '%s\\n' \"$FAKE_PIP_CONFIG\"; exit 0 ;; esac; fi\n"
                      f"if [ \"$1\" = -c ] && [ -d '{site / 'torch'}' ]; then\n"
                      f"  case \"$2\" in \"import torch\"*) PYTHONPATH='{site}' exec '{sys.executable}' \"$@\" ;; esac\n"
                      f"fi\n")
    python.chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if key not in ("TORCH_CUDA_INDEX_URL", "RECSYS_LLM_VARIANT", "TORCH_VERSION", "FBGEMM_VERSION",
                          "TORCHREC_VERSION")}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    env["VENV"] = str(venv)
    return env


def run_install(tmp_path: Path, env: dict, **extra: str) -> subprocess.CompletedProcess:
    log = tmp_path / "python.log"
    log.unlink(missing_ok=True)
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install.sh")], env={**env, **extra},
                          capture_output=True, text=True, timeout=60)


def test_a_failed_install_leaves_no_stamp_that_skips_the_next_run(tmp_path: Path) -> None:
    env = fake_install_env(tmp_path, driver_cuda="12.8")
    first = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu")
    assert first.returncode == 0, first.stderr
    assert "[install] done." in first.stdout
    # the CUDA install fails half way (fbgemm-gpu(-cpu) removed, the new one not installed)
    failed = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cuda", FAIL_PIP_ON="fbgemm-gpu==")
    assert failed.returncode != 0
    assert "uninstall --yes --quiet fbgemm-gpu fbgemm-gpu-cpu" in (tmp_path / "python.log").read_text()
    # so the CPU variant must be installed again, not skipped as up to date
    again = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu")
    assert again.returncode == 0, again.stderr
    assert "skipping" not in again.stdout
    assert "fbgemm-gpu-cpu==" in (tmp_path / "python.log").read_text()


def test_a_driver_too_old_for_every_cuda_build_is_refused_before_the_venv_changes(tmp_path: Path) -> None:
    """The refusal came after pip was upgraded and fbgemm-gpu(-cpu) uninstalled: a working CPU venv lost torchrec."""
    env = fake_install_env(tmp_path, driver_cuda="12.4")
    assert run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu").returncode == 0
    refused = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cuda")
    assert refused.returncode == 1 and "need 12.6 or newer" in refused.stderr
    log = tmp_path / "python.log"
    assert not log.exists() or "pip" not in log.read_text()  # no pip command ran
    again = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu")
    assert again.returncode == 0 and "skipping" in again.stdout  # the earlier install stands


def test_a_second_run_with_another_cuda_index_installs_from_it(tmp_path: Path) -> None:
    env = fake_install_env(tmp_path, driver_cuda="13.0")
    first = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cuda")
    assert first.returncode == 0, first.stderr
    assert "--index-url https://download.pytorch.org/whl/cu128" not in (tmp_path / "python.log").read_text()
    # the image's hosts have CUDA 12.8 drivers (docs/launch.md): the documented override must not be skipped
    again = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cuda",
                        TORCH_CUDA_INDEX_URL="https://download.pytorch.org/whl/cu128")
    assert again.returncode == 0, again.stderr
    assert "skipping" not in again.stdout
    assert "--index-url https://download.pytorch.org/whl/cu128 fbgemm-gpu==" in (tmp_path / "python.log").read_text()


def fake_torch(tmp_path: Path, version: str, cuda: Optional[str], dist_version: Optional[str] = None) -> None:
    """Puts a ``torch`` of that version and CUDA (None: a CPU build) into the fake venv of ``fake_install_env``;
    ``dist_version`` is the version of its wheel's metadata (what pip knows), ``version`` when None."""
    package = tmp_path / "site" / "torch"
    package.mkdir(parents=True)
    dist_info = tmp_path / "site" / f"torch-{dist_version or version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {dist_version or version}\n")
    (package / "__init__.py").write_text(
        f"__version__ = {version!r}\n"
        f"class version:\n    cuda = {cuda!r}\n"
        f"class cuda:\n    @staticmethod\n    def is_available():\n        return {cuda is not None}\n")


@pytest.mark.parametrize("driver_cuda, installed, expected", [
    # a venv from before install.sh moved to a newer torch: fbgemm-gpu fits only the new one
    ("12.8", ("2.12.0+cu128", "12.8"), "--index-url https://download.pytorch.org/whl/cu128 torch==2.13.0"),
    # installed for a CUDA 12.6 driver, then the driver was updated: PyPI's fbgemm-gpu is a CUDA 13.0 build
    ("13.0", ("2.13.0+cu126", "12.6"), "--isolated --index-url https://pypi.org/simple torch==2.13.0"),
])
def test_a_torch_that_does_not_fit_the_cuda_index_is_replaced(tmp_path: Path, driver_cuda: str, installed, expected) -> None:
    env = fake_install_env(tmp_path, driver_cuda=driver_cuda)
    fake_torch(tmp_path, *installed)
    result = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cuda", TORCH_VERSION="2.13.0")
    assert result.returncode == 0, result.stderr
    assert expected in (tmp_path / "python.log").read_text()


def test_a_failed_peer_venv_run_leaves_no_stamp_that_skips_the_next_run(tmp_path: Path) -> None:
    # scripts/peer_venv.sh with a venv whose python logs its arguments and fails on deepctr-torch while `broken` exists
    venv = tmp_path / "peers"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    log, broken = tmp_path / "python.log", tmp_path / "broken"
    python.write_text(f"#!/bin/sh\necho \"$*\" >> '{log}'\n"
                      f"case \"$*\" in *deepctr-torch==*) [ -e '{broken}' ] && exit 1 ;; esac\nexit 0\n")
    python.chmod(0o755)
    env = {**os.environ, "PEER_VENV": str(venv)}

    def peer_venv(torch_version: str) -> subprocess.CompletedProcess:
        log.unlink(missing_ok=True)
        return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "peer_venv.sh")],
                              env={**env, "TORCH_VERSION": torch_version}, capture_output=True, text=True, timeout=60)

    assert peer_venv("2.13.0").returncode == 0
    broken.touch()
    # torch 2.14.1 replaces 2.13.0 in the peer venv, then the run fails
    assert peer_venv("2.14.1").returncode != 0
    assert "torch==2.14.1" in log.read_text()
    broken.unlink()
    # so the peer venv is no longer the 2.13.0 one: it must be installed again, not skipped
    again = peer_venv("2.13.0")
    assert again.returncode == 0, again.stderr
    assert "skipping" not in again.stdout
    assert "torch==2.13.0" in log.read_text()


def test_a_venv_left_without_pip_is_made_again(tmp_path: Path) -> None:
    # Debian's python3 without python3-venv (no ensurepip), or an interrupt during `python3 -m venv`,
    # leaves the venv with bin/python but no pip: the next run must make it again, not fail on pip forever
    env = fake_install_env(tmp_path, driver_cuda=None)
    venv_python = Path(env["VENV"]) / "bin" / "python"
    working_python = venv_python.read_text()
    venv_python.write_text("#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    system_python = tmp_path / "python3"
    system_python.write_text(f"#!/bin/sh\necho \"$*\" >> '{tmp_path / 'python3.log'}'\n"
                             f"cat > '{venv_python}' <<'EOF'\n{working_python}EOF\n")
    system_python.chmod(0o755)
    result = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu", PYTHON=str(system_python))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "python3.log").read_text() == f"-m venv {env['VENV']}\n"
    assert "[install] done." in result.stdout


def test_a_peer_venv_left_without_pip_is_made_again(tmp_path: Path) -> None:
    venv_python = tmp_path / "peers" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    venv_python.chmod(0o755)
    system_python = tmp_path / "python3"
    system_python.write_text(f"#!/bin/sh\necho \"$*\" >> '{tmp_path / 'python3.log'}'\n"
                             f"printf '#!/bin/sh\\nexit 0\\n' > '{venv_python}'\n")
    system_python.chmod(0o755)
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "peer_venv.sh")],
                            env={**os.environ, "PEER_VENV": str(venv_python.parents[1]), "TORCH_VERSION": "2.13.0",
                                 "PYTHON": str(system_python)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "python3.log").read_text() == f"-m venv {venv_python.parents[1]}\n"


@pytest.mark.parametrize("variant", ["gpu", "CUDA"])
def test_a_variant_other_than_cuda_or_cpu_is_an_error(tmp_path: Path, variant: str) -> None:
    # not the CPU build in silence: RECSYS_LLM_VARIANT=gpu on an image build meant the CUDA one
    env = fake_install_env(tmp_path, driver_cuda=None)
    result = run_install(tmp_path, env, RECSYS_LLM_VARIANT=variant)
    assert result.returncode == 2
    assert f"RECSYS_LLM_VARIANT is {variant!r}" in result.stderr and "cuda or cpu" in result.stderr
    assert not (tmp_path / "python.log").exists()


def test_a_cpu_torch_is_installed_into_the_peer_venv_as_the_cpu_build(tmp_path: Path) -> None:
    # the same kernels as a CPU .venv, not PyPI's CUDA build (several GB): from PyTorch's CPU index
    # when the configured sources lack it
    venv = tmp_path / "peers"
    (venv / "bin").mkdir(parents=True)
    python, log = venv / "bin" / "python", tmp_path / "python.log"
    python.write_text(f"#!/bin/sh\necho \"$*\" >> '{log}'\n"
                      "case \"$*\" in *deepctr*) ;; *torch==*) case \"$*\" in *--extra-index-url*) ;; *) exit 1 ;; esac ;; esac\n"
                      "exit 0\n")
    python.chmod(0o755)
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "peer_venv.sh")],
                            env={**os.environ, "PEER_VENV": str(venv), "TORCH_VERSION": "2.13.0+cpu",
                                 "TORCH_CPU_INDEX_URL": "file:///cpu-wheels"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    torch_installs = [line for line in log.read_text().splitlines() if "torch==" in line and "deepctr" not in line]
    assert torch_installs == ["-m pip install --quiet torch==2.13.0+cpu numpy",
                              "-m pip install --quiet --extra-index-url file:///cpu-wheels torch==2.13.0+cpu numpy"]


@pytest.mark.parametrize("version, supported", [((3, 9), False), ((3, 15), False), ((3, 10), True), ((3, 14), True)])
def test_a_python_without_torch_wheels_is_an_error_naming_it(tmp_path: Path, version: tuple, supported: bool) -> None:
    # PYTHON=python3.9 made the venv, then pip failed on "ResolutionImpossible" for torch naming no Python version
    env = fake_install_env(tmp_path, driver_cuda=None)
    venv_python = Path(env["VENV"]) / "bin" / "python"
    as_version = tmp_path / "as_version.py"
    as_version.write_text(f"import sys\nsys.version_info = {(*version, 'final', 0)!r}\n"
                          "code = sys.argv[2]\nsys.argv = ['-c']\nexec(code)\n")
    logging_python = venv_python.read_text()
    venv_python.write_text(logging_python.replace(
        "#!/bin/sh\n", "#!/bin/sh\n"
        f"case \"$2\" in *version_info*) exec '{sys.executable}' '{as_version}' \"$@\" ;; esac\n", 1))
    result = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu")
    if supported:
        assert result.returncode == 0, result.stderr
        assert "[install] done." in result.stdout
    else:
        assert result.returncode == 2
        assert f"{venv_python} is Python {version[0]}.{version[1]};" in result.stderr
        assert "need Python 3.10-3.14" in result.stderr and f"remove {env['VENV']}" in result.stderr
        assert "torch==" not in (tmp_path / "python.log").read_text()


def test_the_peer_venv_takes_the_torch_of_the_venv_make_uses(tmp_path: Path) -> None:
    # `make bench VENV=...` (the Makefile takes VENV) installed .venv's torch, or PyPI's 2.13.0 (a CUDA
    # build of several GB) without a .venv, into the peer venv instead of the CPU build of the venv in use
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\necho 2.14.1+cpu\n")
    venv_python.chmod(0o755)
    peer_python, log = tmp_path / "peers" / "bin" / "python", tmp_path / "python.log"
    peer_python.parent.mkdir(parents=True)
    peer_python.write_text(f"#!/bin/sh\necho \"$*\" >> '{log}'\nexit 0\n")
    peer_python.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "TORCH_VERSION"}
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "peer_venv.sh")],
                            env={**env, "VENV": str(tmp_path / "venv"), "PEER_VENV": str(tmp_path / "peers")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "-m pip install --quiet torch==2.14.1+cpu numpy" in log.read_text().splitlines()


def test_a_venv_whose_python_no_longer_runs_is_made_again(tmp_path: Path) -> None:
    # the Python the venv was made from went away (a distribution upgrade, pyenv or Homebrew removing a version):
    # bin/python dangles, yet the stamp said "up to date" and `make test` failed on ".venv/bin/python: No such
    # file or directory"; without the stamp `python3 -m venv` failed on the dangling link ("[Errno 2] ... python3")
    env = fake_install_env(tmp_path, driver_cuda=None)
    first = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu")
    assert first.returncode == 0, first.stderr
    venv = Path(env["VENV"])
    venv_python = venv / "bin" / "python"
    working_python = venv_python.read_text()
    (venv / "pyvenv.cfg").write_text("home = /removed/python/bin\n")
    venv_python.unlink()
    venv_python.symlink_to("/removed/python/bin/python3")
    system_python = tmp_path / "python3"
    system_python.write_text(f"#!/bin/sh\necho \"$*\" >> '{tmp_path / 'python3.log'}'\n"
                             f"case \"$*\" in *--clear*) rm -f '{venv_python}' ;; esac\n"
                             f"[ -e '{venv_python}' ] || [ ! -L '{venv_python}' ] || exit 1\n"
                             f"cat > '{venv_python}' <<'EOF'\n{working_python}EOF\nchmod +x '{venv_python}'\n")
    system_python.chmod(0o755)
    again = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu", PYTHON=str(system_python))
    assert again.returncode == 0, again.stderr
    assert "skipping" not in again.stdout and "[install] done." in again.stdout
    assert (tmp_path / "python3.log").read_text() == f"-m venv --clear {venv}\n"


def test_a_peer_venv_whose_python_no_longer_runs_is_made_again(tmp_path: Path) -> None:
    # as for .venv: `python3 -m venv` failed on the dangling bin/python3 ("[Errno 2] ... python3") on every run
    venv = tmp_path / "peers"
    venv_python = venv / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /removed/python/bin\n")
    venv_python.symlink_to("/removed/python/bin/python3")
    system_python = tmp_path / "python3"
    system_python.write_text(f"#!/bin/sh\necho \"$*\" >> '{tmp_path / 'python3.log'}'\n"
                             f"case \"$*\" in *--clear*) rm -f '{venv_python}' ;; esac\n"
                             f"[ -e '{venv_python}' ] || [ ! -L '{venv_python}' ] || exit 1\n"
                             f"printf '#!/bin/sh\\nexit 0\\n' > '{venv_python}'\nchmod +x '{venv_python}'\n")
    system_python.chmod(0o755)
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "peer_venv.sh")],
                            env={**os.environ, "PEER_VENV": str(venv), "TORCH_VERSION": "2.13.0",
                                 "PYTHON": str(system_python)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "python3.log").read_text() == f"-m venv --clear {venv}\n"


def test_the_dependencies_installed_after_torch_keep_it(tmp_path: Path) -> None:
    """tensordict, peft and the rest came unconstrained after torch: one asking for another torch made pip
    replace it (PyPI's CUDA build, several GB, on a CPU machine), breaking fbgemm-gpu's match."""
    env = fake_install_env(tmp_path, driver_cuda=None)
    fake_torch(tmp_path, "2.13.0+cpu", None)
    result = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu", TORCH_VERSION="2.13.0")
    assert result.returncode == 0, result.stderr
    constraint = tmp_path / "venv" / "torch-constraint.txt"
    assert constraint.read_text() == "torch==2.13.0+cpu\n"
    log = (tmp_path / "python.log").read_text()
    assert f"install -c {constraint} pyre-extensions tensordict" in log
    assert f"install -c {constraint} -e .[dev,bench]" in log


def test_pypis_cuda_torch_is_kept_and_constrained_by_the_version_pip_knows(tmp_path: Path) -> None:
    """PyPI's CUDA build says ``2.13.0+cu130`` in ``torch.__version__`` while its wheel is 2.13.0: the constraint
    ``torch==2.13.0+cu130`` matched no wheel (ResolutionImpossible on tensordict), and the local-version check
    took it for PyTorch's index's build and installed it again. The CPU install's last resort (PyPI's plain
    build, e.g. on a Python whose +cpu wheel the configured sources lack) failed the same way."""
    env = fake_install_env(tmp_path, driver_cuda="13.0")
    fake_torch(tmp_path, "2.13.0+cu130", "13.0", dist_version="2.13.0")
    result = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cuda", TORCH_VERSION="2.13.0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "venv" / "torch-constraint.txt").read_text() == "torch==2.13.0\n"
    log = (tmp_path / "python.log").read_text()
    assert "uninstall --yes --quiet torch" not in log
    assert "--index-url https://pypi.org/simple torch==" not in log


def test_a_python_other_than_the_existing_venvs_is_named_not_silently_ignored(tmp_path: Path) -> None:
    """``make install PYTHON=python3.13`` over a .venv of 3.12 said only "up to date; skipping"."""
    env = fake_install_env(tmp_path, driver_cuda=None)
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.write_text('#!/bin/sh\ncase "$*" in *version_info*) echo 3.12 ;; esac\nexit 0\n')
    other = tmp_path / "bin" / "python3.13"
    other.write_text("#!/bin/sh\necho 3.13\n")
    other.chmod(0o755)
    assert run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu").returncode == 0
    same = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu", PYTHON=str(venv_python))
    assert same.returncode == 0 and "skipping" in same.stdout and "[install] note" not in same.stderr
    again = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu", PYTHON=str(other))
    assert again.returncode == 0 and "skipping" in again.stdout
    assert "is Python 3.12 and stays so; PYTHON=" in again.stderr and "(Python 3.13)" in again.stderr


def test_a_venv_path_with_a_space_installs_into_it(tmp_path: Path) -> None:
    """``PIP="$VENV/bin/python -m pip"`` split a VENV such as ``~/my envs/recsys`` at its space: every pip
    call ran ``.../my`` and the install failed ('No such file or directory')."""
    root = tmp_path / "my envs"
    root.mkdir()
    env = fake_install_env(root, driver_cuda=None)
    result = run_install(root, env, RECSYS_LLM_VARIANT="cpu", TORCH_VERSION="2.13.0")
    assert result.returncode == 0, result.stderr
    log = (root / "python.log").read_text()
    assert "-m pip install --no-deps fbgemm-gpu-cpu==" in log
    assert f"install -c {root / 'venv' / 'torch-constraint.txt'} -e .[dev,bench]" in log


def test_a_peer_venv_path_with_a_space_installs_into_it(tmp_path: Path) -> None:
    venv = tmp_path / "my envs" / "peers"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    log = tmp_path / "python.log"
    python.write_text(f"#!/bin/sh\necho \"$*\" >> '{log}'\nexit 0\n")
    python.chmod(0o755)
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "peer_venv.sh")],
                            env={**os.environ, "PEER_VENV": str(venv), "TORCH_VERSION": "2.13.0"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "-m pip install --quiet --no-deps deepctr-torch==" in log.read_text()


def test_make_passes_a_venv_path_with_a_space_whole(tmp_path: Path) -> None:
    """``VENV=$(VENV) bash scripts/install.sh`` ran the venv path's second word as the command."""
    venv = tmp_path / "my envs" / "venv"
    result = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), "demo", f"VENV={venv}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    install = shlex.split(next(line for line in lines if "scripts/install.sh" in line))
    assert f"VENV={venv}" in install
    demo = shlex.split(next(line for line in lines if "recsys_llm.cli demo" in line))
    assert demo[0] == f"{venv}/bin/python"


def test_make_passes_run_and_data_paths_with_a_space_whole(tmp_path: Path) -> None:
    """``make clean RUNS_DIR="my runs"`` would have removed ./my and ./runs."""
    runs, data = tmp_path / "my runs", tmp_path / "my data"
    for target, marker in (("clean", "rm -rf"), ("demo", "recsys_llm.cli demo")):
        result = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), target, f"RUNS_DIR={runs}", f"DATA_DIR={data}"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        words = shlex.split(next(line for line in result.stdout.splitlines() if marker in line))
        assert str(runs) in words or f"{runs}/demo" in words, words
        assert target == "clean" or f"{data}/synthetic" in words


def _nvidia_smi(tmp_path: Path, body: str) -> dict:
    """Environment whose ``nvidia-smi`` runs ``body`` (sh), for ``--print-cuda-index`` or a ``fake_install_env`` run."""
    env = fake_install_env(tmp_path, driver_cuda=None)
    (tmp_path / "bin" / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
    return env


# lists a GPU, but the header names no CUDA version (a driver that does not say, or garbage)
GPU_WITHOUT_CUDA_VERSION = ('case "$1" in -L) echo "GPU 0: NVIDIA H100 (UUID: GPU-1)" ;; '
                            '*) echo "| NVIDIA-SMI 580.1   Driver Version: 580.1   CUDA Version: N/A |" ;; esac')


def test_a_gpu_whose_driver_names_no_cuda_version_is_refused_before_the_venv_changes(tmp_path: Path) -> None:
    """PyPI's CUDA 13 builds were installed, and the stamp written, whatever CUDA the driver supports."""
    env = _nvidia_smi(tmp_path, GPU_WITHOUT_CUDA_VERSION)
    printed = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install.sh"), "--print-cuda-index"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert printed.stdout.strip() == ("none: nvidia-smi lists a GPU but its header names no CUDA version it supports "
                                      "('CUDA Version: x.y')")
    refused = run_install(tmp_path, env)
    assert refused.returncode == 1 and "set TORCH_CUDA_INDEX_URL" in refused.stderr
    log = tmp_path / "python.log"
    assert not log.exists() or "pip" not in log.read_text()  # no pip command ran
    mirror = "https://mirror.example/whl/cu129"
    chosen = run_install(tmp_path, env, TORCH_CUDA_INDEX_URL=mirror)  # the user names the index
    assert chosen.returncode == 0, chosen.stderr
    assert f"--index-url {mirror}" in log.read_text()


def test_a_hung_nvidia_smi_is_given_up_and_not_asked_when_the_variant_is_given(tmp_path: Path) -> None:
    """A hung driver hung the install (and make test), even with RECSYS_LLM_VARIANT=cpu."""
    env = _nvidia_smi(tmp_path, f"touch '{tmp_path / 'asked'}'; exec sleep 600")
    given = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cpu")
    assert given.returncode == 0, given.stderr
    assert not (tmp_path / "asked").exists()
    (tmp_path / "venv" / ".recsys_llm_installed").unlink()
    picked = run_install(tmp_path, env, RECSYS_LLM_SMI_TIMEOUT_S="1")
    assert picked.returncode == 0, picked.stderr
    assert "nvidia-smi -L gave no answer in 1 s: taken as no GPU" in picked.stderr
    assert "[install] variant: cpu" in picked.stdout
    for bad in ("abc", "0"):  # timeout's 125 (or no limit at all) read as "no GPU"
        refused = run_install(tmp_path, env, RECSYS_LLM_SMI_TIMEOUT_S=bad)
        assert refused.returncode == 2 and f"RECSYS_LLM_SMI_TIMEOUT_S is '{bad}'" in refused.stderr


def test_the_isolated_cuda_installs_keep_the_network_settings_of_the_pip_config(tmp_path: Path) -> None:
    """--isolated keeps find-links' CPU wheels out of the CUDA install; it also dropped pip.conf's proxy and certificate."""
    env = fake_install_env(tmp_path, driver_cuda="12.8")
    config = "\n".join(["global.cert='/etc/corp/ca.pem'", "global.find-links='/opt/wheels'",
                        "install.trusted-host='mirror.corp\\nindex.corp'", ":env:.proxy='http://proxy.corp:3128'",
                        ":env:.default-timeout='120'"])
    result = run_install(tmp_path, env, RECSYS_LLM_VARIANT="cuda", FAKE_PIP_CONFIG=config)
    assert result.returncode == 0, result.stderr
    options = ("--isolated --cert /etc/corp/ca.pem --trusted-host mirror.corp --trusted-host index.corp"
               " --proxy http://proxy.corp:3128 --timeout 120 --index-url https://download.pytorch.org/whl/cu128")
    log = (tmp_path / "python.log").read_text()
    assert f"{options} torch==" in log and f"--no-deps {options} fbgemm-gpu==" in log
    assert "/opt/wheels" not in log
