"""The host path of a training step: what a unit keeps between calls (`ResidualUnit.prepared`, a
`functional.PreparedUnit`), the whole chain of units handed to the backend in one call (`nn.units.UnitChain`,
`Backend.units_train`), and BN's folded affine map as one C++ op (`fastresnet_ext::bn_affine`, `scale_shift`).
Every cached path must give bitwise the results of the path that rebuilds and re-checks everything, and must notice
every change that would make its cache wrong."""
import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fastresnet import reference
from fastresnet.backends import get_backend_impl, set_backend
from fastresnet.models import ResNet
from fastresnet.nn import BNReLU2d, PreActConv2d, cache
from fastresnet.nn.units import ResidualUnit, run_per_layer


def _available(backend):
    reason = get_backend_impl(backend).why_not(torch.empty(1, 1, 1, 1))
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def _default_backend(name):
    set_backend(name)
    try:
        yield
    finally:
        set_backend(None)


def _net(backend="ext", dtype=torch.float64):
    torch.manual_seed(0)
    return ResNet("basic", [2, 2], [4, 8], 3, stem_width=4, shortcut="A", backend=backend).to(dtype)


def _train(model, steps=3, batch=2, dtype=torch.float64):
    """`steps` SGD steps on fixed inputs; returns every output, gradient, parameter and buffer along the way."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for i in range(steps):
        torch.manual_seed(10 + i)
        x = (2.0 + torch.randn(batch, 3, 6, 6, dtype=dtype)).contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        opt.step()
        seen += [out.detach()] + [p.grad.clone() for p in model.parameters()]
        seen += [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    return seen


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), (i, (u.double() - v.double()).abs().max())


@pytest.fixture
def calls(monkeypatch):
    """Records the number of plans of every `Backend.units_train` call of the "ext" backend."""
    impl = type(get_backend_impl("ext"))
    seen, original = [], impl.units_train

    def units_train(self, x, mean, var, plans):
        seen.append(len(plans))
        return original(self, x, mean, var, plans)

    monkeypatch.setattr(impl, "units_train", units_train)
    return seen


def test_chain_hands_all_units_over_and_matches_the_per_unit_path(calls, monkeypatch):
    """After one pass unit by unit, a net's units go to the backend in one call per step (all n plans in one list),
    with bitwise the results of the C++ node called unit by unit and of the Python node."""
    _available("ext")
    n = len(_net().units)
    fast = _train(_net())
    assert calls == [1] * n + [n, n], calls  # step 1: unit by unit (and recorded); steps 2, 3: one call
    calls.clear()
    model = _net()
    model.unit_chain = _unit_by_unit
    _assert_same(fast, _train(model))
    assert calls == [1] * (3 * n)
    monkeypatch.setattr(type(get_backend_impl("ext")), "unit_plan", None)  # the Python node (`_PreactUnit`)
    _assert_same(fast, _train(_net()))


def _unit_by_unit(units, x):
    stats = None
    for unit in units:
        x, stats = unit.forward_chained(x, stats)
    return x, stats


def _mutations():
    """(name, change to make on a model): each invalidates a cache or changes what a unit's one op is."""
    def set_weight(m):
        m.units[1].conv1.conv.weight = nn.Parameter(m.units[1].conv1.conv.weight.detach() * 0.5)

    def set_buffer(m):
        m.units[2].conv2.bn.running_var = torch.full_like(m.units[2].conv2.bn.running_var, 2.0)

    def set_momentum(m):
        m.units[3].conv1.bn.momentum = 0.5

    def set_eps(m):
        m.units[0].conv2.bn.eps = 1e-2

    def freeze_bn(m):
        m.units[2].conv1.bn.eval()

    def unfuse(m):
        m.units[3].fuse_unit = False

    def to_float(m):
        m.float().double()  # every buffer replaced by a new tensor (`Module._apply`)

    def other_backend(m):
        m.units[1].backend = "torch"

    return [("set_weight", set_weight), ("set_buffer", set_buffer), ("set_momentum", set_momentum),
            ("set_eps", set_eps), ("freeze_bn", freeze_bn), ("unfuse", unfuse), ("to_float", to_float),
            ("other_backend", other_backend)]


