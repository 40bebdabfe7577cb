"""User-facing errors: raised for bad config, data or paths; printed as one line by the CLI."""


class UserError(Exception):
    """An error caused by the user's input. The CLI prints its message alone and exits non-zero."""


class ConfigError(UserError):
    """A config value or key the tree refuses; `key` is the dotted key it names (None: the whole file)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key
