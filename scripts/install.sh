#!/usr/bin/env bash
# Creates .venv (if missing) and installs recsys_llm with the torch/fbgemm-gpu/torchrec
# build that fits this machine: CUDA where nvidia-smi sees a GPU, CPU otherwise.
# RECSYS_LLM_VARIANT=cuda|cpu overrides the choice (e.g. a CUDA image built without a GPU);
# TORCH_CUDA_INDEX_URL / TORCH_CPU_INDEX_URL name where the CUDA / CPU torch builds come from.
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

torch_cuda() { "$VENV/bin/python" -c "import torch; print(torch.version.cuda)" 2>/dev/null || echo missing; }

echo "[install] variant: $VARIANT (torch $TORCH_VERSION, fbgemm-gpu $FBGEMM_VERSION, torchrec $TORCHREC_VERSION)"
# fbgemm-gpu and fbgemm-gpu-cpu ship the same package directory: removing one of two installed
# deletes the other's files too, so both go and the chosen one is installed afresh below
$PIP uninstall --yes --quiet fbgemm-gpu fbgemm-gpu-cpu 2>/dev/null || true
if [ "$VARIANT" = cuda ]; then
  # PyPI's Linux torch wheels are CUDA builds, but pip prefers a visible "+cpu" wheel of the
  # same version (a CPU index or wheel folder in the pip config, or a CPU torch already here)
  $PIP install "torch==$TORCH_VERSION"
  if [ "$(torch_cuda)" = None ]; then
    index=${TORCH_CUDA_INDEX_URL:-https://pypi.org/simple}
    echo "[install] torch here is a CPU build; installing the CUDA build from $index (TORCH_CUDA_INDEX_URL)"
    $PIP uninstall --yes --quiet torch
    $PIP install --isolated --index-url "$index" "torch==$TORCH_VERSION"
  fi
  if [ "$(torch_cuda)" = None ]; then
    echo "[install] error: torch $TORCH_VERSION is still a CPU build; set TORCH_CUDA_INDEX_URL to an index with the CUDA build" >&2
    exit 1
  fi
  $PIP install --no-deps "fbgemm-gpu==$FBGEMM_VERSION" "torchrec==$TORCHREC_VERSION"
else
  # the CPU build: from the configured sources when they have it, else PyTorch's CPU index;
  # PyPI's plain build (CUDA, several GB) also runs on CPU and is the last resort
  $PIP install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || $PIP install --extra-index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "torch==$TORCH_VERSION+cpu" \
    || $PIP install "torch==$TORCH_VERSION"
  $PIP install --no-deps "fbgemm-gpu-cpu==$FBGEMM_VERSION" "torchrec==$TORCHREC_VERSION"
fi
# torchrec's pure-Python dependencies (installed explicitly because of --no-deps above).
$PIP install pyre-extensions tensordict "torchmetrics>=1.0.3" tqdm iopath
$PIP install -e ".[dev,bench]"
"$VENV/bin/python" -c "import recsys_llm.env as e; e.check_versions(verbose=True)"
if [ "$VARIANT" = cuda ] && ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
  echo "[install] warning: the CUDA build is installed but torch sees no GPU (driver: ${driver:-none found});" \
       "torch $TORCH_VERSION needs an NVIDIA driver for CUDA $(torch_cuda). Training with device auto falls back to CPU." >&2
fi
echo "$stamp_key" > "$stamp"
echo "[install] done."
