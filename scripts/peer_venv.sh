#!/usr/bin/env bash
# Creates the separate venv that benchmarks/peers.py runs DeepCTR-Torch in (default .venv-peers).
#
# DeepCTR-Torch is a peer to compare against, not a dependency: it never enters the project's
# .venv. The peer venv is a plain venv (no system site-packages) with the same torch version as
# the project's venv (so both sides run the same kernels), numpy, `deepctr-torch` installed with --no-deps
# (its metadata would pull whatever torch it likes) and the light packages it imports
# (scikit-learn, tqdm, requests). A second run skips what is already installed (stamp file keyed
# by this script and the versions). A `.gitignore` inside the venv keeps it out of git.
#
# Usage: bash scripts/peer_venv.sh            # or PEER_VENV=/tmp/peers bash scripts/peer_venv.sh
# Env:   PYTHON (python3), PEER_VENV (.venv-peers), VENV (the project's venv, as in the Makefile: .venv),
#        TORCH_VERSION (that of $VENV, else 2.13.0;
#        a CPU build, 2.13.0+cpu, is installed as one), TORCH_CPU_INDEX_URL (where a CPU build comes
#        from when the configured sources lack it), DEEPCTR_VERSION (0.3.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PEER_VENV=${PEER_VENV:-.venv-peers}
VENV=${VENV:-.venv}
DEEPCTR_VERSION=${DEEPCTR_VERSION:-0.3.0}
if [ -z "${TORCH_VERSION:-}" ]; then
  # the CPU build keeps its +cpu (PyPI's plain build is a CUDA one of several GB); other labels
  # (+cu126: PyTorch's CUDA index) go, and the peer gets PyPI's build of that version
  TORCH_VERSION=$("$VENV/bin/python" -c 'import torch; v = torch.__version__; print(v if v.endswith("+cpu") else v.split("+")[0])' 2>/dev/null || echo 2.13.0)
fi

stamp_key=$( (cat scripts/peer_venv.sh; echo "$TORCH_VERSION $DEEPCTR_VERSION") | sha256sum | cut -c1-16)
stamp="$PEER_VENV/.peers_installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ] && [ -x "$PEER_VENV/bin/python" ]; then
  echo "[peer_venv] $PEER_VENV is up to date (torch $TORCH_VERSION, deepctr-torch $DEEPCTR_VERSION); skipping."
  exit 0
fi

# a venv without pip is made again: one whose creation failed (Debian's python3 without
# python3-venv leaves bin/python behind) or was interrupted; one whose python no longer runs (its base
# Python was removed) is cleared first, as `python3 -m venv` fails on the dangling bin/python3
if ! "$PEER_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  if [ -f "$PEER_VENV/pyvenv.cfg" ] && ! "$PEER_VENV/bin/python" -c '' >/dev/null 2>&1; then
    "$PYTHON" -m venv --clear "$PEER_VENV"
  else
    "$PYTHON" -m venv "$PEER_VENV"
  fi
fi
# from here on the venv changes: a run that fails or is interrupted must not leave the stamp of
# an earlier install behind for a later run (with that install's versions) to skip on
rm -f "$stamp"
printf '*\n' > "$PEER_VENV/.gitignore"
PIP=("$PEER_VENV/bin/python" -m pip)  # an array: a path with spaces stays one word
echo "[peer_venv] installing torch $TORCH_VERSION, deepctr-torch $DEEPCTR_VERSION into $PEER_VENV"
if [[ "$TORCH_VERSION" == *+cpu ]]; then  # as scripts/install.sh: the configured sources, else PyTorch's CPU index
  "${PIP[@]}" install --quiet "torch==$TORCH_VERSION" numpy 2>/dev/null \
    || "${PIP[@]}" install --quiet --extra-index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "torch==$TORCH_VERSION" numpy
else
  "${PIP[@]}" install --quiet "torch==$TORCH_VERSION" numpy
fi
"${PIP[@]}" install --quiet --no-deps "deepctr-torch==$DEEPCTR_VERSION"
"${PIP[@]}" install --quiet scikit-learn tqdm requests
# deepctr_torch asks PyPI for a newer version in a thread at import; point that at a closed
# local port so the check fails at once, here and in the benchmark.
HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
  "$PEER_VENV/bin/python" -c "
import torch, numpy, sklearn, deepctr_torch
from deepctr_torch.models import DeepFM
print('[peer_venv] torch', torch.__version__, 'numpy', numpy.__version__, 'deepctr-torch', deepctr_torch.__version__)
"
echo "$stamp_key" > "$stamp"
echo "[peer_venv] done."
