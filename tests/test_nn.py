"""fastresnet.nn modules: state-dict compatibility with unfused PyTorch modules, repr, and numerics (torch backend)."""
import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fastresnet
from fastresnet import BNReLU2d, PreActConv2d
from fastresnet.nn.units import ResidualUnit


def _unfused(cin, cout, k, s, p):
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(cin), relu=nn.ReLU(), conv=nn.Conv2d(cin, cout, k, s, p,
                                                                                             bias=False)))


def _randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)


def test_preact_conv_state_dict_keys_and_round_trip():
    fused = PreActConv2d(6, 8, 3, stride=2, padding=1)
    ref = _unfused(6, 8, 3, 2, 1)
    assert list(fused.state_dict()) == list(ref.state_dict())
    _randomize_bn(ref.bn)
    fused.load_state_dict(ref.state_dict())        # unfused → fused
    back = _unfused(6, 8, 3, 2, 1)
    back.load_state_dict(fused.state_dict())       # fused → unfused
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    again = PreActConv2d(6, 8, 3, stride=2, padding=1)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fused.state_dict().values()))


def test_bnrelu_is_a_batchnorm_for_checkpoints():
    bn = nn.BatchNorm2d(5)
    _randomize_bn(bn)
    m = BNReLU2d(5)
    m.load_state_dict(bn.state_dict())
    assert isinstance(m, nn.BatchNorm2d)
    x = torch.randn(3, 5, 4, 4) - 1
    torch.testing.assert_close(m.eval()(x), torch.relu(bn.eval()(x)))


def test_repr_names_the_layer():
    r = repr(PreActConv2d(6, 8, 3, stride=2, padding=1, backend="torch"))
    assert r.startswith("PreActConv2d(")
    assert "6, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), backend='torch'" in r
    assert "BatchNorm2d(6" in r and "Conv2d(6, 8" in r
    assert "backend='torch'" in repr(BNReLU2d(4, backend="torch"))
    assert "variant='full_preact'" in repr(fastresnet.create_model("preact_resnet20"))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_preact_conv_matches_unfused_training(momentum, channels_last):
    fused = PreActConv2d(5, 7, 3, stride=2, padding=1, momentum=momentum, backend="torch").double()
    ref = _unfused(5, 7, 3, 2, 1).double()
    ref.bn.momentum = momentum
    _randomize_bn(ref.bn)
    fused.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(2):  # two steps: running statistics accumulate the same way
        x = (-2.3 + 0.5 * torch.randn(3, 5, 7, 5, dtype=torch.float64)).contiguous(memory_format=fmt)
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yr = fused(xf), ref(xr)
        torch.testing.assert_close(yf, yr)
        dy = torch.randn_like(yr)
        yf.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xf.grad, xr.grad)
    torch.testing.assert_close(fused.conv.weight.grad, ref.conv.weight.grad)
    torch.testing.assert_close(fused.bn.weight.grad, ref.bn.weight.grad)
    torch.testing.assert_close(fused.bn.bias.grad, ref.bn.bias.grad)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.bn, k), getattr(ref.bn, k))


def test_preact_conv_eval_uses_running_stats():
    fused = PreActConv2d(4, 4, 1, backend="torch").double().eval()
    ref = _unfused(4, 4, 1, 1, 0).double().eval()
    _randomize_bn(ref.bn)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(fused(x), ref(x2))
    fused(x).sum().backward()
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(fused.bn.weight.grad, ref.bn.weight.grad)
    assert fused.bn.num_batches_tracked.item() == 0


def test_fused_layers_save_only_the_bn_input():
    m = PreActConv2d(4, 4, 3, padding=1, backend="torch")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    ptrs = {t.data_ptr() for t in saved if t.numel() > 4}  # per-channel mean/rstd/γ/β are 4 elements here
    assert ptrs == {x.data_ptr(), m.conv.weight.data_ptr()}, "only x (the BN input) and W may be saved"


def test_bad_inputs_name_the_argument():
    m = PreActConv2d(4, 8, 3, padding=1)
    with pytest.raises(ValueError, match="x: expected 4 channels"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match="x: expected dtype"):
        m(torch.ones(2, 4, 5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        m(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="more than one value per channel"):
        m(torch.randn(1, 4, 1, 1))
    m.eval()(torch.randn(1, 4, 3, 3))  # a single value per channel is fine with running statistics
    with pytest.raises(ValueError, match="unknown backend"):
        fastresnet.set_backend("nope")


def test_model_state_dict_round_trip_and_deepcopy():
    m = fastresnet.create_model("preact_resnet20")
    m2 = fastresnet.create_model("preact_resnet20")
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m.eval()(x), m2.eval()(x))
    torch.testing.assert_close(copy.deepcopy(m)(x), m(x))


def test_model_loads_state_dict_of_its_unfused_twin():
    # unconvert gives the model as plain BatchNorm2d / ReLU / Conv2d modules: the eager PyTorch equivalent.
    fused = fastresnet.create_model("preact_resnet20")
    plain = fastresnet.unconvert(fastresnet.create_model("preact_resnet20"))
    assert not any(isinstance(m, (PreActConv2d, BNReLU2d)) for m in plain.modules()) and not plain.chained
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m)
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    fused.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)  # fp32, reordered sums


def test_per_channel_arguments_are_checked():
    x = torch.randn(2, 4, 3, 3)
    F_ = fastresnet.functional
    with pytest.raises(ValueError, match="running_mean, running_var: expected both"):
        F_.bn_relu(x, torch.zeros(4), None)
    with pytest.raises(ValueError, match="bn_weight: expected a 1-D tensor of 4 elements"):
        F_.bn_relu(x, None, None, bn_weight=torch.ones(2, 2))
    with pytest.raises(TypeError, match="bn_weight: expected a floating dtype"):
        F_.bn_relu(x, None, None, bn_weight=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"stats\[0\] \(mean\): expected a 1-D tensor of 4"):
        F_.bn_relu(x, None, None, stats=(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="weight: expected a 4-D conv weight"):
        F_.bn_relu_conv2d(x, torch.ones(4, 4), None, None)
    with pytest.raises(ValueError, match="residual: expected shape"):
        F_.bn_relu_conv2d(x, torch.ones(5, 4, 1, 1), None, None, residual=torch.zeros(2, 4, 3, 3))


def test_pre_act_conv_follows_its_bn_mode():
    """Freezing every BatchNorm2d of a model (`m.eval()` on each, the usual fine-tuning recipe) freezes the BN inside
    a PreActConv2d too: it normalises with its running statistics and leaves them alone, as eager BN → ReLU → conv
    does, in the layer and in a unit's chained forward (which then runs it per layer)."""
    torch.manual_seed(0)
    unit = ResidualUnit(4, 4, backend="torch").double()
    for m in unit.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
    unit.conv2.bn.eval()
    layer, bn = unit.conv2, unit.conv2.bn
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    before = [b.clone() for b in bn.buffers()]
    expected = torch.nn.functional.conv2d(
        torch.relu(torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)),
        layer.conv.weight, None, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert unit.one_op() is None
    out, _ = unit.forward_chained(x)
    frozen_input = unit.conv1(x)
    torch.testing.assert_close(out, x + layer(frozen_input), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))