@pytest.mark.parametrize("per_layer", [False, True], ids=["chained", "per-layer"])
@pytest.mark.parametrize("name,change", _mutations(), ids=[n for n, _ in _mutations()])
def test_caches_notice_changes(name, change, per_layer):
    """A model trained a step (caches warm), changed, trained on, against a copy changed before any cache existed
    (`copy.deepcopy` leaves the caches behind): bitwise the same. Per layer (`run_per_layer`), the caches are the
    layers' plans."""
    _available("ext")
    model = run_per_layer(_net()) if per_layer else _net()
    _train(model, steps=2)
    fresh = copy.deepcopy(model)
    assert (model.__dict__["unit_chain"]._cached is None) == per_layer
    assert fresh.__dict__["unit_chain"]._cached is None
    layers = [m for m in model.modules() if isinstance(m, (PreActConv2d, BNReLU2d))]
    assert all(cache.SLOT in m.__dict__ for m in layers) or not per_layer
    assert not any(cache.SLOT in m.__dict__ for m in fresh.modules())
    change(model)
    change(fresh)
    assert [u.prepared() is None for u in model.units] == [u.prepared() is None for u in fresh.units]
    _assert_same(_train(model), _train(fresh))


def test_caches_follow_the_input_and_the_default_backend(calls):
    """A new batch size changes every BN's sample count (the checks and plans are redone); a new default backend
    for units that take the default changes who runs them."""
    _available("ext")
    model = _net(backend=None)
    with _default_backend("ext"):
        _train(model, steps=2)  # caches warm for batch 2
        fresh = copy.deepcopy(model)  # the same state without them
        _assert_same(_train(model, batch=3), _train(fresh, batch=3))
        fresh = copy.deepcopy(model)
    calls.clear()
    with _default_backend("torch"):
        a = _train(model, steps=2)
        assert calls == []
        b = _train(fresh, steps=2)
    _assert_same(a, b)


def test_unit_cache_is_reused_and_not_pickled():
    _available("ext")
    unit = ResidualUnit(4, 4, backend="ext").double()
    first = unit.prepared()
    assert first is not None and unit.prepared() is first
    unit.conv1.bn.momentum = 0.3
    assert unit.prepared() is not first
    assert cache.SLOT not in copy.deepcopy(unit).__dict__


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3, 16, 17, 64, 1000])
def test_affine_ops_equal_their_aten_composition(dtype, channels, device):
    """The CPU and CUDA kernels of bn_affine / scale_shift against `torch.rsqrt(var + eps)` and
    `reference.scale_shift` (their definition) on the same device: bitwise, for γ/β present or absent and in other
    dtypes, over variances of many magnitudes (ATen's AVX-512 rsqrt is not correctly rounded; the kernel must give its
    bits, not 1/sqrt's; on a GPU an FMA where ATen rounds twice would change the last bit)."""
    _available("ext")
    if device == "cuda" and not torch.ops.fastresnet_ext.bn_affine.default.has_kernel_for_dispatch_key("CUDA"):
        pytest.skip("fastresnet._C was built without CUDA")
    ops = torch.ops.fastresnet_ext
    torch.manual_seed(channels)
    mean = (torch.randn(channels, dtype=torch.float64) * 100).to(dtype).to(device)
    var = torch.exp(torch.randn(channels, dtype=torch.float64) * 10).to(dtype).to(device)
    for gamma, beta in [(None, None), (torch.randn(channels, dtype=dtype, device=device), None),
                        (torch.randn(channels, device=device).bfloat16(),
                         torch.randn(channels, dtype=dtype, device=device))]:
        rstd, scale, shift = ops.bn_affine(mean, var, 1e-5, gamma, beta)
        expected_rstd = torch.rsqrt(var + 1e-5)
        expected = reference.scale_shift(mean, expected_rstd, gamma, beta)
        assert torch.equal(rstd, expected_rstd)
        assert torch.equal(scale, expected[0]) and torch.equal(shift, expected[1])
        again = ops.scale_shift(mean, rstd, gamma, beta)
        assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])


def test_affine_ops_name_bad_arguments():
    _available("ext")
    ops = torch.ops.fastresnet_ext
    v = torch.ones(4)
    with pytest.raises(RuntimeError, match="var: expected Float of shape \\[4\\]"):
        ops.bn_affine(v, torch.ones(5), 1e-5, None, None)
    with pytest.raises(RuntimeError, match="mean: expected a float32 or float64 vector"):
        ops.bn_affine(torch.ones(4, dtype=torch.int64), v, 1e-5, None, None)
    with pytest.raises(RuntimeError, match="weight: expected a floating vector of shape \\[4\\]"):
        ops.scale_shift(v, v, torch.ones(3), None)


