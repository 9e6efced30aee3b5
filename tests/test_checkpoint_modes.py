"""`ResNet(checkpoint="unit" | "segment")`: recomputation gives bitwise the gradients, outputs and running statistics
of checkpoint="none" (float64, and fp32 on the deterministic backends), updates running statistics once, replays
dropout's RNG, works under autocast and with synchronised BN across two processes, and saves less.

Tiny nets (bottleneck ResNet-11/-29 at 8×8, batch 2) keep the cost low; Triton runs under the interpreter.
"""
import copy
import os

import torch

from fastresnet.kernels import interpreting  # does not import triton

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
INTERPRET = interpreting()

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastresnet  # noqa: E402
from fastresnet import recompute  # noqa: E402
from fastresnet.memory import measure_saved_bytes  # noqa: E402
from fastresnet.models import ResNet, cifar_resnet, create_model  # noqa: E402

DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _backend(name):
    reason = fastresnet.available_backends()[name]
    needs_gpu = name.startswith("triton") and not (INTERPRET or torch.cuda.is_available())
    return pytest.param(name, marks=pytest.mark.skipif(reason != "ok" or needs_gpu, reason=f"backend {name}: "
                                                       f"{reason if reason != 'ok' else 'needs a GPU or interpreter'}"))


def _batch(n=2, size=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (-0.7 + torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
    return x, torch.randint(10, (n,), generator=g).to(DEVICE)


def _step(model, x, y, mode, segment_size=None, steps=1, autocast=None, seed=None):
    """`steps` SGD steps of a copy of `model` in `mode`; returns (losses, grads of the last step, state dict)."""
    model = copy.deepcopy(model)
    model.set_checkpoint(mode, segment_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return losses, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_bitwise(a, b, what):
    (la, ga, sa), (lb, gb, sb) = a, b
    assert all(torch.equal(u, v) for u, v in zip(la, lb)), f"{what}: losses differ"
    for n in ga:
        assert torch.equal(ga[n], gb[n]), f"{what}: grad of {n} differs by {(ga[n] - gb[n]).abs().max()}"
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what}: state {k} differs"


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                           pytest.param("ext", torch.float32, marks=_backend("ext").marks)])
def test_recomputation_is_bitwise_none(backend, dtype):
    torch.manual_seed(0)
    model = cifar_resnet("bottleneck", 29, backend=backend).to(DEVICE, dtype)
    x, y = _batch(dtype=dtype)
    ref = _step(model, x, y, "none", steps=2)
    for mode, size in (("unit", None), ("segment", None), ("segment", 2)):
        _assert_bitwise(_step(model, x, y, mode, size, steps=2), ref, f"{backend} {dtype} {mode} k={size}")
    # running statistics moved, and num_batches_tracked counts the two steps once each
    state, init = ref[2], model.state_dict()
    tracked = [k for k in state if k.endswith("num_batches_tracked")]
    assert tracked and all(int(state[k]) == 2 for k in tracked)
    assert all(not torch.equal(state[k], init[k]) for k in state if k.endswith("running_mean"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [_backend("triton"), _backend("triton_conv")])
def test_recomputation_is_bitwise_none_triton(backend):
    torch.manual_seed(0)
    model = cifar_resnet("bottleneck", 11, backend=backend).to(DEVICE)  # 3 units: the interpreter is slow
    x, y = _batch()
    ref = _step(model, x, y, "none")
    _assert_bitwise(_step(model, x, y, "unit"), ref, f"{backend} unit")
    _assert_bitwise(_step(model, x, y, "segment", 2), ref, f"{backend} segment")


@pytest.mark.parametrize("backend", ["torch", _backend("ext")])
def test_recomputation_under_autocast(backend):
    torch.manual_seed(0)
    model = cifar_resnet("bottleneck", 29, backend=backend).to(DEVICE)
    x, y = _batch()
    ref = _step(model, x, y, "none", autocast=torch.bfloat16)
    assert ref[0][0].dtype == torch.float32
    for mode in ("unit", "segment"):
        _assert_bitwise(_step(model, x, y, mode, autocast=torch.bfloat16), ref, f"bf16 {mode}")


@pytest.mark.parametrize("kw", [dict(form="basic", depth=14), dict(form="bottleneck", depth=20, shortcut_bn=True)])
def test_other_shortcuts(kw):
    """Option-A shortcuts (basic nets) and BN after projections (plain BatchNorm2d inside a chained unit, replayed
    with its running statistics frozen)."""
    torch.manual_seed(0)
    model = cifar_resnet(kw.pop("form"), kw.pop("depth"), backend="torch", **kw).to(DEVICE, torch.float64)
    x, y = _batch(dtype=torch.float64)
    ref = _step(model, x, y, "none", steps=2)
    _assert_bitwise(_step(model, x, y, "unit", steps=2), ref, "unit")


@pytest.mark.parametrize("name", ["resnet110_dropout_shortcut", "resnet164_bn_after_add"])
def test_post_activation_nets_and_dropout_rng_replay(name):
    """Nets that do not chain (plain BatchNorm2d after the last conv or the addition; dropout on the shortcut):
    the replay re-draws the first forward's dropout mask and leaves the global RNG where "none" leaves it."""
    torch.manual_seed(0)
    model = create_model(name, backend="torch").to(DEVICE, torch.float64)
    # a 2-units-per-stage slice keeps the cost small: the first two units of every stage
    for stage in model.stages:
        del stage[2:]
    x, y = _batch(dtype=torch.float64)
    ref = _step(model, x, y, "none", seed=5)
    rng_after_none = torch.get_rng_state()
    for mode in ("unit", "segment"):
        _assert_bitwise(_step(model, x, y, mode, seed=5), ref, f"{name} {mode}")
        assert torch.equal(torch.get_rng_state(), rng_after_none), "the replay must not move the global RNG"
    if "dropout" in name:  # a different seed drops different elements: the test would notice a mask mismatch
        other = _step(model, x, y, "none", seed=6)
        assert not all(torch.equal(other[1][n], ref[1][n]) for n in ref[1])


def test_saves_less_and_eval_is_unchanged():
    torch.manual_seed(0)
    model = cifar_resnet("bottleneck", 29, backend="torch").to(DEVICE)
    x, y = _batch()
    saved = {}
    for mode in recompute.MODES:
        model.set_checkpoint(mode)
        saved[mode] = measure_saved_bytes(model, x, y)[0]
    assert saved["segment"] < saved["unit"] < 0.7 * saved["none"], saved
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_checkpoint("unit")
        assert torch.equal(model(x), ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="checkpoint: expected one of"):
        cifar_resnet("bottleneck", 11, checkpoint="layer")
    with pytest.raises(ValueError, match="segment_size: expected a positive int"):
        cifar_resnet("bottleneck", 11, checkpoint="segment", segment_size=0)
    with pytest.raises(ValueError, match="segment_size: only applies"):
        ResNet("basic", [1], [8], 10, checkpoint="unit", segment_size=2)
    tape = recompute.StatsTape([(torch.zeros(4), torch.ones(4))])
    with pytest.raises(RuntimeError, match="has 5 channels"):
        tape.pop(torch.zeros(2, 5, 1, 1))
    tape.pop(torch.zeros(2, 4, 1, 1))
    with pytest.raises(RuntimeError, match="more batch norms"):
        tape.pop(torch.zeros(2, 4, 1, 1))


# ---- synchronised BN + DDP across two processes (gloo) -------------------------------------------------------------
def _ddp_worker(rank, world, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fastresnet.distributed import convert_sync_batchnorm
    import fastresnet.distributed as fd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gathers = []
    real = fd.dist.all_gather
    fd.dist.all_gather = lambda *a, **k: gathers.append(1) or real(*a, **k)
    try:
        x, y = (t.cpu() for t in _batch(n=4, dtype=torch.float64))
        out = {}
        for mode in ("none", "unit", "segment"):
            torch.manual_seed(0)
            model = convert_sync_batchnorm(cifar_resnet("bottleneck", 20, backend="torch").double())
            model.set_checkpoint(mode)
            net = DDP(model)
            gathers.clear()
            loss = F.cross_entropy(net(x[rank * 2:(rank + 1) * 2]), y[rank * 2:(rank + 1) * 2])
            loss.backward()
            out[mode] = {"grads": {n: p.grad for n, p in model.named_parameters()},
                         "state": dict(model.state_dict()), "gathers": torch.tensor(len(gathers))}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        fd.dist.all_gather = real
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_bn_ddp_two_ranks(tmp_path):
    """Each rank: DDP over a synchronised-BN net; "unit"/"segment" give bitwise the gradients (all-reduced by DDP)
    and running statistics of "none", and gather statistics exactly as often (once per BN, in the first forward)."""
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        ref = res["none"]
        assert int(ref["gathers"]) > 0
        for mode in ("unit", "segment"):
            assert int(res[mode]["gathers"]) == int(ref["gathers"]), mode
            for n, g in ref["grads"].items():
                assert torch.equal(res[mode]["grads"][n], g), f"rank {r} {mode}: grad of {n}"
            for k, v in ref["state"].items():
                assert torch.equal(res[mode]["state"][k], v), f"rank {r} {mode}: {k}"


# ---- CUDA graph ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_unit_mode_inside_a_cuda_graph(backend):
    """A whole training step with checkpoint="unit" captured as one CUDA graph (no host synchronisation in the
    recomputation) replays to the gradients of an eager step."""
    from benchmarks.common import TrainStep

    torch.manual_seed(0)
    model = cifar_resnet("bottleneck", 29, backend=backend, checkpoint="unit").cuda()
    reference = copy.deepcopy(model)
    step = TrainStep(model, 8, 16, 10, "fp32", torch.device("cuda"), channels_last=False)
    step.capture(warmup=2)
    ref_step = TrainStep(reference, 8, 16, 10, "fp32", torch.device("cuda"), channels_last=False)
    ref_step.x.copy_(step.x)
    ref_step.y.copy_(step.y)
    for _ in range(2):  # the warm-up steps the capture ran
        ref_step.step()
    ref_step.step()
    step.step()
    torch.cuda.synchronize()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        # the same kernels replayed; cuDNN's default weight-gradient algorithms may reduce in a different order
        # between runs, so 3 fp32 SGD steps agree to a few ulps rather than bitwise
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
