"""The GPU run's plumbing on CPU: what it packs comes back whole from the GPU machine (and the check refuses what
would not), the run packs and checks its output even when a stage fails, compute-sanitizer reports are read per
kernel, the sanitizer driver covers every CUDA kernel, and the python-node provider really runs the Python node."""
import copy
import json
import os
import subprocess
import tarfile

import pytest
import torch

from benchmarks import bench_models, common, gpu_outputs, sanitize_kernels
from fastresnet.backends import get_backend_impl
from fastresnet.models import ResNet


def _work(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "stages.tsv").write_text("env\tok\t3\t10\novershoot\ttimed out\t9\t9\n")
    (work / "env.log").write_text("torch 2.11\n")
    (work / "overshoot.log").write_text("started\n")
    (work / "tests_ops.xml").write_text("<testsuites/>\n")
    (work / "env.jsonl").write_text(json.dumps({"bench": "models", "device": "cpu"}) + "\n")
    (work / "overshoot.jsonl").write_text(json.dumps({"bench": "overhead", "device": "cpu"}) + "\n{\"cut off")
    return work


def test_pack_writes_three_files_that_come_back(tmp_path):
    out = tmp_path / "out"
    assert gpu_outputs.pack(_work(tmp_path), out, with_tables=False) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_outputs.PACKED)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows == [{"bench": "models", "device": "cpu", "stage": "env"},
                    {"bench": "overhead", "device": "cpu", "stage": "overshoot"}]  # the cut-off line is left out
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["env.log", "overshoot.log", "stages.tsv", "tests_ops.xml"]
    summary = (out / "summary.txt").read_text()
    assert "overshoot  timed out" in summary and "2 rows" in summary


def test_check_refuses_what_would_not_come_back(tmp_path):
    out = tmp_path / "out"
    gpu_outputs.pack(_work(tmp_path), out, with_tables=False)
    for i in range(5):
        (out / f"extra-{i}.txt").write_text("x")
    assert gpu_outputs.check(out) == []  # 8 files
    (out / "ninth.txt").write_text("x")
    assert gpu_outputs.check(out) == ["9 files, over 8"]
    (out / "ninth.txt").unlink()
    (out / "bad name.txt").write_text("x")
    assert gpu_outputs.check(out)[0].startswith("bad name.txt: name has characters")
    (out / "bad name.txt").unlink()
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "c" / "f").write_text("x")
    assert gpu_outputs.check(out) == ["a/b/c/f: more than 2 folders deep", "9 files, over 8"]
    (out / "a" / "b" / "c" / "f").unlink()
    (out / "a" / "b" / "c").rmdir()
    os.truncate(out / "extra-0.txt", gpu_outputs.MAX_FILE_BYTES + 1)  # sparse: no disk used
    assert gpu_outputs.check(out) == [f"extra-0.txt: {gpu_outputs.MAX_FILE_BYTES + 1} bytes, over "
                                      f"{gpu_outputs.MAX_FILE_BYTES}"]
    os.truncate(out / "extra-0.txt", 1)
    (out / "link").symlink_to(out / "extra-1.txt")
    assert gpu_outputs.check(out) == ["link: not a plain file or folder"]


