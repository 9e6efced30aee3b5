"""Static checks of the CUDA kernels (csrc/cuda/bn_kernels.cu) for sm_80 and sm_90, no GPU needed.

One nvcc build compiles the kernels as setup.py does (-O3 -lineinfo, sm_80 and sm_90) with ptxas's resource report
and the PTX kept, linked with a small host program that prints `num_tiles` for given shapes (host code only: it
runs without a GPU). From it: no kernel spills on either architecture; the reductions' merges are bounded (≤ 1024
partial rows per channel, each finalize lane merging every 32nd of them, then a barrier-synchronised tree); the
elementwise kernels' vector variants use 16-byte loads of x (sm_90 PTX). Skipped when nvcc is not found; the build
takes about 15 s.
"""
from __future__ import annotations

import math
import pathlib
import re
import shutil
import subprocess

import pytest

CUDA_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
SOURCE = CUDA_DIR / "bn_kernels.cu"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: cannot compile the CUDA kernels")

HARNESS = r"""
#include <cstdio>
#include "bn_kernels.h"
int main() {
  long long n, c, hw;
  int nhwc;
  while (std::scanf("%lld %lld %lld %d", &n, &c, &hw, &nhwc) == 4)
    std::printf("%lld\n", static_cast<long long>(fastresnet_cuda::num_tiles({n, c, hw, nhwc != 0})));
  return 0;
}
"""

# Kernel templates and how many instantiations the launchers make (dtype pairs × vector widths).
KERNELS = {"moments_partial_kernel": 8, "moments_finalize_kernel": 8, "bwd_partial_kernel": 6,
           "bwd_finalize_kernel": 2, "bn_relu_kernel": 12, "bwd_dx_kernel": 12, "affine_kernel": 2}
MAX_TILES, FINALIZE_LANES = 1024, 32
ARCHS = ("80", "90")


