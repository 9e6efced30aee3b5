"""Triton kernels (installed as `fastresnet.kernels`). Importing this package's modules needs triton; the backends
import them lazily so that fastresnet works without it.

Tier A primitives (`fastresnet.backends.triton_backend.TritonBackend`), each a kernel + host launcher with the
semantics of the same-named function in `fastresnet.reference`:
- `stats.batch_stats`: per-channel (mean, biased var), per-tile Chan partials + fixed-order merge (deterministic);
- `bn_relu.bn_relu_forward`: a = max(x·scale + shift, 0);
- `bn_relu.bn_relu_backward`: ReLU mask from x, Σdz and Σdz·x̂, dx (+ optional fused shortcut gradient);
- `add_stats.add_stats`: y = a + b with the statistics of y;
- `stats.bn_affine`: a BN's rstd, affine map and running update, made by the kernel that consumes its statistics;
- `bn_relu.stats_bn_relu_forward`: x's batch statistics and the BN-ReLU forward with them in one launch with a grid
  barrier (as is `bn_relu_backward` unless FASTRESNET_GRID_BARRIER=0).
Tensors are dense NHWC (channels_last, the fast path) or dense NCHW; statistics are fp32 (fp64 for fp64 input).

Tier B (`fastresnet.backends.triton_conv_backend.TritonConvBackend`): `conv.conv_forward` / `conv.conv_backward`,
implicit-GEMM BN-ReLU-conv reusing tier A's statistics merge and BN backward steps.

This module itself does not import triton (the backends import `interpreting` from it without triton installed).
"""
import os


def conv_fp32_precision() -> str:
    """The precision of fp32 convolutions in force: "tf32" or "ieee", read from PyTorch's cuDNN conv setting, which
    fastresnet's Triton convs follow so that a fused net and its cuDNN twin compute fp32 alike. PyTorch's default is
    TF32 (10-bit mantissa products, fp32 accumulation: about 3e-4 relative error per conv). Force IEEE fp32 for
    both with `torch.backends.cudnn.conv.fp32_precision = "ieee"` (torch >= 2.9; `torch.backends.cudnn.allow_tf32 =
    False` on older torch). "none" at a level inherits from the level above (cudnn, then torch.backends)."""
    import torch
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    for level in (conv, torch.backends.cudnn, torch.backends):
        value = getattr(level, "fp32_precision", "none")
        if value != "none":
            return "tf32" if value == "tf32" else "ieee"
    return "ieee"


def _switch(name: str) -> bool:
    """The on/off environment switch `name` (default on)."""
    value = os.environ.get(name, "1").lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"{name}: expected 0 or 1, got {value!r}")
    return value in ("1", "true", "yes", "on")


def last_program_merge() -> bool:
    """Whether reductions over per-program partials are finished by the last program of the launch that writes them
    (docs/kernels.md, "Merges finished by the last program"; the default) or by a separate merge launch
    (FASTRESNET_LAST_PROGRAM_MERGE=0: the fallback, and the baseline a GPU run compares against)."""
    return _switch("FASTRESNET_LAST_PROGRAM_MERGE")


def grid_barrier() -> bool:
    """Whether tier A runs a statistics pass and the BN-ReLU forward that consumes it, and the BN backward's sums and
    its dx pass, as one persistent launch each with a grid-wide barrier between the two (docs/kernels.md, "Pairs
    joined by a grid barrier"; the default) or as two launches each (FASTRESNET_GRID_BARRIER=0: the fallback, and
    the baseline a GPU run compares against)."""
    return _switch("FASTRESNET_GRID_BARRIER")


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter: TRITON_INTERPRET set to a value Triton reads as true."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "y", "on")