def test_unit_cache_is_not_shared_with_replicas_or_parametrized_weights():
    """A DataParallel replica shares the unit's attributes but has its own tables (and tensors): it builds its own
    cache. A parametrized conv weight is computed on every access: the unit never caches it."""
    _available("ext")
    unit = ResidualUnit(4, 4, backend="ext").double()
    first = unit.prepared()
    replica = unit._replicate_for_data_parallel()
    assert replica.prepared() is not first and unit.prepared() is first

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(unit.conv2.conv, "weight", Doubled())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    unit.forward_chained(x)
    with torch.no_grad():
        unit.conv2.conv.parametrizations.weight.original.mul_(0.5)  # the computed weight changes, no object does
    out, _ = unit.forward_chained(x)
    unit.fuse_unit = False  # the per-layer path reads the weight through the module: bitwise the one op's result
    expected, _ = unit.forward_chained(x)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_eager_path_of_the_per_layer_ops_equals_the_custom_op(backend):
    """`FusedOp`: an eager call runs the body and backward formula in a plain autograd.Function instead of the
    `torch.library` op; outputs, statistics and every gradient are bitwise the op's, and the statistics are not
    differentiable."""
    _available(backend)
    from fastresnet.ops import bn_ops, unit_ops
    torch.manual_seed(0)
    x = (3 + torch.randn(2, 4, 5, 5, dtype=torch.float64)).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    g, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    res = torch.randn(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    mean, var = reference.batch_stats(x)
    rstd = torch.rsqrt(var + 1e-5)
    cases = [
        (bn_ops._bn_relu, (x, mean, rstd, g, b, True, backend)),
        (bn_ops._bn_relu_conv, (x, w, mean, rstd, g, b, [1, 1], [1, 1], True, backend)),
        (bn_ops._add_stats, (x, x.flip(0), backend)),
        (unit_ops._bn_relu_conv_stats, (x, w, mean, rstd, g, b, res, [1, 1], [1, 1], True, backend)),
    ]
    for fused, args in cases:
        results = []
        for call in (fused, fused.op):
            leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.dim() != 1
                      or a is g or a is b else a for a in args]
            out = call(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            (outs[0] * torch.linspace(-1, 1, outs[0].numel(), dtype=outs[0].dtype).view_as(outs[0])).sum().backward()
            grads = [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
            results.append((outs, grads))
            if call is fused:
                assert all(not o.requires_grad for o in outs[1:])
        (outs_a, grads_a), (outs_b, grads_b) = results
        _assert_same(list(outs_a) + grads_a, list(outs_b) + grads_b)


def test_eager_path_works_under_torch_func_grad(monkeypatch):
    """The eager path is a new-style autograd.Function (setup_context), so torch.func transforms that need a
    backward (grad) go through it as they went through the custom op: the same gradient as autograd. `FusedOp`
    calls autograd.Function's C apply directly (Function.apply binds the forward's arguments with
    inspect.signature on every call); only under a torch.func transform does it take Function.apply, which routes
    the call through functorch."""
    _available("ext")
    import fastresnet.functional as FF
    from fastresnet.ops import bn_ops
    taken = []
    original = bn_ops._EagerOp.apply.__func__

    def apply(cls, *args):
        taken.append(torch._C._are_functorch_transforms_active())
        return original(cls, *args)

    monkeypatch.setattr(bn_ops._EagerOp, "apply", classmethod(apply))
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64)

    def loss(weight):
        return FF.bn_relu_conv2d(x, weight, None, None, padding=1, backend="ext").square().sum()

    expected = w.clone().requires_grad_()
    loss(expected).backward()
    assert taken == []
    assert torch.equal(torch.func.grad(loss)(w), expected.grad)
    assert taken and taken[0]  # (functorch then calls apply again below its transform)


def test_conversion_that_swaps_parameter_tensors_rebuilds_the_cache():
    """With `swap_module_params_on_conversion`, `.to(...)` keeps each Parameter object and swaps the tensor inside
    it, which no identity comparison sees: the unit drops its cache on any conversion."""
    _available("ext")
    model = _net()
    _train(model, steps=2)
    fresh = copy.deepcopy(model)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(memory_format=torch.channels_last)
        fresh.to(memory_format=torch.channels_last)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    _assert_same(_train(model), _train(fresh))


def test_state_dict_load_that_swaps_parameter_tensors_works():
    """`load_state_dict` in swap mode swaps each parameter's tensor, which refuses tensors held elsewhere: the caches
    let go first, and training goes on as in a model that never had them."""
    _available("ext")
    model, source = _net(), _net()
    _train(model, steps=2)
    _train(source, steps=1)
    fresh = copy.deepcopy(model)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.load_state_dict(source.state_dict())
        fresh.load_state_dict(source.state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    _assert_same(_train(model), _train(fresh))


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_backend_affine_map_equals_the_reference(backend):
    """`Backend.scale_shift`, which the per-layer ops use: bitwise `reference.scale_shift` on every backend."""
    _available(backend)
    torch.manual_seed(0)
    mean, rstd = torch.randn(7) * 50, torch.rand(7) * 10
    for gamma, beta in [(None, None), (torch.randn(7), torch.randn(7)), (torch.randn(7).bfloat16(), None)]:
        got = get_backend_impl(backend).scale_shift(mean, rstd, gamma, beta)
        expected = reference.scale_shift(mean, rstd, gamma, beta)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_running_update_of_the_cuda_backend_equals_the_reference(buffer_dtype):
    """The "ext" backend's running update (C++, what BNReLU2d / PreActConv2d use in training there) against
    `reference.update_running_stats`: buffers and counters bitwise over several steps, for buffers in every dtype a
    model may hold; momentum=None (cumulative average) and BNs without a counter take the reference."""
    _available("ext")
    from fastresnet import ops
    torch.manual_seed(0)
    stat_dtype = torch.float64 if buffer_dtype == torch.float64 else torch.float32
    rm, rv = torch.randn(9).to(buffer_dtype), torch.rand(9).to(buffer_dtype)
    nbt = torch.tensor(3)
    mine, theirs = (rm.clone(), rv.clone(), nbt.clone()), (rm.clone(), rv.clone(), nbt.clone())
    for step in range(4):
        mean, var = (100 * torch.randn(9)).to(stat_dtype), torch.rand(9).to(stat_dtype) * 1e3
        momentum = None if step == 3 else 0.1 * (step + 1)
        ops.update_running_stats(*mine, mean, var, 2 * 5 * 7, momentum, "ext")
        reference.update_running_stats(*theirs, mean, var, 2 * 5 * 7, momentum)
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b), (step, a, b)
    get_backend_impl("ext").update_running_stats([mine[0]], [mine[1]], [mine[2]], [70], 0.5, [mean], [var])
    reference.update_running_stats(*theirs, mean, var, 70, 0.5)
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)
    ops.update_running_stats(mine[0], mine[1], None, mean, var, 70, 0.5, "ext")
    reference.update_running_stats(theirs[0], theirs[1], None, mean, var, 70, 0.5)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


