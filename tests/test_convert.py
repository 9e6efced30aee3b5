"""fastresnet.convert / unconvert on networks written in the styles users have: timm ResNetV2 (pre-activation
bottlenecks, norm-act Sequentials, a pre-activated projection shortcut), a torchvision-style PreAct ResNet
(functional F.relu(self.bn(x)) in forward), a plain nn.Sequential CNN, and a CNN with no matching chain.

Equivalence is checked in float64 on the "torch" backend: the fused layers compute the same math as BatchNorm2d →
ReLU → Conv2d in a different association order (BN folded to scale/shift, running statistics by lerp), so the
differences are rounding, ~1e-15 relative; 1e-10 leaves room for accumulation over a few layers and still fails on
any real semantic difference (a missed ReLU, wrong statistics, a dropped running-stat update).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastresnet
from fastresnet import BNReLU2d, PreActConv2d, convert, unconvert
from fastresnet.convert import SCRIPTED_REASON

TOL = dict(atol=1e-10, rtol=1e-10)  # float64, see the module docstring


# ---- reference networks (written for these tests) -----------------------------------------------------------------
def norm_act(c):
    """timm style: a norm layer with its activation (here a Sequential, the activation in place)."""
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True))


class ProjectionConv(nn.Module):
    """A 1×1 projection that reads the pre-activated input (no norm of its own)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        return self.conv(x)


class PreActBottleneck(nn.Module):
    """timm ResNetV2 style: norm1/conv1/norm2/conv2/norm3/conv3, downsample on the pre-activated input."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        mid = cout // 4
        self.downsample = ProjectionConv(cin, cout, stride) if stride != 1 or cin != cout else None
        self.norm1, self.conv1 = norm_act(cin), nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2, self.conv2 = norm_act(mid), nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.norm3, self.conv3 = norm_act(mid), nn.Conv2d(mid, cout, 1, bias=False)

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return x + shortcut

    def extra_method(self):
        return "kept"


class TimmStyleResNetV2(nn.Module):
    def __init__(self, widths=(8, 16), num_classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        blocks, cin = [], 4
        for i, w in enumerate(widths):
            blocks += [PreActBottleneck(cin, w, 1 if i == 0 else 2), PreActBottleneck(w, w)]
            cin = w
        self.stages = nn.Sequential(*blocks)
        self.norm = norm_act(cin)
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.norm(self.stages(self.stem(x)))

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


class PreActBlock(nn.Module):
    """torchvision-style pre-activation basic block with the ReLU written three ways in forward."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(self.bn2(out).relu())
        return out + shortcut


class TorchvisionStylePreActResNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 8))
        self.layer2 = nn.Sequential(PreActBlock(8, 16, 2))
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = torch.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(self.relu(out), 1)
        return self.linear(out.view(out.size(0), -1))


def sequential_cnn():
    """Post-activation CNN as one nn.Sequential: bn1 → relu → conv2 is a pre-activated conv in disguise."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


class UnrelatedCNN(nn.Module):
    """No BN → ReLU anywhere: conv → ReLU → pool, conv → BN → SiLU."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.silu(self.bn(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Chain(nn.Module):
    """One BN → ReLU → conv with configurable modules, for the unsupported-option cases."""

    def __init__(self, bn=None, conv=None):
        super().__init__()
        self.bn = bn or nn.BatchNorm2d(4)
        self.conv = conv or nn.Conv2d(4, 6, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class InplaceTrick(Chain):
    def forward(self, x):
        out = self.bn(x)
        torch.relu_(out)
        return self.conv(out)


class BranchesOnMode(Chain):
    def forward(self, x):
        y = self.conv(F.relu(self.bn(x)))
        return y * 2 if self.training else y


class DataDependent(Chain):
    def forward(self, x):
        if x.sum() > 0:
            return self.conv(F.relu(self.bn(x)))
        return x


# ---- helpers -------------------------------------------------------------------------------------------------------
def randomize(model):
    """Non-trivial BN affine parameters and running statistics, so a swapped or dropped tensor shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return model


def converted(model, **kw):
    model = randomize(model).double()
    fused, report = convert(model, backend="torch", **kw)
    return model, fused, report


def run(model, x):
    """Output, input grad and {state-dict key: grad} after a backward of a fixed random projection."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * g).sum().backward()
    params = {k: v.grad for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    return y.detach(), x.grad, params


def assert_same(orig, fused, x, training):
    orig.train(training)
    fused.train(training)
    y0, dx0, g0 = run(orig, x)
    y1, dx1, g1 = run(fused, x)
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(dx1, dx0, **TOL)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], **TOL, msg=lambda m: f"{k}: {m}")
    # running statistics (updated once in training) and every other entry, under the original keys
    s0, s1 = orig.state_dict(), fused.state_dict()
    assert list(s1) == list(s0)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], **TOL, msg=lambda m: f"{k}: {m}")


