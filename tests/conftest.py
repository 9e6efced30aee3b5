import importlib.util

import pytest
import torch

from fastresnet.kernels import interpreting
from threads import one_torch_thread


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU machines)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    config.addinivalue_line("markers", "emulated: runs CUDA kernels on CPU under the checking emulator (tests/cuda_emu)")


# Modules whose every test is `slow` (left out of the quick tier, `-m "not slow"`), with what makes them so; single
# slow tests elsewhere carry the marker themselves.
SLOW_MODULES = {
    "test_reproduce.py": "smoke reproductions of every experiment of the paper",
    "test_static_sm90.py": "compiles every Triton launch of the zoo's nets for sm_90",
    "test_numerics_judge.py": "whole-net training steps on every backend, dtype and layout",
    "test_properties.py": "hypothesis examples of every fused op on every backend, Triton under the interpreter",
    "test_cuda_source.py": "nvcc builds of the CUDA kernels",
    "test_cpp_source.py": "C++17 compiles of the extension's sources against the torch headers",
    "test_convert_timm.py": "converts real timm models",
    "test_distributed.py": "spawns processes (torch.multiprocessing, torchrun)",
    "test_cuda_emulated.py": "builds the CUDA emulator and runs every CUDA kernel under it with sanitizers",
    "test_triton_gpu_tiles.py": "the conv kernels with a GPU's tiles under the interpreter",
    "test_gpu_session.py": "runs the GPU script's stages as processes",
    "test_kill_safety.py": "kills training processes at random moments",
    "test_convert_cold_start.py": "compiles a converted model in a fresh process",
    "test_export.py": "ONNX export and onnxruntime sessions",
    "test_compile.py": "torch.compile of whole models",
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    _group_shared_fixtures(items)
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (run on the device machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: folder names are keywords too
            item.add_marker(skip)


def pytest_collection_finish(session):
    """On an xdist worker under --dist loadgroup, warn when the groups did not take effect (pytest-xdist marks a
    grouped test by appending "@<group>" to its node id): the suite still passes, but builds shared fixtures once
    per worker and runs far longer."""
    if getattr(session.config.option, "loadgroup", False) and any(
            item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid for item in session.items):
        import warnings
        warnings.warn("pytest-xdist's --dist loadgroup is not grouping tests with this pytest/pytest-xdist pair "
                      "(setup.py's test extra pins a pair that does): shared fixtures are built on every worker")


# Modules whose shared fixture is cheaper to build on every worker than their tests are to run on one, so
# _group_shared_fixtures leaves them spread over the workers.
UNGROUPED = {
    "test_numerics_judge.py": "the float64 yardstick of two small nets (seconds); the interpreted cases take minutes",
}


def _group_shared_fixtures(items):
    """Under pytest-xdist with --dist loadgroup (tests/run.sh), the tests of a module that share a module- or
    session-scoped fixture (an nvcc build, smoke reproductions, subprocess runs) go to one worker, which builds the
    fixture once instead of once per worker (except the modules in UNGROUPED)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:  # the module chose its group itself
            continue
        if item.path.name in UNGROUPED:
            continue
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d[-1].scope in ("module", "session") and d[-1].baseid for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


# Modules that run the Triton kernels with the interpreter's 32-bit integer overflow checks
# (tests/triton_interpreter.py). Together they launch every kernel of kernels/, the conv kernels at each GPU tile
# class of the zoo: the largest indices the suite makes. The other tests run the same kernels at smaller indices,
# without the checks.
OVERFLOW_CHECKED = {"test_triton_kernels.py", "test_grid_barrier.py", "test_triton_gpu_tiles.py"}


@pytest.hookimpl(tryfirst=True)  # before the item's fixtures, which may launch kernels
def pytest_runtest_setup(item):
    if interpreting() and importlib.util.find_spec("triton") is not None:
        import triton_interpreter
        triton_interpreter.skip_repeated_language_patches()
        triton_interpreter.overflow_checks(item.path.name in OVERFLOW_CHECKED)


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    """Each test starts from seed 0 and the environment's default backend: an in-process trainer run or a
    set_backend call in one test does not change which backend the next test on that worker gets."""
    import fastresnet
    torch.manual_seed(0)
    fastresnet.set_backend(None)
    yield
    fastresnet.set_backend(None)


@pytest.fixture
def one_thread():
    with one_torch_thread():
        yield
