"""What a circuit mask means for an editor, and the four control conditions.

Semantics (shared by the fine-tuning editors; ROME/MEMIT document their own):

- ``mode="restrict"``: only masked elements may change; every other element of every tensor stays
  bit-identical (the editors build the new tensors with ``masked_scatter`` over the originals, so
  this holds by construction, not up to rounding).
- ``mode="ablate"`` (Ge et al.): the network is pruned to the mask. Every head and MLP-neuron slice
  *outside* the mask is zeroed (norms too when the mask includes norms); embeddings, the unembedding
  and unmasked norms are not prunable units and stay. The editor trains the masked elements of that
  pruned network, and the returned edit writes the pruned network (zeros included), because the
  pruned network is what Ge et al. evaluate. ``Edit.undo()`` still restores every tensor bit-exactly.
"""
from __future__ import annotations

import torch

from ..errors import KnoweditError

MODES = ("restrict", "ablate")
CONDITIONS = ("circuit", "complement", "random", "none")


def check_mode(mode: str, mask) -> str:
    if mode not in MODES:
        raise KnoweditError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "ablate" and mask is None:
        raise KnoweditError("mode='ablate' prunes the model to a mask; pass mask= (or use mode='restrict')")
    return mode


def check_mask_handle(mask, handle) -> None:
    if mask is not None and getattr(mask, "handle", handle) is not handle:
        raise KnoweditError("mask: it was built on a different model handle; build it with "
                            "circuit.parameter_mask(handle) for the model being edited")


def pruned_elements(mask) -> dict[str, torch.Tensor]:
    """``{param: bool}`` of the elements ``mode="ablate"`` zeroes: the prunable units outside the mask.

    With grouped-query attention a k/v slice shared by a masked and an unmasked query head is kept."""
    out = {}
    for name, u in mask.universe().tensors.items():
        m = mask[name]
        drop = u if m is None else (u & ~m)
        if drop.any():
            out[name] = drop
    return out


def mask_conditions(handle, circuit, seed: int = 0, ports: str = "qkvo", include_norms: bool = False,
                    same_layers: bool = False) -> dict:
    """The four conditions researchers compare: ``{"circuit", "complement", "random", "none"}``.

    ``circuit`` is a :class:`~knowedit.circuit.Circuit` (checked against the model) or a
    ``ParameterMask``. The random control has as many heads and MLP neurons as the circuit."""
    from ..circuit import Circuit, ParameterMask

    if isinstance(circuit, Circuit):
        mask = circuit.parameter_mask(handle, ports=ports, include_norms=include_norms)
    elif isinstance(circuit, ParameterMask):
        check_mask_handle(circuit, handle)
        mask = circuit
    else:
        raise KnoweditError(f"circuit: expected a Circuit or ParameterMask, got {type(circuit).__name__}")
    if not mask.tensors:
        raise KnoweditError("circuit: it has no heads or MLPs, so its mask selects no parameters")
    return {"circuit": mask, "complement": mask.complement(), "random": mask.random_like(seed, same_layers=same_layers),
            "none": None}


def describe_conditions(conditions: dict) -> list[dict]:
    """One row per condition: density by parameter count and by module count, and the norm share."""
    rows = []
    for cond, m in conditions.items():
        if m is None:
            rows.append({"condition": cond, "params": None, "param_density": None, "modules": None,
                         "module_density": None, "heads": None, "mlp_neurons": None, "norm_share_of_mask": None})
            continue
        d = m.density()
        rows.append({"condition": cond, "params": d["params"], "param_density": d["param_density"],
                     "modules": d["modules"], "module_density": d["module_density"], "heads": d["heads"],
                     "mlp_neurons": d["mlp_neurons"], "norm_share_of_mask": d["norm_share_of_mask"]})
    return rows


def format_conditions(rows: list[dict]) -> str:
    head = f"{'condition':<11} {'params':>11} {'by params':>9} {'modules':>8} {'by modules':>10} {'heads':>6} " \
           f"{'neurons':>8} {'norm share':>10}"
    lines = [head]
    for r in rows:
        if r["params"] is None:
            lines.append(f"{r['condition']:<11} {'(no mask: the editor default)':>50}")
            continue
        lines.append(f"{r['condition']:<11} {r['params']:>11,} {r['param_density']:>9.2%} {r['modules']:>8} "
                     f"{r['module_density']:>10.2%} {r['heads']:>6} {r['mlp_neurons']:>8} "
                     f"{r['norm_share_of_mask']:>10.2%}")
    return "\n".join(lines)
