#!/usr/bin/env bash
# Creates .venv (if missing) and installs recsys_llm with the torch/fbgemm-gpu/torchrec
# build that fits this machine: CUDA where nvidia-smi sees a GPU, CPU otherwise.
# RECSYS_LLM_VARIANT=cuda|cpu overrides the choice (e.g. a CUDA image built without a GPU).
# The CUDA build of torch and fbgemm-gpu comes from one index, picked by the CUDA version the
# driver supports (nvidia-smi's "CUDA Version"): PyPI's wheels are CUDA 13.0 builds, for a driver
# of CUDA 13 or newer (or none visible, e.g. an image build); a CUDA 12.8+ / 12.6+ driver gets
# PyTorch's cu128 / cu126 index; a GPU whose driver names no CUDA version, or one older than 12.6,
# is refused. TORCH_CUDA_INDEX_URL names the index instead;
# TORCH_CPU_INDEX_URL where the CPU torch build comes from when the configured sources lack it.
# A second run skips what is already installed (stamp file keyed by this script, setup.py, the
# variant, the versions and, for CUDA, the index).
# `install.sh --print-cuda-index` prints the CUDA index it would use and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
FBGEMM_VERSION=${FBGEMM_VERSION:-1.8.0}
TORCHREC_VERSION=${TORCHREC_VERSION:-1.8.0}
PYPI_INDEX=https://pypi.org/simple
PYTORCH_INDEX=https://download.pytorch.org/whl

# nvidia-smi with its arguments, given up after RECSYS_LLM_SMI_TIMEOUT_S (30) seconds: a hung driver would
# hang the install, and make test with it
SMI_TIMEOUT_S=${RECSYS_LLM_SMI_TIMEOUT_S:-30}
if ! [[ "$SMI_TIMEOUT_S" =~ ^[1-9][0-9]*$ ]]; then
  echo "[install] error: RECSYS_LLM_SMI_TIMEOUT_S is '$SMI_TIMEOUT_S'; expected a whole number of seconds > 0" >&2
  exit 2
fi
smi() {
  command -v nvidia-smi >/dev/null 2>&1 || return 127
  if command -v timeout >/dev/null 2>&1; then timeout "$SMI_TIMEOUT_S" nvidia-smi "$@"; else nvidia-smi "$@"; fi
}

# whether nvidia-smi lists a GPU
gpu_listed() {
  local code=0
  smi -L >/dev/null 2>&1 || code=$?
  if [ "$code" -eq 124 ]; then
    echo "[install] warning: nvidia-smi -L gave no answer in $SMI_TIMEOUT_S s: taken as no GPU" \
         "(RECSYS_LLM_VARIANT=cuda|cpu decides without asking it)" >&2
  fi
  return "$code"
}

# "13.0" from nvidia-smi's header; empty when there is no driver to ask, or its header names none
driver_cuda_version() {
  { smi 2>/dev/null || true; } | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1
}