class Build:
    def __init__(self, tmp: pathlib.Path):
        (tmp / "harness.cpp").write_text(HARNESS)
        keep = tmp / "keep"
        keep.mkdir()
        self.binary = tmp / "num_tiles"
        gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
        cmd = ["nvcc", "-std=c++17", "-O3", "-lineinfo", *gencode, "-Xptxas", "-v", "--keep", "--keep-dir", str(keep),
               "-I", str(CUDA_DIR), str(SOURCE), str(tmp / "harness.cpp"), "-o", str(self.binary),
               "-Werror", "all-warnings"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        self.resources = self._parse_report(proc.stdout + proc.stderr)
        ptx = (keep / f"{SOURCE.stem}.compute_90.ptx").read_text()
        self.ptx = {m.group(1): m.group(0) for m in re.finditer(r"\.entry (\w+)\(.*?\n\}", ptx, re.S)}

    @staticmethod
    def _parse_report(text: str) -> dict[tuple[str, str], dict[str, int]]:
        """ptxas -v: (arch, mangled kernel name) -> registers, spill stores/loads, stack frame bytes."""
        out, name = {}, None
        for line in text.splitlines():
            if m := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
                name = (m.group(2), m.group(1))
                out[name] = {}
            elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                                          r"loads", line)):
                out[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
            elif name and (m := re.search(r"Used (\d+) registers", line)):
                out[name]["registers"] = int(m[1])
        return out

    def num_tiles(self, shapes: list[tuple[int, int, int, bool]]) -> list[int]:
        text = "".join(f"{n} {c} {hw} {int(nhwc)}\n" for n, c, hw, nhwc in shapes)
        proc = subprocess.run([str(self.binary)], input=text, capture_output=True, text=True, check=True)
        return [int(v) for v in proc.stdout.split()]


def _family(mangled: str) -> str:
    return next(k for k in KERNELS if re.search(rf"\d{k}I", mangled))


def _vector_width(mangled: str) -> int:
    """V of bn_relu_kernel<T, O, V> / bwd_dx_kernel<T, G, V> (the mangled template argument `Li<V>E`)."""
    return int(re.search(r"Li(\d+)EE", mangled).group(1))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return Build(tmp_path_factory.mktemp("cuda_source"))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiled_without_spills(build, arch):
    resources = {name: r for (a, name), r in build.resources.items() if a == arch}
    families = [_family(k) for k in resources]
    assert {f: families.count(f) for f in KERNELS} == KERNELS
    for name, r in resources.items():
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, (name, r)
        assert r["registers"] <= 255, (name, r)


def _zoo_shapes() -> list[tuple[int, int, int, bool]]:
    """(N, C, H·W) of the BN layers of CIFAR nets at batch 128 and ImageNet nets at batch 64, both layouts, and
    extremes: a 4096-image batch of 1×1 maps, and M = N·H·W = 2^32."""
    shapes = [(128, c, hw * hw, nhwc) for hw, c in ((32, 16), (32, 64), (16, 128), (8, 256)) for nhwc in (True, False)]
    shapes += [(64, c, hw * hw, nhwc) for hw, c in ((112, 64), (56, 256), (28, 512), (14, 1024), (7, 2048))
               for nhwc in (True, False)]
    return shapes + [(4096, 512, 1, False), (65536, 8, 65536, True), (65536, 8, 65536, False)]


def test_partial_rows_bounded_so_finalize_lanes_walk_at_most_32(build):
    shapes = _zoo_shapes()
    for (n, c, hw, nhwc), tiles in zip(shapes, build.num_tiles(shapes)):
        base = 256 if nhwc else 4096  # rows (NHWC) / elements (NCHW) of a channel in a base tile
        base_tiles = math.ceil(n * hw / base)
        assert 1 <= tiles <= MAX_TILES, ((n, c, hw, nhwc), tiles)
        assert math.ceil(tiles / FINALIZE_LANES) <= 32
        if base_tiles <= MAX_TILES:  # every CIFAR shape: the base tiling is kept
            assert tiles == base_tiles, ((n, c, hw, nhwc), tiles, base_tiles)
        else:  # larger tiles (a multiple of the base) cover M in fewer rows
            assert tiles < base_tiles


def test_finalize_merges_lanes_in_a_block_tree(build):
    """Each finalize kernel splits the partial rows over the tile lanes (threadIdx.y) and combines the lanes through
    shared memory between barriers: not one thread per channel walking every row."""
    finalizers = [k for k in build.ptx if _family(k).endswith("finalize_kernel")]
    assert len(finalizers) == 10
    for name in finalizers:
        body = build.ptx[name]
        assert "%tid.y" in body and "bar.sync" in body and "st.shared" in body, name
        assert re.search(r"\.maxntid 1024, 1, 1", body), name  # 32 channels × 32 tile lanes


def test_elementwise_vector_variants_load_16_bytes(build):
    elementwise = [k for k in build.ptx if _family(k) in ("bn_relu_kernel", "bwd_dx_kernel")]
    widths = sorted({_vector_width(k) for k in elementwise})
    assert widths == [1, 2, 4, 8]
    for name in elementwise:
        body = build.ptx[name]
        vector_loads = re.findall(r"ld\.global(?:\.nc)?\.(v4\.(?:u32|f32)|v2\.f64)", body)
        vector_stores = re.findall(r"st\.global\.v\d\.\w+", body)
        if _vector_width(name) > 1:
            assert vector_loads and vector_stores, name
        else:  # the scalar fallback for unaligned pointers or rows that are not whole vectors
            assert not vector_loads and not vector_stores, name


def test_affine_kernel_rounds_every_operation_as_aten_does(build):
    """bn_affine / scale_shift on CUDA must give the bits of ATen's composition (rsqrt(var + eps), γ·rstd,
    β − mean·scale: one rounding per operation). The float kernel: the add, multiplies and subtract are separately
    rounded instructions (`add.rn` / `mul.rn`, nothing contracted into an `fma`) around the math library's rsqrt,
    the instruction ATen's float rsqrt compiles to. (The double kernel calls the library's double rsqrt, a routine
    with its own internal FMAs, exactly as ATen's double kernel does.)"""
    (name,) = [k for k in build.ptx if _family(k) == "affine_kernel" and re.search(r"affine_kernelIfE", k)]
    body = build.ptx[name]
    assert "fma" not in body, body
    assert re.search(r"rsqrt\.approx\.f32", body)
    assert len(re.findall(r"add\.rn\.f32", body)) == 2 and len(re.findall(r"mul\.rn\.f32", body)) == 2, body
