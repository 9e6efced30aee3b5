"""Checkpoints that survive kills: atomic writes and safe, checked loads.

`save` writes to a temporary file in the target's folder, flushes and fsyncs it, then `os.replace`s it onto the
target (atomic on POSIX) and fsyncs the folder: at every instant the target is either the previous complete file or
the new complete file, never a partial one. If writing fails (disk full, a kill, an exception), the previous file is
untouched and the temporary file is removed.

`load` uses `torch.load(..., weights_only=True)`: only tensors and plain containers/scalars are unpickled, never
arbitrary objects. So checkpoints hold plain types only (RNG states as uint8 tensors, configs as dicts).
A truncated, corrupt or unsafe file raises `CheckpointError` naming the file.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or holding objects weights_only refuses."""


def save(obj: Dict[str, Any], path: str) -> None:
    """Atomically write `obj` (plain containers, scalars and tensors) to `path` (see module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


REQUIRED_KEYS = ("iteration", "model")


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint written by `save` with weights_only=True; `CheckpointError` naming the file if it is
    missing, truncated, corrupt, unsafe, or lacks the trainer's keys."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors by cause
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it is truncated, corrupt or holds objects weights_only=True refuses. Checkpoints are written "
            "atomically, so an older one in the same folder (prev.pt) is intact") from e
    if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path}: not a fastresnet training checkpoint (expected a dict with keys "
                              f"{REQUIRED_KEYS})")
    return obj
