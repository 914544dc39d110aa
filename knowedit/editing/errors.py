"""Errors specific to editing."""
from ..errors import KnoweditError


class EditRefused(KnoweditError):
    """An edit the editor refuses (it would disable the model); nothing was changed."""
