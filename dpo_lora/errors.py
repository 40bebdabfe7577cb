"""User-facing errors: raised for bad config, data or paths; printed as one line by the CLI."""


class UserError(Exception):
    """An error caused by the user's input. The CLI prints its message alone and exits non-zero."""
