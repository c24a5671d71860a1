#!/usr/bin/env bash
# The test suite (CPU, about 10 minutes on 2 cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec ${PYTHON:-python3} -m pytest -q "$@" tests