# the index of the CUDA builds for a driver of CUDA $1; empty when torch $TORCH_VERSION has none for it
cuda_index() {
  local driver=$1 major minor
  if [ -n "${TORCH_CUDA_INDEX_URL:-}" ]; then echo "$TORCH_CUDA_INDEX_URL"; return; fi
  if [ -z "$driver" ]; then echo "$PYPI_INDEX"; return; fi
  major=${driver%%.*}
  minor=${driver#*.}
  if [ "$major" -ge 13 ]; then echo "$PYPI_INDEX"
  elif [ "$major" -eq 12 ] && [ "$minor" -ge 8 ]; then echo "$PYTORCH_INDEX/cu128"
  elif [ "$major" -eq 12 ] && [ "$minor" -ge 6 ]; then echo "$PYTORCH_INDEX/cu126"
  fi
}

# sets DRIVER_CUDA and CUDA_INDEX (empty: no CUDA build fits) and, when there is none, WHY_NO_INDEX;
# a GPU whose driver names no CUDA version gets no index: PyPI's CUDA 13 builds would fail on a CUDA 12 driver
choose_cuda_index() {
  DRIVER_CUDA=$(driver_cuda_version)
  CUDA_INDEX=$(cuda_index "$DRIVER_CUDA")
  WHY_NO_INDEX="the driver supports CUDA $DRIVER_CUDA"
  if [ -z "$DRIVER_CUDA" ] && [ -z "${TORCH_CUDA_INDEX_URL:-}" ] && gpu_listed; then
    CUDA_INDEX=""
    WHY_NO_INDEX="nvidia-smi lists a GPU but its header names no CUDA version it supports ('CUDA Version: x.y')"
  fi
}

if [ "${1:-}" = --print-cuda-index ]; then
  choose_cuda_index
  echo "${CUDA_INDEX:-none: $WHY_NO_INDEX}"
  exit 0
fi

# nvidia-smi is asked only when the variant is not given
VARIANT=${RECSYS_LLM_VARIANT:-}
if [ -z "$VARIANT" ]; then
  if gpu_listed; then VARIANT=cuda; else VARIANT=cpu; fi
fi
case "$VARIANT" in
  cuda | cpu) ;;
  *) echo "[install] error: RECSYS_LLM_VARIANT is '$VARIANT'; expected cuda or cpu (or unset: picked by nvidia-smi)" >&2
     exit 2 ;;
esac
DRIVER_CUDA=""
CUDA_INDEX=""
if [ "$VARIANT" = cuda ]; then
  choose_cuda_index
  # refused before anything changes: the venv of an earlier install still works
  if [ -z "$CUDA_INDEX" ]; then
    echo "[install] error: $WHY_NO_INDEX, and torch $TORCH_VERSION's CUDA builds need 12.6 or newer: update the" \
         "driver, set TORCH_CUDA_INDEX_URL to an index with a build for it, or install the CPU build" \
         "(RECSYS_LLM_VARIANT=cpu)" >&2
    exit 1
  fi
fi

# what was installed: a run that would install another variant, other versions or from another
# CUDA index (a driver update, TORCH_CUDA_INDEX_URL) does not skip
installed="$VARIANT torch $TORCH_VERSION fbgemm-gpu $FBGEMM_VERSION torchrec $TORCHREC_VERSION"
if [ "$VARIANT" = cuda ]; then installed="$installed from ${CUDA_INDEX:-none}"; fi
stamp_key=$( (cat scripts/install.sh setup.py; echo "$installed") | sha256sum | cut -c1-16)-$VARIANT
stamp="$VENV/.recsys_llm_installed"
# PYTHON makes a new venv only: one already there keeps its Python, which a user who names another is told
python_minor='import sys; print("%d.%d" % tuple(sys.version_info[:2]))'
note_kept_python() {
  local want have
  want=$("$PYTHON" -c "$python_minor" 2>/dev/null) || return 0
  have=$("$VENV/bin/python" -c "$python_minor" 2>/dev/null) || return 0
  if [ -n "$want" ] && [ -n "$have" ] && [ "$want" != "$have" ]; then
    echo "[install] note: $VENV is Python $have and stays so; PYTHON=$PYTHON (Python $want) makes a new" \
         "venv only: remove $VENV, or pass another VENV, to install with it" >&2
  fi
}
# skipped when the stamp matches and the venv's python still runs (its base Python may be gone since, e.g.
# removed by a distribution upgrade)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ] && "$VENV/bin/python" -c '' >/dev/null 2>&1; then
  note_kept_python
  echo "[install] $VENV is up to date ($VARIANT); skipping."
  exit 0
fi

# a venv without pip is made again: one whose creation failed (Debian's python3 without
# python3-venv leaves bin/python behind) or was interrupted; one whose python no longer runs (its base
# Python was removed) is cleared first, as `python3 -m venv` fails on the dangling bin/python3
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  if [ -f "$VENV/pyvenv.cfg" ] && ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    "$PYTHON" -m venv --clear "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
else
  note_kept_python
