"""The errors a user can cause, and how the command line reports them.

Library code raises a `UserError` subclass when the *input* is wrong (a bad path, a
corrupt file, a config key that does not exist). The `codec-jax` dispatcher
(`codec_jax/cli/__init__.py`) prints such an error as one line, `codec-jax <command>:
<message>`, and exits with the error's `exit_code`: 2 for usage errors (the command was
written wrongly), 1 for failed work (the inputs could not be processed). Anything else
is a bug and keeps its traceback. `--debug` (or `CODEC_JAX_DEBUG=1`) shows the traceback
for user errors too.

Errors that already have a meaningful type elsewhere (`UnsafeCheckpointError` is a
`pickle.UnpicklingError`) also derive from `UserError`, so callers can catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: reported as one line, no traceback."""

    exit_code = 1


class UsageError(UserError, ValueError):
    """The command or its arguments are wrong (unknown key, missing path, bad value)."""

    exit_code = 2


class WorkError(UserError, RuntimeError):
    """The command was right but its inputs could not be processed."""

    exit_code = 1
