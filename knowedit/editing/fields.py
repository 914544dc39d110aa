"""Validation of the hyperparameter fields an editor reads, with errors naming the field."""
from __future__ import annotations

from ..errors import KnoweditError


def field(hp: dict, name: str, kind, check=None, why: str = ""):
    """``hp[name]`` as ``kind`` (int, float, bool, str, list), else a KnoweditError naming the field."""
    if name not in hp:
        raise KnoweditError(f"hparams: field {name!r} is missing")
    v = hp[name]
    try:
        if kind is bool:
            if not isinstance(v, bool):
                raise TypeError
        elif kind is int:
            if isinstance(v, bool) or int(v) != v:
                raise TypeError
            v = int(v)
        elif kind is float:
            if isinstance(v, bool):
                raise TypeError
            v = float(v)
        elif kind is list:
            if not isinstance(v, (list, tuple)):
                raise TypeError
            v = list(v)
        elif not isinstance(v, kind):
            raise TypeError
    except (TypeError, ValueError):
        raise KnoweditError(f"hparams: field {name!r} = {v!r} must be {kind.__name__}") from None
    if check is not None and not check(v):
        raise KnoweditError(f"hparams: field {name!r} = {v!r} is out of range{': ' + why if why else ''}")
    return v


def layer_list(hp: dict, n_layers: int) -> list[int]:
    layers = field(hp, "layers", list, lambda v: len(v) > 0, "give at least one layer")
    out = []
    for x in layers:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layers:
            raise KnoweditError(f"hparams: field 'layers' holds {x!r}; layers are integers in 0..{n_layers - 1}")
        out.append(x)
    if len(set(out)) != len(out):
        raise KnoweditError(f"hparams: field 'layers' = {layers} repeats a layer")
    return sorted(out)


def below_loss_layer(hp: dict, layers: list[int], n_layers: int) -> None:
    """δ at a layer's subject token reaches the prediction only through later layers."""
    loss = field(hp, "v_loss_layer", int, lambda v: -n_layers <= v < n_layers, f"the model has {n_layers} layers")
    if max(layers) >= loss % n_layers:
        raise KnoweditError(f"hparams: edit layer {max(layers)} is not below v_loss_layer {loss % n_layers}; a change "
                            "there cannot reach the prediction. Choose lower 'layers'")