def x_input(shape=(3, 3, 9, 7)):
    return (-1.3 + 0.7 * torch.randn(shape)).double()  # non-zero mean, odd sizes


def fused_types(model):
    return [type(m).__name__ for m in model.modules() if isinstance(m, (PreActConv2d, BNReLU2d))]


# ---- tests ---------------------------------------------------------------------------------------------------------
def test_timm_style_resnetv2():
    orig, fused, report = converted(TimmStyleResNetV2())
    # 4 blocks × (norm2→conv2, norm3→conv3) + norm1→conv1 in the 2 identity blocks; norm1 of the 2 projecting
    # blocks feeds conv1 and the downsample (BNReLU2d), and the final norm feeds a mean (BNReLU2d).
    assert report.num_preact == 10 and report.num_bn_relu == 3, str(report)
    assert not report.skipped and not report.untraced, str(report)
    assert isinstance(fused.stages[0].conv1, nn.Conv2d)  # projecting block: conv1 stays plain
    assert isinstance(fused.stages[0].norm1[0], BNReLU2d) and isinstance(fused.stages[0].norm1[1], nn.Identity)
    assert isinstance(fused.stages[1].conv1, PreActConv2d) and fused.stages[1].conv1.bn is not None
    assert fused.stages[1].extra_method() == "kept" and isinstance(fused.stages[1], PreActBottleneck)
    assert isinstance(fused, TimmStyleResNetV2) and fused.forward_features is not None
    for training in (True, False):
        assert_same(orig, fused, x_input(), training)


def test_torchvision_style_preact_resnet():
    orig, fused, report = converted(TorchvisionStylePreActResNet())
    # bn2→.relu()→conv2 in every block, F.relu(bn1)→conv1 in the two identity blocks; bn1 of the projecting block
    # and the head's torch.relu(bn) are BNReLU2d.
    assert report.num_preact == 5 and report.num_bn_relu == 2, str(report)
    assert {c.relu.split(" ")[0] for c in report.fused} == {"F.relu", "x.relu()", "torch.relu"}
    assert isinstance(fused.get_submodule("layer1.0.conv1"), PreActConv2d) and fused.layer1[0].bn1 is None
    assert isinstance(fused.layer2[0].bn1, BNReLU2d)
    for training in (True, False):
        assert_same(orig, fused, x_input(), training)


def test_sequential_chains():
    orig, fused, report = converted(sequential_cnn())
    assert [type(m).__name__ for m in fused] == [
        "Conv2d", "Identity", "Identity", "PreActConv2d", "BNReLU2d", "Identity", "AdaptiveAvgPool2d", "Flatten",
        "Linear"]
    assert report.num_preact == 1 and report.num_bn_relu == 1
    for training in (True, False):
        assert_same(orig, fused, x_input(), training)


def test_unrelated_cnn_unchanged():
    model = UnrelatedCNN().double()
    fused, report = convert(model)
    assert fused_types(fused) == [] and not report.fused
    assert type(fused) is UnrelatedCNN
    assert [s.reason for s in report.skipped] == ["BN output goes to silu(), not a ReLU"]
    assert "0 PreActConv2d, 0 BNReLU2d" in str(report)
    x = x_input()
    torch.testing.assert_close(fused(x), model(x), atol=0, rtol=0)
    _, report = convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert str(report) == "convert: no BatchNorm2d → ReLU (→ Conv2d) chain found; the model is unchanged"


def test_state_dict_loads_both_ways():
    orig, fused, _ = converted(TimmStyleResNetV2())
    other = randomize(TimmStyleResNetV2()).double()
    assert list(fused.state_dict()) == list(other.state_dict())
    fused.load_state_dict(other.state_dict())                   # strict: keys match exactly
    x = x_input()
    orig.load_state_dict(other.state_dict())
    assert_same(orig, fused, x, training=False)
    other2 = randomize(TimmStyleResNetV2()).double()
    orig.load_state_dict(other2.state_dict())
    fused.load_state_dict(other2.state_dict())
    orig.eval(); other2.eval()
    other2.load_state_dict(fused.state_dict())                 # fused -> plain
    torch.testing.assert_close(other2(x), orig(x), **TOL)
    # metadata follows the keys (BatchNorm2d's version entry stays under the BN's name)
    assert fused.state_dict()._metadata.keys() == orig.state_dict()._metadata.keys()


