"""knowedit: find the circuit a model uses, edit knowledge through it, measure what happened."""
from .errors import KnoweditError, ModelLoadError, UnsupportedArchitecture
from .models import ModelHandle, load_model

__version__ = "0.1.0"
__all__ = ["load_model", "ModelHandle", "KnoweditError", "ModelLoadError", "UnsupportedArchitecture"]
