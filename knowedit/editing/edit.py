"""Edit: the exact weight changes one editor call made, applied atomically, undone bit-exactly.

Undo restores saved copies of the original values rather than subtracting the deltas, because
float addition is not exactly reversible. Only what changes is kept (:mod:`.change`): the changed lines
of each matrix, or ROME's rank-one factors with the matrix's original values, and every read and
write goes through :mod:`knowedit.models.weights`, so edits land where a dispatched model keeps
its weights (another GPU, or accelerate's CPU or disk offload)."""
from __future__ import annotations

import hashlib

import torch

from ..errors import KnoweditError
from ..models.weights import read_param, write_param
from .change import Change, diff


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class Reversible:
    """Context-manager protocol for anything with ``apply()`` and ``undo()``."""

    def __enter__(self):
        return self.apply()

    def __exit__(self, *exc):
        self.undo()
        return False


class Edit(Reversible):
    def __init__(self, handle, new_values: dict[str, torch.Tensor | Change], method: str, info: dict | None = None):
        """``new_values``: {parameter name: full new tensor, or a :class:`~.change.Change` of it}.
        Nothing is written until :meth:`apply`; a full tensor is reduced to the lines that differ."""
        self.handle = handle
        self.method = method
        self.info = info or {}
        model = handle.model
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        unknown = [n for n in new_values if n not in shapes]
        if unknown:
            raise KnoweditError(f"new_values: {', '.join(unknown[:4])} is not a parameter of this model; use names "
                                "from model.named_parameters()")
        self.changes: dict[str, Change] = {n: v if isinstance(v, Change) else diff(model, n, v)
                                           for n, v in new_values.items()}
        self._shapes = {n: shapes[n] for n in self.changes}
        self.applied = False

    # ---- full tensors, computed on request (each costs the tensor's size) --------------------------
    def _full(self, which: str) -> dict[str, torch.Tensor]:
        out = {}
        for n, c in self.changes.items():
            lines = c.old if which == "old" else c.new
            out[n] = c.scatter(read_param(self.handle.model, n), lines)
        return out

    @property
    def originals(self) -> dict[str, torch.Tensor]:
        """{name: full tensor before the edit}, rebuilt from the current weights; exact while no later
        edit has changed other lines of the same tensors (see :func:`values_before` for sequences)."""
        return self._full("old")

    @property
    def new_values(self) -> dict[str, torch.Tensor]:
        """{name: full tensor with the edit applied}, rebuilt like :attr:`originals`."""
        return self._full("new")

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: c.full_delta(self._shapes[n]) for n, c in self.changes.items()}

    def norms(self) -> dict[str, float]:
        """Frobenius norm of the change per edited matrix."""
        return {n: float(c.delta_slice().float().norm()) for n, c in self.changes.items()}

    @property
    def nbytes(self) -> int:
        """Memory the edit holds to apply and undo itself."""
        return sum(c.nbytes for c in self.changes.values())

    @torch.no_grad()
    def apply(self) -> "Edit":
        if self.applied:
            return self
        model, done = self.handle.model, []
        try:
            for n, c in self.changes.items():
                done.append(n)   # before the write: a write that fails half-way is undone too
                write_param(model, n, c.new, c.dim, c.index)
        except BaseException:
            for n in done:  # all or nothing
                c = self.changes[n]
                write_param(model, n, c.old, c.dim, c.index)
            raise
        self.applied = True
        return self

    @torch.no_grad()
    def undo(self) -> None:
        if not self.applied:
            return
        for n, c in self.changes.items():
            write_param(self.handle.model, n, c.old, c.dim, c.index)
        self.applied = False

    def __repr__(self) -> str:
        return f"Edit({self.method}, {len(self.changes)} tensors, applied={self.applied})"


def values_before(edits: list) -> dict[str, torch.Tensor]:
    """{name: full tensor} as it was before ``edits`` (applied in this order) were applied, rebuilt
    from the current weights by undoing their changes in reverse, on copies."""
    out: dict[str, torch.Tensor] = {}
    for e in reversed(list(edits)):
        for n, c in e.changes.items():
            base = out[n] if n in out else read_param(e.handle.model, n)
            out[n] = c.scatter(base, c.old)
    return out
