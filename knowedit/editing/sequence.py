"""EditSequence: edits applied one after another, undone in reverse order."""
from __future__ import annotations

from .edit import Reversible


class EditSequence(Reversible):
    """Sequential editing: each request is its own :class:`~knowedit.editing.edit.Edit`, computed on
    the model as the previous edits left it. Undo runs in reverse, so it is bit-exact."""

    def __init__(self, edits: list):
        self.edits = list(edits)
        self.method = self.edits[0].method if self.edits else None
        self.info = {"sequential": True, "n_edits": len(self.edits)}

    @property
    def applied(self) -> bool:
        return any(e.applied for e in self.edits)

    def apply(self) -> "EditSequence":
        done = []
        try:
            for e in self.edits:
                e.apply()
                done.append(e)
        except BaseException:
            for e in reversed(done):
                e.undo()
            raise
        return self

    def undo(self) -> None:
        for e in reversed(self.edits):
            e.undo()

    def norms(self) -> list[dict[str, float]]:
        return [e.norms() for e in self.edits]

    def __iter__(self):
        return iter(self.edits)

    def __len__(self) -> int:
        return len(self.edits)

    def __repr__(self) -> str:
        return f"EditSequence({self.method}, {len(self.edits)} edits, applied={self.applied})"
