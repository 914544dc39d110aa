"""The input directions an update of one matrix may use.

Every locate-then-edit solve here has the form ΔWᵀ = B (Bᵀ A B)⁻¹ Bᵀ b: the least-squares update
whose rows lie in span(B). B is built from three independent restrictions, intersected:

* a circuit's neurons S (only the down-projection columns of S change): B ⊆ span(e_i, i ∈ S);
* AlphaEdit's knowledge null space: the eigenvectors of the key covariance C (within S) whose
  eigenvalue is below ``nullspace_threshold``, so ΔW barely moves the keys of preserved knowledge;
* a circuit-preserving projection: orthogonal to the keys of the preserved tasks' prompts
  (:mod:`knowedit.editing.preserve`), so ΔW k = 0 for them up to float error.

With B orthonormal, Bᵀ(A + μI)B = BᵀAB + μI, so AlphaEdit's ΔW = R Kᵀ P (…P + L2·I)⁻¹ with P = BBᵀ is
this solve with A + L2·I, and ΔW (I − P) = 0 holds exactly by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_RANK_TOL = 1e-10   # a singular value below this (relative to 1: the inputs are orthonormal) is zero


@dataclass
class Subspace:
    """``neurons``: the columns that may change (None: all ``d``). ``basis``: an orthonormal ``[d, m]``
    basis of the allowed directions when it is narrower than those columns, else None."""

    d: int
    neurons: torch.Tensor | None = None
    basis: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        if self.basis is not None:
            return self.basis.shape[1]
        return self.d if self.neurons is None else len(self.neurons)

    def columns(self) -> torch.Tensor:
        return torch.arange(self.d) if self.neurons is None else self.neurons

    def full_basis(self) -> torch.Tensor:
        """The allowed directions as an orthonormal ``[d, m]`` float64 basis."""
        if self.basis is not None:
            return self.basis
        cols = self.columns()
        return torch.eye(self.d, dtype=torch.float64)[:, cols]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The orthogonal projection of ``x`` (``[d]`` or ``[d, m]``) onto the allowed directions."""
        B = self.full_basis().to(x.device)
        return B @ (B.T @ x.double())


def as_subspace(space, d: int) -> Subspace:
    if isinstance(space, Subspace):
        return space
    return Subspace(d, neurons=space)


def solve_in(A: torch.Tensor, b: torch.Tensor, space) -> torch.Tensor:
    """A⁻¹ b with the solution confined to ``space`` (a :class:`Subspace`, a tensor of neuron
    indices, or None for all): B (BᵀAB)⁻¹ Bᵀ b, float64. ``b`` is ``[d]`` or ``[d, m]``."""
    if space is None:
        return torch.linalg.solve(A, b)
    sp = as_subspace(space, A.shape[0])
    if sp.basis is None:
        if sp.neurons is None:
            return torch.linalg.solve(A, b)
        out = torch.zeros_like(b)
        S = sp.neurons.to(A.device)
        out[S] = torch.linalg.solve(A[S][:, S], b[S])
        return out
    B = sp.basis.to(A.device, A.dtype)
    return B @ torch.linalg.solve(B.T @ A @ B, B.T @ b)


def _complement(basis: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of {B x : (B x) ⊥ span(blocked)} for orthonormal ``basis`` B ``[d, m]``
    and any ``blocked`` ``[d, r]``."""
    if blocked.shape[1] == 0:
        return basis
    inner = basis.T @ blocked               # [m, r]: the blocked directions in B's coordinates
    U, s, _ = torch.linalg.svd(inner, full_matrices=True)
    rank = int((s > _RANK_TOL * max(1.0, float(s.max()) if len(s) else 1.0)).sum())
    return basis @ U[:, rank:]


def knowledge_null_space(C: torch.Tensor, neurons: torch.Tensor | None, threshold: float) -> tuple[torch.Tensor, dict]:
    """AlphaEdit's P: the eigenvectors of C (restricted to ``neurons``) whose eigenvalue is below
    ``threshold``, as a ``[d, m]`` basis, and the spectrum facts to record."""
    d = C.shape[0]
    S = torch.arange(d) if neurons is None else neurons
    vals, vecs = torch.linalg.eigh(C[S][:, S].double())
    keep = vals < threshold
    B = torch.zeros(d, int(keep.sum()), dtype=torch.float64)
    B[S] = vecs[:, keep]
    return B, {"nullspace_threshold": threshold, "null_dims": int(keep.sum()), "key_dims": len(S),
               "eig_min": float(vals[0]), "eig_max": float(vals[-1])}


def build_subspace(d: int, neurons: torch.Tensor | None = None, null_basis: torch.Tensor | None = None,
                   blocked: torch.Tensor | None = None) -> Subspace:
    """The allowed directions: the ``neurons`` columns (all when None), within ``null_basis`` when given
    (it must already lie in those columns), orthogonal to ``blocked`` ``[d, r]`` when given."""
    if null_basis is None and blocked is None:
        return Subspace(d, neurons=neurons)
    base = null_basis if null_basis is not None else torch.eye(d, dtype=torch.float64)[
        :, torch.arange(d) if neurons is None else neurons]
    B = base if blocked is None else _complement(base, blocked.double())
    return Subspace(d, neurons=neurons, basis=B)
