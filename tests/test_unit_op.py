"""One autograd node per residual unit (`functional.preact_unit`, `ResidualUnit.one_op`): the whole-net results
equal the per-layer path's (`fuse_unit = False`), the shortcut gradient joins dx inside the BN backward (`dres`),
and bad arguments get errors that name them."""
import pytest
import torch
from torch import nn

from fastresnet import functional as FF
from fastresnet.backends import get_backend_impl
from fastresnet.distributed import convert_sync_batchnorm
from fastresnet.models import ResNet
from fastresnet.nn.units import ResidualUnit

# every form and every one-op shortcut kind: basic with zero-pad (A) and a shared identity first unit; bottleneck
# with shared projections; single-conv units (k = 1) with a shared identity and zero-pad
NETS = {
    "basic_A": dict(form="basic", units=[1, 2], widths=[4, 8], shortcut="A"),
    "bottleneck_B": dict(form="bottleneck", units=[1, 1], widths=[8, 16], shortcut="B"),
    "single_A": dict(form="single", units=[2, 1], widths=[4, 8], shortcut="A"),
}
BACKENDS = ["torch", "ext", "triton", "triton_conv"]


def _net(kind, backend, fuse, dtype):
    torch.manual_seed(0)
    spec = dict(NETS[kind])
    model = ResNet(spec.pop("form"), spec.pop("units"), spec.pop("widths"), 3, stem_width=4, backend=backend,
                   **spec).to(dtype)
    for u in model.units:
        u.fuse_unit = fuse
    return model


def _step(model, chained, dtype, device="cpu", memory_format=torch.channels_last):
    model.chained = chained  # unchained: every unit's plain forward (batch statistics of x computed per unit)
    torch.manual_seed(1)
    x = (3.0 + torch.randn(2, 3, 6, 6, dtype=dtype)).to(device).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=dtype, device=device).view_as(out)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()] + list(model.buffers())


def _available(backend):
    reason = get_backend_impl(backend).why_not(torch.empty(1, 1, 1, 1))
    if reason is not None:
        pytest.skip(reason)


def _one_op_cases():
    """(kind, backend, dtype) for every net form, backend and dtype; triton_conv's interpreted basic and bottleneck
    nets are `slow` (the single-conv net keeps one of its cases in the quick tier)."""
    for dtype, name in ((torch.float64, "fp64"), (torch.float32, "fp32")):
        for backend in BACKENDS:
            for kind in NETS:
                slow = backend == "triton_conv" and kind != "single_A"
                yield pytest.param(kind, backend, dtype, id=f"{name}-{backend}-{kind}",
                                   marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("kind,backend,dtype", list(_one_op_cases()))
def test_one_op_equals_per_layer_path(kind, backend, dtype):
    """Bitwise: same kernels in the same order. In fp32 too, because the in-kernel dx + dres is an fp32 add of the
    same two fp32 values that autograd would add after the kernel (one rounding either way)."""
    _available(backend)
    if backend == "triton_conv" and dtype == torch.float64:
        pytest.skip("triton_conv's own kernels take fp32/bf16/fp16")
    for chained in (True, False):
        fused = _step(_net(kind, backend, True, dtype), chained, dtype)
        layered = _step(_net(kind, backend, False, dtype), chained, dtype)
        for i, (a, b) in enumerate(zip(fused, layered)):
            if backend == "triton_conv" and not chained:
                # the one op adds the shortcut in the conv epilogue before its single rounding; the unchained
                # per-layer path rounds the conv output, then adds (`h + f`): they differ by fp32 rounding
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a, b), (kind, backend, chained, i, (a.double() - b.double()).abs().max())


