"""The error every data source raises: the train command prints its one line and exits 2."""


class SourceError(ValueError):
    """A data source cannot be opened or read; the message names it."""
