"""The model zoo: every registered model builds, runs forward and backward, and matches the paper's sizes."""
import functools
import math

import pytest
import torch

import fastresnet
from fastresnet.models.registry import default_num_classes
from fastresnet.nn import PreActConv2d, ResidualUnit
from fastresnet.profile import count_macs, count_params, profile

# docs/paper.md §1.5: (weights only, with BN γ/β), CIFAR-10 heads.
PARAMS = {
    "resnet20": (268_346, 269_722),
    "resnet32": (461_882, 464_154),
    "resnet44": (655_418, 658_586),
    "resnet56": (848_954, 853_018),
    "resnet110": (1_719_866, 1_727_962),
    "preact_resnet110": (1_719_866, 1_727_962),
    "resnet1202": (19_331_642, 19_421_274),
    "preact_resnet164": (1_679_034, 1_703_258),
    "preact_resnet1001": (10_178_490, 10_327_706),
}
# docs/paper.md §1.5, CIFAR-100 heads.
PARAMS_C100 = {"preact_resnet164": (1_702_164, 1_726_388), "preact_resnet1001": (10_201_620, 10_350_836)}
# docs/paper.md §6 (MACs per 32×32 image); the test allows 0.2%.
MACS = {
    "resnet20": 40.6e6, "resnet32": 68.9e6, "resnet44": 97.2e6, "resnet56": 125.5e6, "resnet110": 252.9e6,
    "preact_resnet110": 252.9e6, "resnet110_1layer": 252.9e6, "preact_resnet110_1layer": 252.9e6,
    "resnet1202": 2.83e9, "preact_resnet164": 244.5e6, "preact_resnet1001": 1.488e9,
}

# nets of 101 layers and more take seconds each to build and profile: the quick tier leaves them to the full suite
DEEP = {f"{p}resnet{d}" for p in ("", "preact_") for d in (101, 152, 200, 1001, 1202)}


@functools.lru_cache(maxsize=None)
def _profile(name, **kwargs):
    """`profile` once per model and options: the parameter and MAC tests of a deep net share one build."""
    return profile(name, **kwargs)


def _depth_marked(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in names]


REQUIRED = (
    [f"{p}resnet{d}" for p in ("", "preact_") for d in (20, 32, 44, 56, 110, 1202, 18, 34, 50, 101, 152, 200)]
    + ["resnet164", "resnet1001", "preact_resnet164", "preact_resnet1001", "resnet110_1layer",
       "preact_resnet110_1layer"]
    + [f"resnet110_{v}" for v in ("scale_shortcut", "scale_both", "exclusive_gating", "shortcut_gating",
                                  "conv_shortcut", "dropout_shortcut")]
    + [f"resnet{d}_{v}" for d in (110, 164) for v in ("bn_after_add", "relu_before_add", "relu_only_preact")]
)


def test_registry_covers_the_paper():
    missing = sorted(set(REQUIRED) - set(fastresnet.list_models()))
    assert not missing, f"models missing from the registry: {missing}"
    assert fastresnet.list_models("preact_resnet1*") == sorted(
        n for n in fastresnet.list_models() if n.startswith("preact_resnet1"))


@pytest.mark.parametrize("name", _depth_marked(sorted(PARAMS)))
@pytest.mark.xdist_group("zoo_profiles")  # one worker, so _profile's cache is shared
def test_param_counts_match_paper(name):
    pr = _profile(name)
    assert (pr.params_weights, pr.params_with_bn) == PARAMS[name]


@pytest.mark.parametrize("name", _depth_marked(sorted(PARAMS_C100)))
@pytest.mark.xdist_group("zoo_profiles")  # one worker, so _profile's cache is shared
def test_param_counts_cifar100(name):
    pr = _profile(name, num_classes=100)
    assert (pr.params_weights, pr.params_with_bn) == PARAMS_C100[name]


@pytest.mark.parametrize("name", _depth_marked(sorted(MACS)))
@pytest.mark.xdist_group("zoo_profiles")  # one worker, so _profile's cache is shared
def test_macs_match_paper(name):
    macs = _profile(name).macs
    assert abs(macs - MACS[name]) / MACS[name] < 2e-3, f"{name}: {macs} MACs vs paper {MACS[name]}"


@pytest.mark.slow  # profiles preact_resnet164 and preact_resnet1001
def test_macs_stride_on_3x3_variant():
    # docs/paper.md §6: stride on the 3×3 gives 247.6M (ResNet-164) and 1.491G (ResNet-1001).
    assert abs(profile("preact_resnet164", stride_on="3x3").macs / 247.6e6 - 1) < 2e-3
    assert abs(profile("preact_resnet1001", stride_on="3x3").macs / 1.491e9 - 1) < 2e-3


def test_profile_counts_real_model_like_meta():
    m = fastresnet.create_model("preact_resnet20")
    assert count_params(m) == (268_346, 269_722)
    assert count_macs(m) == profile("preact_resnet20").macs


@pytest.mark.parametrize("name", _depth_marked(fastresnet.list_models()))
def test_forward_backward_every_model(name):
    model = fastresnet.create_model(name)
    model.train()
    size = 32 if default_num_classes(name) == 1000 else 16  # small inputs keep the suite fast
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, default_num_classes(name))
    out.float().logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


