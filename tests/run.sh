#!/usr/bin/env bash
# The project's test command (README): installs what it needs on a fresh machine, then runs the suite on CPU with
# Triton kernels under the interpreter. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 2>/dev/null || python -c "import torch" # GPU machines: keep their torch
python -m pip install -q -e ".[test]"
export TRITON_INTERPRET=1
python -m pytest -q tests "$@"
