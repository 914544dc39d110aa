"""What a circuit mask means for ROME and MEMIT.

``mode="restrict"``: only MLP layers that the mask touches are edited (the hparams layers
intersected with ``mask.mlp_layers()``), and within a layer only the down-projection columns of the
masked neurons S change. The update is then the constrained least-squares solution: minimising
E‖ΔW k‖² = tr(ΔW C ΔWᵀ) subject to ΔW k* = δ and ΔW[:, i] = 0 for i ∉ S gives
ΔW[:, S] = δ (C_SS⁻¹ k*_S)ᵀ / (k*_Sᵀ C_SS⁻¹ k*_S) (note C_SS⁻¹, not (C⁻¹)_SS); MEMIT likewise solves
ΔW[:, S] = R K_Sᵀ (λ C_SS + K_S K_Sᵀ)⁻¹. The MLP's input projections, biases, attention and norms never
change, so every parameter outside the mask stays bit-identical.

``mode="ablate"`` (Ge et al.: run the pruned sub-network) is refused for ROME and MEMIT: their keys,
values and covariance are read from the full network's activations, and an update computed inside a
pruned network has no defined meaning once the pruning is lifted (and while it is kept, the edited
network is not the model users evaluate). Fine-tuning editors support it.
"""
from __future__ import annotations

import torch

from ..errors import KnoweditError
from ..models.weights import read_param
from .change import Change
from .subspace import solve_in  # noqa: F401  (the solve every editor uses lives with the subspaces)

MODES = ("restrict", "ablate")


def edit_sites(handle, layers: list[int], mask, mode: str, method: str) -> list[tuple[int, torch.Tensor | None]]:
    """``[(layer, neurons or None for all)]`` that the editor may change."""
    if mode not in MODES:
        raise KnoweditError(f"mode: {mode!r} is not one of {MODES}")
    if mask is None:
        return [(l, None) for l in layers]
    if mode == "ablate":
        raise KnoweditError(f"mode 'ablate' is not defined for {method} (a locate-then-edit method reads keys and "
                            "values from the full network); use mode='restrict', or an FT editor for ablate")
    in_mask = set(mask.mlp_layers())
    keep = [l for l in layers if l in in_mask]
    if not keep:
        raise KnoweditError(f"mask: the circuit has no MLP among the edit layers {layers} (its MLP layers: "
                            f"{sorted(in_mask) or 'none'}); add an MLP to the circuit or change hparams 'layers'")
    d = handle.adapter.d_mlp
    out = []
    for l in keep:
        n = mask.mlp_neurons(l)
        out.append((l, None if len(n) == d else n))
    return out


def weight_change(handle, layer: int, delta_out_in, neurons) -> tuple[str, Change]:
    """The down projection's parameter name and the :class:`~.change.Change` that adds ΔW to it, ΔW
    given as ``[out, in]``: a tensor, or a rank-one pair ``(left [out], right [in])`` (ΔW = left rightᵀ).

    Only the columns of ``neurons`` (all when None) change, so every other entry keeps its exact bits
    (adding a float 0 would turn -0.0 into +0.0), and only those columns are kept for undo."""
    mod = handle.adapter.mlp_out(layer)
    name = handle.adapter.name_of(mod.weight)
    linear = handle.adapter.out_dim(mod) == 0          # nn.Linear [out, in]; Conv1D is [in, out]
    dim = None if neurons is None else handle.adapter.in_dim(mod)
    cols = None if neurons is None else torch.as_tensor(neurons, dtype=torch.long)
    old = read_param(handle.model, name, dim, cols)
    old = old.clone() if cols is None else old
    if cols is not None:
        cols = cols.to(old.device)
    if isinstance(delta_out_in, tuple):
        left, right = delta_out_in
        right = right if cols is None else right[cols.to(right.device)]
        return name, Change(dim, cols, old, factors=[(left, right) if linear else (right, left)])
    d = delta_out_in if cols is None else delta_out_in[:, cols.to(delta_out_in.device)]
    d = (d if linear else d.T).to(old.device)
    return name, Change(dim, cols, old, new=(old.double() + d).to(old.dtype))


def new_weight(handle, layer: int, delta_out_in, neurons: torch.Tensor | None) -> tuple[str, torch.Tensor]:
    """The down projection's parameter name and its full new value (see :func:`weight_change`)."""
    name, c = weight_change(handle, layer, delta_out_in, neurons)
    return name, c.scatter(read_param(handle.model, name), c.new)
