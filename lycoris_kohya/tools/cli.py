"""The ``lycoris-kohya`` command: one subcommand per module of this package.

Exit codes: 0 done; 1 a file cannot be used (missing, unreadable, not fitting the model, ...); 2 the
command line is wrong (argparse's own errors, a flag's value, an output that would replace a file or
an input); 130 interrupted. Every error is one line naming the file, flag or module, without a
traceback; output cut short by a closed pipe (``| head``) ends quietly.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .._version import __version__
from .common import ToolError

SUBCOMMANDS = ("inspect", "resize", "merge", "convert", "extract")


def parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="lycoris-kohya", description="Inspect, resize, merge, convert and extract "
                                "LoCon/LoHa/LoKr/DoRA files (lycoris_kohya, kohya and LyCORIS formats).")
    p.add_argument("--version", action="version", version=f"lycoris_kohya {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return p


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null, so that the interpreter's final flush does
    not print a second BrokenPipeError."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stdout (tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        rc = int(args.run(args) or 0)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:  # `lycoris-kohya inspect x | head`: the reader has what it wanted
        _quiet_stdout()
        return 0
    except ToolError as e:
        print(f"lycoris-kohya {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, OSError) as e:  # a message from below (specs, weights, the file system) names its object
        print(f"lycoris-kohya {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lycoris-kohya {args.command}: interrupted (an output is renamed into place only once "
              f"complete: no half-written file is left)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
