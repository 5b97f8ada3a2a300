"""The ``ssl-eval`` command: the parser is assembled from ``ssl_eval/commands/`` (one module
per subcommand); errors a user can cause end here in one line and exit code 2."""

from __future__ import annotations

import argparse
import sys

from .core.errors import UserError, one_line


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import discover

    parser = argparse.ArgumentParser(
        prog="ssl-eval", description="Evaluate vision representations honestly."
    )
    parser.add_argument("--version", action="version", version=f"ssl-eval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in discover():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "deterministic", False):
            # before any command imports torch: the pinned kernels are read at its first op
            from .core.runtime import log
            from .train.determinism import pin_environment

            pin_environment(lambda s: log(s, "train"))
        return args.func(args)
    except UserError as e:
        # one line even when a library's several-line message reached the error's text
        print(f"ssl-eval: error: {one_line(e, limit=None)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "ssl-eval: interrupted; completed results and cache entries are kept", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
