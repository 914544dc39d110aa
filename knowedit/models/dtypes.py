"""The dtypes a model can be loaded in, under the names researchers type (``bf16``, ``float16``, ...)."""
from __future__ import annotations

import torch

from ..errors import ModelLoadError

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
CHOICES = ("bf16", "fp16", "fp32")


def parse_dtype(dtype, field: str = "dtype") -> torch.dtype:
    """``None`` (float32), a torch dtype, or one of :data:`DTYPES`' names."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"{field}: {dtype} is not a floating dtype a model can run in; use one of "
                                 f"{', '.join(CHOICES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelLoadError(f"{field}: {dtype!r} is not a dtype knowedit can load a model in; use one of "
                             f"{', '.join(CHOICES)} (or bfloat16 / float16 / float32)")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype for what must not lose precision to a low-precision model (optimiser master copies,
    sums): float32, or the model's own dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)
