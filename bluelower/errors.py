"""User-facing errors.

Anything a user can cause (a missing file, a malformed config, an unsupported op, a
prompt longer than the KV cache) is raised as :class:`BlueLowerError`. The CLI prints its
message on one line and exits non-zero; everything else is a bug and keeps its traceback.
"""


class BlueLowerError(Exception):
    """An error caused by the user's input, reported as one line without a traceback.

    The message is one line whatever it quotes: line breaks (a tensor name, a key read from a
    damaged file) are written as ``\\n`` / ``\\r``."""

    exit_code = 1

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (args[0].replace("\r", "\\r").replace("\n", "\\n"),)
        super().__init__(*args)


class UnsupportedOperatorError(BlueLowerError):
    """A frontend met an operator it cannot convert."""

    exit_code = 3
