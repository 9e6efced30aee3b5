"""The whole-net numerics judge (`fastresnet.numerics`) on every backend this machine runs.

A training step of preact_resnet32 (basic) and preact_bottleneck47 (bottleneck, the 47-layer net), 5 units per stage,
batch 2 × 8 × 8, input mean 3: loss, every gradient and the running statistics judged against a float64 run, relative
to plain PyTorch ops in the same dtype (`fastresnet.numerics.verdict`: ≤ 2× with a floor of 16 units of roundoff).

CI cost (2-core CPU, interpreter): almost all of it the interpreted Triton backends. So the C++ backend ("ext", cheap
on CPU) runs the full product dtype × {chained, unchained} × {NCHW, channels_last}; each Triton backend runs four
configurations, two per net (preact_resnet32: fp32 chained NHWC and bf16 unchained NHWC; preact_bottleneck47: fp32
unchained NCHW and fp16 chained NCHW), so every dtype, chain mode and layout is judged on a deep net, each chain mode
meets each layout, and each net runs both chain modes. On a GPU every backend runs the full product on both nets.
"""
import copy

import pytest
import torch

from fastresnet import numerics
from fastresnet.backends import get_backend_impl
from fastresnet.backends.torch_backend import TorchBackend
from fastresnet.kernels import interpreting
from fastresnet.nn.layers import BNReLU2d, PreActConv2d
from fastresnet.nn.units import run_per_layer

DEV = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
NETS = tuple(numerics.JUDGE_NETS)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FULL = [(d, c, lay) for d in (F32, F16, BF16) for c in (True, False) for lay in numerics.LAYOUTS]
# under the interpreter, per net: every dtype, chain mode and layout appears, each chain mode with each layout
COVER = {"preact_resnet32": [(F32, True, "nhwc"), (BF16, False, "nhwc")],
         "preact_bottleneck47": [(F32, False, "nchw"), (F16, True, "nchw")]}
triton_ok = pytest.mark.skipif(DEV == "cpu" and not interpreting(),
                               reason="Triton kernels need a CUDA GPU or the interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def judges():
    x, target = numerics.judge_input(DEV)
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = numerics.Judge(numerics.judge_net(name).to(DEV), x, target, name)
        return cache[name]
    return get


def _cases(backend, configs):
    """configs: a list for every net, or a dict net -> list."""
    return [pytest.param(net, backend, d, c, lay, id=f"{net}-{backend}-{str(d)[6:]}-{'chain' if c else 'unit'}-{lay}")
            for net in NETS for d, c, lay in (configs[net] if isinstance(configs, dict) else configs)]


CASES = (_cases("ext", FULL)
         + [pytest.param(*p.values, marks=triton_ok, id=p.id)
            for b in ("triton", "triton_conv") for p in _cases(b, FULL if DEV == "cuda" else COVER)])


@pytest.mark.parametrize("net,backend,dtype,chained,layout", CASES)
def test_backend_within_twice_plain_pytorch_error(judges, net, backend, dtype, chained, layout):
    why = get_backend_impl(backend).why_not(torch.empty(1, 1, 1, 1, device=DEV, dtype=dtype))
    if why is not None:
        pytest.skip(f"backend {backend!r} does not run here: {why}")
    row = judges(net).row(backend, dtype, chained, layout)
    assert row.ok, numerics.format_rows([row])


@pytest.mark.parametrize("net", NETS)
def test_reference_equals_eager_pytorch_in_float64(judges, net):
    """The yardstick's float64 run (the "torch" backend) is eager PyTorch's float64 step to rounding."""
    j = judges(net)
    eager = j.errors(None, torch.float64, True, "nchw", eager=True)
    assert max(eager[k] for k in numerics.METRICS) < 1e-12, eager


@pytest.mark.parametrize("net", NETS)
def test_ties_separated(judges, net):
    """After separate_relu_ties every ReLU input of the float64 training forward is >= 1e-2·|γ| from zero (so no fp32
    rounding can flip a mask), and the β shifts are small (the net stays a typical random init)."""
    j = judges(net)
    # a scratch copy (its forward updates running statistics), layer by layer so every fused layer's hook runs
    model = run_per_layer(copy.deepcopy(j.model).double().train())
    closest = []

    def hook(mod, args):
        bn = mod.bn if isinstance(mod, PreActConv2d) else mod
        xi = args[0]
        var, mean = torch.var_mean(xi, dim=(0, 2, 3), unbiased=False, keepdim=True)
        z = (xi - mean) * torch.rsqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        closest.append((z.abs() / bn.weight.abs().view(1, -1, 1, 1)).min().item())
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (PreActConv2d, BNReLU2d))]
    with torch.no_grad():
        model(j.x.double())
    for h in handles:
        h.remove()
    assert len(closest) > 30 and min(closest) >= 1e-2 * (1 - 1e-6), min(closest)
    assert 0 < j.shift < 0.5


