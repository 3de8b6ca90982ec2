"""`skyreels-local` command line: one module per subcommand, each with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import SkyreelsError
from . import generate
from .settings_flags import HelpFormatter, check_environment


class Parser(argparse.ArgumentParser):
    """A bad flag is one line naming it and the way to the help, not the whole usage block (which
    for `serve` is thirty lines that bury the error). Subcommand parsers inherit this class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="skyreels-local",
        description="Self-hosted SkyReels V1 image-to-video: generate videos locally or serve the "
        "WaveSpeed v3 HTTP API.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _subcommands():
        module.register(subparsers)
    return parser


def _subcommands() -> list:
    modules = [generate]
    # Optional subcommands register themselves when their module exists.
    for name in ("serve", "worker", "weights", "bench"):
        try:
            modules.append(__import__(f"{__name__}.{name}", fromlist=["register"]))
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    return modules


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Every command reads the SKYREELS_* variables: a bad one is reported first, in one line.
        check_environment()
    except SkyreelsError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args) or 0)
    except SkyreelsError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
