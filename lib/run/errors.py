"""Errors a user can fix (a bad config key, a missing or truncated checkpoint, an output directory
that already holds a run): the scripts print them as one line and exit 2, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input: the message names the file, key or shape and what was expected."""


def exit_code_of(main: Callable[[], int]) -> int:
    """Run a script's `main`; a `UserError` becomes `error: <message>` on stderr and exit code 2."""
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
