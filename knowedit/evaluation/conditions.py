"""Mask conditions for restricted edits: ``none`` (no mask), ``circuit``, ``complement`` (every
head and MLP outside the circuit) and ``random`` (a random set of the circuit's size)."""
from __future__ import annotations

from pathlib import Path

from ..circuit import Circuit
from ..errors import KnoweditError

CONDITIONS = ("none", "circuit", "complement", "random")


def condition_circuit(circuit: Circuit | None, condition: str, seed: int = 0) -> Circuit | None:
    if condition not in CONDITIONS:
        raise KnoweditError(f"condition {condition!r} is unknown; use one of {CONDITIONS}")
    if condition == "none":
        return None
    if circuit is None:
        raise KnoweditError(f"condition {condition!r} needs a circuit; name one in the suite ('circuit: PATH')")
    if condition == "circuit":
        return circuit
    if condition == "complement":
        return circuit.complement()
    return circuit.random_like(seed=seed)


def load_circuit(path, handle) -> Circuit:
    p = Path(path)
    if not p.exists():
        raise KnoweditError(f"circuit file {p} does not exist; discover one first (knowedit discover ...) "
                            "or point 'circuit:' in the suite at an existing file")
    return Circuit.load(p, handle)
