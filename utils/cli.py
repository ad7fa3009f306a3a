"""Shared entry-point wrapper: user mistakes become one-line errors, Ctrl-C a clean exit."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from utils.errors import UserError


def run_cli(main: Callable[[argparse.Namespace], Any], parse_args: Callable[[], argparse.Namespace]) -> None:
    try:
        main(parse_args())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
