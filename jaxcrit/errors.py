"""The one user-facing error class: raised at the boundary, printed by the CLI as one line."""
from __future__ import annotations

import sys
from typing import Callable


class JaxcritError(Exception):
    """Bad input a user can fix; the message says what was wrong and what to do."""


def exit_code(command: Callable[[], object]) -> int:
    """A command line's exit code: 0 once `command()` returns; 2, after one `jaxcrit: error:` line
    on stderr, when it raises JaxcritError."""
    try:
        command()
    except JaxcritError as e:
        print(f"jaxcrit: error: {e}", file=sys.stderr)
        return 2
    return 0
