"""The static sm_90 gate (benchmarks/static_sm90.py): the kernel launches of the zoo's nets, compiled for Hopper on a
CPU machine, stay within shared memory, do not spill in CIFAR bf16/fp16 configurations,
use tensor cores for bf16/fp16 dots, keep every program's serial loop bounded and, at CIFAR sizes, give every SM a
program (all kernels but the merges of partials).

Cost: `test_gate_rules` is instant; `test_replay_is_channels_last` traces and replays preact_resnet164 at batch 8
(no compile, a few seconds); `test_sm90_gate_cifar_subset` traces preact_resnet164 at batch 128 (bf16) on the
meta device and compiles its 64 distinct launches for sm_90: under a minute on 2 cores;
`test_another_batch_compiles_nothing_new` records preact_resnet20's launches at two batch sizes (no compile, about
20 s). The whole set (six nets × three dtypes, ~520 compiles, about 10–12 minutes on 2 busy cores) is
`python benchmarks/static_sm90.py --check`.
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
    # fewer programs than SMs: a violation for a CIFAR launch of any dtype, except the merges and ImageNet
    for dtype in ("bf16", "fp32"):
        assert "programs" in " ".join(gate.violations(_row(dtype=dtype, programs=gate.SMS - 1)))
    assert "programs" in " ".join(gate.violations(_row(kernel="_bn_relu_bwd_dx_kernel", programs=128, wgmma=0,
                                                       shape={})))
    assert gate.violations(_row(programs=gate.SMS)) == []
    assert gate.violations(_row(cifar=False, programs=64)) == []
    for merge in gate.MERGE_KERNELS:
        assert gate.violations(_row(kernel=merge, programs=1, wgmma=0, shape={})) == []
    # occupancy: 255 registers × 4 warps leave room for 2 blocks; 160 KB of shared memory for 1
    assert gate.blocks_per_sm(255, 0, 4) == (2, "registers")
    assert gate.blocks_per_sm(32, 160 * 1024, 4)[0] == 1


# per launch of a replayed preact_resnet164 step: (kernel, whether its activation x is NHWC: channels innermost)
_REPLAY_LAYOUTS = """
import json, torch
from benchmarks import static_sm90 as gate
launches = gate.record_launches(gate.trace_calls("preact_resnet164", 8, 32, torch.bfloat16))
print(json.dumps([(la["fn"].fn.__name__, bool(la["values"].get("NHWC", la["values"]["x_ptr"].stride()[1] == 1)))
                  for la in launches if "x_ptr" in la["values"]]))