def test_run_packs_and_fails_when_its_output_would_not_come_back(tmp_path):
    """One stage of the dry run (the extension's import): the three files are packed, and a stray file with a bad
    name in OUT makes the run fail, naming it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stray file").write_text("x")
    env = dict(os.environ, OUT=str(out), GPU_STAGES="install",
               PYTHONPATH=os.pathsep.join([str(common.REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=common.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stray file: name has characters" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_outputs.PACKED + ("stray file",))
    stages = (out / "summary.txt").read_text()
    assert "install" in stages and "stages: 1," in stages


def test_split_files_rows_where_the_report_reads_them(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"bench": "models", "device": "NVIDIA H100 80GB HBM3", "stage": "models"},
        {"bench": "overhead", "device": "NVIDIA H100 80GB HBM3", "stage": "overhead"},
        {"bench": "models", "device": "NVIDIA H100 80GB HBM3", "stage": "models"}]))
    written = gpu_outputs.split(rows, tmp_path)
    assert [p.name for p in written] == ["models_nvidia-h100-80gb-hbm3.jsonl", "overhead_nvidia-h100-80gb-hbm3.jsonl"]
    assert len(common.read_rows([written[0]])) == 2
    gpu_outputs.split(rows, tmp_path)  # appended, as benchmark runs append
    assert len(common.read_rows([written[0]])) == 4


MEMCHECK = """========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at void fastresnet_cuda::(anonymous namespace)::bn_relu_kernel<float, float, 4>(const float *, float *, \
const float *, const float *, fastresnet_cuda::Geom)+0x2a0 in /src/csrc/cuda/bn_kernels.cu:348
=========     by thread (5,0,0) in block (0,0,0)
=========     Address 0x7f0000000400 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: [0x2f1e5] in libcuda.so.1
=========
========= Invalid __global__ read of size 2 bytes
=========     at _conv_fwd_kernel+0x1b0 in /src/kernels/conv.py:101
=========     by thread (0,0,0) in block (3,0,0)
=========
========= Invalid __global__ write of size 4 bytes
=========     at void fastresnet_cuda::(anonymous namespace)::bn_relu_kernel<float, float, 1>(const float *, float *, \
const float *, const float *, fastresnet_cuda::Geom)+0x1a0 in /src/csrc/cuda/bn_kernels.cu:348
=========
========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to cudaFuncSetAttribute.
=========     Saved host backtrace up to driver entry point at error
=========
extension calls done
========= ERROR SUMMARY: 4 errors
"""
RACECHECK = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at void fastresnet_cuda::(anonymous namespace)::\
moments_finalize_kernel<float>(const float *, fastresnet_cuda::Geom, float *, float *)+0x3c0 in /src/bn_kernels.cu:201
=========     and Read access at void fastresnet_cuda::(anonymous namespace)::moments_finalize_kernel<float>(const \
float *, fastresnet_cuda::Geom, float *, float *)+0x400 in /src/bn_kernels.cu:205 [64 hazards]
=========
========= Warning: Race reported between Write access at _conv_wgrad_kernel+0x10 in /src/kernels/conv.py:240
=========     and Write access at _conv_wgrad_kernel+0x20 in /src/kernels/conv.py:241 [2 hazards]
=========
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
"""


def test_sanitizer_reports_are_read_per_kernel():
    mem = sanitize_kernels.parse_report(MEMCHECK)
    assert mem["errors"] == {"bn_relu_kernel": 2, "_conv_fwd_kernel": 1} and mem["warnings"] == {}
    assert mem["api_errors"] == {"cudaFuncSetAttribute": 1} and mem["summary"] == "ERROR SUMMARY: 4 errors"
    assert mem["first"]["bn_relu_kernel"].startswith("Invalid __global__ write of size 4 bytes [at void")
    race = sanitize_kernels.parse_report(RACECHECK)
    assert race["errors"] == {"moments_finalize_kernel": 1} and race["warnings"] == {"_conv_wgrad_kernel": 1}
    assert race["summary"].startswith("RACECHECK SUMMARY: 2 hazards")
    assert sanitize_kernels.parse_report("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")[
        "errors"] == {}
    # the profiler's names of the same kernels
    assert sanitize_kernels.kernel_label("void fastresnet_cuda::(anonymous namespace)::bwd_dx_kernel<c10::BFloat16, "
                                         "float, 8>(float const*, float const*)") == "bwd_dx_kernel"
    assert sanitize_kernels.kernel_label("_conv_dgrad_kernel") == "_conv_dgrad_kernel"


