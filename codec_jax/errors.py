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


class PathNotFoundError(UsageError, FileNotFoundError):
    """A file or directory named on the command line (or in a config) does not exist.
    Also a `FileNotFoundError`, so `except FileNotFoundError` keeps working."""


class Preempted(Exception):
    """The run was stopped by SIGTERM after saving a checkpoint at `step`.

    Not a failure, but not "done" either: `codec-jax train` exits with `exit_code`
    (`train.preemption_exit_code`, default 143 = 128 + SIGTERM, the status of a process
    killed by SIGTERM) so that a scheduler restarts the job, which then resumes.
    """

    def __init__(self, step: int, exit_code: int = 143, resume_step: int | None = None):
        resume_step = step if resume_step is None else resume_step
        if resume_step == step:
            what = f"checkpoint {step} saved"
        else:  # the state at `step` was not finite, so it was not saved
            what = (f"the state at step {step} was not finite and was not saved; "
                    + (f"the newest checkpoint is {resume_step}" if resume_step
                       else "there is no checkpoint"))
        super().__init__(f"preempted: {what}; run the same command again to resume")
        self.step = step
        self.resume_step = resume_step
        self.exit_code = int(exit_code)
