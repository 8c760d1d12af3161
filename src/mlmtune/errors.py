"""The one exception type for errors a user can cause; the CLI prints it on one line and exits 1."""


class MlmtuneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
