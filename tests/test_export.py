"""Deployment paths of fused models (docs/deploy.md): torch.export graphs hold only fastresnet:: and ATen ops
whichever backend runs, torch.onnx.export (both exporters) writes standard ONNX that onnxruntime runs like PyTorch,
torch.jit.trace records the fastresnet:: ops, torch.jit.script refuses with the alternatives."""
import io
import operator

import pytest
import torch
from torch import nn

import fastresnet
from fastresnet.backends import BACKEND_NAMES, get_backend_impl
from fastresnet.models import create_model
from fastresnet.nn import BNReLU2d, PreActConv2d
from vision_libs import import_timm, import_torchvision


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults (mean 0, var 1, γ 1, β 0), so an export
    that dropped or misplaced any of them differs from PyTorch."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def _onnx_check(model: nn.Module, x: torch.Tensor, dynamo: bool) -> None:
    """Export `model` with the chosen exporter, check that the graph is standard ONNX and that onnxruntime's output
    matches PyTorch's."""
    onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (the test extra)")
    ort = pytest.importorskip("onnxruntime", reason="ONNX export tests run the model in onnxruntime (the test extra)")
    if dynamo:
        pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (the test extra)")
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=dynamo, verbose=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    assert not proto.functions, [f.name for f in proto.functions]
    for node in proto.graph.node:  # every operator is one of the ONNX standard's (default domain)
        assert node.domain in ("", "ai.onnx") and onnx.defs.has(node.op_type), (node.domain, node.op_type)
    assert "Conv" in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    # fp32 rounding of the same arithmetic in another order (ONNX Runtime's convs, the folded BN): on these models
    # both PyTorch and onnxruntime differ from a float64 run by about 1e-6 of the output's largest magnitude; any
    # formula error (eps, a dropped γ/β, ReLU placement, statistics) gives differences of order 1e-2 or more.
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_preact_resnet20(dynamo):
    model = _randomize_bn(create_model("preact_resnet20", num_classes=10))
    _onnx_check(model, torch.randn(2, 3, 16, 16), dynamo)


def test_onnx_converted_torchvision_resnet18():
    tv = import_torchvision()
    model = fastresnet.convert(tv.models.resnet18(num_classes=10)).model
    assert any(isinstance(m, PreActConv2d) for m in model.modules())
    # the TorchScript exporter: each dynamo export rebuilds the exporter's operator registry (about 10 s on a CPU),
    # and preact_resnet20 covers the dynamo path of the same ops
    _onnx_check(_randomize_bn(model), torch.randn(1, 3, 32, 32), dynamo=False)


def test_onnx_converted_timm_resnetv2_50():
    timm = import_timm()
    model = fastresnet.convert(timm.create_model("resnetv2_50", num_classes=10)).model
    assert any(isinstance(m, PreActConv2d) for m in model.modules())
    _onnx_check(_randomize_bn(model), torch.randn(1, 3, 32, 32), dynamo=False)


def _small_net() -> nn.Module:
    """Every fused layer kind of a full pre-activation net: BNReLU2d, PreActConv2d and (in training) whole units."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                         fastresnet.nn.ResidualUnit(8, 8, 1, form="basic", share_preact=True),
                         fastresnet.nn.ResidualUnit(8, 16, 2, form="basic", shortcut="A"),
                         BNReLU2d(16), PreActConv2d(16, 4, 1))


def _backends_here():
    """The backends that run CPU tensors here (the Triton ones under TRITON_INTERPRET=1, as the suite runs)."""
    probe = torch.empty(1, 1, 1, 1)
    return [name for name in BACKEND_NAMES if name != "auto" and get_backend_impl(name).why_not(probe) is None]


def _foreign_targets(ep) -> set:
    """Call targets of an exported program (its subgraphs included) other than ATen ops, fastresnet:: ops,
    getitem and higher-order operators (whose subgraphs are checked as part of the program)."""
    out = set()
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            t = node.target
            if node.op != "call_function" or t is operator.getitem or isinstance(t, torch._ops.HigherOrderOperator):
                continue
            if not (isinstance(t, torch._ops.OpOverload) and t.namespace in ("aten", "fastresnet")):
                out.add(str(t))
    return out


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("training", [False, True])
def test_torch_export_graph_has_public_ops_only(backend, training):
    # export traces with fake tensors, so no kernel runs
    model = _small_net().train(training)
    fastresnet.set_backend(backend)
    try:
        ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    finally:
        fastresnet.set_backend(None)
    fused = {str(n.target) for n in ep.graph.nodes if str(n.target).startswith("fastresnet.")}
    assert fused, "the fused layers should appear as fastresnet:: ops"
    assert not _foreign_targets(ep)


@pytest.mark.parametrize("training", [False, True])
def test_torch_export_decomposes_to_aten(training):
    model = _randomize_bn(_small_net()).train(training)
    x = torch.randn(2, 3, 8, 8)
    table = torch.export.default_decompositions()
    table.update(fastresnet.ops.decompositions())
    ep = torch.export.export(model, (x,)).run_decompositions(table)
    namespaces = {n.target.namespace for n in ep.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    assert namespaces == {"aten"}
    if not training:
        with torch.no_grad():
            # the reference composition of the ops against the backend's kernels: fp32 rounding of a few layers
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_jit_trace_records_public_ops():
    model = _randomize_bn(_small_net())
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(model, (x,))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert {"fastresnet::bn_relu", "fastresnet::bn_relu_conv"} <= kinds
    assert not any(k.startswith("fastresnet_ext::") or k == "prim::PythonOp" for k in kinds), kinds
    buf = io.BytesIO()
    torch.jit.save(traced, buf)  # a graph of registered ops saves (a Python autograd.Function would not)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_jit_script_refused_with_alternatives():
    for model in (create_model("preact_resnet20"), _small_net(),
                  fastresnet.convert(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))).model):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .*torch\.export.*torch\.jit\.trace"
                                               r".*fastresnet\.unconvert"):
            torch.jit.script(model)


def test_jit_script_of_unconverted_twin():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    model = _randomize_bn(fastresnet.convert(plain).model)
    scripted = torch.jit.script(fastresnet.unconvert(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_onnx_training_mode():
    """ONNX export covers inference: the TorchScript exporter exports a model in training mode in eval mode (its
    default, as for plain PyTorch) and restores the mode. (The dynamo exporter fails on a training-mode model: the
    running-statistics update has no ONNX form; docs/deploy.md. Not run here: each dynamo export rebuilds the
    exporter's operator registry, about 10 s on a CPU.)"""
    pytest.importorskip("onnx", reason="ONNX export tests need onnx (the test extra)")
    ort = pytest.importorskip("onnxruntime", reason="ONNX export tests run the model in onnxruntime (the test extra)")
    model = _randomize_bn(nn.Sequential(BNReLU2d(4), PreActConv2d(4, 4, 3))).train()
    x = torch.randn(2, 4, 8, 8)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False)
    assert model.training
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model.eval()(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()  # fp32 rounding, as in _onnx_check
