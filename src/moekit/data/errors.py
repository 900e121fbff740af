"""Errors of the data loaders (to be replaced by moekit.data.corpus's once that is on main)."""


class MissingDataError(FileNotFoundError):
    """A data source is not installed; the message names the package that provides it."""


class DataFileError(ValueError):
    """A user-supplied data file cannot be used; the message names the file."""
