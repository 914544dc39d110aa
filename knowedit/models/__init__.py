"""Model loading, the default offline model, architecture adapters and component names."""
from .adapters import ADAPTERS, Adapter, ParamSlice, adapter_for
from .components import Component, Edge, parse, validate
from .handle import Batch, ModelHandle
from .loading import load_model
from .weights import read_param, write_param

__all__ = ["ADAPTERS", "Adapter", "ParamSlice", "adapter_for", "Component", "Edge", "parse", "validate",
           "Batch", "ModelHandle", "load_model", "read_param", "write_param"]
