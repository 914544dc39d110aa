"""Circuit-preserving projection: the keys that circuit tasks' prompts produce at an edited matrix.

``preserve: [ioi, colored-objects, ...]`` in an editor's hparams runs ``preserve_n`` clean prompts of
each task (seed ``preserve_seed``) through the unedited model and collects the input of every edited
matrix at every token ("keys": the down-projection input for ROME/MEMIT/AlphaEdit, the module input for
fine-tuned matrices). M = Σ_tasks E_task[k kᵀ] (a sum, so a direction is free only if it is quiet for
every task). The blocked span is M's eigenvectors with eigenvalue ≥ ``preserve_threshold``; an update
restricted to its orthogonal complement has ΔW k = 0 for those directions up to float error, and
changes any task key by at most √threshold·‖ΔW‖ in the rest. ``preserve_threshold: 0`` blocks the
whole numerical span of the collected keys (exact for them, but with fewer key dimensions than
collected tokens it leaves nothing to edit).

M is cached (float64: the span of its small eigenvalues must survive storage) under ``cache_root()/preserve/<model fingerprint>/`` per task set, prompt count, seed and
matrix (and the dtype the model runs in, when not float32); like the covariance statistics it describes
the unedited model.
"""
from __future__ import annotations

import hashlib
import io

import torch

from ..errors import KnoweditError
from ..models.cache import atomic_write_bytes, cache_root, file_lock
from .covariance import forward_tag
from .fields import field
from .subspace import as_subspace, build_subspace

PRESERVE_DEFAULTS = {"preserve": [], "preserve_threshold": 1e-3, "preserve_n": 200, "preserve_seed": 0,
                     "preserve_min_free": 0.1}
_EXACT_TOL = 1e-12   # threshold 0: eigenvalues above this share of the largest are the span
_basis_cache: dict[tuple, tuple[torch.Tensor, dict]] = {}


def preserve_settings(hp: dict) -> dict | None:
    """The validated preserve fields, or None when no task is preserved."""
    from ..tasks import TASKS

    hp = {**PRESERVE_DEFAULTS, **hp}
    names = hp.get("preserve") or []
    if isinstance(names, str):
        names = [x.strip() for x in names.split(",") if x.strip()]
    if not isinstance(names, (list, tuple)):
        raise KnoweditError(f"hparams: field 'preserve' = {names!r} must be a list of task names, e.g. [ioi, colored-objects]")
    usable = [t for t in TASKS if t != "custom"]
    for t in names:
        if t not in usable:
            raise KnoweditError(f"hparams: field 'preserve' names task {t!r}, which does not exist; "
                                f"choose from {', '.join(usable)}")
    if not names:
        return None
    return {"tasks": sorted(set(names)),
            "threshold": field(hp, "preserve_threshold", float, lambda v: v >= 0, "0 (the exact span) or more"),
            "n": field(hp, "preserve_n", int, lambda v: v > 0, "at least one prompt per task"),
            "seed": field(hp, "preserve_seed", int),
            "min_free": field(hp, "preserve_min_free", float, lambda v: 0 <= v < 1, "a share in [0, 1)")}


def _path(handle, s: dict, module_name: str):
    key = hashlib.sha256(f"{s['tasks']}|{s['n']}|{s['seed']}".encode()).hexdigest()[:12]
    # a model run in bfloat16 blocks the span of its own keys (see covariance.forward_tag)
    return (cache_root() / "preserve" / handle.fingerprint / f"{'+'.join(s['tasks'])}-{key}" /
            f"{module_name}{forward_tag(handle)}.pt")


