"""The two kinds of failure the tool reports, and their exit codes.

Exit codes (stable, documented in docs/cli.md): 0 success, 1 runtime error,
2 usage error (bad arguments, bad input files named on the command line).
"""

from __future__ import annotations


class ImgclusterError(Exception):
    """Something went wrong while doing the work; the CLI exits with 1."""

    exit_code = 1


class UsageError(ImgclusterError):
    """The request cannot be carried out as asked; the CLI exits with 2."""

    exit_code = 2


class Interrupted(ImgclusterError):
    """Training was stopped by Ctrl-C after a checkpoint was written; the CLI exits with 130."""

    exit_code = 130
