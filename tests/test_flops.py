"""FlopCounterMode (torch.utils.flop_counter) counts a converted or fused network like its eager original, forward +
backward (fastresnet/ops/flops.py). Counted on the meta device (shapes only, no arithmetic), so the real torchvision
networks cost only their conversion; one CPU run checks that real tensors count the same (no double counting of the
conv inside a fused op)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastresnet
from fastresnet import convert, unconvert
from vision_libs import import_torchvision

tv = import_torchvision()


def step_flops(model, x):
    """FLOPs of one forward + backward, and the per-op counts."""
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def small_densenet(num_classes):
    return tv.models.densenet.DenseNet(growth_rate=8, block_config=(3, 3), num_init_features=16,
                                      num_classes=num_classes)


@pytest.mark.parametrize("build", [tv.models.resnet18, tv.models.resnet50, small_densenet],
                         ids=["resnet18", "resnet50", "densenet"])
def test_converted_counts_like_original(build):
    original = build(num_classes=10).to("meta")
    fused, report = convert(original)
    assert report.num_preact > 0
    x = torch.empty(2, 3, 32, 32, device="meta")
    (total0, ops0), (total1, ops1) = step_flops(original, x), step_flops(fused, x)
    assert "fastresnet.bn_relu_conv" in ops1 and "fastresnet.bn_relu_conv_backward" in ops1
    assert abs(total1 - total0) <= 0.01 * total0, (ops0, ops1)   # the bar; the formulas give equality


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("name", ["preact_resnet20", "preact_resnet164"])  # zero-pad / shared projection shortcuts
def test_fused_preact_counts_like_plain_twin(device, name):
    fused = fastresnet.create_model(name).to(device)    # one op per unit: preact_unit
    plain = unconvert(fused)
    x = torch.randn(2, 3, 16, 16, device=device)
    (total0, ops0), (total1, ops1) = step_flops(plain, x), step_flops(fused, x)
    assert "fastresnet.preact_unit" in ops1 and "fastresnet.preact_unit_backward" in ops1
    assert total1 == total0, (ops0, ops1)


@pytest.mark.parametrize("checkpoint", ["unit", "segment"])
def test_recomputed_units_count_alike_on_every_backend(checkpoint):
    """A recomputation replays units (on "ext", when run for real, its C++ node for all but a segment's last unit);
    under FlopCounterMode every backend runs the composition of registered ops, so each counts the same convolutions."""
    if fastresnet.backends.get_backend_impl("ext").why_not(torch.empty(1, 1, 1, 1)) is not None:
        pytest.skip("the C++ extension is not built")
    totals = {}
    for backend in ("torch", "ext"):
        torch.manual_seed(0)
        model = fastresnet.create_model("preact_resnet20", backend=backend, checkpoint=checkpoint)
        totals[backend] = step_flops(model, torch.randn(2, 3, 16, 16))
    assert totals["ext"][0] == totals["torch"][0], totals
