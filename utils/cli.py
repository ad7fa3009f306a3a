"""What every script's command line shares: the flags several scripts take (one definition each, reused through
``parents=``), boolean flags that accept the original project's ``True/False``, and the entry-point wrapper that
turns user mistakes into one-line errors and Ctrl-C / SIGTERM into a clean, recorded exit."""

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


DEVICE_CHOICES = ("auto", "cpu", "cuda")
NUM_WORKERS_HELP = ("DataLoader worker processes that decode images, capped at the CPU count; 0 decodes in the main "
                    "process")


def model_path_flags(*aliases: str) -> argparse.ArgumentParser:
    """--model_path: the run folder main.py wrote; ``aliases`` keep a script's older spelling working."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model_path", *aliases, dest="model_path", required=True,
                        help="run folder written by main.py")
    return parser


def device_flags(default: str = "auto", what: str = "where the models run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", choices=list(DEVICE_CHOICES), default=default,
                        help=f"{what}; auto = cuda when a GPU is visible, else cpu (default: %(default)s)")
    return parser


def num_workers_flags(default: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--num_workers", type=int, default=default, help=f"{NUM_WORKERS_HELP} (default: %(default)s)")
    return parser


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