@torch.no_grad()
def _collect(handle, modules: dict[str, torch.nn.Module], s: dict) -> dict[str, tuple[torch.Tensor, dict]]:
    """M = Σ_tasks E[k kᵀ] at each module's input, over every real token of the tasks' clean prompts."""
    from ..hooks.hookset import HookSet
    from ..tasks import get_task

    sums = {n: None for n in modules}
    counts = {}
    cur = {}

    def grab(name):
        def fn(mod, args):
            x = args[0][cur["mask"]].double()
            cur["acc"][name] = cur["acc"].get(name, 0) + x.T @ x
        return fn

    with HookSet() as hs:
        for n, m in modules.items():
            hs.pre(m, grab(n))
        for t in s["tasks"]:
            task = get_task(t, handle.tokenizer, n=s["n"], seed=s["seed"])
            cur["acc"], tokens = {}, 0
            for i in range(0, len(task.clean), 32):
                b = handle.tokenize(task.clean[i:i + 32], bos=task.bos)
                cur["mask"] = b.attention_mask.bool()
                tokens += int(b.attention_mask.sum())
                handle.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, logits_to_keep=1)
            counts[t] = {"prompts": len(task), "tokens": tokens}
            for n in modules:
                m = cur["acc"][n].cpu() / tokens
                sums[n] = m if sums[n] is None else sums[n] + m
    return {n: (sums[n], counts) for n in modules}


def task_key_moments(handle, modules: dict[str, torch.nn.Module], s: dict) -> dict[str, tuple[torch.Tensor, dict]]:
    """{module name: (M float64 ``[d_in, d_in]``, per-task prompt and token counts)}, cached on disk."""
    out, missing = {}, {}

    def read_cached(wanted: dict) -> dict:
        left = {}
        for n, m in wanted.items():
            p = _path(handle, s, n)
            if p.exists():
                blob = torch.load(p, map_location="cpu", weights_only=True)
                out[n] = (blob["moment"].double(), blob["counts"])
            else:
                left[n] = m
        return left

    missing = read_cached(modules)
    if not missing:
        return out
    # The processes of a sweep want the same moments: one computes them, the others wait here, then read them.
    folder = _path(handle, s, next(iter(missing))).parent
    with file_lock(folder, f"waiting for another process to compute preserved-task moments in {folder}"):
        missing = read_cached(missing)
        if missing:
            if not handle.is_unedited():
                raise KnoweditError("preserve: the preserved tasks' keys are read from the unedited model, but this "
                                    "model carries edits and they are not cached yet; compute them once before "
                                    "editing (any edit with the same preserve settings on the unedited model caches them)")
            for n, (mom, counts) in _collect(handle, missing, s).items():
                buf = io.BytesIO()
                torch.save({"moment": mom, "counts": counts, "tasks": s["tasks"], "n": s["n"], "seed": s["seed"],
                            "model": handle.fingerprint}, buf)
                atomic_write_bytes(_path(handle, s, n), buf.getvalue())
                out[n] = (mom, counts)
    return out


def blocked_basis(handle, modules: dict[str, torch.nn.Module], s: dict) -> dict[str, tuple[torch.Tensor, dict]]:
    """{module name: (orthonormal ``[d_in, r]`` basis of the preserved span, facts to record)}."""
    out, need = {}, {}
    for n, m in modules.items():
        key = (handle.fingerprint, handle.dtype, n, tuple(s["tasks"]), s["n"], s["seed"], s["threshold"])
        if key in _basis_cache:
            out[n] = _basis_cache[key]
        else:
            need[n] = (m, key)
    if need:
        moments = task_key_moments(handle, {n: m for n, (m, _) in need.items()}, s)
        for n, (_, key) in need.items():
            M, counts = moments[n]
            vals, vecs = torch.linalg.eigh(M)
            cut = s["threshold"] if s["threshold"] > 0 else _EXACT_TOL * float(vals[-1])
            keep = vals >= cut if s["threshold"] > 0 else vals > cut
            Q = vecs[:, keep]
            info = {"tasks": s["tasks"], "threshold": s["threshold"], "blocked_dims": int(keep.sum()),
                    "key_dims": len(vals), "task_energy_left": float(vals[~keep].sum() / vals.sum()),
                    "prompts": counts}
            _basis_cache[key] = (Q, info)
            out[n] = (Q, info)
    return out


