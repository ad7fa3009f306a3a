"""Shared entry-point wrapper: user mistakes become one-line errors; Ctrl-C and SIGTERM a clean, recorded exit."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, Callable

from utils.errors import UserError


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
