"""The kernel-count gate: `triton_conv`'s and tier A's kernels per BN-ReLU-conv layer per training step (forward +
backward, counted under the Triton interpreter by benchmarks/bench_kernel_count.py's rule) must not rise above the
committed values, and the count must see what it claims to count."""
import json

import pytest

from fastresnet.kernels import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts Triton launches under TRITON_INTERPRET=1")

bench = pytest.importorskip("benchmarks.bench_kernel_count")


@pytest.mark.slow
def test_triton_conv_kernels_per_layer_within_gate():
    shallow, deep = (bench.count_step(name, "triton_conv", bench.CI_BATCH, bench.CI_IMAGE_SIZE)
                     for name in bench.CI_PAIR)
    m = bench.marginal(shallow, deep)
    # the marginal of whole-net counts is a ratio of integer differences: rounded as the committed value is
    assert round(m["kernels_per_layer"], 2) <= bench.GATE["triton_conv"], m["by_op_per_layer"]
    # the count sees both kinds: every layer launches its conv kernels, and the profiler tree is not empty
    assert m["by_op_per_layer"].get("triton::_conv_fwd_kernel") == 1.0
    assert shallow["aten_kernels"] > 0 and deep["layers"] - shallow["layers"] == 6


@pytest.mark.slow
def test_tier_a_kernels_per_layer_within_gate(monkeypatch):
    monkeypatch.setenv("FASTRESNET_GRID_BARRIER", "1")
    shallow, deep = (bench.count_step(name, "triton", bench.CI_BATCH, bench.CI_IMAGE_SIZE) for name in bench.CI_PAIR)
    m = bench.marginal(shallow, deep)
    assert round(m["kernels_per_layer"], 2) <= bench.GATE["triton"], m["by_op_per_layer"]
    # every layer's BN backward is one launch with a grid barrier, and an inner BN's statistics come with its forward
    assert m["by_op_per_layer"].get("triton::_bn_relu_bwd_fused_kernel") == 1.0
    assert m["by_op_per_layer"].get("triton::_stats_bn_relu_fwd_kernel", 0) > 0


@pytest.mark.parametrize("backend", sorted(bench.GATE))
def test_gate_matches_the_committed_rows(backend):
    # GATE is the CI pair's marginal count of the committed "after" rows: the test gates what the rows report
    path = bench.Path(bench.__file__).parent / "results" / "kernel_count_cpu.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ci = [r for r in rows if r["kind"] == "marginal" and r["backend"] == backend and r["label"] == "after"
          and r["model"] == ",".join(bench.CI_PAIR) and r["batch"] == bench.CI_BATCH
          and r["image_size"] == bench.CI_IMAGE_SIZE]
    assert ci, "no committed 'after' row of the CI pair"
    assert round(ci[-1]["kernels_per_layer"], 2) == bench.GATE[backend]


def test_marginal_rejects_a_shallower_deep_net():
    one = dict(kernels=10, triton_launches=4, aten_kernels=6, layers=6, by_op={})
    with pytest.raises(ValueError, match="more layers"):
        bench.marginal(one, one)
