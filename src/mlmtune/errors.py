"""The one exception type for errors a user can cause, and the one way mlmtune talks on stderr.

`MlmtuneError` carries a message that says what to do (`require` raises it where a condition fails); the CLI
prints it on one line and exits 1.
`say` prints a line of progress on stderr (above any progress bar), `warn` a `warning: ...` line
about input that is partly bad but usable. In a job of several processes only rank 0 speaks
(`distributed.init` calls `speak_as`), so a line appears once per run, not once per process.
"""

import sys

from tqdm import tqdm


class MlmtuneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def require(condition: bool, message: str) -> None:
    """Raise `MlmtuneError(message)` unless `condition` holds: the configs' validation."""
    if not condition:
        raise MlmtuneError(message)


_quiet = False  # a process other than rank 0 of a job


def speak_as(rank: int) -> None:
    """Rank 0 speaks; the other ranks of a job keep quiet."""
    global _quiet
    _quiet = rank != 0


def say(message: str) -> None:
    """One line on stderr, written above the progress bars (which are redrawn under it)."""
    if not _quiet:
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


def warn(message: str) -> None:
    """One `warning: ...` line on stderr: the work goes on, and the user learns what was skipped."""
    say(f"warning: {message}")
