"""fastresnet.convert on the real classes of timm and torchvision (random weights, offline; see vision_libs.py).

Numerics in float64 use test_convert's 1e-10 tolerance (rounding differences only). Inputs are 64×64, batch 2:
in training mode BatchNorm's batch statistics of smaller inputs (the last stage at 1×1, two values per channel)
make the original network itself sensitive at 1e-8 to input changes of 1e-15, which no tolerance separates from
a real error. The numeric tests run the 48-chain pre-activation structure of resnetv2_50 at 1/16 of its width
(timm's own ResNetV2 class) and timm resnet18 (the drop_block/aa Identity slots of resnet50's blocks); the full
resnetv2_50 is converted and its chains counted.
"""
import torch
from torch import nn

from fastresnet import BNReLU2d, PreActConv2d, convert, unconvert
from test_convert import TOL, assert_same, randomize
from vision_libs import import_timm, import_torchvision

timm = import_timm()
torchvision = import_torchvision()
from timm.layers import BatchNormAct2d  # noqa: E402


def x64(n=2, c=3, hw=64):
    return (-0.5 + torch.randn(n, c, hw, hw)).double()


def chains_of(model):
    """{BN-act path: conv paths reading its activation} for a timm ResNetV2 (norm1/2/3 → conv1/2/3, downsample)."""
    out = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "PreActBottleneck":
            out[f"{name}.norm1"] = [f"{name}.conv1"] + ([f"{name}.downsample.conv"] if m.downsample else [])
            out[f"{name}.norm2"], out[f"{name}.norm3"] = [f"{name}.conv2"], [f"{name}.conv3"]
    return out


def test_bn_act_minimal():
    orig = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False))).double()
    fused, report = convert(orig, backend="torch")
    assert report.num_preact == 1 and not report.skipped, str(report)
    assert isinstance(fused[2], PreActConv2d) and type(fused[2].bn) is BatchNormAct2d
    for training in (True, False):
        assert_same(orig, fused, x64(hw=9), training)
    assert fused.state_dict()._metadata.keys() == orig.state_dict()._metadata.keys()
    plain = unconvert(fused)
    assert [type(m) for m in plain] == [nn.Conv2d, BatchNormAct2d, nn.Conv2d]


def test_bn_act_alone_and_unsupported():
    # BN-act feeding a pool: BNReLU2d in its slot; SiLU activation: left alone with the reason
    orig = randomize(nn.Sequential(BatchNormAct2d(4), nn.AdaptiveAvgPool2d(1),
                                   BatchNormAct2d(4, act_layer=nn.SiLU), nn.Conv2d(4, 4, 1, bias=False))).double()
    fused, report = convert(orig, backend="torch")
    assert report.num_bn_relu == 1 and type(fused[0]) is BNReLU2d
    assert [s.reason for s in report.skipped] == ["BatchNormAct2d.act is SiLU, not nn.ReLU"]
    for training in (True, False):
        assert_same(orig, fused, x64(c=4, hw=5), training)
    assert type(unconvert(fused)[0]) is BatchNormAct2d


def test_resnetv2_50_chains():
    model = timm.create_model("resnetv2_50", pretrained=False)
    chains = chains_of(model)
    assert len(chains) == 48
    fused, report = convert(model, backend="torch")
    preact = {c.bn: c.conv for c in report.fused if c.conv is not None}
    # 44 BN-act → conv chains become PreActConv2d; the 4 norm1 read by conv1 and the downsample conv cannot (one
    # BN, two convs) and become BNReLU2d, as does the final norm
    assert len(preact) >= 40 and all(preact[bn] in convs for bn, convs in chains.items() if bn in preact)
    assert report.num_preact == 44 and report.num_bn_relu == 5 and not report.skipped and not report.untraced
    assert list(fused.state_dict()) == list(model.state_dict())


def test_resnetv2_structure_numerics():
    # timm's ResNetV2 class with resnetv2_50's layers at 1/16 width: same 48 chains, same fusion
    resnetv2 = timm.models.resnetv2
    orig = randomize(resnetv2.ResNetV2(layers=(3, 4, 6, 3), channels=(16, 32, 64, 128), stem_chs=4, num_classes=10,
                                       conv_layer=timm.layers.create_conv2d, norm_layer=BatchNormAct2d)).double()
    fused, report = convert(orig, backend="torch")
    assert report.num_preact == 44 and report.num_bn_relu == 5, str(report)
    for training in (True, False):
        assert_same(orig, fused, x64(), training)


def test_timm_resnet_identity_slots():
    orig = randomize(timm.create_model("resnet18", pretrained=False, num_classes=10)).double()
    fused, report = convert(orig, backend="torch")
    # bn1 → drop_block (Identity) → act1 → aa (Identity) → conv2 in each of the 8 blocks; the stem's bn1 → act1
    assert report.num_preact == 8 and report.num_bn_relu == 1, str(report)
    assert all("not a ReLU" in s.reason for s in report.skipped)   # bn2 → add, downsample BNs
    for training in (True, False):
        assert_same(orig, fused, x64(), training)
    orig.set_grad_checkpointing(True); fused.set_grad_checkpointing(True)   # the stem's other branch
    assert_same(orig, fused, x64(), training=True)


def test_dense_layer_keeps_both_input_types():
    orig = randomize(torchvision.models.densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                                          bn_size=2, num_classes=3)).double()
    fused, report = convert(orig, backend="torch")
    # per layer norm1 → conv1, norm2 → conv2; the transition's norm → conv; norm0 → relu0 → pool0 and norm5 alone
    assert report.num_preact == 9 and report.num_bn_relu == 2 and not report.untraced, str(report)
    for training in (True, False):
        assert_same(orig, fused, x64(), training)
    layer0, layer1 = orig.features.denseblock1.denselayer1, fused.features.denseblock1.denselayer1
    assert isinstance(layer1.conv1, PreActConv2d)
    x = x64(c=8, hw=6)
    for inp in (x, [x], [x, x[:, :0]]):   # a Tensor (the original wraps it in a list) or a list of Tensors
        torch.testing.assert_close(layer1(inp), layer0(inp), **TOL)
    layer0.memory_efficient = layer1.memory_efficient = True   # the checkpointed branch
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(layer1([xg]), layer0([xg]), **TOL)
