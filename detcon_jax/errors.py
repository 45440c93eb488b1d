"""The error types every layer raises for a user's mistake (a leaf: imports nothing).

The command lines catch USER_ERRORS and print one `error:` line; anything else is a bug
and keeps its traceback.
"""


class ConfigError(ValueError):
  """An impossible or inconsistent config; the message names the key and the fix."""


class InputError(RuntimeError):
  """The input stalled, ended, or read more unreadable records than allowed."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the run stopped without writing a checkpoint."""


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not writable, held by another run, not this project's,
  or no checkpoint restores."""


USER_ERRORS = (ConfigError, InputError, NonFiniteLossError, WorkdirError)
