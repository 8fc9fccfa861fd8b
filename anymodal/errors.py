"""Errors a user can cause; the CLI turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad user input: a missing file, an unknown config key, a mismatched token space..."""


class ConfigError(UserError):
    """A config file or `key=value` override that does not fit its schema."""
