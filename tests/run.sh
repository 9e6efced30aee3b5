#!/usr/bin/env bash
# The project's test command (README, CI): installs what it needs on a fresh machine, then runs the suite on CPU
# with Triton kernels under the interpreter, one pytest worker per core. Extra arguments go to pytest, e.g.
# `bash tests/run.sh -m "not slow"` (the quick tier) or `bash tests/run.sh tests/test_nn.py`.
# FASTRESNET_TEST_WORKERS sets the number of workers (default: one per core; 0 runs in one process).
set -euo pipefail
cd "$(dirname "$0")/.."

# The install is skipped when it is current: the stamp holds a hash of everything the install depends on (the
# build files, the C++/CUDA sources, the Python and torch in use), written after an install whose extension loads.
stamp=build/install-stamp
install_hash() {
    python - <<'EOF'
import hashlib, pathlib, sys
h = hashlib.sha256(sys.executable.encode())
try:
    import torch
    h.update(torch.__version__.encode())
except ImportError:
    h.update(b"no torch")
for p in sorted([pathlib.Path("setup.py"), pathlib.Path("pyproject.toml"), *pathlib.Path("csrc").rglob("*")]):
    if p.is_file():
        h.update(str(p).encode() + b"\0" + p.read_bytes())
print(h.hexdigest())
EOF
}
current() {
    [[ -f $stamp && "$(cat "$stamp")" == "$(install_hash)" ]] &&
        python -c "import fastresnet._C" 2>/dev/null &&
        python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in (
            'pytest', 'xdist', 'pytest_timeout', 'pytest_benchmark', 'hypothesis', 'timm', 'torchvision', 'sklearn',
            'matplotlib')))"
}
if current; then
    echo "fastresnet is installed and current (stamp $stamp); skipping the install"
else
    # a machine's own torch (e.g. a CUDA build on a GPU machine) is kept; a fresh machine gets the CPU build
    python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
    # setup.py imports torch to build the C++/CUDA extension (csrc/), so install without build isolation; the build
    # tools it needs (setuptools, wheel, ninja) must be present first.
    python -m pip install -q setuptools wheel ninja 2>/dev/null || python -c "import setuptools" # offline GPU machines
    # the extension builds in place (fastresnet/_C*.so, found in the source tree by the editable install) while pip
    # installs the package, without building it, and the test dependencies: the two overlap on a fresh machine
    FASTRESNET_SKIP_EXT=1 python -m pip install -q --no-build-isolation -e ".[test]" &
    pip_pid=$!
    mkdir -p build
    python setup.py -q build_ext --inplace >build/ext-build.log 2>&1 || true # judged by the import below
    wait "$pip_pid"
    # setup.py turns a failed extension build into a warning (users still get the Python backends); the tests must not
    python -c "import fastresnet._C" || {
        tail -n 40 build/ext-build.log >&2; echo "the C++ extension fastresnet._C did not build" >&2; exit 1; }
    install_hash > "$stamp.tmp.$$" && mv "$stamp.tmp.$$" "$stamp"
fi

export TRITON_INTERPRET=1
workers=${FASTRESNET_TEST_WORKERS:-auto}
if [[ $workers == 0 ]]; then
    python -m pytest -q tests "$@"
else
    python -m pytest -q -n "$workers" --dist loadgroup tests "$@"
fi