def _units(model):
    return [m for m in model.modules() if isinstance(m, ResidualUnit)]


def test_preact_resnet164_structure():
    m = fastresnet.create_model("preact_resnet164")
    units = _units(m)
    assert len(units) == 54
    firsts = [u for u in units if u.share_preact]
    # the first unit of every stage projects (16→64, 64→128/2, 128→256/2) and shares its pre-activation
    assert len(firsts) == 3
    assert [u.conv1.stride for u in firsts] == [(1, 1), (2, 2), (2, 2)]  # stride on the first 1×1
    assert all(not isinstance(u.shortcut[-1], torch.nn.BatchNorm2d) for u in firsts)  # no BN on projections
    assert isinstance(m.head_act, fastresnet.BNReLU2d)  # the extra activation after the last addition
    assert len(_units(fastresnet.create_model("preact_resnet1001"))) == 333


def test_preact_resnet110_option_a():
    m = fastresnet.create_model("preact_resnet110")
    units = _units(m)
    assert len(units) == 54 and sum(p.numel() for p in m.parameters()) == 1_727_962
    assert units[0].share_preact and not units[18].share_preact  # first unit after conv1 only, by default
    shared = fastresnet.create_model("preact_resnet110", preact_shortcut=True)
    assert _units(shared)[18].share_preact
    assert isinstance(m.stem[-1], torch.nn.Identity)  # conv1 has no BN/ReLU of its own


def test_variant_units_layout():
    u = _units(fastresnet.create_model("resnet110_relu_only_preact"))[1]
    assert isinstance(u.preact, torch.nn.ReLU) and isinstance(u.post, torch.nn.BatchNorm2d) and u.after is None
    u = _units(fastresnet.create_model("resnet110_bn_after_add"))[1]
    assert u.post is None and isinstance(u.after, fastresnet.BNReLU2d)
    u = _units(fastresnet.create_model("resnet110_relu_before_add"))[1]
    assert isinstance(u.post, fastresnet.BNReLU2d) and u.after is None
    u = _units(fastresnet.create_model("resnet110"))[1]
    assert isinstance(u.post, torch.nn.BatchNorm2d) and isinstance(u.after, torch.nn.ReLU)
    assert isinstance(u.conv2, PreActConv2d)  # BN→ReLU→conv inside F is fused in every variant
    assert len(_units(fastresnet.create_model("resnet110_1layer"))) == 108


def test_gating_bias_init_and_scaling():
    m = fastresnet.create_model("resnet110_exclusive_gating", gate_bias=-3.0)
    gate = _units(m)[0].gate
    assert gate.exclusive and torch.all(gate.conv.bias == -3.0)
    assert not _units(fastresnet.create_model("resnet110_shortcut_gating"))[0].gate.exclusive
    u = _units(fastresnet.create_model("resnet110_scale_both"))[0]
    assert (u.shortcut_scale, u.residual_scale) == (0.5, 0.5)


def test_scaling_merge_math():
    u = ResidualUnit(4, 4, form="basic", variant="original", shortcut="identity", merge="scale",
                     shortcut_scale=0.5, residual_scale=0.25).eval()
    x = torch.randn(2, 4, 5, 5)
    f = u.residual(x)
    torch.testing.assert_close(u(x), torch.relu(0.5 * x + 0.25 * f))


def test_he_init_fan_out():
    m = fastresnet.create_model("preact_resnet1001")
    w = m.stages[2][5].conv2.conv.weight  # 3×3, 64→64
    assert abs(w.std().item() / math.sqrt(2 / (9 * 64)) - 1) < 0.05
    bn = m.stages[2][5].conv2.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(m.fc.bias == 0)


def test_unknown_model_and_bad_depth():
    with pytest.raises(ValueError, match="name: unknown model"):
        fastresnet.create_model("resnet7")
    from fastresnet.models import cifar_resnet
    with pytest.raises(ValueError, match="depth"):
        cifar_resnet("bottleneck", 100)
    assert len([u for u in cifar_resnet("bottleneck", 29).modules() if isinstance(u, ResidualUnit)]) == 9


def test_option_a_shortcut_zero_pads_after_subsampling():
    from fastresnet.nn import ZeroPadShortcut
    x = torch.randn(2, 3, 6, 6)
    y = ZeroPadShortcut(3, 5, 2)(x)
    assert y.shape == (2, 5, 3, 3)
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2])
    assert torch.all(y[:, 3:] == 0)


@pytest.mark.parametrize("name", ["preact_resnet20", "preact_resnet164", "preact_resnet110_1layer", "preact_resnet18"])
def test_chained_training_forward_equals_unit_by_unit(name):
    # The chain hands each conv's output statistics to the next BN; values must not change (float64, torch backend).
    import copy
    m = fastresnet.create_model(name, backend="torch").double()
    assert m.chained
    ref = copy.deepcopy(m)
    ref.chained = False
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (n, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=n)
    for (n, b), b_ref in zip(m.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-12, msg=n)
