"""One exception type for every foreseeable user mistake.

The CLI prints ``str(error)`` as a single line and exits with status 2; library users can catch
``LongMemError`` (a ``ValueError``) without caring which part of the library raised it.
"""


class LongMemError(ValueError):
    """A bad input, file or setting. The message says what was wrong and what to do."""
