"""Build and install fastresnet. The top-level kernels/ folder installs as the subpackage fastresnet.kernels.

The C++/CUDA extension `fastresnet._C` (csrc/) is built with torch.utils.cpp_extension, so install with
`pip install --no-build-isolation -e .` (setup.py imports the installed torch). It holds the C++ CPU kernels always
and the CUDA kernels when torch has CUDA and nvcc is found; otherwise the CPU part alone is built, with a warning.
A failed compile is reported as a warning and the package installs without the extension: the "ext" backend then
reports why in `fastresnet.available_backends()` and "auto" uses the other backends.

Environment flags:
  FASTRESNET_SKIP_EXT=1        pure-Python install (no extension, torch not imported here)
  FASTRESNET_SKIP_CUDA=1       build only the C++ CPU kernels
  FASTRESNET_CUDA_ARCH="80;90" compute capabilities of the CUDA kernels (sm_80 and sm_90 by default)
"""
import importlib.metadata
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler ($CXX, else c++) compiles and links a trivial program with `flag`."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [os.environ.get("CXX", "c++"), flag, src, "-o", os.path.join(tmp, "probe")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _extension_build():
    """(ext_modules, cmdclass) for fastresnet._C, or ([], {}) when FASTRESNET_SKIP_EXT is set."""
    if _flag("FASTRESNET_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp", "csrc/bn_cpu.cpp", "csrc/unit.cpp"]
    # -ffp-contract=off: no a·b + c fused into an FMA, so the one-pass CPU kernels round like the ATen compositions
    # they replace (bn_cpu.cpp, bn_affine)
    # -g0: no debug information (Python's own CFLAGS ask for -g): a third less compile time and a smaller library
    cxx, link = ["-O3", "-ffp-contract=off", "-g0"], []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux") and _compiler_accepts("-fopenmp"):
        # at::parallel_for (the CPU kernels' tiles) runs threads only in code compiled with OpenMP: it is inline in
        # ATen's headers. Linux wheels of torch ship libgomp.so.1, which the extension then shares (one runtime,
        # following torch.set_num_threads); results do not depend on the thread count either way.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    nvcc_path = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    with_cuda = (not _flag("FASTRESNET_SKIP_CUDA") and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None and nvcc_path and os.path.exists(nvcc_path))
    if with_cuda:
        archs = [a.strip() for a in os.environ.get("FASTRESNET_CUDA_ARCH", "80;90").split(";") if a.strip()]
        nvcc = ["-O3", "-lineinfo"]
        for a in archs:
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = cpp_extension.CUDAExtension(
            "fastresnet._C", sources + ["csrc/bn_cuda.cpp", "csrc/cuda/bn_kernels.cu"],
            extra_compile_args={"nvcc": nvcc, "cxx": cxx + [
                "-DFASTRESNET_WITH_CUDA", f"-DFASTRESNET_CUDA_ARCHS={'_'.join(archs)}"]},  # _C.cuda_archs
            extra_link_args=link)
    else:
        why = ("FASTRESNET_SKIP_CUDA is set" if _flag("FASTRESNET_SKIP_CUDA") else
               "torch has no CUDA" if torch.version.cuda is None else "nvcc / CUDA_HOME not found")
        warnings.warn(f"fastresnet: building the C++ CPU kernels only ({why}); the CUDA kernels are not built")
        ext = cpp_extension.CppExtension("fastresnet._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension that turns a failed compile into a warning: the package still installs without _C."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001 — compiler/linker errors come as several exception types
                warnings.warn(f"fastresnet: building {extension.name} failed ({e}); installing without it — the "
                              "'ext' backend will be unavailable. Rebuild with `pip install --no-build-isolation "
                              "-e .` to see the compiler output.")

    return [ext], {"build_ext": BuildExt}


def _torchvision_for_installed_torch() -> str:
    """The torchvision requirement of the test extras. timm (real timm/torchvision models in tests/) needs
    torchvision, and every torchvision release pins one torch release, so an unpinned torchvision makes pip replace
    the installed torch with the newest. Torch 2.m pairs with torchvision 0.(m+15) (2.13 with 0.28), so that pin keeps
    the installed torch; with no torch installed yet pip picks a matching pair itself."""
    try:
        major, minor = importlib.metadata.version("torch").split("+")[0].split(".")[:2]
    except importlib.metadata.PackageNotFoundError:
        return "torchvision"
    return f"torchvision==0.{int(minor) + 15}.*" if major == "2" else "torchvision"


ext_modules, cmdclass = _extension_build()

setup(
    name="fastresnet",
    version="0.1.0",
    description="Fused BN-ReLU-conv kernels, model zoo and trainer for pre-activation ResNets (He et al., ECCV 2016)",
    python_requires=">=3.11",
    packages=find_packages(include=["fastresnet", "fastresnet.*"]) + ["fastresnet.kernels"],
    package_dir={"fastresnet.kernels": "kernels"},
    install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'", "numpy"],
    entry_points={"console_scripts": ["fastresnet=fastresnet.cli:main"]},
    extras_require={
        # hypothesis: property-based tests of every fused op (random shapes, layouts, dtypes, with shrinking of a
        # failing case to a minimal one), which hand-written parameter grids cover far less well
        # pytest-xdist: tests/run.sh runs the suite on every core (the Triton interpreter is CPU-bound);
        # pytest-timeout: a per-test timeout turns a hang into a failure with a stack instead of a stuck run.
        # pytest < 9.2: under pytest 9.2 pytest-xdist's --dist loadgroup silently stops grouping (pytest-xdist issue
        # #1386), so a module's shared fixture (smoke reproductions, the emulator build) is built on every worker
        "test": ["pytest<9.2", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "ninja", "pybind11", "scikit-learn",
                 "matplotlib", "hypothesis", "timm", _torchvision_for_installed_torch(),
                 # tests/test_export.py exports models with torch.onnx.export (both exporters; the dynamo one needs
                 # onnxscript) and runs them in onnxruntime against PyTorch
                 "onnx", "onnxscript", "onnxruntime"],
        "train": ["scikit-learn", "matplotlib"],
        # ONNX export (docs/deploy.md): torch.onnx.export's dynamo exporter needs onnx and onnxscript; onnxruntime
        # runs the exported model
        "export": ["onnx", "onnxscript", "onnxruntime"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
