"""The `fastresnet` console script: `fastresnet <command> [args]`, one module per command (`COMMANDS`); the
arguments after the command go to that module's `main(argv) -> int` unchanged.

Every command runs through `run_command`, also when started as `python -m fastresnet.<module>`, so all of them
follow one convention for errors:
- bad arguments: argparse prints usage and the error and exits 2;
- bad input found later (a value, a missing or unreadable file, a refused pickle or checkpoint, an unknown model, a
  backend this machine lacks, a missing optional package): one line `fastresnet <command>: error: <message>` on
  stderr, exit 2; `--debug` anywhere in the arguments (or FASTRESNET_DEBUG=1) shows the traceback instead;
- Ctrl-C before a command has installed its own handler (the trainer's saves a checkpoint): one line, exit 130
  (from the first import of the package on: `fastresnet._startup`; a KeyboardInterrupt that reaches this module,
  as in-process calls of `main` see it, gives the same line and code);
- output piped into a reader that stops early (`| head`): no message, exit 141 (128 + SIGPIPE, what a process
  killed by the signal reports).
Other exceptions are bugs and keep their traceback.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from fastresnet._startup import DEBUG_ENV, DEBUG_FLAG, EXIT_INTERRUPTED, debug_wanted, interrupted_line
from fastresnet.backends.base import BackendUnsupportedError
from fastresnet.checkpoint import CheckpointError

# command -> (module with `main(argv) -> int`, one-line description)
COMMANDS = {
    "train": ("fastresnet.train", "train a model (the paper's recipes, docs/paper.md §5; default: the digits job)"),
    "profile": ("fastresnet.profile", "parameters and MACs of every model beside the paper's numbers"),
    "info": ("fastresnet.info", "versions, devices, backends and the extension build of this machine"),
    "reproduce": ("fastresnet.reproduce", "the paper's CIFAR tables and figures, resumable and shardable"),
    "numerics": ("fastresnet.numerics", "judge every backend's training step of deep nets against float64"),
}
EPILOG = f"On an error, {DEBUG_FLAG} (or {DEBUG_ENV}=1) prints the full traceback."
EXIT_USAGE, EXIT_BROKEN_PIPE = 2, 141
# exceptions that mean bad input rather than a bug (module docstring); OSError includes FileNotFoundError
USER_ERRORS = (ValueError, OSError, ImportError, pickle.UnpicklingError, CheckpointError, BackendUnsupportedError)


def _split_debug(argv: Sequence[str]) -> Tuple[List[str], bool]:
    """(argv without --debug, whether tracebacks are wanted); arguments after a bare `--` are left alone."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    return [a for a in args[:end] if a != DEBUG_FLAG] + args[end:], debug_wanted(args)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_command(name: str, main: Callable[[Sequence[str]], Optional[int]], argv: Sequence[str]) -> int:
    """Run a command's `main(argv)` under the error convention of the module docstring; returns the exit code."""
    args, debug = _split_debug(argv)
    return _run(name, main, args, debug)


def _run(name: str, main: Callable[[Sequence[str]], Optional[int]], args: Sequence[str], debug: bool) -> int:
    try:
        code = main(args)
        sys.stdout.flush()  # inside the try: a reader that went away shows up here at the latest
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        if debug:
            raise
        print(interrupted_line(name), file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fastresnet {name}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return code if isinstance(code, int) else 0


def _usage() -> str:
    lines = [f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items()]
    return (f"usage: fastresnet {{{','.join(COMMANDS)}}} [args] [{DEBUG_FLAG}]\n\ncommands:\n" + "\n".join(lines)
            + f"\n\n`fastresnet <command> --help` describes a command. {EPILOG}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch `fastresnet <command> [args]` to the command's module through `run_command`."""
    args, debug = _split_debug(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_USAGE
    if args[0] not in COMMANDS:
        print(f"fastresnet: error: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return EXIT_USAGE
    name = args[0]

    def load_and_run(rest: Sequence[str]) -> Optional[int]:
        # importing the command (torch, the models) is part of start-up: Ctrl-C there is handled too
        return importlib.import_module(COMMANDS[name][0]).main(rest)

    return _run(name, load_and_run, args[1:], debug)


if __name__ == "__main__":
    sys.exit(main())
