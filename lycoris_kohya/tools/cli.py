"""The ``lycoris-kohya`` command: one subcommand per module of this package."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .common import ToolError

SUBCOMMANDS = ("inspect", "resize", "merge", "convert", "extract")


def parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="lycoris-kohya", description="Inspect, resize, merge, convert and extract "
                                "LoCon/LoHa/LoKr/DoRA files (lycoris_kohya, kohya and LyCORIS formats).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ToolError, ValueError, FileNotFoundError) as e:
        print(f"lycoris-kohya {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