def test_inplace_keeps_parameter_objects_and_optimizer():
    model = randomize(TorchvisionStylePreActResNet()).double()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused, _ = convert(model, backend="torch", inplace=True)
    assert fused is model
    after = {k: v for k, v in fused.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
    assert all(after[k] is before[k] for k in before)
    fused(x_input()).sum().backward()
    opt.step()  # updates the fused model's parameters


def test_unconvert_round_trip():
    orig, fused, _ = converted(TimmStyleResNetV2())
    fused.train()
    fused(x_input())  # change the running stats in the fused form
    plain = unconvert(fused)
    assert fused_types(plain) == [] and fused_types(fused) != []     # inplace=False left fused alone
    assert [type(m) for m in plain.modules()] == [type(m) for m in orig.modules()]
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in orig.named_parameters()]
    assert list(plain.state_dict()) == list(orig.state_dict())
    assert not any(m._state_dict_hooks or m._load_state_dict_pre_hooks for m in plain.modules())
    x = x_input()
    for a, b in zip(plain.state_dict().values(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    plain.eval(); fused.eval()
    torch.testing.assert_close(plain(x), fused(x), **TOL)
    # the fused model still works (its hooks survived the deep copy) and converts again identically
    assert list(fused.state_dict()) == list(orig.state_dict())
    assert convert(plain)[1].num_preact == 10


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_bn_flags_supported(affine, track):
    orig, fused, report = converted(Chain(bn=nn.BatchNorm2d(4, affine=affine, track_running_stats=track)))
    assert report.num_preact == 1
    for training in (True, False):
        assert_same(orig, fused, x_input((2, 4, 5, 3)), training)


@pytest.mark.parametrize("conv,reason", [
    (nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), "groups=2"),
    (nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), "dilation=(2, 2)"),
    (nn.Conv2d(4, 6, 3, padding=1, bias=True), "bias"),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False), "padding_mode='reflect'"),
    (nn.Conv2d(4, 6, 3, padding="same", bias=False), "padding='same'"),
])
def test_unsupported_conv_keeps_conv(conv, reason):
    orig, fused, report = converted(Chain(conv=conv))
    assert report.num_preact == 0 and report.num_bn_relu == 1   # BN → ReLU alone is still fused
    assert reason in report.fused[0].relu and type(fused.conv) is nn.Conv2d
    for training in (True, False):
        assert_same(orig, fused, x_input((2, 4, 5, 3)), training)


@pytest.mark.parametrize("model,reason", [
    (InplaceTrick(), "BN output has 2 users"),
    (Chain(bn=nn.BatchNorm2d(4).eval()), "train/eval mismatch"),
])
def test_unsafe_chains_left_alone(model, reason):
    orig, fused, report = converted(model)
    assert not report.fused and reason in report.skipped[0].reason, str(report)
    assert fused_types(fused) == []
    assert_same(orig, fused, x_input((2, 4, 5, 3)), training=True)


@pytest.mark.parametrize("model,reason", [
    (BranchesOnMode(), "branches on self.training"),
    (DataDependent(), "torch.fx cannot trace"),
])
def test_untraceable_reported(model, reason):
    _, fused, report = converted(model)
    assert reason in report.untraced[""] and fused_types(fused) == [] and type(fused) is type(model)


def test_shared_bn_left_alone():
    class SharedBN(Chain):
        def forward(self, x):
            return self.conv(F.relu(self.bn(x))) + self.conv(F.relu(self.bn(x)))
    _, _, report = converted(SharedBN())
    assert not report.fused and all("shared" in s.reason for s in report.skipped)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        convert("resnet")
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        convert(nn.Linear(1, 1), backend="nope")


def test_exported():
    assert fastresnet.convert is convert and fastresnet.unconvert is unconvert
    assert {"convert", "unconvert"} <= set(fastresnet.__all__)


# ---- no-op modules in the chain, and forwards that branch on more than tensor values ------------------------------
class IdentityBetween(nn.Module):
    """timm resnet style: BN → drop_block (nn.Identity) → ReLU → aa (nn.Identity) → conv."""

    def __init__(self):
        super().__init__()
        self.bn, self.drop_block, self.act, self.aa = nn.BatchNorm2d(4), nn.Identity(), nn.ReLU(), nn.Identity()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.aa(self.act(self.drop_block(self.bn(x)))))


