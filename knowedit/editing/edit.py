"""Edit: the exact weight changes one editor call made, applied atomically, undone bit-exactly.

Undo restores saved copies of the original tensors rather than subtracting the deltas, because
float addition is not exactly reversible."""
from __future__ import annotations

import hashlib

import torch


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
    def __init__(self, handle, new_values: dict[str, torch.Tensor], method: str, info: dict | None = None):
        """``new_values``: {parameter name: full new tensor}. Nothing is written until :meth:`apply`."""
        self.handle = handle
        self.method = method
        self.info = info or {}
        params = dict(handle.model.named_parameters())
        self._params = {n: params[n] for n in new_values}
        self.originals = {n: p.detach().clone() for n, p in self._params.items()}
        self.new_values = {n: v.detach().to(self._params[n].dtype) for n, v in new_values.items()}
        self.applied = False

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: self.new_values[n] - self.originals[n] for n in self.new_values}

    def norms(self) -> dict[str, float]:
        """Frobenius norm of the change per edited matrix."""
        return {n: float(d.float().norm()) for n, d in self.deltas.items()}

    @torch.no_grad()
    def apply(self) -> "Edit":
        if self.applied:
            return self
        done = []
        try:
            for n, v in self.new_values.items():
                self._params[n].copy_(v)
                done.append(n)
        except BaseException:
            for n in done:  # all or nothing
                self._params[n].copy_(self.originals[n])
            raise
        self.applied = True
        return self

    @torch.no_grad()
    def undo(self) -> None:
        if not self.applied:
            return
        for n, p in self._params.items():
            p.copy_(self.originals[n])
        self.applied = False

    def __repr__(self) -> str:
        return f"Edit({self.method}, {len(self.new_values)} tensors, applied={self.applied})"
