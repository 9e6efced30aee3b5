"""Fused layers inside torch.compile (no graph breaks, same numerics as eager fused, running statistics included)
and inside CUDA graphs (a captured training step replays to the eager result).

CPU runs use the "torch" backend (the fused custom ops with the reference implementation) and tiny models so compile
time stays a few seconds. The numerics test compiles with backend="aot_eager": it runs the same Dynamo capture and
AOTAutograd functionalization / joint forward-backward graph as Inductor (where running-stat mutations and the custom
ops' autograd are handled) but executes the graph eagerly. Inductor itself is not tested here: on the 2-core CI
machine compiling this tiny model's forward+backward with Inductor (C++ codegen) took 115 s, over the test budget.
"""
import copy

import pytest
import torch
from torch import nn

from fastresnet import convert
from fastresnet.models import ResNet
from test_convert import TimmStyleResNetV2


def tiny_resnet(backend="torch"):
    # full pre-activation bottleneck net: PreActConv2d, BNReLU2d (shared pre-activation), projection shortcut
    return ResNet("bottleneck", [1, 1], [8, 16], 3, stem_width=8, backend=backend)


def explain_breaks(model, x):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(x)


@pytest.mark.parametrize("training", [True, False])
def test_no_graph_breaks_fastresnet_model(training):
    model = tiny_resnet().train(training)
    e = explain_breaks(model, torch.randn(2, 3, 8, 8))
    assert e.graph_break_count == 0 and e.graph_count == 1, e.break_reasons


def test_no_graph_breaks_converted_model():
    model, report = convert(TimmStyleResNetV2(), backend="torch")
    assert report.num_preact > 0
    for training in (True, False):
        e = explain_breaks(model.train(training), torch.randn(2, 3, 8, 8))
        assert e.graph_break_count == 0 and e.graph_count == 1, e.break_reasons


def train_step(fn, model, x):
    """Forward of fn (model or its compiled form) + backward; returns output, input grad, grads by state-dict key,
    and model's state dict after the step (running statistics)."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    grads = {k: v.grad.clone() for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    # clones: a CUDA-graphed function reuses its output buffers on the next call
    return y.detach().clone(), x.grad.clone(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def assert_close_all(a, b, tol):
    for u, v in zip(a, b):
        if isinstance(u, dict):
            assert u.keys() == v.keys()
            for k in u:
                torch.testing.assert_close(v[k], u[k], **tol, msg=lambda m: f"{k}: {m}")
        else:
            torch.testing.assert_close(v, u, **tol)


# aot_eager runs the same ops as eager (functionalized): only the order of a few elementwise ops may differ.
AOT_TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_compiled_matches_eager_aot_eager(training):
    eager = tiny_resnet().train(training)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = -1.0 + 0.5 * torch.randn(2, 3, 8, 8)
    for _ in range(2):  # two steps: the second starts from updated running statistics
        ref = train_step(eager, eager, x)
        got = train_step(compiled, compiled_model, x)
        assert_close_all(ref, got, AOT_TOL)
        eager.zero_grad(); compiled_model.zero_grad()
    if training:
        assert int(compiled_model.stages[0][0].conv2.bn.num_batches_tracked) == 2


@pytest.mark.gpu
def test_cuda_graph_training_step_replays_eager():
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager = tiny_resnet(backend=None).to(device).train()
    graphed = copy.deepcopy(eager)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    xs = [(-1.0 + 0.5 * torch.randn(8, 3, 16, 16, device=device)) for _ in range(4)]
    static_x = xs[0].clone()

    def step(model, opt, x):
        opt.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    # warm up on a side stream (PyTorch's recipe), one real step that eager mirrors
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(graphed, opt_g, static_x)
    torch.cuda.current_stream().wait_stream(s)
    step(eager, opt_e, xs[0])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = step(graphed, opt_g, static_x)
    # capture does not execute: replays run steps 2..4
    for x in xs[1:]:
        static_x.copy_(x)
        g.replay()
        loss = step(eager, opt_e, x)
        # same kernels in the same order; only cuDNN algorithm choice may differ between capture and eager
        torch.testing.assert_close(static_loss, loss, atol=1e-4, rtol=1e-4)
    torch.cuda.synchronize()
    for (k, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.gpu
def test_reduce_overhead_training_matches_eager():
    """torch.compile(mode="reduce-overhead"): Inductor plus CUDA graphs around the fused unit ops, no graph break,
    three training steps (running statistics included) as eager."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    eager = tiny_resnet(backend=None).to(device).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    x = -1.0 + 0.5 * torch.randn(8, 3, 16, 16, device=device)
    for _ in range(3):
        ref = train_step(eager, eager, x)
        got = train_step(compiled, compiled_model, x)
        # Inductor generates its own kernels for the stem, head and loss (other summation orders) and convs may run
        # in TF32: agreement to 1e-3, not bitwise
        assert_close_all(ref, got, dict(atol=1e-3, rtol=1e-3))
        eager.zero_grad()
        compiled_model.zero_grad()