def _native_vs_python_node(kind, autocast, device, monkeypatch, dtype=torch.float32,
                           memory_format=torch.channels_last, checkpoint="none"):
    _available("ext")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(type(get_backend_impl("ext")), "unit_plan", None)
        model = _net(kind, "ext", True, dtype).to(device)
        model.set_checkpoint(checkpoint)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            x = torch.randn(2, 4, 6, 6, dtype=dtype, device=device, requires_grad=True)  # the stem's width: 4
            node = model.units[0](x).grad_fn
            results.append([_step(model, chained, dtype, device, memory_format) for chained in (True, False)])
        assert (node.name() == "NativeUnitBackward") == native, node.name()
    for a, b in zip(sum(results[0], []), sum(results[1], [])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_native_unit_equals_python_node(kind, autocast, monkeypatch):
    """The "ext" backend's C++ unit node (csrc/unit.cpp) against the same backend's unit composed in Python from the
    same primitives (`unit_ops._PreactUnit`): bitwise, outputs, gradients and running buffers."""
    _native_vs_python_node(kind, autocast, "cpu", monkeypatch)


@pytest.mark.parametrize("case", ["fp64-nchw", "segment", "unit"])
def test_native_unit_equals_python_node_more_cases(case, monkeypatch):
    """fp64 with NCHW inputs, and the recomputation modes, whose replays run the C++ node for a segment's inner units
    and the Python composition for its last (`preact_unit_gradients`)."""
    if case == "fp64-nchw":
        _native_vs_python_node("basic_A", False, "cpu", monkeypatch, torch.float64, torch.contiguous_format)
    else:
        _native_vs_python_node("bottleneck_B", False, "cpu", monkeypatch, checkpoint=case)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_native_unit_equals_python_node_on_gpu(kind, autocast, monkeypatch):
    """The same on CUDA tensors: the CUDA kernels under the C++ node, bitwise the Python node's."""
    _native_vs_python_node(kind, autocast, "cuda", monkeypatch)



def _native_unit():
    """A basic unit with an identity shortcut on the "ext" backend (its C++ node), in training, and an input."""
    _available("ext")
    torch.manual_seed(0)
    unit = ResidualUnit(4, 4, 1, form="basic", shortcut="identity", backend="ext")
    x = (1.0 + torch.randn(2, 4, 5, 5, dtype=torch.float64)).requires_grad_()
    return unit.double(), x


# torch's forward-mode AD loads its decompositions through torch.jit.script, which torch itself marks deprecated
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_native_node_autograd_contract():
    """The hand-written C++ node behaves as autograd nodes do: a second backward without retain_graph raises, with
    it gives the same gradients again; a weight changed in place after the forward is caught at backward; saved-tensor
    hooks see what it saves; forward-mode AD is refused by name; without gradients no node is made."""
    unit, x = _native_unit()
    out = unit(x)
    assert out.grad_fn.name() == "NativeUnitBackward"
    out.sum().backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in unit.parameters()]
    out.sum().backward()
    again = [x.grad] + [p.grad for p in unit.parameters()]
    assert all(torch.equal(b, 2 * a) for a, b in zip(first, again))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()

    out = unit(x)
    with torch.no_grad():
        unit.conv1.conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        unit(x).sum().backward()
    assert any(t is x for t in packed) and any(t is unit.conv1.conv.weight for t in packed)

    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
        unit(fwAD.make_dual(x.detach(), torch.ones_like(x)))

    steps = unit.conv1.bn.num_batches_tracked.item()
    with torch.no_grad():
        assert unit(x).grad_fn is None
    assert unit.conv1.bn.num_batches_tracked.item() == steps + 1  # still training: buffers updated

def test_one_op_bf16_autocast_close_to_per_layer_path():
    """Under bf16 autocast dx is rounded once (in the kernel, with the shortcut gradient) instead of twice, so the
    two paths differ by bf16 rounding of the gradients: agreement to a few bf16 ulps (2^-8 relative) per tensor."""
    results = []
    for fuse in (True, False):
        model = _net("bottleneck_B", "torch", fuse, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_step(model, True, torch.float32))
    for a, b in zip(*results):
        a, b = a.double(), b.double()
        assert (a - b).norm() <= 2 ** -6 * b.norm() + 1e-12