fi
# torch, fbgemm-gpu and torchrec have wheels for CPython 3.10-3.14 only; on another Python pip fails
# below with "no matching distribution" or a resolution conflict that names no Python version
if ! venv_python=$("$VENV/bin/python" -c \
    'import sys; v = sys.version_info; print("%d.%d" % tuple(v[:2])); sys.exit(not (3, 10) <= tuple(v[:2]) <= (3, 14))'); then
  echo "[install] error: $VENV/bin/python is Python ${venv_python:-of unknown version}; torch $TORCH_VERSION," \
       "fbgemm-gpu and torchrec need Python 3.10-3.14: remove $VENV and run again with PYTHON naming such a" \
       "Python (now PYTHON=$PYTHON; e.g. PYTHON=python3.12)" >&2
  exit 2
fi
# from here on the venv changes: a run that fails or is interrupted must not leave the stamp of
# an earlier install behind for a later run (of that install's variant) to skip on
rm -f "$stamp"
PIP=("$VENV/bin/python" -m pip)  # an array: a path with spaces stays one word
"${PIP[@]}" install --quiet --upgrade pip wheel setuptools

# --isolated (the CUDA installs from $CUDA_INDEX below) leaves out pip.conf and PIP_* variables, so that no
# CPU wheel they point at (find-links, extra indexes) stands in for the CUDA build; their network settings
# (certificate, proxy, trusted hosts, timeout, retries) are passed on as options
isolated_network_options() {
  local line key value host
  ISOLATED=(--isolated)
  while IFS= read -r line; do
    key=${line%%=*}; key=${key#*.}
    value=${line#*=}; value=${value#\'}; value=${value%\'}
    case "$key" in
      cert|client-cert|proxy|retries) ISOLATED+=("--$key" "$value") ;;
      timeout|default-timeout) ISOLATED+=(--timeout "$value") ;;
      trusted-host) for host in ${value//\\n/ }; do ISOLATED+=(--trusted-host "$host"); done ;;
    esac
  done < <("${PIP[@]}" config list 2>/dev/null | grep -E '^(global|install|:env:)\.' || true)
}

torch_cuda() { "$VENV/bin/python" -c "import torch; print(torch.version.cuda)" 2>/dev/null || echo missing; }
# the version pip knows (the wheel's metadata), not torch.__version__: PyPI's CUDA build says 2.13.0+cu130
# there while pip has it as 2.13.0, so a constraint or local-version check on __version__ matches no wheel
torch_version() {
  "$VENV/bin/python" -c "import torch, importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || echo missing
}

