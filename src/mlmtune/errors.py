"""The one exception type for errors a user can cause (the CLI prints it on one line and exits 1),
and the one warning line for input that is partly bad but usable."""

import sys


class MlmtuneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def warn(message: str) -> None:
    """One `warning: ...` line on stderr: the work goes on, and the user learns what was skipped."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