def free_share(space, k: torch.Tensor) -> torch.Tensor:
    """‖P k‖ / ‖k restricted to the space's columns‖ per key (``k``: ``[d]`` or ``[n, d]``): how much of
    a key the allowed directions can still reach."""
    kk = k.double().reshape(-1, k.shape[-1])
    sp = as_subspace(space, kk.shape[1])
    cols = sp.columns().to(kk.device)
    total = kk[:, cols].norm(dim=1).clamp_min(1e-30)
    return sp.project(kk.T).T.norm(dim=1) / total


def check_free(space, keys: torch.Tensor, labels: list[str], s: dict, method: str) -> list[float]:
    """Refuse (EditRefused) when some edit's key lies almost wholly in the preserved span: the update
    would have to be huge along the little that is left, or would not make the edit."""
    from .errors import EditRefused

    shares = [float(x) for x in free_share(space, keys)]
    bad = [(lab, sh) for lab, sh in zip(labels, shares) if sh < s["min_free"]]
    if bad:
        what = ", ".join(f"{lab} ({sh:.1%} free)" for lab, sh in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise EditRefused(f"{method}: the key of {what} lies almost wholly in the span the preserved tasks "
                          f"{', '.join(s['tasks'])} use (preserve_min_free {s['min_free']}); the projected update "
                          "could not make the edit. Preserve fewer tasks, raise preserve_threshold, or edit "
                          "another layer")
    return shares


def update_space(handle, layer: int, neurons, preserve: dict | None, null_basis: torch.Tensor | None = None):
    """The directions ROME/MEMIT/AlphaEdit may write at ``layer``: ``neurons`` (None: all), within
    AlphaEdit's ``null_basis`` when given, minus the preserved tasks' key span when ``preserve`` is
    set; and what the projection records (None without one)."""
    if not preserve:
        return (neurons if null_basis is None else build_subspace(handle.adapter.d_mlp, neurons, null_basis)), None
    mod = handle.adapter.mlp_out(layer)
    name = handle.adapter.name_of(mod.weight)
    Q, info = blocked_basis(handle, {name: mod}, preserve)[name]
    space = build_subspace(handle.adapter.d_mlp, neurons, null_basis, blocked=Q)
    if space.dim == 0:
        from .errors import EditRefused
        raise EditRefused(f"preserve: at layer {layer} the preserved tasks {', '.join(preserve['tasks'])} leave no "
                          "direction to edit; raise preserve_threshold or preserve fewer tasks")
    return space, dict(info, free_dims=space.dim)


def weight_projectors(handle, train: dict[str, torch.Tensor], s: dict) -> tuple[dict, list[str]]:
    """For fine-tuning: {param name: (P ``[d_in, d_in]`` float64, input axis)} such that a weight change
    D with D P (or P D for GPT-2's Conv1D) leaves the preserved tasks' inputs to that matrix unchanged,
    and the names of trainable vectors (biases, norms) that must stay frozen, since they shift every
    token alike. A masked matrix must train whole input columns."""
    a = handle.adapter
    params = dict(handle.model.named_parameters())
    mats = {n: m for n, m in train.items() if params[n].dim() == 2}
    frozen = sorted(n for n in train if params[n].dim() != 2)
    modules = {n: handle.model.get_submodule(n.rsplit(".", 1)[0]) for n in mats}
    blocked = blocked_basis(handle, modules, s)
    out = {}
    for n, m in mats.items():
        axis = a.in_dim(modules[n])
        cols = m.any(dim=1 - axis)
        if not bool((m == cols.unsqueeze(1 - axis)).all()):
            raise KnoweditError(f"preserve: the mask trains part of the input columns of {n}; the projection that keeps "
                                "the preserved tasks' inputs unchanged needs whole columns (a neuron-level or "
                                "module-level mask), or drop 'preserve'")
        d = m.shape[axis]
        S = None if bool(cols.all()) else cols.nonzero().flatten()
        B = build_subspace(d, S, blocked=blocked[n][0]).full_basis()
        out[n] = (B @ B.T, axis)
    return out, frozen
