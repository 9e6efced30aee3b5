"""The benchmark harness on CPU: the eager twin is the same network, the smoke modes run and write complete rows,
the largest-batch search is right, and report.py renders the rows (tables, plots, README block)."""
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_memory, bench_models, bench_overhead, common, report
from fastresnet.backends import get_backend_impl
from fastresnet.nn import BNReLU2d, PreActConv2d

ENV_FIELDS = {"device", "device_type", "torch", "cuda", "cudnn", "triton", "python", "git_rev", "date", "run_id"}
MODEL_FIELDS = ENV_FIELDS | {"bench", "smoke", "model", "provider", "backend", "cuda_graph", "compile_mode", "dtype",
                             "batch", "image_size", "channels_last", "cudnn_benchmark", "macs_per_image", "status",
                             "reason"}
MEASURED_FIELDS = {"ms_per_step", "ms_p20", "ms_p80", "iters", "images_per_s", "peak_mem_bytes", "tflops",
                   "speedup_vs_eager", "memory_vs_eager", "warmup_s"}


def _one_step(provider):
    """(model, its initial parameters, names of the ops dispatched during one training step) for preact_resnet20."""
    model = bench_models.build_model("preact_resnet20", provider, torch.device("cpu"), channels_last=True)
    initial = [p.detach().clone() for p in model.parameters()]
    step = common.TrainStep(model, 2, 8, 10, "fp32", torch.device("cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step.step()
    return model, initial, {e.key for e in prof.key_averages()}


@pytest.mark.slow
def test_eager_provider_runs_plain_pytorch_and_fused_provider_does_not():
    eager, eager_init, eager_ops = _one_step(bench_models.Provider("eager"))
    fused, fused_init, fused_ops = _one_step(bench_models.Provider("fastresnet:torch", "torch"))
    assert not any(isinstance(m, (PreActConv2d, BNReLU2d)) for m in eager.modules())
    assert not any(k.startswith("fastresnet") for k in eager_ops) and "aten::native_batch_norm" in eager_ops
    assert "fastresnet::preact_unit" in fused_ops and "fastresnet::preact_unit_backward" in fused_ops
    # the same architecture and the same (seed-0) initial weights
    assert len(eager_init) == len(fused_init)
    assert all(torch.equal(a, b) for a, b in zip(eager_init, fused_init))


@pytest.mark.parametrize("fits_up_to, start, expected", [(300, 128, 296), (20, 128, 16), (5, 8, 0), (10**6, 64, 1024)])
def test_largest_batch_search(fits_up_to, start, expected):
    probed = []

    def fits(b):
        probed.append(b)
        return b <= fits_up_to

    batch, probes, note = bench_memory.largest_batch(fits, start, limit=1024, granularity=8)
    assert batch == expected and probes == len(probed)
    assert all(b % 8 == 0 and b <= 1024 for b in probed)
    assert note.startswith("≥") == (expected == 1024)


def test_largest_batch_rejects_bad_bounds():
    with pytest.raises(ValueError, match="granularity, start, limit"):
        bench_memory.largest_batch(lambda b: True, start=4, limit=1024, granularity=8)


@pytest.mark.slow
def test_models_cpu_smoke_writes_rows_and_report_renders(tmp_path):
    out = tmp_path / "models.jsonl"
    bench_models.main(["--cpu-smoke", "--out", str(out)])
    rows = common.read_rows([out])
    assert {r["provider"] for r in rows} >= {"eager", "eager+graph", "fastresnet:torch"}
    for r in rows:
        assert MODEL_FIELDS <= set(r), MODEL_FIELDS - set(r)
        assert r["device"] == "cpu" and r["smoke"] and r["model"] == "preact_resnet20" and r["batch"] == 4
        assert r["status"] in ("ok", "unavailable", "skipped") and (r["status"] == "ok" or r["reason"])
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    assert {"eager", "fastresnet:torch"} <= set(ok)
    for r in ok.values():
        assert MEASURED_FIELDS <= set(r) and r["iters"] == 3 and r["ms_per_step"] > 0
        assert r["images_per_s"] == pytest.approx(4 / r["ms_per_step"] * 1e3)
        assert r["tflops"] == pytest.approx(6 * r["macs_per_image"] * 4 / r["ms_per_step"] * 1e-9)
        assert r["peak_mem_bytes"] is None and "CPU" in r["reason"]
    assert ok["eager"]["speedup_vs_eager"] == 1.0
    assert ok["fastresnet:torch"]["speedup_vs_eager"] == pytest.approx(
        ok["eager"]["ms_per_step"] / ok["fastresnet:torch"]["ms_per_step"])
    graph = next(r for r in rows if r["provider"] == "eager+graph")
    assert graph["status"] == "unavailable" and "CUDA" in graph["reason"]

    assert report.latest(rows) == []  # smoke rows stay out of the docs' tables unless asked for
    block = report.main([str(out), "--include-smoke", "--plots-dir", str(tmp_path / "plots")])
    assert "| preact_resnet20 | 4×16² | NHWC | fp32 | `eager` |" in block and "`eager+graph` unavailable" in block
    assert list((tmp_path / "plots").glob("models_cpu_fp32.png"))
    text = report.replace_block("# t\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\ntail\n", "perf-table",
                                block)
    assert "old" not in text and text.endswith("<!-- perf-table:end -->\ntail\n") and "`fastresnet:torch`" in text
    with pytest.raises(ValueError, match="perf-table"):
        report.replace_block("no markers\n", "perf-table", block)


@pytest.mark.slow
def test_memory_cpu_smoke_writes_rows(tmp_path):
    out = tmp_path / "memory.jsonl"
    bench_memory.main(["--cpu-smoke", "--out", str(out), "--backend", "torch"])
    rows = common.read_rows([out])
    assert [(r["depth"], r["provider"]) for r in rows] == [
        (11, "eager"), (11, "fastresnet:torch"), (11, "fastresnet:torch+unit"), (11, "fastresnet:torch+segment")]
    for r in rows:
        assert ENV_FIELDS <= set(r) and r["status"] == "ok" and r["peak_mem_bytes"] is None
        assert r["peak_kind"].startswith("cpu_peak_rss") and r["peak_growth_bytes"] > 0 and r["cpu_ms_per_step"] > 0
        assert abs(r["planned_saved_error"]) < 0.05 and r["saved_bytes"] > 0
    assert [r["saved_vs_eager"] < 1 for r in rows] == [False, True, True, True]
    assert "| preact_bottleneck11 | 11 | fp32 | `eager` | 2 |" in report.memory_table(rows)


@pytest.mark.slow
def test_kernels_cpu_smoke_writes_rows(tmp_path):
    out = tmp_path / "kernels.jsonl"
    # without the pytest-xdist worker's variables, which make pytest-benchmark in the child disable benchmarks
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
               FASTRESNET_BENCH_DEVICE="cpu", FASTRESNET_BENCH_OUT=str(out))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "benchmarks/bench_kernels.py", "--benchmark-only", "-k", "torch and (fp32 or add_stats)"],
                          cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = common.read_rows([out])
    ops = {r["op"] for r in rows if r["status"] == "ok"}
    assert ops == {"batch_stats", "bn_relu", "bn_relu_backward", "add_stats", "bn_relu_conv", "bn_relu_conv_backward"}
    for r in rows:
        assert r["device"] == "cpu" and r["smoke"] and r["ceiling_copy_gbps"] > 0 and r["ceiling_matmul_tflops"] > 0
        if r["status"] == "ok":
            assert r["gbps"] == pytest.approx(r["bytes"] / r["us"] * 1e-3) and r["speedup_vs_torch"] is not None
    assert "bn_relu_backward" in report.kernels_table(rows)


