"""The harness's errors that carry a user-facing one-line message."""


class ConfigError(ValueError):
  """A bad flag value or combination: the message starts with the flag."""
