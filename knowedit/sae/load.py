"""``load_sae``: an SAE or transcoder from a local directory (sparsify or SAELens format) or, where
the hub is reachable, a Hugging Face repository; checked against the model it will be spliced into."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import KnoweditError
from . import load_saelens, load_sparsify
from .registry import attach as _attach
from .sae import SAE
from .site import Site, check_layer, parse_site, site_of_hookpoint

CARD = "card.json"


def _has_sae(d: Path) -> bool:
    return (d / "cfg.json").is_file() or (d / load_sparsify.WEIGHTS).is_file() or (d / load_saelens.WEIGHTS).is_file()


def _file_site(sae: SAE) -> Site | None:
    try:
        return parse_site(sae.hookpoint) if sae.hookpoint else None
    except KnoweditError:
        return None


def _pick_dir(root: Path, hookpoint: str | None) -> Path:
    """The directory holding one SAE: ``root`` itself, or its subdirectory for ``hookpoint`` (sparsify
    saves one subdirectory per hookpoint)."""
    if _has_sae(root) and hookpoint is None:
        return root
    subs = sorted(d for d in root.iterdir() if d.is_dir() and _has_sae(d)) if root.is_dir() else []
    if hookpoint is not None:
        if (root / hookpoint).is_dir():
            return root / hookpoint
        if _has_sae(root):
            return root
        want = parse_site(hookpoint)
        same = []
        for d in subs:
            try:
                if site_of_hookpoint(d.name) == want:
                    same.append(d)
            except KnoweditError:
                pass
        if len(same) == 1:
            return same[0]
        raise KnoweditError(f"hookpoint {hookpoint!r}: {root} has no SAE for it; it holds "
                            f"{', '.join(d.name for d in subs) or 'no SAE directories'}")
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise KnoweditError(f"{root}: no SAE here; expected cfg.json with sae.safetensors (sparsify) or with "
                            "sae_weights.safetensors (SAELens), or one subdirectory per hookpoint holding them")
    raise KnoweditError(f"{root} holds SAEs for several hookpoints ({', '.join(d.name for d in subs)}); choose one "
                        "with hookpoint=... (--hookpoint)")


def _from_hub(repo: str, hookpoint: str | None) -> Path:
    """Download a repository's files (only the hookpoint's subdirectory when given)."""
    try:
        from huggingface_hub import snapshot_download
        parts = repo.split("/")
        repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:]) or hookpoint
        path = Path(snapshot_download(repo_id, allow_patterns=[f"{sub}/*"] if sub else None))
        return path / sub if sub and (path / sub).is_dir() else path
    except Exception as e:  # offline, unknown repository, no permission
        raise KnoweditError(f"SAE {repo!r}: not a local directory, and downloading it from the Hugging Face hub "
                            f"failed ({type(e).__name__}: {e}); download it where the hub is reachable and give "
                            "the directory") from None


def read_dir(directory: Path, norm_scaling_factor: float | None = None) -> SAE:
    """Read one SAE directory in whichever format its files say."""
    if (directory / load_sparsify.WEIGHTS).is_file():
        sae = load_sparsify.read_sparsify(directory)
        sae.hookpoint = directory.name   # sparsify names the directory after the hookpoint
    elif (directory / load_saelens.WEIGHTS).is_file():
        sae = load_saelens.read_saelens(directory, norm_scaling_factor)
    else:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else "nothing"
        raise KnoweditError(f"{directory}: no SAE weights; expected cfg.json with sae.safetensors (sparsify) or with "
                            f"sae_weights.safetensors (SAELens); found {found}")
    card = directory / CARD
    if card.is_file():
        try:
            sae.source["card"] = json.loads(card.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise KnoweditError(f"{card}: not valid JSON ({e})") from None
    return sae


def check_against(sae: SAE, handle) -> None:
    """Shapes against the model's site: d_model wherever an SAE or transcoder reads or writes."""
    check_layer(sae.site, handle)
    if sae.kind == "transcoder" and sae.site.kind != "m":
        raise KnoweditError(f"{sae.source.get('path')}: a transcoder maps an MLP's input to its output, but its "
                            f"hookpoint {sae.hookpoint!r} names the residual stream; give the MLP's hookpoint "
                            "(e.g. 'layers.L.mlp')")
    d = handle.adapter.d_model
    where = "the residual stream" if sae.site.kind == "r" else f"MLP {sae.site.layer}'s " + (
        "input and output" if sae.kind == "transcoder" else "output")
    for field, got in (("d_in", sae.d_in), ("d_out", sae.d_out)):
        if got != d:
            raise KnoweditError(f"{sae.source.get('path')}: the SAE's {field}={got} does not match {where} at "
                                f"hookpoint {sae.hookpoint!r} of {handle.name}, which is d_model={d} wide")


def load_sae(path, handle=None, hookpoint: str | None = None, *, attach: bool = True,
             norm_scaling_factor: float | None = None) -> SAE:
    """Load an SAE or transcoder.

    ``path``: a directory in sparsify's format (``cfg.json`` + ``sae.safetensors``) or SAELens's
    (``cfg.json`` + ``sae_weights.safetensors``), or a parent directory with one subdirectory per
    hookpoint, or a Hugging Face repository id (``org/name``, optionally ``/hookpoint``).
    ``hookpoint`` chooses among several and overrides the one the files record (``'layers.12'``,
    ``'r12'``, ``'blocks.12.hook_resid_post'``, ``'layers.7.mlp'``).
    With ``handle`` the shapes are checked against the model and, with ``attach``, latent names such as
    ``r12.f45`` refer to this SAE from then on (:func:`knowedit.sae.attach`)."""
    root = Path(path).expanduser()
    if not root.exists():
        s = str(path)
        if s.count("/") >= 1 and not s.startswith((".", "/", "~")):
            root = _from_hub(s, hookpoint)
        else:
            raise KnoweditError(f"SAE path {str(path)!r} does not exist; give a directory holding cfg.json and "
                                "sae.safetensors (sparsify) or sae_weights.safetensors (SAELens)")
    directory = _pick_dir(root, hookpoint)
    sae = read_dir(directory, norm_scaling_factor)
    if hookpoint is not None and _file_site(sae) != parse_site(hookpoint):
        sae.hookpoint = hookpoint   # the caller's word over the file's
    if sae.hookpoint is None:
        raise KnoweditError(f"{directory}: the files do not say where the SAE reads; give hookpoint=... "
                            "(e.g. 'layers.12' for the residual stream after block 12)")
    sae.site = parse_site(sae.hookpoint)
    if handle is not None:
        check_against(sae, handle)
        if attach:
            _attach(handle, sae)
    return sae
