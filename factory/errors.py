"""The one base of the errors the factory raises for bad input, bad settings or a machine too small.

The CLI turns a `FactoryError` into a one-line message naming the file, record or field and
exits 1; any other exception is a bug and keeps its traceback.
"""


class FactoryError(Exception):
    """Input, settings or resources the user can fix; the message says what and where."""
