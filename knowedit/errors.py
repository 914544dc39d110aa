"""Exception types that carry a fix the user can act on."""


class KnoweditError(ValueError):
    """Bad input: the message names the field and what to do about it."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says where to point instead."""


class UnsupportedArchitecture(KnoweditError):
    """The model's architecture has no adapter."""
