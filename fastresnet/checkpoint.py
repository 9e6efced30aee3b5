"""Files that survive kills: atomic writes, checkpoints with a kept predecessor, and safe, checked loads.

`atomic_write(path)` is the one way the package writes a file: the content goes to a temporary file with a unique
name (`.<name>.<random>.tmp`) in the target's folder, is flushed and fsynced, then `os.replace`d onto the target
(atomic on POSIX), and the folder is fsynced. At every instant the target is either the previous complete file or the
new complete file, never a partial one; any number of processes may write the same target at once (the last replace
wins, each reader sees one whole version). If writing fails (disk full, an exception), the target is untouched and
the temporary file is removed; a kill can leave a temporary file behind, which no reader ever takes for the target
(`stale_temporaries` lists them for cleaning).

`save(obj, path, previous=...)` writes a checkpoint that way; with `previous`, the file that was at `path` becomes
`previous` only after the new one is complete, through a hard link, so a complete `path` exists at every instant.

`load` uses `torch.load(..., weights_only=True)`: only tensors and plain containers/scalars are unpickled, never
arbitrary objects. So checkpoints hold plain types only (RNG states as uint8 tensors, configs as dicts).
A truncated, corrupt or unsafe file raises `CheckpointError` naming the file.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from typing import IO, Any, Dict, Iterator, List, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or holding objects weights_only refuses."""


def _temporary(path: str) -> str:
    """A new, empty temporary file with a unique name beside `path` (module docstring); its name."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def stale_temporaries(path: str) -> List[str]:
    """Temporary files of `atomic_write(path)` that a killed writer left behind."""
    folder, name = os.path.split(os.path.abspath(path))
    return glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp"))


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _keep_as(path: str, previous: str) -> None:
    """Make the current `path` also `previous` (atomically replacing it), leaving `path` in place: a hard link, or
    where the file system has none, a complete copy."""
    if os.path.exists(previous) and os.path.samefile(path, previous):
        # already one file (a writer killed after this step and before its new `path` was in place): rename(2)
        # between two links of one file does nothing, which would leave the temporary link behind
        return
    tmp = _temporary(previous)
    try:
        os.unlink(tmp)                                   # os.link needs a free name; mkstemp's stays unique
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, previous)
    except BaseException:
        _discard(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", previous: Optional[str] = None) -> Iterator[IO[Any]]:
    """`with atomic_write(path) as f: f.write(...)`: `path` gets the whole content when the block ends without an
    exception, and is left as it was otherwise (module docstring). `mode`: "w" (text, UTF-8) or "wb". `previous`: a
    name under which the file that was at `path` is kept, set once the new content is complete on disk."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    tmp = _temporary(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.exists(path):
            _keep_as(path, previous)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str) -> None:
    """Atomically write `text` to `path`."""
    with atomic_write(path) as f:
        f.write(text)


def save_png(fig, path: str, dpi: int) -> None:
    """Atomically write a matplotlib figure to `path` as PNG."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def save(obj: Dict[str, Any], path: str, previous: Optional[str] = None) -> None:
    """Atomically write `obj` (plain containers, scalars and tensors) to the existing folder of `path`; with
    `previous`, the file that was at `path` is kept there once the new one is complete (module docstring)."""
    with atomic_write(path, "wb", previous) as f:
        torch.save(obj, f)


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
