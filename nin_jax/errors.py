"""The one exception type for problems with the user's data or settings."""


class UserError(Exception):
  """Bad data, a bad setting or a missing dataset: said in one line, no traceback.

  Raise it with a message that names the culprit (the file, folder or config key) and, where
  there is one, the fix. `nin_jax.main` and the command-line tools print it and exit with
  status 2; everything else is a bug and keeps its traceback.
  """