def test_one_op_covers_the_zoo_and_refuses_what_it_cannot_run():
    model = _net("bottleneck_B", "torch", True, torch.float32)
    assert [u.one_op()[1] for u in model.units] == ["shared_projection", "shared_projection"]
    model = _net("basic_A", "torch", True, torch.float32)
    assert [u.one_op()[1] for u in model.units] == ["shared_identity", "zero_pad", "identity"]
    assert [u.one_op()[3] for u in model.units] == [1, 2, 1]
    refused = [
        ResidualUnit(4, 8, 2, shortcut="B", share_preact=True, shortcut_bn=True),   # BN after the projection
        ResidualUnit(4, 8, 2, shortcut="B"),                                        # projection of raw x
        ResidualUnit(4, 4, variant="original"),                                     # post-activation
        ResidualUnit(4, 4, merge="scale"),                                          # Table 1 merge
    ]
    assert all(u.one_op() is None for u in refused)
    unit = ResidualUnit(4, 4)
    unit.fuse_unit = False
    assert unit.one_op() is None
    unit = ResidualUnit(4, 4, form="bottleneck")
    unit.conv2.bn.eval()  # a frozen BN normalises with its running statistics: the per-layer path keeps that
    assert unit.one_op() is None
    synced = convert_sync_batchnorm(nn.Sequential(ResidualUnit(4, 4)), process_group=object())[0]
    assert synced.one_op() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_relu_conv_backward_adds_dres(backend):
    _available(backend)
    impl = get_backend_impl(backend)
    torch.manual_seed(0)
    dtype = torch.float32 if backend == "triton_conv" else torch.float64
    x = torch.randn(2, 4, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3, dtype=dtype)
    dy = torch.randn(2, 6, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dres = torch.randn_like(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    rstd = torch.rsqrt(var + 1e-5)
    scale, shift = rstd, -mean * rstd
    args = (dy, x, scale, shift, mean, rstd, w, [2, 2], [1, 1], True, True)
    dx, dw, s1, s2 = impl.bn_relu_conv_backward(*args)
    dx_r, dw_r, s1_r, s2_r = impl.bn_relu_conv_backward(*args, dres)
    assert torch.equal(dw_r, dw) and torch.equal(s1_r, s1) and torch.equal(s2_r, s2)
    # fp64: the in-kernel add is exact up to one rounding; fp32 kernels add in fp32 before the store
    torch.testing.assert_close(dx_r, dx + dres, rtol=0, atol=4 * torch.finfo(dtype).eps * float(dx.abs().max() + 1))


def _layer(cin, cout, k=3, stride=1):
    return FF.BNConv(torch.randn(cout, cin, k, k), None, None, None, None, None, 0.1, 1e-5, (stride, stride),
                     (k // 2, k // 2))


def test_preact_unit_errors_name_the_argument():
    x = torch.randn(2, 4, 6, 6)
    cases = [
        (dict(layers=[_layer(4, 4)], shortcut="bogus"), "shortcut: expected one of"),
        (dict(layers=[]), "layers: expected at least one"),
        (dict(layers=[_layer(4, 8), _layer(4, 8)]), r"layers\[1\]\.weight: expected a 4-D conv weight with 8"),
        (dict(layers=[_layer(4, 8)]), "shortcut: 'identity' needs as many output channels"),
        (dict(layers=[_layer(4, 8, stride=2)], shortcut="zero_pad"), "shortcut_stride: the shortcut gives"),
        (dict(layers=[_layer(4, 8)], shortcut="shared_projection", shortcut_weight=torch.randn(8, 4, 3, 3)),
         r"shortcut_weight: expected a projection weight of shape \(8, 4, 1, 1\)"),
        (dict(layers=[_layer(4, 4)], shortcut_weight=torch.randn(4, 4, 1, 1)), "shortcut_weight: only"),
        (dict(layers=[_layer(4, 4)], shortcut_stride=0), "shortcut_stride: expected a positive int"),
        (dict(layers=[_layer(3, 3)]), "x: expected 3 channels"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            FF.preact_unit(x, backend="torch", **kwargs)


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("variant", ["plain", "momentum_none", "no_buffers"])
def test_preact_unit_functional_matches_modules(backend, variant):
    """The functional form with explicit tensors: the same output, statistics and running updates as the unit. A BN
    with the cumulative average (momentum None) or without buffers takes the Python node on the "ext" backend;
    the others its C++ node."""
    _available(backend)
    torch.manual_seed(0)
    unit = ResidualUnit(4, 8, 2, form="bottleneck", shortcut="B", share_preact=True, backend=backend).double()
    ref = ResidualUnit(4, 8, 2, form="bottleneck", shortcut="B", share_preact=True, backend=backend).double()
    ref.load_state_dict(unit.state_dict())
    ref.fuse_unit = False
    for u in (unit, ref):
        if variant == "momentum_none":
            u.conv2.bn.momentum = None  # cumulative average beside momentum 0.1
        elif variant == "no_buffers":
            u.conv2.bn.running_mean = u.conv2.bn.running_var = u.conv2.bn.num_batches_tracked = None
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    layers, kind, weight, stride = unit.one_op()
    out, mean, var = FF.preact_unit(x, layers, kind, weight, stride, backend=backend)
    expected, (m_ref, v_ref) = ref.forward_chained(x)
    assert torch.equal(out, expected) and torch.equal(mean, m_ref) and torch.equal(var, v_ref)
    assert len(list(unit.buffers())) == len(list(ref.buffers())) > 0
    for a, b in zip(unit.buffers(), ref.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(form="bottleneck", shortcut="B", share_preact=True, stride=2),
                                    dict(form="basic", shortcut="A", stride=2), dict(form="single")])
def test_gradients_from_the_input_equal_autograd(kwargs):
    """`ResidualUnit.gradients` (the recomputation's path: no graph, no last conv) gives bitwise the gradients of
    backward through the one-op forward, and leaves the running buffers alone."""
    torch.manual_seed(0)
    cout = 8 if kwargs.get("stride") == 2 else 4
    unit = ResidualUnit(4, cout, backend="torch", **kwargs).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    out, _ = unit.forward_chained(x)
    dout = torch.randn_like(out)
    out.backward(dout)
    buffers = [b.clone() for b in unit.buffers()]
    dx, grads = unit.gradients(x.detach(), None, dout)
    assert torch.equal(dx, x.grad)
    assert set(grads) == set(unit.parameters())
    for p, g in grads.items():
        assert torch.equal(g, p.grad)
    assert all(torch.equal(a, b) for a, b in zip(buffers, unit.buffers()))