def test_running_update_names_bad_arguments():
    _available("ext")
    from fastresnet import _C
    v, n = torch.zeros(3), torch.tensor(0)
    with pytest.raises(ValueError, match="counts: expected N·H·W = 0 or > 1, got 1"):
        _C.update_running_stats([v], [v.clone()], [n], [1], 0.1, [v], [v])
    with pytest.raises(ValueError, match="expected one running buffer set, count, mean and var per BN"):
        _C.update_running_stats([v], [v.clone()], [n], [4], 0.1, [v, v], [v])


# ---- single fused layers (`Backend.layer_train`: a converted model's PreActConv2d / BNReLU2d in training) ----------
@pytest.fixture
def layer_calls(monkeypatch):
    """Records every `Backend.layer_train` call of the "ext" backend: whether it was handed statistics."""
    impl = type(get_backend_impl("ext"))
    seen, original = [], impl.layer_train

    def layer_train(self, x, mean, var, plan, weight_dtype):
        seen.append(mean is not None)
        return original(self, x, mean, var, plan, weight_dtype)

    monkeypatch.setattr(impl, "layer_train", layer_train)
    return seen


@pytest.mark.parametrize("chained", [False, True], ids=["per-layer", "chained"])
@pytest.mark.parametrize("dtype,autocast", [(torch.float64, False), (torch.float32, False), (torch.float32, True)],
                         ids=["fp64", "fp32", "bf16-autocast"])
def test_native_layers_equal_the_ops(chained, dtype, autocast, layer_calls, monkeypatch):
    """Every fused layer of a net run layer by layer (`run_per_layer`, the path of a converted model), and the
    chained net's head BN → ReLU (handed its input's statistics), as one C++ node each: bitwise the ops' results —
    outputs, gradients, parameters and running buffers over three SGD steps; under bf16 autocast too (the conv weight
    cast per call, its gradient cast back)."""
    _available("ext")

    def net():
        model = _net(dtype=dtype)
        return model if chained else run_per_layer(model)

    def train():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _train(net(), dtype=dtype)

    fast = train()
    layers = sum(isinstance(m, (PreActConv2d, BNReLU2d)) for m in net().modules())
    assert layer_calls == ([True] * 3 if chained else [False] * (3 * layers)), layer_calls
    monkeypatch.setattr(type(get_backend_impl("ext")), "layer_plan", None)
    _assert_same(fast, train())


