#!/usr/bin/env bash
# Creates .venv (if missing) and installs recsys_llm with the torch/fbgemm-gpu/torchrec
# build that fits this machine: CUDA where nvidia-smi sees a GPU, CPU otherwise.
# A second run skips what is already installed (stamp file keyed by this script and setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
FBGEMM_VERSION=${FBGEMM_VERSION:-1.8.0}
TORCHREC_VERSION=${TORCHREC_VERSION:-1.8.0}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  VARIANT=cuda
else
  VARIANT=cpu
fi
VARIANT=${RECSYS_LLM_VARIANT:-$VARIANT}

stamp_key=$(cat scripts/install.sh setup.py | sha256sum | cut -c1-16)-$VARIANT
stamp="$VENV/.recsys_llm_installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ]; then
  echo "[install] $VENV is up to date ($VARIANT); skipping."
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip wheel setuptools

echo "[install] variant: $VARIANT (torch $TORCH_VERSION, fbgemm-gpu $FBGEMM_VERSION, torchrec $TORCHREC_VERSION)"
if [ "$VARIANT" = cuda ]; then
  # PyPI's Linux torch wheels are CUDA builds; fbgemm-gpu must match torch (docs/install.md).
  $PIP install "torch==$TORCH_VERSION"
  $PIP install --no-deps "fbgemm-gpu==$FBGEMM_VERSION" "torchrec==$TORCHREC_VERSION"
else
  $PIP install "torch==$TORCH_VERSION"
  $PIP install --no-deps "fbgemm-gpu-cpu==$FBGEMM_VERSION" "torchrec==$TORCHREC_VERSION"
fi
# torchrec's pure-Python dependencies (installed explicitly because of --no-deps above).
$PIP install pyre-extensions tensordict "torchmetrics>=1.0.3" tqdm iopath
$PIP install -e ".[dev,bench]"
"$VENV/bin/python" -c "import recsys_llm.env as e; e.check_versions(verbose=True)"
echo "$stamp_key" > "$stamp"
echo "[install] done."
