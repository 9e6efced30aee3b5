"""benchmarks/step_bytes.py: the byte-counting rule on single ATen ops, the per-step table generated from the
committed rows, and (in a subprocess, compiled kernels' launches recorded) a small net's step counted by both paths.

Cost: the rule and table tests are instant; `test_small_net_step` traces and replays preact_resnet20 at batch 8,
8×8 on the meta device (a few seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common, report
from benchmarks import step_bytes as sb

ROOT = Path(__file__).resolve().parents[1]


def _meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16)


def _bytes(op, args, kwargs=None):
    return sb.aten_bytes(op, args, kwargs or {}, op(*args, **(kwargs or {})))


def test_aten_rule():
    x, w, y = _meta(2, 4, 8, 8), _meta(6, 4, 3, 3), _meta(2, 6, 8, 8)
    n = lambda t: t.numel() * 2  # noqa: E731  bf16
    aten = torch.ops.aten
    assert _bytes(aten.add.Tensor, (x, x.clone())) == 3 * n(x)             # reads two, writes one
    assert _bytes(aten.relu.default, (x,)) == 2 * n(x)
    assert _bytes(aten.view.default, (x, [2, 256])) == 0                    # a view moves nothing
    assert _bytes(aten.zero_.default, (x.clone(),)) == n(x)                 # writes only
    assert _bytes(aten.copy_.default, (x.clone(), x)) == 2 * n(x)           # reads the source, writes the destination
    assert _bytes(aten.convolution.default, (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)) == \
        n(x) + n(w) + n(y)
    # cuDNN's two backward kernels: dgrad (dy, w -> dx) and wgrad (dy, x -> dW); dy read by both
    args = (y, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    assert _bytes(aten.convolution_backward.default, args) == (n(y) + n(w) + n(x)) + (n(y) + n(x) + n(w))
    args = args[:-1] + ([True, False, False],)
    assert _bytes(aten.convolution_backward.default, args) == n(y) + n(w) + n(x)


def test_table_is_generated_from_rows():
    rows = common.read_rows([common.RESULTS_DIR / "step_bytes_sm90.jsonl"])
    assert {(r["net"], r["path"]) for r in rows} == {(net, path) for net, _, _ in sb.NETS for path in ("fused", "eager")}
    table = report.step_bytes_table(report.latest(rows))
    for net, _, _ in sb.NETS:
        fused, eager = ({r["path"]: r for r in rows if r["net"] == net}[p] for p in ("fused", "eager"))
        assert fused["floor_ms"] == float(f"{fused['bytes'] / sb.gate.HBM_BYTES_PER_S * 1e3:.4g}")
        line = next(line for line in table.splitlines() if line.startswith(f"| {net} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3:5] == [f"{fused['bytes'] / 1e9:.2f}", f"{fused['floor_ms']:.2f}"]
        assert cells[6:8] == [f"{eager['bytes'] / 1e9:.2f}", f"{eager['floor_ms']:.2f}"]
        assert cells[9] == f"{eager['bytes'] / fused['bytes']:.2f}"
    assert table in (ROOT / "docs" / "benchmarks.md").read_text()  # the docs show this table


_SMALL = """
import json, torch
from benchmarks import step_bytes as sb
fused = sb.fused_step("preact_resnet20", 8, 8, torch.bfloat16)
eager = sb.eager_step("preact_resnet20", 8, 8, torch.bfloat16)
print(json.dumps([fused, eager]))
"""


@pytest.mark.slow  # traces a training step in a fresh process
def test_small_net_step():
    """Both paths count a step of preact_resnet20 (19 BN-ReLU-conv layers): every layer's conv forward, dgrad and
    wgrad are Triton launches on the fused path and ATen convs (one backward op each) on the eager one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels' launches are recorded
    run = subprocess.run([sys.executable, "-c", _SMALL], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    fused, eager = json.loads(run.stdout.strip().splitlines()[-1])
    assert fused["bytes"] == fused["triton_bytes"] + fused["aten_bytes"] and fused["triton_launches"] >= 3 * 18
    assert eager["triton_bytes"] == 0 and eager["aten_kernels"] >= 2 * 19
    # one 8×8 activation of the first stage is 8·16·8·8·2 B = 16 KB; a step moves many of them on either path
    assert min(fused["bytes"], eager["bytes"]) > 100 * 16384
