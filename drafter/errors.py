"""Errors the product reports to users as a clear message rather than a traceback, and the
exit codes the CLI gives them (README: "Exit codes")."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # a failed or refused action (any other DrafterError)
    USAGE = 2  # a bad command line (click's own code)
    CONFIG = 3  # a bad config file or -s override
    PARTIAL_INPUT = 4  # some inputs could not be read; the others were processed
    VALIDATION = 5  # a data validation failed; nothing was published
    GATE_FAILED = 6  # the candidate failed its gate; the registry is unchanged


class DrafterError(Exception):
    """Base of every expected failure: bad input, a failed check, a refused action."""

    exit_code: ExitCode = ExitCode.ERROR
