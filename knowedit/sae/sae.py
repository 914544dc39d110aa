"""The SAE object: one sparse autoencoder or transcoder, whatever file format it came from.

    pre   = (norm_in(x) - b_dec·[b_dec_to_input]) @ W_enc + b_enc, times ``pre_scale`` when set
    acts  = relu(pre) | topk(relu(pre), k) | jumprelu(pre, threshold) | groupmax(relu(pre), k)
    recon = norm_out(acts @ W_dec + b_dec) (+ x @ W_skipᵀ for a transcoder with a skip connection)

``W_enc`` is ``[d_in, width]`` and ``W_dec`` ``[width, d_out]`` (SAELens's orientation). An SAE reads and
writes the same vector (``x`` is the site's activation); a transcoder reads an MLP's input and predicts
its output. Tensors are kept in float32 whatever the file's dtype: the error term of a spliced SAE is
a small difference of large vectors, and half precision would spend the budget that an exact splice
needs. Conventions that change what a latent's value means are folded in at load time (see the
loaders), so ``acts`` here is what every intervention reads and writes.

``skip_first``: a sequence's first position holds the attention sink in these models (on
SmolLM2-135M its residual stream is ~70 times the norm of every other position's), which an SAE is
not trained on (:mod:`knowedit.sae.train` excludes it) and which would dominate every squared error.
So, as SAE evaluations usually drop the BOS position, a spliced SAE reads zero latents there and
writes nothing there, and the metrics leave it out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import KnoweditError
from .site import Site

ACTIVATIONS = ("relu", "topk", "jumprelu", "groupmax")
NORMALIZE = ("none", "constant_norm_rescale", "layer_norm")
KINDS = ("sae", "transcoder")
_LN_EPS = 1e-5   # SAELens's layer_norm input normalisation


@dataclass
class SAE:
    W_enc: torch.Tensor                 # [d_in, width]
    b_enc: torch.Tensor                 # [width]
    W_dec: torch.Tensor                 # [width, d_out]
    b_dec: torch.Tensor                 # [d_out]
    activation: str = "relu"
    k: int | None = None                # topk / groupmax
    threshold: torch.Tensor | None = None   # jumprelu, [width]
    b_dec_to_input: bool = True         # subtract b_dec from the input before encoding
    normalize: str = "none"             # run-time input normalisation (SAELens)
    pre_scale: torch.Tensor | None = None   # multiplies pre-activations (SAELens topk rescale_acts_by_decoder_norm)
    W_skip: torch.Tensor | None = None  # [d_out, d_in], sparsify transcoders' linear skip
    kind: str = "sae"
    hookpoint: str | None = None
    site: Site | None = None
    skip_first: bool = True             # leave each sequence's first position to the model (see below)
    source: dict = field(default_factory=dict)   # format, path, original config: provenance for cards and errors

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise KnoweditError(f"activation {self.activation!r} is unknown; knowedit supports {', '.join(ACTIVATIONS)}")
        if self.normalize not in NORMALIZE:
            raise KnoweditError(f"normalize_activations {self.normalize!r} is unknown; knowedit supports "
                                f"{', '.join(NORMALIZE)} (and 'expected_average_only_in' with its scaling factor)")
        if self.kind not in KINDS:
            raise KnoweditError(f"kind {self.kind!r}: use 'sae' or 'transcoder'")
        if self.activation in ("topk", "groupmax") and not (self.k and 0 < self.k <= self.width):
            raise KnoweditError(f"k: {self.k!r}; a {self.activation} SAE needs 1 <= k <= its width {self.width}")
        if self.activation == "groupmax" and self.width % self.k:
            raise KnoweditError(f"k: groupmax needs the width {self.width} to be a multiple of k={self.k}")
        if self.activation == "jumprelu" and self.threshold is None:
            raise KnoweditError("threshold: a jumprelu SAE needs a threshold vector (one per latent)")
        shapes = {"W_enc": (self.d_in, self.width), "b_enc": (self.width,), "W_dec": (self.width, self.d_out),
                  "b_dec": (self.d_out,)}
        if self.threshold is not None:
            shapes["threshold"] = (self.width,)
        if self.pre_scale is not None:
            shapes["pre_scale"] = (self.width,)
        if self.W_skip is not None:
            shapes["W_skip"] = (self.d_out, self.d_in)
        for name, want in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise KnoweditError(f"{name}: shape {got} does not match {want} (d_in={self.d_in}, width="
                                    f"{self.width}, d_out={self.d_out} from W_enc and W_dec)")
        if self.kind == "sae" and self.d_in != self.d_out:
            raise KnoweditError(f"W_dec: an SAE reconstructs its input, but d_in={self.d_in} and d_out={self.d_out}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "pre_scale", "W_skip"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach().to(torch.float32))
        self._cache: dict = {}

    # ---- shape --------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def width(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.k else ""
        return (f"SAE({self.kind}, site={self.site}, hookpoint={self.hookpoint!r}, d_in={self.d_in}, width={self.width}, "
                f"{self.activation}{extra}, format={self.source.get('format')})")

    def check_index(self, i: int, name: str | None = None) -> None:
        if not 0 <= int(i) < self.width:
            raise KnoweditError(f"latent {name or i!r}: index {i} is past this SAE's width; it has latents "
                                f"0..{self.width - 1} ({self.source.get('path', 'loaded SAE')})")

    # ---- device ---------------------------------------------------------------------------------
    def _t(self, name: str, device) -> torch.Tensor | None:
        """A parameter on ``device`` (copies cached, so a spliced forward pass moves nothing twice)."""
        t = getattr(self, name)
        if t is None or t.device == torch.device(device):
            return t
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = t.to(device)
        return self._cache[key]

    # ---- normalisation --------------------------------------------------------------------------
    def _norm_stats(self, x: torch.Tensor):
        if self.normalize == "constant_norm_rescale":
            return (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True),)
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            return mu, (x - mu).std(-1, keepdim=True)
        return ()

    def _norm_in(self, x, stats):
        if self.normalize == "constant_norm_rescale":
            return x * stats[0]
        if self.normalize == "layer_norm":
            return (x - stats[0]) / (stats[1] + _LN_EPS)
        return x

    def _out_scale(self, stats):
        """The factor norm_out multiplies a reconstruction's linear part by."""
        if self.normalize == "constant_norm_rescale":
            return 1 / stats[0]
        if self.normalize == "layer_norm":
            return stats[1]
        return None

    # ---- encode / decode ------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        dev = x.device
        h = self._norm_in(x, self._norm_stats(x))
        if self.b_dec_to_input:
            h = h - self._t("b_dec", dev)
        pre = h @ self._t("W_enc", dev) + self._t("b_enc", dev)
        if self.pre_scale is not None:
            pre = pre * self._t("pre_scale", dev)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            # SAELens gates on the rectified threshold: a negative stored threshold means "always open"
            return pre.relu() * (pre > self._t("threshold", pre.device).relu())
        pos = pre.relu()
        if self.activation == "topk":
            vals, idx = pos.topk(self.k, dim=-1, sorted=False)
        else:   # groupmax: the largest latent of each of k equal groups
            vals, idx = pos.unflatten(-1, (self.k, -1)).max(-1)
            idx = idx + torch.arange(0, self.width, self.width // self.k, device=pre.device)
        return torch.zeros_like(pos).scatter_(-1, idx, vals)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., width]`` (dense, float32) of ``x [..., d_in]``."""
        if x.shape[-1] != self.d_in:
            raise KnoweditError(f"SAE input: last dimension {x.shape[-1]} does not match the SAE's d_in={self.d_in}")
        return self.activate(self.pre_acts(x))

    def decode_delta(self, dacts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """How the reconstruction changes when the latents change by ``dacts``: the linear part of
        :meth:`decode` (no b_dec, no skip). ``x`` is the encoded input (its norm scales the output
        under run-time normalisation)."""
        y = dacts.to(torch.float32) @ self._t("W_dec", dacts.device)
        s = self._out_scale(self._norm_stats(x.to(torch.float32)))
        return y if s is None else y * s

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction ``[..., d_out]``; ``x`` (the encoded input) is needed for run-time
        normalisation and a transcoder's skip connection."""
        if (self.normalize != "none" or self.W_skip is not None) and x is None:
            raise KnoweditError("decode: this SAE needs its input x (run-time normalisation or a skip connection)")
        dev = acts.device
        y = acts.to(torch.float32) @ self._t("W_dec", dev) + self._t("b_dec", dev)
        if self.normalize == "constant_norm_rescale":
            y = y * self._out_scale(self._norm_stats(x.to(torch.float32)))
        elif self.normalize == "layer_norm":
            mu, std = self._norm_stats(x.to(torch.float32))
            y = y * std + mu
        if self.W_skip is not None:
            y = y + x.to(torch.float32) @ self._t("W_skip", dev).T
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    __call__ = forward

    # ---- directions -----------------------------------------------------------------------------
    def decoder_directions(self) -> torch.Tensor:
        """``[width, d_out]``: what one unit of each latent adds to the site (norm_out's scale aside)."""
        return self.W_dec

    def to(self, device) -> "SAE":
        """Move the parameters (float32 stays float32)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "pre_scale", "W_skip"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        self._cache = {}
        return self
