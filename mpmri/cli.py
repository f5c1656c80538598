"""The ``mpmri`` console script. Each package registers its own subcommands (imported lazily)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from contract import __version__
from contract.errors import MpmriError

#: modules exposing ``register(subparsers) -> None``; each sub-parser sets ``func(args) -> int``.
COMMAND_MODULES: tuple[str, ...] = (
    "mpmri_client.cli",
    "synth.cli",
    "preprocessing.cli",
    "preprocess_service.cli",
    "training.cli",
    "export.cli",
    "serving.cli",
    "mpmri.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpmri", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mpmri {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a package not built yet must not break the others
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MpmriError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
