"""Errors specific to editing."""
from ..errors import KnoweditError


class EditRefused(KnoweditError):
    """The editor computed an update it will not apply (a "disabling edit"); the model is unchanged."""
