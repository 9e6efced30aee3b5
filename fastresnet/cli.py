"""The `fastresnet` console script: `fastresnet train ...` (fastresnet.train) and `fastresnet profile ...`
(fastresnet.profile); arguments after the subcommand go to it unchanged."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {
    "train": ("fastresnet.train", "train a model (PAPER.md §5 recipes; default: the digits job)"),
    "profile": ("fastresnet.profile", "parameters and MACs of every model beside the paper's numbers"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        lines = [f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: fastresnet {train,profile} [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"fastresnet: unknown command {args[0]!r}; expected one of {tuple(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib
    module = importlib.import_module(COMMANDS[args[0]][0])
    code = module.main(args[1:])
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
