"""`fastresnet info` per device: what each backend runs on cpu and cuda, or why it cannot; never a device claimed
that this machine lacks."""
import torch

import fastresnet
from fastresnet import info
from fastresnet.backends import get_backend_impl, resolve


def test_backends_by_device_follow_each_backends_own_check():
    table = info.backends_by_device()
    assert set(table) == set(fastresnet.available_backends())
    cpu = torch.empty(2, 2, 1, 1)
    for name, per_device in table.items():
        assert set(per_device) == {"cpu", "cuda"}
        why = get_backend_impl(name).why_not(cpu)
        if why is None:
            assert per_device["cpu"].startswith(info.RUNS[name]["cpu"])
            assert per_device["cpu"].endswith("(auto picks it)") == (resolve(cpu, "auto") == name)
        else:
            assert per_device["cpu"] == f"unavailable: {why}"
        if not torch.cuda.is_available():
            assert per_device["cuda"].startswith("unavailable: "), (name, per_device["cuda"])
    assert table["torch"]["cpu"].startswith("PyTorch reference ops")


def test_extension_backend_reports_its_kernels_per_device():
    entry = info.backends_by_device()["ext"]
    if get_backend_impl("ext").unavailable_reason() is None:
        assert entry["cpu"].startswith("C++ CPU kernels")
    if torch.cuda.is_available() and get_backend_impl("ext").why_not(torch.empty(1, 1, 1, 1, device="cuda")) is None:
        assert entry["cuda"].startswith("CUDA kernels")
    text = info.format_report(info.report())
    assert "cpu:" in text and "ok" not in text.split("extension")[0].split("backends")[1]
