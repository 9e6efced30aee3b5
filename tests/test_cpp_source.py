"""The extension's C++ sources compile as C++17, not only as the C++20 this torch builds extensions with.

torch 2.13 passes -std=c++20 to extension builds; older releases (torch 2.11 among them) pass -std=c++17, and
setup.py turns a failed build into a warning, so a C++20-only construct would leave such a machine without
fastresnet._C and its tests skipped rather than failed. A syntax-only compile of the host sources against the
installed torch headers catches that here (bn_cuda.cpp needs CUDA headers and is left to the CUDA build). The three
sources are checked as one translation unit, so the torch headers are parsed once; that each source includes what
it uses is the real build's to check (it compiles them one by one).
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils import cpp_extension

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
CXX = shutil.which("c++") or shutil.which("g++")


SOURCES = ("ops.cpp", "bn_cpu.cpp", "unit.cpp")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler found")
def test_compiles_as_cpp17(tmp_path):
    unit = tmp_path / "host_sources.cpp"
    unit.write_text("".join(f'#include "{CSRC / s}"\n' for s in SOURCES))
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           *includes, str(unit)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
