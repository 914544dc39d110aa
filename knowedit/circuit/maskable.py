"""Which parameters a weight mask may cover, and what kind each one is.

Maskable: every parameter of every block's attention and MLP (weights and, where the family has
them, biases) and every norm parameter (LayerNorm/RMSNorm gains and LayerNorm biases, including the
final norm). Embeddings and the unembedding are *not* maskable: Ge et al. report circuit shares for
attention, MLP and LayerNorm modules only, and zeroing token embeddings would make a mask's density
hinge on 28M vocabulary rows that a 15-token task never reads. They still count in the
all-parameter totals, so densities can be given both ways.

Matrix types (``q k v qkv o gate up down norm``, ``+ ".bias"`` for biases) are what random
controls match counts on."""
from __future__ import annotations

from dataclasses import dataclass

MODULE_KINDS = ("attention", "mlp", "norm", "embedding")
_LEAF_TYPES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "c_attn": "qkv", "query_key_value": "qkv",
               "gate_proj": "gate", "up_proj": "up", "c_fc": "up", "dense_h_to_4h": "up", "fc_in": "up"}


@dataclass(frozen=True)
class MaskableParam:
    name: str
    kind: str          # attention | mlp | norm
    matrix_type: str   # q k v qkv o gate up down norm, with ".bias" for biases
    layer: int | None  # None for the final norm
    shape: tuple


def _typed(handle, module, kind: str, base: str, layer: int | None) -> list[MaskableParam]:
    out = []
    for pname, p in module.named_parameters(recurse=False):
        t = base if pname == "weight" else f"{base}.{pname}"
        out.append(MaskableParam(handle.adapter.name_of(p), kind, t, layer, tuple(p.shape)))
    return out


def maskable_params(handle) -> list[MaskableParam]:
    """The maskable parameters of ``handle``'s model, in layer order (then the final norm)."""
    a = handle.adapter
    out: list[MaskableParam] = []
    seen: set[int] = set()
    for l in range(a.n_layers):
        norm_mods = [a.ln_attn(l)] + ([a.ln_mlp(l)] if a.ln_mlp(l) is not None else [])
        for m in norm_mods:
            out += _typed(handle, m, "norm", "norm", l)
        for block, kind, last, last_type in ((a.attn(l), "attention", a.o_proj(l), "o"),
                                             (a.mlp(l), "mlp", a.mlp_out(l), "down")):
            for name, mod in block.named_modules():
                if id(mod) in seen or not list(mod.parameters(recurse=False)):
                    continue
                seen.add(id(mod))
                leaf = name.rsplit(".", 1)[-1]
                out += _typed(handle, mod, kind, last_type if mod is last else _LEAF_TYPES.get(leaf, leaf), l)
    out += _typed(handle, a.ln_final, "norm", "norm", None)
    return out


def module_kind(handle, name: str) -> str:
    """attention / mlp / norm for maskable parameters, embedding for everything else."""
    for p in maskable_params(handle):
        if p.name == name:
            return p.kind
    return "embedding"


def owner_modules(handle, names) -> dict:
    """``{param name: (module, attribute)}``: the module that holds each named parameter."""
    mods = dict(handle.model.named_modules())
    out = {}
    for n in names:
        path, attr = n.rsplit(".", 1)
        out[n] = (mods[path], attr)
    return out
