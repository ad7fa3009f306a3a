"""What every script's command line shares: boolean values that accept the original project's ``True/False``, and the
entry-point wrapper that turns user mistakes into one-line errors and Ctrl-C / SIGTERM into a
clean, recorded exit. The flags themselves are declared once, in configs.py."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Callable, Optional

from utils.errors import UserError

TRUE_STRINGS = {"true", "1", "yes", "y", "on"}
FALSE_STRINGS = {"false", "0", "no", "n", "off"}


def str2bool(value: str | bool) -> bool:
    """Parse ``True/False`` (any case), ``1/0``, ``yes/no``: the original README writes ``--pre_trained True``."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in TRUE_STRINGS:
        return True
    if lowered in FALSE_STRINGS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, default: Optional[bool], help: str) -> None:
    """``--name`` alone means True; ``--name True|False`` (any case, 1/0, yes/no) sets it."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="True|False", help=help)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, a container stop), handled exactly like Ctrl-C: scripts record the
    interruption (main.py marks the run folder "interrupted"), temporary files are removed, finished files stay."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def run_cli(main: Callable[[argparse.Namespace], Any], parse_args: Callable[[], argparse.Namespace]) -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(parse_args())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
