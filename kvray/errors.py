"""The one exception type for bad user input: the CLI turns it into one line and exit code 2."""


class KvrayInputError(ValueError):
    """A job file, flag, model id, length, dtype or GPU name that kvray cannot use."""