def test_looks_through_identity():
    orig, fused, report = converted(IdentityBetween())
    assert report.num_preact == 1 and not report.skipped, str(report)
    for training in (True, False):
        assert_same(orig, fused, x_input((2, 4, 5, 3)), training)
    assert type(unconvert(fused).bn) is nn.BatchNorm2d


class BranchesOnAttribute(Chain):
    """Forward reads configuration (like timm's grad_checkpointing or torchvision's memory_efficient)."""

    def __init__(self):
        super().__init__()
        self.double_it = False

    def forward(self, x):
        y = self.conv(F.relu(self.bn(x)))
        return y * 2 if self.double_it else y


class OptionalArgument(Chain):
    def forward(self, x, mask=None):
        y = self.conv(F.relu(self.bn(x)))
        return y if mask is None else y * mask


def test_attribute_branch_kept():
    orig, fused, report = converted(BranchesOnAttribute())
    assert report.num_preact == 1
    x = x_input((2, 4, 5, 3))
    assert_same(orig, fused, x, training=False)
    orig.double_it = fused.double_it = True   # the other branch: the original forward runs, with the original modules
    assert_same(orig, fused, x, training=False)
    assert isinstance(fused.conv, PreActConv2d) and fused.bn is None   # the fused slots are back after the call


def test_optional_argument_branch_kept():
    orig, fused, report = converted(OptionalArgument())
    assert report.num_preact == 1
    x = x_input((2, 4, 5, 3))
    mask = torch.rand(2, 6, 5, 3, dtype=torch.float64)
    orig.eval(); fused.eval()
    torch.testing.assert_close(fused(x, mask), orig(x, mask), **TOL)   # traced path (mask given)
    torch.testing.assert_close(fused(x), orig(x), **TOL)               # mask None: the trace assumed a tensor


# ---- TorchScript and torch.fx inputs --------------------------------------------------------------------------------
def test_torch_fx_graph_module_is_converted_from_its_graph():
    """symbolic_trace output: the chains sit in the GraphModule's graph, under bare nn.Module containers (its state
    dict is in graph order, so it, not the eager model, is the reference for key order)."""
    gm = torch.fx.symbolic_trace(randomize(TorchvisionStylePreActResNet()).double())
    fused, report = convert(gm, backend="torch")
    assert report.num_preact == 5 and report.num_bn_relu == 2 and not report.untraced, str(report)
    assert isinstance(fused, torch.fx.GraphModule) and isinstance(fused.get_submodule("layer1.0.conv1"), PreActConv2d)
    assert "layer1_0_bn1" not in fused.code and "layer1_0_bn1" in gm.code
    for training in (True, False):
        assert_same(gm, fused, x_input(), training)
    copied = copy.deepcopy(fused)                           # fx rebuilds a copy from its graph: the fused one
    for m in (gm, fused, copied):
        m.zero_grad(set_to_none=True)                       # a deep copy does not copy .grad
    assert_same(gm, copied, x_input(), training=False)
    for back in (unconvert(fused), unconvert(copied)):
        assert fused_types(back) == [] and "layer1_0_bn1" in back.code
        gm.zero_grad(set_to_none=True)
        back.zero_grad(set_to_none=True)
        assert_same(gm, back, x_input(), training=False)


@pytest.mark.parametrize("how", ["script", "trace", "scripted child"])
def test_torchscript_is_left_alone_with_a_warning(how):
    """A ScriptModule's forward is compiled TorchScript: left unchanged, reported, and a warning says why."""
    model = randomize(sequential_cnn()).double().eval()
    x = x_input()
    if how == "script":
        target, where = torch.jit.script(model), "<model>"
    elif how == "trace":
        target, where = torch.jit.trace(model, x), "<model>"
    else:
        target, where = nn.Sequential(torch.jit.script(randomize(sequential_cnn()).double()), nn.Identity()), "0"
    with pytest.warns(UserWarning, match=f"convert: left {where} unchanged: a TorchScript module"):
        fused, report = convert(target.eval(), backend="torch")
    assert report.untraced == {"" if where == "<model>" else where: SCRIPTED_REASON}
    assert fused_types(fused) == [] and "convert the eager module, then trace the result" in str(report)
    torch.testing.assert_close(fused(x), target(x), atol=0, rtol=0)
