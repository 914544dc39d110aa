"""Learned mask circuits (Ge, Rudzicz & Zhu's weight-level circuits): a logit per weight, MLP
neuron or head, trained so that the masked model keeps the task behaviour at a target density.

Relaxation: Gumbel-sigmoid. A unit's soft value is ``σ((ℓ + g)/τ)`` with logistic noise ``g``, so a
unit is "on" with probability ``σ(ℓ)`` and the expected density is the mean of ``σ(ℓ)`` over units
(weighted by nothing: a unit of the ``weight`` granularity is one element, so this is the density
by parameter count). ``τ`` falls geometrically from ``temp_start`` to ``temp_end``.

Loss per step, on a batch of clean training prompts:
``mean_i relu(1 - f_i) + penalty · (E[density] - D_t)²`` with ``f_i = (m_i - m(∅)) / (m(N) - m(∅))``
the prompt's faithfulness under the soft mask (the hinge stops rewarding a mask for beating the full
model), and ``D_t`` the density target, lowered linearly from the initial expected density to ``D``
over the first ``warmup`` share of the steps and then held. Per-element task gradients are tiny and
noisy next to any usable penalty, so the expected density is steered mainly by a shared logit offset
``b`` (units are on with probability ``σ(ℓ + b)``), re-solved by one Newton step per step so that
``E[density] ≈ D_t``; the penalty then only mops up the residual. The offset does not change the
ranking of the logits, which is all the final mask uses.

The final mask is the top ``round(D · n_units)`` logits (ties broken by position), so its density is
``D`` up to one unit's rounding. Its faithfulness is measured with the same ablation on held-out
prompts (for IOI: the generator with another seed, prompts that occur in the training set removed).

The model's parameters are never written (:mod:`knowedit.discovery.masked_forward`)."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..circuit.weight_mask import GRANULARITIES, WeightMask
from ..errors import KnoweditError
from ..tasks.base import per_prompt_scores
from .masked_forward import ABLATIONS, check_ablation, input_means, masked_last_logits
from .mask_units import sites, weight_mask_from_units

RELAXATION = "gumbel-sigmoid"
FINAL_RULE = "top-k logits, k = round(density * candidate units), ties by position"


@dataclass
class MaskSettings:
    granularity: str = "weight"
    density: float = 0.1
    ablation: str = "zero"
    steps: int = 200
    lr: float = 0.1
    batch_size: int = 8
    init_logit: float = 3.0
    temp_start: float = 1.0
    temp_end: float = 0.1
    penalty: float = 10.0
    warmup: float = 0.4
    seed: int = 0
    checkpoint_every: int = 50

    def check(self) -> "MaskSettings":
        d = self.density
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 < d < 1 or math.isnan(d):
            raise KnoweditError(f"density: {d!r} must be a number strictly between 0 and 1 (the share of candidate "
                                "units kept, e.g. 0.1)")
        if self.granularity not in GRANULARITIES:
            raise KnoweditError(f"granularity: {self.granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        check_ablation(self.ablation)
        for k in ("steps", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise KnoweditError(f"{k}: {v!r} must be a positive integer")
        if not self.lr > 0 or not 0 < self.temp_end <= self.temp_start or not 0 <= self.warmup <= 1:
            raise KnoweditError("lr must be > 0, 0 < temp_end <= temp_start, 0 <= warmup <= 1 "
                                f"(got lr={self.lr}, temps {self.temp_start}->{self.temp_end}, warmup={self.warmup})")
        return self


@dataclass
class LearnedMaskResult:
    granularity: str
    mask: WeightMask                  # the final hard mask, as stored
    keep: list                        # per site: bool unit vector (heads/neurons per layer at those granularities)
    logits: list                      # per site: final logits (the unit scores)
    density: float                    # achieved share of candidate units
    curve: list = field(default_factory=list)  # per step: loss, task loss, expected density, target, metric, tau
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)    # m_full, m_empty, m_circuit, faithfulness on training prompts
    heldout: dict = field(default_factory=dict)  # the same on held-out prompts

    def heads(self) -> list[str]:
        if self.granularity != "head":
            return []
        return [f"a{l}.h{h}" for l, k in enumerate(self.keep) for h in torch.nonzero(k).flatten().tolist()]

    def neurons(self) -> dict[int, list[int]]:
        if self.granularity != "neuron":
            return {}
        return {l: torch.nonzero(k).flatten().tolist() for l, k in enumerate(self.keep) if k.any()}


def heldout_task(task, tokenizer, seed: int = 1, n: int = 50):
    """IOI-style held-out prompts: the same generator with another seed, minus training prompts."""
    from ..tasks import get_task
    if task.name != "ioi":
        raise KnoweditError(f"held-out prompts: only the IOI generator is wired here (task {task.name!r}); "
                            "pass heldout= a Task built with another seed")
    more = get_task("ioi", tokenizer, n=2 * n, seed=seed, bos=task.bos)
    seen = set(task.clean)
    idx = [i for i, c in enumerate(more.clean) if c not in seen][:n]
    return more.subset(idx)


def _batches(handle, task, bs):
    out = []
    for i in range(0, len(task), bs):
        b = handle.tokenize(task.clean[i:i + bs], bos=task.bos)
        out.append((b, torch.tensor(task.answers[i:i + len(b)]), torch.tensor(task.distractors[i:i + len(b)])))
    return out


def _scores(handle, task, weights_fn, means, bs=25) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b, a, d in _batches(handle, task, bs):
            logits = masked_last_logits(handle, b, weights_fn(), means)
            out.append(per_prompt_scores(logits.float(), a, d, task.metric))
    return torch.cat(out)


def evaluate_mask(handle, task, mask: WeightMask, ablation: str = "zero", granularity: str | None = None) -> dict:
    """Faithfulness of a hard mask on ``task``: ``(m(C) - m(∅)) / (m(N) - m(∅))`` with the elements
    outside the mask ablated (``zero`` or ``mean``), ``∅`` = every candidate unit of the mask's
    granularity ablated, ``N`` the model itself."""
    check_ablation(ablation)
    g = granularity or mask.granularity
    params = dict(handle.model.named_parameters())
    skip_bias = ablation == "mean"
    names = [n for n in mask.tensors if not (skip_bias and n.endswith(".bias"))]
    means = input_means(handle, task, names) if ablation == "mean" else None
    empty_keep = [torch.zeros(s.n_units, dtype=torch.bool) for s in sites(handle, g, ablation)]
    empty = weight_mask_from_units(handle, g, ablation, empty_keep)

    def apply(m):
        return lambda: {n: params[n].detach() * m.tensors[n].to(params[n].dtype) for n in names}

    full = _scores(handle, task, lambda: {}, None)
    m_empty = _scores(handle, task, apply(empty), means)
    m_c = _scores(handle, task, apply(mask), means)
    gap = float(full.mean() - m_empty.mean())
    if abs(gap) < 1e-6:
        raise KnoweditError(f"task {task.name!r}: the metric is the same with and without every candidate unit; "
                            "faithfulness is undefined")
    return {"n": len(task), "m_full": float(full.mean()), "m_empty": float(m_empty.mean()),
            "m_circuit": float(m_c.mean()), "faithfulness": float((m_c.mean() - m_empty.mean()) / gap),
            "ablation": ablation}


def _topk_keep(logits: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([l.detach().flatten() for l in logits])
    k = max(1, min(len(flat), k))
    t = torch.kthvalue(flat, len(flat) - k + 1).values
    keep = flat > t
    need = k - int(keep.sum())
    if need > 0:  # ties at the threshold: the first ones by position, so the same logits give the same mask
        ties = torch.nonzero(flat == t).flatten()[:need]
        keep[ties] = True
    return [p.view(l.shape) for p, l in zip(keep.split([l.numel() for l in logits]), logits)]


def _always_kept(handle, s: MaskSettings) -> list[str]:
    if s.granularity != "weight" or s.ablation != "mean":
        return []
    from ..circuit.maskable import maskable_params
    return [p.name for p in maskable_params(handle) if p.name.endswith(".bias")]


def learn_mask(handle, task, settings: MaskSettings | None = None, heldout=None, progress=None,
               checkpoint: str | os.PathLike | None = None) -> LearnedMaskResult:
    """Learn a mask for ``task`` (see the module doc). ``progress(step, row)`` is called every step;
    ``checkpoint`` (a file) is written every ``checkpoint_every`` steps and resumed from when it
    matches these settings."""
    s = (settings or MaskSettings()).check()
    t0 = time.perf_counter()
    params = dict(handle.model.named_parameters())
    site_list = sites(handle, s.granularity, s.ablation)
    n_units = sum(x.n_units for x in site_list)
    shapes = [tuple(params[x.param].shape) if s.granularity == "weight" else (x.n_units,) for x in site_list]
    means = input_means(handle, task, [x.param for x in site_list]) if s.ablation == "mean" else None

    batches = _batches(handle, task, s.batch_size)
    with torch.no_grad():
        full = torch.cat([per_prompt_scores(handle.last_logits(b).float(), a, d, task.metric) for b, a, d in batches])
        zero_w = {x.param: params[x.param].detach() * 0 for x in site_list}
        empty = torch.cat([per_prompt_scores(masked_last_logits(handle, b, zero_w, means).float(), a, d, task.metric)
                           for b, a, d in batches])
        del zero_w
    gap = float(full.mean() - empty.mean())
    if abs(gap) < 1e-6:
        raise KnoweditError(f"task {task.name!r}: the metric does not change when every candidate unit is ablated "
                            f"({float(full.mean()):.4g}); nothing to learn")

    gen = torch.Generator().manual_seed(s.seed)
    logits = [torch.full(sh, s.init_logit, requires_grad=True) for sh in shapes]
    # A short second-moment memory: early, noisy task gradients must not damp later steps for long.
    opt = torch.optim.Adam(logits, lr=s.lr, betas=(0.9, 0.99))
    offset = 0.0
    curve: list[dict] = []
    start = 0
    key = dataclasses.asdict(s) | {"model": handle.name, "task": task.name, "n_train": len(task)}
    ck = Path(checkpoint) if checkpoint else None
    if ck is not None and ck.is_file():
        state = torch.load(ck, weights_only=False)
        if state.get("key") == key:
            with torch.no_grad():
                for l, v in zip(logits, state["logits"]):
                    l.copy_(v)
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            curve, start, offset = state["curve"], state["step"], state["offset"]
    d0 = 1 / (1 + math.exp(-s.init_logit))
    warm = max(1, round(s.warmup * s.steps))

    with torch.enable_grad():
        for step in range(start, s.steps):
            frac = step / max(1, s.steps - 1)
            tau = s.temp_start * (s.temp_end / s.temp_start) ** frac
            target = s.density + (d0 - s.density) * max(0.0, 1 - step / warm)
            b, a, d = batches[step % len(batches)]
            with torch.no_grad():  # one Newton step on the shared offset: E[density] follows the target
                sig = [torch.sigmoid(l + offset) for l in logits]
                e_now = sum(float(x.sum()) for x in sig) / n_units
                slope = sum(float((x * (1 - x)).sum()) for x in sig) / n_units
                del sig
                offset = min(30.0, max(-30.0, offset - (e_now - target) / max(slope, 1e-12)))
            weights = {}
            for x, l in zip(site_list, logits):
                u = torch.rand(l.shape, generator=gen).clamp_(1e-6, 1 - 1e-6)
                soft = torch.sigmoid((l + offset + torch.logit(u)) / tau)
                # the logits stay float32 (Adam's small steps would vanish in bfloat16); the soft mask
                # enters the forward in the model's dtype (a no-op cast for a float32 model)
                w = params[x.param].detach()
                weights[x.param] = w * x.expand(soft).to(w.dtype)
            m = per_prompt_scores(masked_last_logits(handle, b, weights, means).float(), a, d, task.metric)
            f = (m - empty.mean()) / gap
            task_loss = torch.relu(1 - f).mean()
            exp_density = sum(torch.sigmoid(l + offset).sum() for l in logits) / n_units
            loss = task_loss + s.penalty * (exp_density - target) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del weights
            row = {"step": step + 1, "loss": float(loss.detach()), "task_loss": float(task_loss.detach()),
                   "expected_density": float(exp_density.detach()), "target_density": target,
                   "metric": float(m.detach().mean()), "faithfulness_soft": float(f.detach().mean()),
                   "tau": tau, "offset": offset,
                   "seconds": time.perf_counter() - t0}
            curve.append(row)
            if progress:
                progress(step + 1, row)
            if ck is not None and ((step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps):
                _save_checkpoint(ck, {"key": key, "logits": [l.detach() for l in logits], "opt": opt.state_dict(),
                                      "gen": gen.get_state(), "curve": curve, "step": step + 1,
                                      "offset": offset})

    # Under mean ablation biases are always kept (module doc of mask_units); they count towards D.
    kept_always = sum(int(params[n].numel()) for n in _always_kept(handle, s))
    k = max(1, round(s.density * (n_units + kept_always)) - kept_always)
    keep = _topk_keep(logits, k)
    mask = weight_mask_from_units(handle, s.granularity, s.ablation, keep)
    settings_out = {**dataclasses.asdict(s), "relaxation": RELAXATION, "final_rule": FINAL_RULE,
                    "loss": "mean relu(1 - faithfulness_i) + penalty * (E[density] - D_t)^2",
                    "density_control": "shared logit offset, one Newton step per step towards D_t, plus the penalty",
                    "optimizer": "Adam betas (0.9, 0.99)",
                    "density_definition": "share of candidate units kept (weight: by parameter count over the "
                                          "maskable parameters)",
                    "maskable": "attention and MLP weights and biases, norm gains and biases; embeddings and "
                                "unembedding never masked",
                    "ablation_detail": ("zero: parameters outside the mask are 0 (Ge et al.); a zeroed norm gain "
                                        "silences that channel" if s.ablation == "zero" else
                                        "mean: parameters outside the mask read the token-mean input over the "
                                        "task's corrupted prompts; biases never ablated"),
                    "n_units": n_units, "k": k, "n_train": len(task)}
    res = LearnedMaskResult(s.granularity, mask, [x.cpu() for x in keep], [l.detach() for l in logits],
                            (k + kept_always) / (n_units + kept_always), curve, 0.0, settings_out)
    mask.meta = {"method": "learned-mask", "granularity": s.granularity, "ablation": s.ablation}
    res.train = evaluate_mask(handle, task, mask, s.ablation)
    if heldout is not None:
        res.heldout = evaluate_mask(handle, heldout, mask, s.ablation)
    res.seconds = time.perf_counter() - t0
    return res


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


def sidecar_name(out: Path) -> str:
    """``F.json`` -> ``F.mask.safetensors`` (the sidecar sits next to the circuit JSON)."""
    return (out.name[:-5] if out.name.endswith(".json") else out.name) + ".mask.safetensors"


def to_circuit(handle, task, res: LearnedMaskResult, out: str | os.PathLike | None = None):
    """A :class:`~knowedit.circuit.Circuit` for a learned mask; with ``out``, the sidecar is written
    next to it first and referenced as ``extra["weight_mask"]`` (file name + sha256). The JSON itself
    is left to the caller (``circuit.save(out)``), so a failed sidecar write leaves no JSON behind."""
    from ..circuit import Circuit

    nodes = res.heads()
    neurons = {}
    if res.granularity == "neuron":   # every head stays; the chosen neurons per MLP
        nodes = [c.name for c in handle.all_heads()]
        neurons = {int(l): {int(i): 1.0 for i in v} for l, v in res.neurons().items()}
    elif res.granularity == "head":   # every MLP stays
        nodes = list(nodes) + [c.name for c in handle.all_mlps()]
    task_info = {"name": task.name, "n": len(task), "seed": task.meta.get("seed"), "bos": handle.uses_bos(task.bos)}
    method = {"name": "learned-mask", "level": res.granularity, "ablation": res.settings["ablation"],
              "settings": {k: v for k, v in res.settings.items() if k != "ablation"}}
    extra = {"mask_density": res.density, "mask": res.mask.density(), "train": res.train, "heldout": res.heldout,
             "seconds": round(res.seconds, 1), "curve": [{k: round(v, 5) if isinstance(v, float) else v
                                                           for k, v in row.items()} for row in res.curve]}
    if out is not None:
        out = Path(out)
        name = sidecar_name(out)
        sha = res.mask.save(out.parent / name)
        extra["weight_mask"] = res.mask.sidecar_entry(name, sha)
    faith = res.heldout.get("faithfulness", res.train.get("faithfulness"))
    c = Circuit.from_components(handle, nodes, task=task_info, method=method, faithfulness=faith, extra=extra,
                                neurons=neurons)
    return c


def run_mask_cli(handle, task, args: dict):
    """The ``knowedit discover --method mask`` path: learn, evaluate on held-out prompts, write
    the sidecar and return the Circuit (the caller saves the JSON at ``args["out"]``).

    ``args``: granularity, density, mask_ablation, mask_steps, seed, batch_size (mask batch),
    heldout_n, heldout_seed, out, checkpoint, and any :class:`MaskSettings` field by name."""
    fields = {f.name for f in dataclasses.fields(MaskSettings)}
    kw = {k: v for k, v in args.items() if k in fields and v is not None}
    if args.get("mask_ablation") is not None:
        kw["ablation"] = args["mask_ablation"]
    if args.get("mask_steps") is not None:
        kw["steps"] = args["mask_steps"]
    if args.get("mask_batch_size") is not None:
        kw["batch_size"] = args["mask_batch_size"]
    s = MaskSettings(**kw).check()   # bad density/granularity/ablation fail here, before any work
    held = heldout_task(task, handle.tokenizer, args.get("heldout_seed", 1), args.get("heldout_n", 50)) \
        if task.name == "ioi" else None
    log = args.get("progress")
    res = learn_mask(handle, task, s, heldout=held, progress=log, checkpoint=args.get("checkpoint"))
    return to_circuit(handle, task, res, args.get("out"))