"""


def _compiled_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted


@pytest.mark.skipif(_offline_compiler_missing() is not None, reason=str(_offline_compiler_missing()))
def test_replay_is_channels_last():
    """The replay makes the GPU's launches: NHWC throughout, also where meta kernels return NCHW (the stem, the
    plain convs of a shared pre-activation) and for the saved activations a unit's backward gets as a list. In a
    subprocess: the replay records compiled kernels' launches, which TRITON_INTERPRET=1 would replace."""
    run = subprocess.run([sys.executable, "-c", _REPLAY_LAYOUTS], cwd=ROOT, env=_compiled_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    layouts = json.loads(run.stdout.strip().splitlines()[-1])
    kernels = {k for k, _ in layouts}
    assert {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_stats_partial_kernel",
            "_bn_relu_bwd_dx_kernel"} <= kernels, kernels
    assert all(nhwc for _, nhwc in layouts), sorted({k for k, nhwc in layouts if not nhwc})


@pytest.mark.slow
@pytest.mark.skipif(_offline_compiler_missing() is not None, reason=str(_offline_compiler_missing()))
def test_sm90_gate_cifar_subset(tmp_path):
    out = tmp_path / "static.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_sm90.py"), "--subset", "--check",
                          "--out", str(out)], cwd=ROOT, env=_compiled_env(), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kernels = {r["kernel"] for r in rows}
    # every kernel of the tier-A primitives and the tier-B conv is launched by a training step of the net (tier A's
    # training BN backward as its grid-barrier launch, replayed with tier A's two barrier kernels); the merges are
    # finished inside the launches that write the partials (no separate merge launch at batch 128)
    assert {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_stats_partial_kernel",
            "_bn_relu_fwd_kernel", "_stats_bn_relu_fwd_kernel", "_bn_relu_bwd_fused_kernel",
            "_bn_relu_bwd_dx_kernel"} <= kernels, kernels
    assert not kernels & {"sum_groups_kernel", "_stats_merge_kernel", "_bn_relu_bwd_merge_kernel"}, kernels
    # the launches are the GPU's: tensor-core bf16 dots on 64- or 128-row tiles, 132-SM grids (--check: every launch
    # but the merges has at least one program per SM, stage 3, 8×8 at batch 128, included), specialised arguments
    bf16_convs = [r for r in rows if r["dtype"] == "bf16" and r["kernel"].startswith("_conv_")]
    assert bf16_convs and all(r["shape"]["DOT_DTYPE"] == "bf16" and r["shape"]["BLOCK_M"] in (64, 128)
                              and (r["mma"] or r["wgmma"]) for r in bf16_convs)
    stage3 = [r for r in rows if r["kernel"] == "_bn_relu_bwd_dx_kernel" and r["shape"]["M"] == 128 * 8 * 8]
    assert stage3 and all(r["programs"] >= gate.SMS for r in stage3)
    assert all(r["registers"] > 0 and r["blocks_per_sm"] >= 1 for r in rows)
    assert all(r["floor_us"] > 0 for r in rows)


_GPU_BATCH_COUNT = """
import json
from benchmarks import kernel_count_sm90 as k
shallow, deep = (k.count_step(name, "fp32") for name in k.CI_PAIR)
print(json.dumps(k.eager_marginal(shallow, deep)))
"""


@pytest.mark.skipif(_offline_compiler_missing() is not None, reason=str(_offline_compiler_missing()))
def test_triton_conv_launches_per_layer_at_gpu_batch_within_gate():
    """`triton_conv`'s Triton launches per BN-ReLU-conv layer of an eager training step at GPU batch (128, 32×32: the
    launchers' GPU tiles, row tiles and splits, benchmarks/kernel_count_sm90.py) stay at most the gate: every merge
    finished in the launch that writes the partials. Records preact_resnet20 and 32 (no compile, about 15 s)."""
    run = subprocess.run([sys.executable, "-c", _GPU_BATCH_COUNT], cwd=ROOT, env=_compiled_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    from benchmarks.kernel_count_sm90 import GATE
    # the marginal of whole-step counts is a ratio of integer differences: rounded as the gate is written
    assert round(m["eager_per_layer"], 2) <= GATE["triton_conv"], m["by_op_per_layer"]
    assert m["by_op_per_layer"].get("_conv_fwd_kernel") == 1.0 and m["eager_per_layer"] > 0


_NEW_BATCH = """
import json
from benchmarks import compilations
print(json.dumps(compilations.count("preact_resnet20", "fp32", 8, (("train", 128, True, False),
                                                                  ("train, last batch", 80, True, False)))))
"""


@pytest.mark.skipif(_offline_compiler_missing() is not None, reason=str(_offline_compiler_missing()))
def test_another_batch_compiles_nothing_new():
    """Row counts and trip counts that depend on the batch are runtime arguments Triton does not specialise: a
    training step at another batch size (with the same tiles) needs no new compilation (benchmarks/compilations.py
    counts the launches' compile keys; nothing is compiled)."""
    run = subprocess.run([sys.executable, "-c", _NEW_BATCH], cwd=ROOT, env=_compiled_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    phases = json.loads(run.stdout.strip().splitlines()[-1])["phases"]
    assert phases[0]["new"] > 10 and phases[1]["new"] == 0, phases
