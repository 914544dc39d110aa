"""Change: what one edit does to one parameter, holding only the part that changes.

An editor touches a few lines of a matrix (a circuit's neuron columns, a head's rows) or, for ROME, the
whole matrix through rank-one updates. Keeping full copies of every touched matrix, twice (before and
after), would cost two layers' worth of memory per edit for nothing; a Change keeps

* the original values of the changed lines only (``old``), so undo writes back the exact bits, and
* the new values of those lines, or, for ROME, the rank-one factors they are computed from: the new
  lines are recomputed from ``old`` on every apply, by the same code and on the same device that
  produced them, so they are bit-identical each time.
"""
from __future__ import annotations

import torch

from ..models.weights import read_param


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s raw bits, so that -0.0 differs from 0.0 and NaN equals itself."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class Change:
    """The lines ``index`` along ``dim`` of one parameter (``dim=None``: the whole tensor).

    ``old``: their original values. ``new`` is given, or follows from ``old`` and ``factors``: pairs
    ``(left, right)`` added in turn as ``(x.double() + outer(left, right)).to(dtype)``, in the stored
    slice's own orientation."""

    def __init__(self, dim: int | None, index: torch.Tensor | None, old: torch.Tensor,
                 new: torch.Tensor | None = None, factors: list | None = None):
        if (new is None) == (factors is None):
            raise ValueError("Change: give new values or rank-one factors, not both or neither")
        self.dim, self.index, self.old = dim, index, old
        self._new = None if new is None else new.detach().to(device=old.device, dtype=old.dtype)
        self.factors = None if factors is None else [(l.detach(), r.detach()) for l, r in factors]

    @property
    def new(self) -> torch.Tensor:
        if self._new is not None:
            return self._new
        x = self.old
        for left, right in self.factors:
            x = (x.double() + torch.outer(left.to(x.device, torch.float64), right.to(x.device, torch.float64))
                 ).to(self.old.dtype)
        return x

    def then(self, later: "Change") -> "Change":
        """This change followed by ``later`` on the same lines (ROME's requests in turn), as one change
        from this one's original values. ``later.old`` must be this change's new values."""
        if self.factors is None or later.factors is None or self.dim != later.dim or \
                (self.index is not None and not torch.equal(self.index, later.index)):
            raise ValueError("Change.then: both changes need rank-one factors on the same lines")
        return Change(self.dim, self.index, self.old, factors=self.factors + later.factors)

    @property
    def nbytes(self) -> int:
        """Memory this change holds (original lines plus new lines or factors)."""
        held = [self.old] + ([self._new] if self._new is not None else [t for p in self.factors for t in p])
        return sum(t.numel() * t.element_size() for t in held) + (0 if self.index is None else
                                                                   self.index.numel() * self.index.element_size())

    def delta_slice(self) -> torch.Tensor:
        """new − old on the changed lines, in the parameter's dtype."""
        return self.new - self.old

    def scatter(self, base: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
        """``base`` (a full tensor, not changed) with the changed lines replaced by ``lines``."""
        if self.dim is None:
            return lines.clone()
        return base.index_copy(self.dim, self.index.to(base.device), lines.to(base.device, base.dtype))

    def full_delta(self, shape) -> torch.Tensor:
        """new − old as a tensor of the parameter's shape (zero outside the changed lines)."""
        d = self.delta_slice()
        if self.dim is None:
            return d
        return torch.zeros(shape, dtype=d.dtype, device=d.device).index_copy_(self.dim, self.index.to(d.device), d)


def _changed_lines(ne: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
    """The cheapest ``(dim, index)`` that covers every True of ``ne``: rows or columns of a matrix,
    elements of a vector; ``(None, None)`` when that would be the whole tensor anyway."""
    if ne.dim() == 0 or ne.dim() > 2:
        return None, None
    if ne.dim() == 1:
        idx = ne.nonzero().flatten()
        return (None, None) if len(idx) == ne.numel() else (0, idx)
    rows, cols = ne.any(1).nonzero().flatten(), ne.any(0).nonzero().flatten()
    dim, idx = (0, rows) if len(rows) * ne.shape[1] <= len(cols) * ne.shape[0] else (1, cols)
    return (None, None) if len(idx) == ne.shape[dim] else (dim, idx)


def diff(model, name: str, new: torch.Tensor) -> Change:
    """The Change from ``name``'s current values to the full tensor ``new`` (cast to the parameter's
    dtype), keeping only the lines that differ in any bit."""
    cur = read_param(model, name)
    new = new.detach().to(device=cur.device, dtype=cur.dtype)
    dim, idx = _changed_lines(_bits(cur) != _bits(new))
    if dim is None:
        return Change(None, None, cur.clone(), new=new.clone())
    idx = idx.to(cur.device)
    return Change(dim, idx, cur.index_select(dim, idx), new=new.index_select(dim, idx))
