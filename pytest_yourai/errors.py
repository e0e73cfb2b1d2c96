"""Errors the plugin raises on bad input; the plugin turns them into pytest usage errors."""


class YouraiUsageError(Exception):
    """Bad user input: one line that names the bad value and where it came from."""
