"""Ctrl-C while a command starts up: one line on stderr and exit code 130, never a traceback from inside an import.

A command (`fastresnet <command>` or `python -m fastresnet.<module>`) spends its first seconds importing torch and
loading data, before any of its own code can catch an interrupt, and a KeyboardInterrupt raised inside a third-party
import can leave that package half-imported (numpy's lazy submodules then fail with a RecursionError instead).
`install()` runs first in the package's `__init__`, only in a process started as a command and not in debug mode,
and sets a SIGINT handler that prints `fastresnet <command>: interrupted`, removes the folders in `made_folders`
that are still empty, and ends the process at once with exit code 130. A command that must finish something on
Ctrl-C (the trainer saves a checkpoint) installs its own handler while it does, and restores this one afterwards.
Processes that merely import the package keep Python's behaviour. This module imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import List, Optional, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "FASTRESNET_DEBUG"
EXIT_INTERRUPTED = 130
# folders a command made for its outputs that may still be empty; the interrupt handler removes the empty ones
made_folders: List[str] = []


def interrupted_line(name: str) -> str:
    """The line a command prints when Ctrl-C stops it before its own handler exists."""
    return f"fastresnet {name}: interrupted" if name else "fastresnet: interrupted"


def debug_wanted(args: Sequence[str]) -> bool:
    """Whether tracebacks are wanted: --debug among `args` (before a bare `--`) or FASTRESNET_DEBUG set."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    return DEBUG_FLAG in args[:end] or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command_name(argv: Sequence[str], orig_argv: Sequence[str]) -> Optional[str]:
    """The command a process runs ("train", ...; "" when none is named yet), or None if it is not a fastresnet
    command. `argv`: sys.argv; `orig_argv`: the interpreter's own command line (sys.orig_argv)."""
    if argv and os.path.basename(argv[0]) == "fastresnet":       # the console script
        return argv[1] if len(argv) > 1 else ""
    args = list(orig_argv)
    if "-m" in args[:-1]:
        rest = args[args.index("-m") + 1:]
        package, _, module = rest[0].partition(".")
        if package == "fastresnet" and module:
            return (rest[1] if len(rest) > 1 else "") if module == "cli" else module
    return None


def remove_empty(folders: Sequence[str]) -> None:
    """Remove each of `folders` that is empty, innermost (last) first."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):                          # not empty, or gone already
            os.rmdir(folder)


def install() -> None:
    """Set the start-up SIGINT handler in a process started as a command (module docstring)."""
    name = command_name(sys.argv, getattr(sys, "orig_argv", sys.argv))
    if name is None or debug_wanted(sys.argv[1:]):
        return

    def interrupted(signum, frame) -> None:
        print(interrupted_line(name), file=sys.stderr, flush=True)
        remove_empty(made_folders)
        with contextlib.suppress(OSError, ValueError):              # stdout may be a closed pipe
            sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, interrupted)
