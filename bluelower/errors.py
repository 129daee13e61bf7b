"""User-facing errors.

Anything a user can cause (a missing file, a malformed config, an unsupported op, a
prompt longer than the KV cache) is raised as :class:`BlueLowerError`. The CLI prints its
message on one line and exits non-zero; everything else is a bug and keeps its traceback.
"""


class BlueLowerError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 1


class UnsupportedOperatorError(BlueLowerError):
    """A frontend met an operator it cannot convert."""

    exit_code = 3
