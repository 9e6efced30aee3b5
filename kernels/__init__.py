"""Triton kernels (installed as `fastresnet.kernels`). Importing this package's modules needs triton; the backends
import them lazily so that fastresnet works without it.

Tier A primitives (`fastresnet.backends.triton_backend.TritonBackend`), each a kernel + host launcher with the
semantics of the same-named function in `fastresnet.reference`:
- `stats.batch_stats`: per-channel (mean, biased var), per-tile Chan partials + fixed-order merge (deterministic);
- `bn_relu.bn_relu_forward`: a = max(x·scale + shift, 0);
- `bn_relu.bn_relu_backward`: ReLU mask from x, Σdz and Σdz·x̂, dx (+ optional fused shortcut gradient);
- `add_stats.add_stats`: y = a + b with the statistics of y.
Tensors are dense NHWC (channels_last, the fast path) or dense NCHW; statistics are fp32 (fp64 for fp64 input).

Tier B (`fastresnet.backends.triton_conv_backend.TritonConvBackend`): `conv.conv_forward` / `conv.conv_backward`,
implicit-GEMM BN-ReLU-conv reusing tier A's statistics merge and BN backward steps.

This module itself does not import triton (the backends import `interpreting` from it without triton installed).
"""
import os


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter: TRITON_INTERPRET set to a value Triton reads as true."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "y", "on")