@pytest.mark.slow
def test_failing_cells_become_rows_and_the_time_budget_skips(tmp_path):
    out = tmp_path / "models.jsonl"
    base = ["--device", "cpu", "--models", "preact_resnet20", "--dtypes", "fp32", "--warmup", "1", "--min-iters", "1",
            "--max-iters", "1", "--out", str(out)]
    # batch 1 at 4×4: the last stage is 1×1, so training BN has one value per channel and every provider raises
    bench_models.run(bench_models.parse_args(base + ["--batch", "1", "--image-size", "4",
                                                     "--providers", "eager,fastresnet:torch"]))
    bench_models.run(bench_models.parse_args(base + ["--batch", "2", "--providers", "eager", "--time-budget", "0"]))
    rows = common.read_rows([out])
    assert [(r["provider"], r["status"]) for r in rows] == [
        ("eager", "error"), ("fastresnet:torch", "error"), ("eager", "skipped")]
    assert all("one value per channel" in r["reason"] or "more than 1 value" in r["reason"] for r in rows[:2])
    assert "--time-budget" in rows[2]["reason"]


def _profiled(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e for e in prof.events() if e.cpu_parent is None]


def test_overhead_kernel_rule_counts_computing_ops_once_and_views_not_at_all():
    x = torch.randn(4, 4)

    def ops():
        y = x.view(16).reshape(4, 4).t()  # views: no kernel
        y.contiguous()                    # a copy: clone, once (not the copy_ inside it)
        x.to(torch.float64)               # a copy: _to_copy, once
        x.to(torch.float32)               # already fp32: no copy, no kernel
        torch.empty(3)                    # an allocation: no kernel
        x.add_(1)
        x.mul_(2.0)                       # once, though the CPU copies the scalar into a tensor below it

    assert bench_overhead.cpu_kernels(_profiled(ops)) == {"aten::clone": 1, "aten::_to_copy": 1, "aten::add_": 1,
                                                          "aten::mul_": 1}
    assert not any(map(bench_overhead.is_kernel_op, ("view", "reshape", "t", "to", "as_strided", "detach", "empty",
                                                     "resize_", "result_type")))
    assert all(map(bench_overhead.is_kernel_op, ("copy_", "add_", "_foreach_add_", "native_batch_norm", "zero_")))


