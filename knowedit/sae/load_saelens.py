"""SAELens's format: ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` and, for JumpReLU, ``threshold`` (older files:
``log_threshold``).

Config fields read: ``d_in``, ``d_sae``, ``architecture`` (``standard`` = ReLU, ``topk``, ``jumprelu``;
default ``standard``), ``activation_fn`` / ``activation_fn_str`` with ``activation_fn_kwargs.k`` (files
before SAELens 6 wrote TopK as a standard SAE with a topk activation), ``k``,
``apply_b_dec_to_input`` (default true), ``normalize_activations`` (``none``, ``constant_norm_rescale``,
``layer_norm``, ``expected_average_only_in``; old files: a boolean), ``rescale_acts_by_decoder_norm``
(TopK), ``hook_name`` (top level, or under ``metadata`` since SAELens 6; ``hook_point`` before).

``expected_average_only_in`` scales inputs by a dataset constant that is not in the file; SAELens
folds it into the weights when it saves a trained SAE, and its own loader applies nothing at run time
for it, so neither does knowedit, unless the constant is given (``norm_scaling_factor``), which is
then folded in the same way. A ``scaling_factor`` tensor (SAELens's finetuning scaling) multiplies the
latents on the way into the decoder and is folded into ``W_dec``."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import KnoweditError
from .files import need, read_cfg, read_tensors, tensor
from .sae import SAE

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
log = logging.getLogger("knowedit")


def _hook_name(cfg: dict) -> str | None:
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return cfg.get("hook_name") or meta.get("hook_name") or cfg.get("hook_point")


def _normalize(cfg: dict, path: Path) -> str:
    v = cfg.get("normalize_activations", "none")
    if isinstance(v, bool):   # SAELens < 4 wrote a flag
        v = "expected_average_only_in" if v else "none"
    v = "none" if v is None else v
    known = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
    if v not in known:
        raise KnoweditError(f"{path}: field 'normalize_activations' is {v!r}; knowedit supports {', '.join(known)}")
    return v


def _activation(cfg: dict, path: Path) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch not in ARCHITECTURES:
        raise KnoweditError(f"{path}: field 'architecture' is {arch!r}; knowedit reads SAELens's "
                            f"{', '.join(ARCHITECTURES)} SAEs")
    if arch == "topk" or (arch == "standard" and fn == "topk"):
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise KnoweditError(f"{path}: a topk SAE needs a positive integer 'k' (or activation_fn_kwargs.k); "
                                f"found {k!r}")
        return "topk", k
    if arch == "jumprelu":
        return "jumprelu", None
    if fn != "relu":
        raise KnoweditError(f"{path}: field 'activation_fn' is {fn!r}; a standard SAE's activation must be 'relu' "
                            "or 'topk'")
    return "relu", None


def read_saelens(directory: Path, norm_scaling_factor: float | None = None) -> SAE:
    cfg_path, w_path = directory / CFG, directory / WEIGHTS
    cfg = read_cfg(cfg_path)
    d_in, width = need(cfg, "d_in", cfg_path), need(cfg, "d_sae", cfg_path)
    act, k = _activation(cfg, cfg_path)
    normalize = _normalize(cfg, cfg_path)
    w = read_tensors(w_path)
    W_enc = tensor(w, "W_enc", w_path, (d_in, width)).float()
    W_dec = tensor(w, "W_dec", w_path, (width, d_in)).float()
    b_enc = tensor(w, "b_enc", w_path, (width,)).float()
    b_dec = tensor(w, "b_dec", w_path, (d_in,)).float()
    threshold = None
    if act == "jumprelu":
        if "threshold" in w:
            threshold = tensor(w, "threshold", w_path, (width,)).float()
        elif "log_threshold" in w:
            threshold = tensor(w, "log_threshold", w_path, (width,)).float().exp()
        else:
            raise KnoweditError(f"{w_path}: a jumprelu SAE needs a 'threshold' tensor [{width}]")
    scale = w.get("scaling_factor", w.get("finetuning_scaling_factor"))
    if scale is not None:
        W_dec = W_dec * tensor(w, "scaling_factor" if "scaling_factor" in w else "finetuning_scaling_factor",
                               w_path, (width,)).float()[:, None]
    nsf = norm_scaling_factor if norm_scaling_factor is not None else cfg.get("norm_scaling_factor")
    if normalize == "expected_average_only_in":
        if nsf is not None:
            W_enc, W_dec, b_dec = W_enc * float(nsf), W_dec / float(nsf), b_dec / float(nsf)
        else:
            log.warning("%s: normalize_activations is 'expected_average_only_in' without a norm scaling factor; "
                        "taken as folded into the weights, as SAELens's own loader does", cfg_path)
        normalize = "none"
    pre_scale = None
    if act == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre-activations times each decoder row's norm and divides the latents by it again
        # before decoding; keeping the latents in that ranked unit means folding 1/norm into W_dec
        norms = W_dec.norm(dim=-1)
        pre_scale, W_dec = norms, W_dec / norms[:, None]
    return SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation=act, k=k, threshold=threshold,
               b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalize=normalize, pre_scale=pre_scale,
               hookpoint=_hook_name(cfg), source={"format": "saelens", "path": str(directory), "config": cfg})
