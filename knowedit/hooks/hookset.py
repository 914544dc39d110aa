"""A set of PyTorch hooks that is always removed, also when the forward pass raises."""
from __future__ import annotations

import contextlib

from torch import nn


class HookSet(contextlib.AbstractContextManager):
    def __init__(self):
        self._handles = []

    def pre(self, module: nn.Module, fn):
        self._handles.append(module.register_forward_pre_hook(fn))

    def post(self, module: nn.Module, fn):
        self._handles.append(module.register_forward_hook(fn))

    def remove(self):
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc):
        self.remove()
        return False


def hook_count(model: nn.Module) -> int:
    """Hooks currently on the model (used by tests to prove nothing leaked)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextlib.contextmanager
def idle_hooks(handle):
    """Pass-through hooks on every attention output projection and MLP, i.e. what patch/ablate
    install, doing nothing. The overhead benchmark measures this."""
    a = handle.adapter
    with HookSet() as hs:
        for layer in range(a.n_layers):
            hs.pre(a.o_proj(layer), lambda mod, args: None)
            hs.post(a.mlp(layer), lambda mod, args, out: None)
        yield