@pytest.mark.skipif(get_backend_impl("triton").unavailable_reason() is not None,
                    reason="the Triton backend needs a GPU or TRITON_INTERPRET=1")
def test_overhead_counts_each_triton_launch_once():
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    with bench_overhead.count_triton_launches() as launches:
        roots = _profiled(lambda: get_backend_impl("triton").bn_relu(x, scale, shift, torch.float32))
    tally = bench_overhead.cpu_kernels(roots)
    assert launches[0] >= 1 and sum(tally.values()) == launches[0]  # the interpreter's host copies are not kernels
    assert all(name.startswith(bench_overhead.TRITON_PREFIX) for name in tally)


def test_overhead_counts_the_bn_relu_conv_layers():
    cpu = torch.device("cpu")
    basic = bench_models.build_model("preact_resnet20", bench_models.Provider("eager"), cpu, channels_last=True)
    assert bench_overhead.bn_relu_conv_layers(basic, 4) == 18  # 9 units x 2; the stem conv reads the image
    # 3 bottleneck units of 3 convs, and 3 projection shortcuts fed by the units' shared pre-activation
    assert bench_overhead.bn_relu_conv_layers(bench_memory.build(11, None, cpu, "eager"), 4) == 12


def test_overhead_smoke_writes_rows_and_report_renders(tmp_path):
    out = tmp_path / "overhead.jsonl"
    bench_overhead.main(["--smoke", "--device", "cpu", "--out", str(out)])
    rows = {r["provider"]: r for r in common.read_rows([out])}
    assert set(rows) == {p.name for p in bench_overhead.all_providers()}
    assert rows["compile"]["status"] == "skipped" and "--compile" in rows["compile"]["reason"]
    ok = {p: r for p, r in rows.items() if r["status"] == "ok"}
    assert {"eager", "fastresnet:torch", "fastresnet:auto"} <= set(ok)
    for p, r in rows.items():
        assert ENV_FIELDS <= set(r) and r["bench"] == "overhead" and r["smoke"] and r["model"] == "preact_resnet20"
        assert r["status"] == "ok" or r["reason"], p
    for r in ok.values():
        assert r["reps"] == 3 and r["threads"] == 1 and r["bn_relu_conv_layers"] == 18
        assert 0 < r["ms_min"] <= r["ms_per_step"] <= r["ms_max"] and r["cpu_ms_per_step"] > 0
        assert r["host_cost_vs_eager"] == pytest.approx(r["ms_per_step"] / ok["eager"]["ms_per_step"])
        assert sum(r["kernels_by_op"].values()) == r["kernels_per_step"]
        assert r["kernels_forward_backward"] == r["kernels_per_step"] - r["kernels_optimizer"]
        assert r["kernels_per_conv_layer"] == pytest.approx(r["kernels_forward_backward"] / 18)
        assert r["conv_self_ms"] > 0 and 0 < r["conv_share"] < 1
        assert r["conv_self_ms"] + r["optimizer_ms"] + r["other_ms"] == pytest.approx(r["profiled_step_ms"])
    # every provider steps the same parameters with the same optimizer
    assert len({r["kernels_optimizer"] for r in ok.values()}) == 1
    # eager: at least BN, ReLU and conv forward and their three backward ops per BN-ReLU-conv layer, all ATen
    eager_ops = ok["eager"]["kernels_by_op"]
    assert ok["eager"]["kernels_forward_backward"] >= 6 * 18 and all(k.startswith("aten::") for k in eager_ops)
    assert eager_ops["aten::batch_norm"] == eager_ops["aten::native_batch_norm_backward"] == 19
    assert ok["eager"]["host_cost_vs_eager"] == 1.0
    if "fastresnet:ext" in ok:  # the C++ extension built: its ops are counted
        assert any(k.startswith("fastresnet_ext::") for k in ok["fastresnet:ext"]["kernels_by_op"])

    assert report.latest(list(rows.values())) == []  # smoke rows stay out of the docs' tables unless asked for
    text = report.overhead_table(report.latest(list(rows.values()), include_smoke=True))
    assert "| preact_resnet20 | 2×4² | 1 | `eager` |" in text and "preact_resnet20 18" in text
    assert "`compile` skipped" in text
