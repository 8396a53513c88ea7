"""The ``oncopilot`` command. Each sub-command lives in ``OncoPilotLib/commands/<name>.py`` and provides
``add_parser(subparsers)``, which registers its arguments and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oncopilot", description="Promptable CT tumour segmentation and RECIST measurement (OncoPilot).")
    parser.add_argument("--version", action="version", version=f"oncopilot {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").add_parser(subparsers)
    return parser


# Options whose value may start with "-" (negative RAS coordinates, negative edit clicks): argparse would take
# "--point -72.6,-77,-190" for two options, so their value is attached ("--point=-72.6,...") before parsing.
_SIGNED_VALUE_OPTIONS = ("--point", "--box", "--roi", "--edit", "--window")


def _attach_signed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        value = next(tokens, None) if token in _SIGNED_VALUE_OPTIONS else None
        out.append(token if value is None else f"{token}={value}")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_attach_signed_values(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"oncopilot {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