@pytest.mark.parametrize("kind", ["bn_relu", "preact_conv"])
def test_native_layer_node_contract(kind):
    """The layer's C++ node: a second backward without retain_graph raises; a weight changed in place after the
    forward is caught; without gradients no node is made and the running buffers are still updated; a layer that is
    not affine, averages cumulatively or is frozen takes the ops."""
    _available("ext")
    torch.manual_seed(0)
    layer = (BNReLU2d(4, backend="ext") if kind == "bn_relu" else PreActConv2d(4, 6, 3, 2, 1, backend="ext"))
    layer = layer.double()
    bn = layer if kind == "bn_relu" else layer.bn
    x = (1.0 + torch.randn(2, 4, 5, 5, dtype=torch.float64)).requires_grad_()
    out = layer(x)
    assert out.grad_fn.name() == "NativeLayerBackward"
    out.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    out = layer(x)
    with torch.no_grad():
        bn.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    steps = bn.num_batches_tracked.item()
    with torch.no_grad():
        assert layer(x).grad_fn is None
    assert bn.num_batches_tracked.item() == steps + 1
    bn.momentum = None
    assert layer(x).grad_fn.name() != "NativeLayerBackward"
    bn.momentum = 0.1
    bn.eval()
    assert layer(x).grad_fn.name() != "NativeLayerBackward"


# the hook-based weight_norm is deprecated in torch, and used here on purpose: its weight is a plain attribute
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_layer_path_edge_cases_equal_the_ops(monkeypatch):
    """Bitwise the ops' results where the layer's plan could go stale or its order matter: a DataParallel-style
    replica (new tables, its own weight) builds its own plan; a parametrized weight is read through the module on every
    call; a hook-based weight_norm keeps the weight as a plain attribute, recomputed before every call (no plan is
    made); statistics handed in that alias the running buffers see the update first, as in the ops."""
    _available("ext")
    torch.manual_seed(0)
    layer = PreActConv2d(4, 4, 3, 1, 1, backend="ext").double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    layer(x)
    replica = layer._replicate_for_data_parallel()
    replica._modules["conv"] = layer.conv._replicate_for_data_parallel()
    replica.conv._parameters["weight"] = layer.conv.weight.detach() * 2

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(layer.conv, "weight", Doubled())
    layer(x)
    with torch.no_grad():
        layer.conv.parametrizations.weight.original.mul_(0.5)
    normed = torch.nn.utils.weight_norm(BNReLU2d(4, backend="ext").double(), dim=None)
    aliased = BNReLU2d(4, backend="ext").double()

    def run():
        torch.manual_seed(1)
        state = copy.deepcopy((normed.state_dict(), aliased.state_dict()))
        out = [replica(x), layer(x)]
        for _ in range(2):
            xg = x.clone().requires_grad_()
            y = normed(xg) + aliased(xg, (aliased.running_mean, aliased.running_var))
            y.sum().backward()
            out += [y.detach(), xg.grad, aliased.running_mean.clone(), normed.weight_g.grad.clone()]
        normed.load_state_dict(state[0])
        aliased.load_state_dict(state[1])
        normed.zero_grad()
        return out

    native = run()
    monkeypatch.setattr(type(get_backend_impl("ext")), "layer_plan", None)
    _assert_same(native, run())


@pytest.mark.slow  # compiles the backward with compiled autograd
def test_compiled_autograd_runs_the_registered_ops():
    """With compiled autograd on, layers and units record the registered ops' nodes (which it can trace), not the C++
    nodes, and the gradients are bitwise those of plain eager mode."""
    _available("ext")
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    torch.manual_seed(0)
    for model, channels in [(PreActConv2d(4, 4, 3, 1, 1, backend="ext"), 4), (_net(dtype=torch.float32), 3)]:
        x = (1.0 + torch.randn(2, channels, 6, 6)).requires_grad_()
        model(x).sum().backward()  # plain eager: C++ nodes
        expected = [x.grad] + [p.grad for p in model.parameters()]
        x.grad = None
        model.zero_grad()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.num_batches_tracked.zero_()
        with compiled_autograd._enable(torch.compile(backend="eager")):
            out = model(x)
            assert "Native" not in out.grad_fn.name()
            out.sum().backward()
        _assert_same(expected, [x.grad] + [p.grad for p in model.parameters()])
