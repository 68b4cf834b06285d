"""scripts/install.sh picks the index of the CUDA builds by the CUDA version the NVIDIA driver supports.

No GPU here: each case puts an ``nvidia-smi`` first on ``PATH`` that prints the header a driver of that
CUDA version prints (or fails, as on a machine without a driver). ``--print-cuda-index`` stops before
the script creates or installs anything.
"""

import os
import subprocess
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