class _LossyBackend(TorchBackend):
    """A backend with a precision defect: it rounds the fp32 BN-ReLU activation to bf16 before the conv."""

    name = "lossy"

    def bn_relu(self, x, scale, shift, out_dtype):
        a = super().bn_relu(x, scale, shift, out_dtype)
        return a.to(torch.bfloat16).to(a.dtype) if a.dtype == torch.float32 else a


def test_judge_fails_a_backend_with_a_precision_defect(monkeypatch):
    """The judge is not a check that cannot fail: a silent drop to bf16 activations in an fp32 net is caught."""
    from fastresnet import backends
    monkeypatch.setitem(backends._FACTORIES, "lossy", _LossyBackend)
    monkeypatch.setitem(backends._INSTANCES, "lossy", _LossyBackend())
    x, target = numerics.judge_input(DEV)
    j = numerics.Judge(numerics.judge_net("preact_resnet32").to(DEV), x, target, "preact_resnet32")
    row = j.row("lossy", F32, False, "nchw")
    assert not row.ok and any(f.startswith("grad") for f in row.failures), row


def test_verdict_floor_and_ratio():
    base = dict(loss=1e-7, grad=1e-5, worst_param=2e-5, buffers=0.0, worst_buffer=0.0)
    ok = dict(loss=1.5e-6, grad=1.9e-5, worst_param=3.9e-5, buffers=1e-6, worst_buffer=1.8e-6)
    assert numerics.verdict(ok, base, floor=1e-6) == []
    bad = dict(ok, grad=2.1e-5)
    assert numerics.verdict(bad, base, floor=1e-6) == ["grad 2.1e-05 > 2e-05 (plain PyTorch 1e-05)"]


@pytest.mark.parametrize("args, needle", [
    (["--dtypes", "float8"], "--dtypes: expected names from"),
    (["--nets", "vgg16"], "--nets: expected names from"),
    (["--backends", "fastest"], "--backends: expected names from"),
    (["--out", "/dev/null/rows.jsonl"], "--out: cannot append to /dev/null/rows.jsonl"),
])
def test_cli_rejects_bad_arguments_before_judging(args, needle, capsys):
    from fastresnet import cli
    assert cli.run_command("numerics", numerics.main, ["--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastresnet numerics: error: {needle}"), err


def test_cli_rows_and_report_table(tmp_path, capsys):
    """`fastresnet numerics --out` writes one row per configuration (the yardstick's included) that
    benchmarks.report turns into the README's table."""
    from benchmarks import report
    out = tmp_path / "numerics.jsonl"
    code = numerics.main(["--device", DEV, "--backends", "ext", "--dtypes", "float32", "--nets", "preact_resnet32",
                          "--out", str(out)])
    assert code == 0 and "preact_resnet32" in capsys.readouterr().out
    rows = report.latest(report.common.read_rows([out]))
    assert len(rows) == 8 and {r["backend"] for r in rows} == {"torch", "ext"}
    table = report.numerics_table(rows)
    assert "| preact_resnet32 | `ext` |" in table and "4 / 4 pass" in table
