"""Triton kernels (installed as `fastresnet.kernels`). Importing this package needs triton; the backends import
it lazily so that fastresnet works without it."""