echo "[install] variant: $VARIANT (torch $TORCH_VERSION, fbgemm-gpu $FBGEMM_VERSION, torchrec $TORCHREC_VERSION)"
# fbgemm-gpu and fbgemm-gpu-cpu ship the same package directory: removing one of two installed
# deletes the other's files too, so both go and the chosen one is installed afresh below
"${PIP[@]}" uninstall --yes --quiet fbgemm-gpu fbgemm-gpu-cpu 2>/dev/null || true
if [ "$VARIANT" = cuda ]; then
  isolated_network_options
  echo "[install] CUDA build of torch and fbgemm-gpu from $CUDA_INDEX" \
       "(the driver supports CUDA ${DRIVER_CUDA:-?}; TORCH_CUDA_INDEX_URL overrides)"
  if [ "$CUDA_INDEX" = "$PYPI_INDEX" ]; then
    # PyPI's Linux torch wheels are CUDA builds, but pip prefers a visible "+cpu" wheel of the
    # same version (a CPU index or wheel folder in the pip config, or a CPU torch already here)
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  fi
  # a torch already here with another CUDA than the index's (.../cu128: 12.8), or of another
  # version than $TORCH_VERSION, is replaced; so is, for PyPI's index, one with a local version
  # (+cu126: PyTorch's index; PyPI has none), which pip takes as $TORCH_VERSION
  want_cuda=$(sed -n 's|.*/cu\([0-9]*\)\([0-9]\)/*$|\1.\2|p' <<<"$CUDA_INDEX")
  have_cuda=$(torch_cuda)
  have_version=$(torch_version)
  if [ "$have_cuda" = None ] || [ "$have_cuda" = missing ] || { [ -n "$want_cuda" ] && [ "$have_cuda" != "$want_cuda" ]; } \
      || [ "${have_version%%+*}" != "$TORCH_VERSION" ] \
      || { [ "$CUDA_INDEX" = "$PYPI_INDEX" ] && [ "$have_version" != "${have_version%%+*}" ]; }; then
    case "$have_cuda" in None) here="a CPU build" ;; missing) here="none" ;; *) here="$have_version, a CUDA $have_cuda build" ;; esac
    echo "[install] installing torch's CUDA build from $CUDA_INDEX (torch here: $here)"
    "${PIP[@]}" uninstall --yes --quiet torch 2>/dev/null || true
    "${PIP[@]}" install "${ISOLATED[@]}" --index-url "$CUDA_INDEX" "torch==$TORCH_VERSION"
  fi
  if [ "$(torch_cuda)" = None ]; then
    echo "[install] error: torch $TORCH_VERSION is still a CPU build; set TORCH_CUDA_INDEX_URL to an index with the CUDA build" >&2
    exit 1
  fi
  if [ "$CUDA_INDEX" = "$PYPI_INDEX" ]; then
    "${PIP[@]}" install --no-deps "fbgemm-gpu==$FBGEMM_VERSION"
  else
    "${PIP[@]}" install --no-deps "${ISOLATED[@]}" --index-url "$CUDA_INDEX" "fbgemm-gpu==$FBGEMM_VERSION"
  fi
  "${PIP[@]}" install --no-deps "torchrec==$TORCHREC_VERSION"
else
  # the CPU build: from the configured sources when they have it, else PyTorch's CPU index;
  # PyPI's plain build (CUDA, several GB) also runs on CPU and is the last resort
  cpu_index=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || { echo "[install] torch $TORCH_VERSION+cpu is not in the configured sources (pip's conflict above); trying $cpu_index"
         "${PIP[@]}" install --extra-index-url "$cpu_index" "torch==$TORCH_VERSION+cpu"; } \
    || { echo "[install] warning: no torch $TORCH_VERSION+cpu for this Python from $cpu_index either (TORCH_CPU_INDEX_URL" \
              "names another); installing PyPI's torch $TORCH_VERSION, a CUDA build of several GB that also runs on CPU" >&2
         "${PIP[@]}" install "torch==$TORCH_VERSION"; }
  "${PIP[@]}" install --no-deps "fbgemm-gpu-cpu==$FBGEMM_VERSION" "torchrec==$TORCHREC_VERSION"
fi
# the torch installed above stays: pip would otherwise replace it for a later dependency that asks
# for another torch (a new tensordict), taking PyPI's CUDA build on a CPU machine
keep_torch="$VENV/torch-constraint.txt"
echo "torch==$(torch_version)" > "$keep_torch"
# torchrec's pure-Python dependencies (installed explicitly because of --no-deps above).
"${PIP[@]}" install -c "$keep_torch" pyre-extensions tensordict "torchmetrics>=1.0.3" tqdm iopath
"${PIP[@]}" install -c "$keep_torch" -e ".[dev,bench]"
"$VENV/bin/python" -c "import recsys_llm.env as e; e.check_versions(verbose=True)"
if [ "$VARIANT" = cuda ] && ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  driver=$(smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
  echo "[install] warning: the CUDA build is installed but torch sees no GPU (driver: ${driver:-none found});" \
       "torch $TORCH_VERSION needs an NVIDIA driver for CUDA $(torch_cuda). Training with device auto falls back to CPU." >&2
fi
echo "$stamp_key" > "$stamp"
echo "[install] done."
