"""Errors that reach users: each carries a one-line reason, never a deep torch traceback."""


class EchoXError(Exception):
    """Base class: something the caller can act on, with a one-line message."""


class AudioInputError(EchoXError):
    """The audio cannot be used (empty, too long, not finite, unreadable)."""


class ModelLoadError(EchoXError):
    """A model folder is missing, corrupt, or written by a newer version."""


class ConfigError(EchoXError):
    """A configuration is invalid or inconsistent."""


class CancelledError(EchoXError):
    """A running response was cancelled (barge-in)."""
