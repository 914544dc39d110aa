"""Architecture adapters: where the layers, heads, MLPs and norms of each family live.

Everything above this module talks about components and parameter slices, never about
``c_attn`` or ``q_proj``. Weight orientation differs: ``nn.Linear`` stores ``[out, in]``,
GPT-2's ``Conv1D`` stores ``[in, out]``; :meth:`Adapter.out_dim` hides that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import UnsupportedArchitecture
from .weights import execution_value


@dataclass(frozen=True)
class ParamSlice:
    """A part of one named parameter: ``indices`` along ``dim`` (``dim=None`` = the whole tensor)."""

    param: str
    dim: int | None = None
    indices: tuple[int, ...] | None = None

    @staticmethod
    def span(param: str, dim: int, start: int, stop: int) -> "ParamSlice":
        return ParamSlice(param, dim, tuple(range(start, stop)))


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class Adapter:
    """Base class. Subclasses fill in module paths and the q/k/v layout."""

    family: str = ""
    layers_path: str = ""
    conv1d: bool = False  # weights stored [in, out]
    attn_name = ""
    o_name = ""
    mlp_name = ""
    mlp_in_names: Sequence[str] = ()
    mlp_out_name = ""
    ln_attn_name = ""
    ln_mlp_name: str | None = ""
    ln_final_path = ""
    embed_path = ""
    unembed_path = ""

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = cfg.hidden_size
        self.d_head: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.d_mlp: int = self._d_mlp(cfg)
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    def _d_mlp(self, cfg) -> int:
        return cfg.intermediate_size

    # ---- modules -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.layers_path)

    def block(self, layer: int) -> nn.Module:
        return self.layers[layer]

    def attn(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.attn_name)

    def o_proj(self, layer: int) -> nn.Module:
        """The attention output projection; its input is the per-head outputs, concatenated."""
        return _get(self.block(layer), self.o_name)

    def mlp(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.mlp_name)

    def mlp_in(self, layer: int) -> list[nn.Module]:
        return [_get(self.block(layer), n) for n in self.mlp_in_names]

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP down projection; ROME's key is its input."""
        return _get(self.block(layer), self.mlp_out_name)

    def ln_attn(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.ln_attn_name)

    def ln_mlp(self, layer: int) -> nn.Module | None:
        return _get(self.block(layer), self.ln_mlp_name) if self.ln_mlp_name else None

    @property
    def ln_final(self) -> nn.Module:
        return _get(self.model, self.ln_final_path)

    @property
    def embed(self) -> nn.Module:
        return _get(self.model, self.embed_path)

    @property
    def unembed(self) -> nn.Module:
        return _get(self.model, self.unembed_path)

    # ---- weights ---------------------------------------------------------------------------
    def name_of(self, param: torch.Tensor) -> str:
        n = self._names.get(id(param))
        if n is None or self.model.get_parameter(n) is not param:
            # accelerate's offload hooks swap an offloaded layer's Parameter objects on every forward,
            # so the map built at load time goes stale (and an old id may now name another tensor)
            self._names = {id(p): k for k, p in self.model.named_parameters(remove_duplicate=False)}
            n = self._names[id(param)]
        return n

    def value(self, module: nn.Module, what: str = "weight") -> torch.Tensor | None:
        """``module.<what>`` with its values: the parameter itself, or, while accelerate keeps it
        offloaded (an empty ``meta`` tensor), its values read from the offload map onto the device
        the module runs on."""
        t = getattr(module, what, None)
        if t is None or not t.is_meta:
            return t
        return execution_value(self.model, self.name_of(t))

    def out_dim(self, module: nn.Module) -> int:
        """The dimension of ``module.weight`` that indexes output features."""
        return 0 if isinstance(module, nn.Linear) else 1

    def in_dim(self, module: nn.Module) -> int:
        return 1 - self.out_dim(module)

    def weight_in_out(self, module: nn.Module) -> torch.Tensor:
        """``module.weight`` as a view of shape ``[in, out]``, whatever the storage."""
        w = self.value(module)
        return w.t() if self.out_dim(module) == 0 else w

    def head_o_weight(self, layer: int, head: int) -> torch.Tensor:
        """W_O rows of one head as ``[d_head, d_model]``."""
        w = self.weight_in_out(self.o_proj(layer))
        return w[head * self.d_head:(head + 1) * self.d_head]

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)

    def _rows(self, module: nn.Module, start: int, stop: int) -> list[ParamSlice]:
        """Output features start:stop of a module, weight and bias."""
        out = [ParamSlice.span(self.name_of(module.weight), self.out_dim(module), start, stop)]
        if getattr(module, "bias", None) is not None:
            out.append(ParamSlice.span(self.name_of(module.bias), 0, start, stop))
        return out

    def _cols(self, module: nn.Module, idx: Sequence[int]) -> list[ParamSlice]:
        return [ParamSlice(self.name_of(module.weight), self.in_dim(module), tuple(idx))]

    def qkv_rows(self, layer: int, head: int, port: str) -> list[ParamSlice]:
        raise NotImplementedError

    def head_slices(self, layer: int, head: int, ports: str = "qkvo") -> list[ParamSlice]:
        """Every parameter slice that belongs to one head. With grouped-query attention the
        k/v slices are those of the KV head that this query head reads, shared with its group."""
        out: list[ParamSlice] = []
        for p in ports:
            if p == "o":
                out += self._cols(self.o_proj(layer), range(head * self.d_head, (head + 1) * self.d_head))
            else:
                out += self.qkv_rows(layer, head, p)
        return out

    def mlp_slices(self, layer: int, neurons: Sequence[int] | None = None) -> list[ParamSlice]:
        """Slices of one MLP; with ``neurons`` only those hidden units (rows in, columns out)."""
        if neurons is None:
            mods = self.mlp_in(layer) + [self.mlp_out(layer)]
            return [ParamSlice(self.name_of(p)) for m in mods for p in m.parameters(recurse=False)]
        idx = tuple(int(i) for i in neurons)
        out: list[ParamSlice] = []
        for m in self.mlp_in(layer):
            out.append(ParamSlice(self.name_of(m.weight), self.out_dim(m), idx))
            if getattr(m, "bias", None) is not None:
                out.append(ParamSlice(self.name_of(m.bias), 0, idx))
        return out + self._cols(self.mlp_out(layer), idx)

    def norm_params(self) -> list[str]:
        mods = [self.ln_final] + [self.ln_attn(l) for l in range(self.n_layers)]
        mods += [m for m in (self.ln_mlp(l) for l in range(self.n_layers)) if m is not None]
        return [self.name_of(p) for m in mods for p in m.parameters(recurse=False)]

    def describe(self) -> dict:
        return {
            "family": self.family, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "d_head": self.d_head, "d_model": self.d_model,
            "d_mlp": self.d_mlp, "weight_orientation": "conv1d [in,out]" if self.conv1d else "linear [out,in]",
        }


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2 and SmolLM2: separate q/k/v projections, GQA, gated MLP."""

    family = "llama"
    layers_path = "model.layers"
    attn_name = "self_attn"
    o_name = "self_attn.o_proj"
    mlp_name = "mlp"
    mlp_in_names = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out_name = "mlp.down_proj"
    ln_attn_name = "input_layernorm"
    ln_mlp_name = "post_attention_layernorm"
    ln_final_path = "model.norm"
    embed_path = "model.embed_tokens"
    unembed_path = "lm_head"

    def qkv_rows(self, layer, head, port):
        mod = getattr(self.attn(layer), f"{port}_proj")
        h = head if port == "q" else self.kv_head(head)
        return self._rows(mod, h * self.d_head, (h + 1) * self.d_head)


class GPT2Adapter(Adapter):
    """GPT-2: fused ``c_attn`` Conv1D ``[d, 3d]`` holding q|k|v, LayerNorm, GELU MLP."""

    family = "gpt2"
    conv1d = True
    layers_path = "transformer.h"
    attn_name = "attn"
    o_name = "attn.c_proj"
    mlp_name = "mlp"
    mlp_in_names = ("mlp.c_fc",)
    mlp_out_name = "mlp.c_proj"
    ln_attn_name = "ln_1"
    ln_mlp_name = "ln_2"
    ln_final_path = "transformer.ln_f"
    embed_path = "transformer.wte"
    unembed_path = "lm_head"

    def _d_mlp(self, cfg):
        return cfg.n_inner or 4 * cfg.hidden_size

    def qkv_rows(self, layer, head, port):
        off = "qkv".index(port) * self.d_model + head * self.d_head
        return self._rows(self.attn(layer).c_attn, off, off + self.d_head)


class NeoXAdapter(Adapter):
    """GPT-NeoX / Pythia: fused qkv laid out per head as [q|k|v], parallel residual."""

    family = "gpt_neox"
    layers_path = "gpt_neox.layers"
    attn_name = "attention"
    o_name = "attention.dense"
    mlp_name = "mlp"
    mlp_in_names = ("mlp.dense_h_to_4h",)
    mlp_out_name = "mlp.dense_4h_to_h"
    ln_attn_name = "input_layernorm"
    ln_mlp_name = "post_attention_layernorm"
    ln_final_path = "gpt_neox.final_layer_norm"
    embed_path = "gpt_neox.embed_in"
    unembed_path = "embed_out"

    def qkv_rows(self, layer, head, port):
        off = head * 3 * self.d_head + "qkv".index(port) * self.d_head
        return self._rows(self.attn(layer).query_key_value, off, off + self.d_head)


class GPTJAdapter(Adapter):
    """GPT-J: separate q/k/v, one LayerNorm feeding attention and MLP in parallel."""

    family = "gptj"
    layers_path = "transformer.h"
    attn_name = "attn"
    o_name = "attn.out_proj"
    mlp_name = "mlp"
    mlp_in_names = ("mlp.fc_in",)
    mlp_out_name = "mlp.fc_out"
    ln_attn_name = "ln_1"
    ln_mlp_name = None
    ln_final_path = "transformer.ln_f"
    embed_path = "transformer.wte"
    unembed_path = "lm_head"

    def _d_mlp(self, cfg):
        return cfg.n_inner or 4 * cfg.hidden_size

    def qkv_rows(self, layer, head, port):
        return self._rows(getattr(self.attn(layer), f"{port}_proj"), head * self.d_head, (head + 1) * self.d_head)


ADAPTERS: dict[str, type[Adapter]] = {
    "llama": LlamaAdapter, "mistral": LlamaAdapter, "qwen2": LlamaAdapter,
    "gpt2": GPT2Adapter, "gpt_neox": NeoXAdapter, "gptj": GPTJAdapter,
}


def adapter_for(model: nn.Module) -> Adapter:
    kind = getattr(model.config, "model_type", None)
    if kind not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"model_type {kind!r} has no architecture adapter; supported: {', '.join(sorted(ADAPTERS))}. "
            "Add a subclass of knowedit.models.adapters.Adapter and register it in ADAPTERS."
        )
    return ADAPTERS[kind](model)
