"""Synchronised BN (fastresnet.distributed, .sync_functional, .sync) and the trainer under torchrun, on CPU with gloo.

Two ranks, each with half of a global batch, must reproduce one process running the whole batch: outputs, dx of each
rank's slice, the sum of the ranks' parameter gradients (DDP averages them; here they are summed explicitly so the
comparison does not depend on DDP), and the running statistics.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastresnet import distributed, sync, sync_functional
from fastresnet.distributed import SyncBatchNorm2d, convert_sync_batchnorm
from fastresnet.sync import combine_batch_stats
from fastresnet.nn import BNReLU2d, PreActConv2d

N, C = 8, 3


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(PreActConv2d(C, 4, 3, 1, 1, backend="torch"), BNReLU2d(4, backend="torch"),
                        PreActConv2d(4, 4, 3, 2, 1, backend="torch"), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    for m in net.modules():  # non-trivial affine parameters, so dγ/dβ paths matter
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net.double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = -2.3 + 0.5 * torch.randn(N, C, 6, 5, generator=g, dtype=torch.float64)  # non-zero mean, odd sizes
    w = torch.randn(N, 4, 3, 3, generator=g, dtype=torch.float64)                # fixed loss weights
    return x, w


def _run(net, x, w):
    x = x.clone().requires_grad_(True)
    out = net(x)
    (out * w).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in net.named_parameters()}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = convert_sync_batchnorm(_net())
        x, w = _inputs()
        part = slice(rank * N // world, (rank + 1) * N // world)
        out, dx, grads = _run(net, x[part], w[part])
        for g in grads.values():
            dist.all_reduce(g)
        buffers = {n: b.clone() for n, b in net.named_buffers()}
        mean, var, count = combine_batch_stats(*_local_stats(x[part]), (N // world) * 30, None)
        torch.save({"out": out, "dx": dx, "grads": grads, "buffers": buffers, "stats": (mean, var, count)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _local_stats(x):
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def test_convert_keeps_fused_layers():
    net = _net()
    dist_group = object()  # any object stands for a process group here: conversion only stores it
    convert_sync_batchnorm(net, dist_group)
    assert isinstance(net[0], PreActConv2d) and net[0].process_group is dist_group
    assert isinstance(net[1], BNReLU2d) and net[1].process_group is dist_group   # not replaced: keeps its ReLU
    assert type(net[0].bn) is nn.BatchNorm2d                                     # the fused layer's container
    assert isinstance(net[4], SyncBatchNorm2d) and net[4].process_group is dist_group


def test_distributed_keeps_its_public_names():
    """The synchronised ops and the statistics combine live below the modules now; fastresnet.distributed still
    exports them."""
    assert distributed.combine_batch_stats is sync.combine_batch_stats
    assert distributed.sync_bn_relu is sync_functional.sync_bn_relu
    assert distributed.sync_bn_relu_conv2d is sync_functional.sync_bn_relu_conv2d
    assert all(hasattr(distributed, name) for name in distributed.__all__)


@pytest.mark.slow
def test_sync_bn_two_ranks_match_one_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    net = _net()
    x, w = _inputs()
    out, dx, grads = _run(net, x, w)
    tol = dict(rtol=1e-9, atol=1e-10)  # float64 throughout; only the summation order differs
    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out, **tol)
    torch.testing.assert_close(torch.cat([r0["dx"], r1["dx"]]), dx, **tol)
    for name, g in grads.items():
        torch.testing.assert_close(r0["grads"][name], g, **tol, msg=lambda m: f"{name}: {m}")
    ref_buffers = dict(net.named_buffers())
    for r in (r0, r1):
        for name, b in r["buffers"].items():
            torch.testing.assert_close(b, ref_buffers[name], **tol, msg=lambda m: f"{name}: {m}")
    mean, var, count = r0["stats"]
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), **tol)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False), **tol)
    assert float(count) == N * 30


@pytest.mark.slow
def test_torchrun_sync_bn_matches_single_process(tmp_path):
    """`torchrun --nproc_per_node=2` (gloo) with --sync-bn = one process with the same global batch."""
    from fastresnet.train import Trainer, resolve_config
    args = ["--iterations", "3", "--batch-size", "32", "--log-every", "1", "--no-plot", "--schedule", "constant"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "fastresnet.train", *args, "--sync-bn", "--out-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode and "torch.distributed.run" in proc.stderr and "No module" in proc.stderr:
        pytest.skip("torch.distributed.run (torchrun) is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = Trainer(resolve_config(args + ["--out-dir", str(tmp_path / "one")]))
    result = single.fit()
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    # fp32 training; the ranks' gradients are all-reduced (sum order differs from one process's batch reduction)
    # and BN statistics are combined from partial sums: ~1e-6 relative per step, 3 steps.
    torch.testing.assert_close(ddp["history"]["loss"], single.history["loss"], rtol=1e-5, atol=1e-6)
    for name, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][name], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert abs(ddp["history"]["eval"][-1]["test_loss"] - result["test_loss"]) < 1e-4
