"""The Circuit type and its parameter mask."""
from .circuit import SCHEMA_VERSION, Circuit, model_info
from .mask import MaskUnits, ParameterMask
from .weight_mask import WeightMask

__all__ = ["Circuit", "ParameterMask", "MaskUnits", "WeightMask", "SCHEMA_VERSION", "model_info"]
