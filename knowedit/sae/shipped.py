"""SAEs that ship with the repository (``data/sae/<model>/<hookpoint>/``, sparsify's layout plus a
card), found by the fingerprint of the model they were trained on."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import KnoweditError

SHIPPED_COMMAND = ("knowedit sae train --hookpoint layers.22 --expansion 8 --k 32 --tokens 3000000 --optimizer adam "
                   "--lr 2e-3 --auxk-alpha 0.03125 --out data/sae/smollm2-135m")


def shipped_root() -> Path | None:
    import knowedit
    d = Path(knowedit.__file__).resolve().parents[1] / "data" / "sae"
    return d if d.is_dir() else None


def shipped_saes(handle) -> list[Path]:
    """Directories of shipped SAEs whose card names this model's fingerprint."""
    root = shipped_root()
    out = []
    for card in sorted(root.glob("*/*/card.json")) if root else []:
        try:
            if json.loads(card.read_text(encoding="utf-8")).get("fingerprint") == handle.fingerprint:
                out.append(card.parent)
        except json.JSONDecodeError:
            continue
    return out


def load_shipped_sae(handle, hookpoint: str | None = None, attach: bool = True):
    """The shipped SAE for this model (at ``hookpoint`` when several ship), checked and attached."""
    from .load import load_sae
    from .site import parse_site

    dirs = shipped_saes(handle)
    if hookpoint is not None:
        want = parse_site(hookpoint)
        dirs = [d for d in dirs if parse_site(d.name) == want]
    if not dirs:
        raise KnoweditError(f"no SAE ships for {handle.name} (fingerprint {handle.fingerprint})"
                            + (f" at {hookpoint}" if hookpoint else "") + "; train one, e.g. for the default "
                            f"model: {SHIPPED_COMMAND}")
    if len(dirs) > 1:
        raise KnoweditError(f"several SAEs ship for {handle.name} ({', '.join(d.name for d in dirs)}); choose one "
                            "with hookpoint=...")
    return load_sae(dirs[0], handle, attach=attach)
