"""The Circuit type and its parameter mask."""
from .circuit import SCHEMA_VERSION, Circuit, model_info
from .mask import MaskUnits, ParameterMask

__all__ = ["Circuit", "ParameterMask", "MaskUnits", "SCHEMA_VERSION", "model_info"]
