"""The static sm_90 gate (benchmarks/static_sm90.py): the kernel launches of the zoo's nets, compiled for Hopper on a
CPU machine, stay within shared memory, do not spill in CIFAR bf16/fp16 configurations,
use tensor cores for bf16/fp16 dots and keep every program's serial loop bounded.

Cost: `test_gate_rules` is instant; `test_sm90_gate_cifar_subset` traces preact_resnet164 at batch 128 (bf16 and
fp32) on the meta device and compiles its ~110 distinct launches for sm_90: about 1.5 minutes on 2 cores. The whole
set (three nets × three dtypes, ~340 compiles, about 5 minutes on 2 cores) is `python benchmarks/static_sm90.py
--check`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import static_sm90 as gate

ROOT = Path(__file__).resolve().parents[1]


def _offline_compiler_missing():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton has no offline compile API: {e}"
    return None


def _row(**kw):
    row = dict(net="preact_resnet164", dtype="bf16", cifar=True, kernel="_conv_fwd_kernel", op="bn_relu_conv_stats",
               programs=1024, shared_bytes=32768, spill_store_bytes=0, spill_load_bytes=0, mma=0, wgmma=8,
               longest_loop=9, shape={"DOT_DTYPE": "bf16", "C_in": 16, "C_out": 16, "KH": 3, "STRIDE": 1})
    row.update(kw)
    return row


def test_gate_rules():
    """Each rule of the gate fires on a row that breaks it, and a clean row passes."""
    assert gate.violations(_row()) == []
    assert "shared memory" in " ".join(gate.violations(_row(shared_bytes=gate.SMEM_PER_BLOCK + 1)))
    assert "spills" in " ".join(gate.violations(_row(spill_store_bytes=8, spill_load_bytes=8)))
    assert "spills" in " ".join(gate.violations(_row(spill_load_bytes=4)))
    assert gate.violations(_row(dtype="fp32", spill_store_bytes=8, shape={"DOT_DTYPE": "fp32"})) == []
    assert gate.violations(_row(cifar=False, spill_store_bytes=8)) == []
    assert "mma" in " ".join(gate.violations(_row(wgmma=0)))
    assert "longest loop" in " ".join(gate.violations(_row(longest_loop=gate.LOOP_BOUND + 1)))
    # occupancy: 255 registers × 4 warps leave room for 2 blocks; 160 KB of shared memory for 1
    assert gate.blocks_per_sm(255, 0, 4) == (2, "registers")
    assert gate.blocks_per_sm(32, 160 * 1024, 4)[0] == 1


@pytest.mark.slow
@pytest.mark.skipif(_offline_compiler_missing() is not None, reason=str(_offline_compiler_missing()))
def test_sm90_gate_cifar_subset(tmp_path):
    out = tmp_path / "static.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_sm90.py"), "--subset", "--check",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kernels = {r["kernel"] for r in rows}
    # every kernel of the tier-A primitives and the tier-B conv is launched by a training step of the net
    assert {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "sum_groups_kernel",
            "_stats_partial_kernel", "_stats_merge_kernel", "_bn_relu_fwd_kernel", "_bn_relu_bwd_partial_kernel",
            "_bn_relu_bwd_merge_kernel", "_bn_relu_bwd_dx_kernel"} <= kernels, kernels
    # the launches are the GPU's: tensor-core bf16 dots on 64- or 128-row tiles, 132-SM grids, specialised
    # arguments; every conv launch of the net has at least one program per SM (stage 3, 8×8 at batch 128, included)
    bf16_convs = [r for r in rows if r["dtype"] == "bf16" and r["kernel"].startswith("_conv_")]
    assert bf16_convs and all(r["shape"]["DOT_DTYPE"] == "bf16" and r["shape"]["BLOCK_M"] in (64, 128)
                              and (r["mma"] or r["wgmma"]) for r in bf16_convs)
    convs = [r for r in rows if r["kernel"].startswith("_conv_")]
    assert all(r["programs"] >= gate.SMS for r in convs), sorted({(r["kernel"], r["programs"]) for r in convs})
    assert all(r["registers"] > 0 and r["blocks_per_sm"] >= 1 for r in rows)
    assert all(r["floor_us"] > 0 for r in rows)
