"""`raysparse data|train|tune|serve|query|bench|demo` — thin argument parsing over the library.

Each command group lives beside the code it drives and registers itself here through a
`register(subparsers)` function, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds). Modules that need Ray are imported only when their command runs.
COMMAND_MODULES = [
    "raysparse.data.cli",        # data synthetic | convert | check
    "raysparse.train_cli",       # train (--local or on Ray)
    "raysparse.bench.cli",       # bench data | step | train | gpu | serve | accuracy
    "raysparse.extra_cli",       # tune | serve | query
    "raysparse.demo",            # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysparse", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # user-facing errors: one clear line, no stack trace
        from raysparse.errors import UserError

        if isinstance(err, UserError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
