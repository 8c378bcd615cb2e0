#!/usr/bin/env bash
# Set up gradtrace on a fresh machine: CPU PyTorch first (so nothing pulls a CUDA build),
# then the project with every extra and the test tools, then Chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# PIP_BREAK_SYSTEM_PACKAGES lets a Debian system Python (PEP 668) install too; no effect elsewhere.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_BREAK_SYSTEM_PACKAGES=1
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[all,test]"
# Under pyenv a new console script needs its shim before `gradtrace` is on PATH.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium not found (install Debian's 'chromium' package for the browser test)" >&2
  fi
fi
$PY -c "import torch, gradtrace; print('torch', torch.__version__, '| gradtrace', gradtrace.__version__)"