def test_sanitizer_calls_cover_every_cuda_kernel():
    """The driver's calls reach each __global__ of bn_kernels.cu (which ops launch which kernel: bn_kernels.cu's
    launchers), and its kernel list is the source's."""
    assert sanitize_kernels.cuda_kernel_names() == [
        "moments_partial_kernel", "moments_finalize_kernel", "bwd_partial_kernel", "bwd_finalize_kernel",
        "bn_relu_kernel", "bwd_dx_kernel", "affine_kernel"]
    assert {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"} <= set(
        sanitize_kernels.triton_kernel_names())


def _train(model, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for i in range(steps):
        torch.manual_seed(10 + i)
        x = (2.0 + torch.randn(2, 3, 6, 6, dtype=torch.float64)).contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        opt.step()
        seen += [out.detach()] + [p.grad.clone() for p in model.parameters()]
    return seen


def test_python_node_provider_runs_no_native_node_and_computes_the_same(monkeypatch):
    impl = type(get_backend_impl("ext"))
    if get_backend_impl("ext").why_not(torch.empty(1, 1, 1, 1)) is not None:
        pytest.skip("the C++ extension is not built")
    calls = []
    for hook in ("units_train", "layer_train"):
        original = getattr(impl, hook)
        monkeypatch.setattr(impl, hook, lambda self, *a, _o=original, _h=hook: calls.append(_h) or _o(self, *a))
    torch.manual_seed(0)
    net = ResNet("basic", [2, 2], [4, 8], 3, stem_width=4, shortcut="A", backend="ext").double()
    python_node = bench_models.WithoutNativeNodes(copy.deepcopy(net), "ext")
    slow = _train(python_node)
    assert calls == [] and impl.__dict__["unit_plan"] is not None and impl.__dict__["layer_plan"] is not None
    fast = _train(net)
    assert "units_train" in calls
    assert len(fast) == len(slow) and all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert bench_models.native_backends() == ["ext"]


def test_sanitizer_stage_runs_each_tool_and_reads_its_report(tmp_path):
    """The tools' orchestration with a stand-in for compute-sanitizer that reports one memcheck error and then says
    the calls ran (without running them); the plain pass runs the calls on CPU. One row per tool, errors by kernel."""
    fake = tmp_path / "fake-sanitizer"
    fake.write_text("#!/bin/sh\necho '========= COMPUTE-SANITIZER'\n"
                    "case \"$*\" in *memcheck*) printf '%s\\n' '========= Invalid __global__ write of size 4 bytes' "
                    "'=========     at bn_relu_kernel<float, float, 4>(const float *)+0x10 in bn_kernels.cu:348' "
                    f"'{sanitize_kernels.DONE}' '========= ERROR SUMMARY: 1 error'; exit 86;; esac\n"
                    f"echo '{sanitize_kernels.DONE}'\necho '========= RACECHECK SUMMARY: 0 hazards displayed'\n")
    fake.chmod(0o755)
    out = tmp_path / "rows.jsonl"
    assert sanitize_kernels.main(["--out", str(out), "--log-dir", str(tmp_path), "--sanitizer", str(fake),
                                  "--budget", "240"]) == 1
    rows = {r["tool"]: r for r in common.read_rows([out])}
    assert rows["memcheck"]["status"] == "errors" and rows["memcheck"]["errors"] == {"bn_relu_kernel": 1}
    assert rows["memcheck"]["exit"] == sanitize_kernels.ERROR_EXIT
    assert rows["racecheck"]["status"] == "ok" and rows["racecheck"]["errors"] == {}
    assert "--leak-check no" in rows["memcheck"]["command"] and "--racecheck-report" in rows["racecheck"]["command"]
    # the plain pass ran the calls on CPU: it finished, and no CUDA kernel was launched
    assert rows["memcheck"]["plain_error"] is None and rows["memcheck"]["launched"] == {}
    assert rows["memcheck"]["not_launched"] == sanitize_kernels.cuda_kernel_names()
    assert (tmp_path / "sanitize_memcheck.log").exists() and (tmp_path / "sanitize_plain.log").exists()
    assert "bn_relu_kernel" in sanitize_kernels.table(list(rows.values()))
