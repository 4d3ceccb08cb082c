"""Errors the product reports to users as a clear message rather than a traceback."""


class DrafterError(Exception):
    """Base of every expected failure: bad input, a failed check, a refused action."""
