"""Causal tracing (Meng et al. 2022, ROME §2): which hidden states carry a fact to the prediction.

The subject's token embeddings are corrupted with Gaussian noise. Then states of the clean run are
put back into the corrupted run: the residual stream after a block (``hidden``), an MLP's output
(``mlp``) or an attention layer's output (``attn``), at one token and one layer, or, for MLP and
attention, at one token and a window of ``window`` layers centred on the layer (``mlp_window``,
``attn_window``; layers L - window//2 .. L - window//2 + window - 1, clipped at the ends, as in ROME).
The indirect effect of a state is p(answer | corrupted run, state restored) - p(answer | corrupted run),
where p is the probability of the answer's first token at the last position. It is averaged over the
noise seeds, with the same noise for every restoration under one seed.

Noise: each subject token's embedding gets ν ~ N(0, (noise · σ)² I), noise = 3 as in ROME. ROME's σ is
the standard deviation of the embedding entries of the subject tokens of its known facts; here σ is,
by default, the standard deviation of all entries of the model's token-embedding matrix, which needs
no data set and is the same for every request (:func:`embedding_std`; :func:`subject_embedding_std`
gives ROME's estimate for a list of subjects, and ``noise_std`` overrides σ). The result records σ
and where it came from.

Speed: a restored run is identical to the corrupted run below its first restored layer and at the
tokens before its first restored token. So each batch starts at its first restored layer, from the
corrupted residual stream cached there (the blocks below are skipped), and runs only the tokens from
its first restored token on, attending to the corrupted run's cached keys and values of the tokens
before. Restorations at tokens before the subject change nothing (those states are the same in both
runs) and are not run.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import KnoweditError
from ..hooks.hookset import HookSet
from ..tasks.positions import span_positions

KINDS = ("hidden", "mlp", "attn")
GRID_KINDS = ("hidden", "mlp", "attn", "mlp_window", "attn_window")
ROME_NOISE = 3.0     # ν = 3σ (ROME §2.1)
ROME_WINDOW = 10     # ROME's k for the windowed MLP/attention traces
DEFAULT_SEEDS = 5    # ROME uses 10 samples; 5 fits the 30 s budget of one full trace on a 2-core CPU
MAX_ROWS = 160       # rows (restorations × seeds) per forward
MAX_SPAN = 1         # first layers one batch may mix

# A restoration: the clean states to put back, as (kind, layer, token position) triples.
Restoration = tuple[tuple[str, int, int], ...]


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def _cache_kw(model) -> str:
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The ``window`` layers centred on ``layer`` (L - window//2 .. L - window//2 + window - 1), clipped."""
    lo = layer - window // 2
    return list(range(max(0, lo), min(n_layers, lo + window)))


@torch.no_grad()
def embedding_std(handle) -> float:
    """σ of all entries of the token-embedding matrix (the default noise unit)."""
    return float(handle.adapter.value(handle.adapter.embed).detach().float().std())


@torch.no_grad()
def subject_embedding_std(handle, subjects: list[str]) -> float:
    """ROME's σ: the standard deviation of the embedding entries of the subjects' tokens."""
    ids = [i for s in subjects for i in handle.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise KnoweditError("subjects: no tokens; give at least one non-empty subject")
    return float(handle.adapter.value(handle.adapter.embed).detach()[torch.tensor(ids)].float().std())


def locate_subject(handle, prompt: str, subject: str, where: str = "request") -> tuple[str, tuple[int, int]]:
    """The prompt text with the subject filled in, and the subject's token range ``[first, last + 1)`` in
    the model's tokenization (BOS included). ``prompt`` holds ``{}`` or the subject itself."""
    if not isinstance(subject, str) or not subject.strip():
        raise KnoweditError(f"{where}: field 'subject' is empty; give the entity the fact is about")
    if not isinstance(prompt, str) or not prompt.strip():
        raise KnoweditError(f"{where}: field 'prompt' is empty; give the text that precedes the answer")
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise KnoweditError(f"{where}: field 'prompt' must contain exactly one '{{}}' for the subject")
        start = prompt.index("{}")
        text = prompt.replace("{}", subject)
    else:
        start = prompt.find(subject)
        if start < 0:
            raise KnoweditError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; put the subject "
                                "in the prompt or mark its place with '{}'")
        text = prompt
    text = text.rstrip()
    end = start + len(subject)
    first, last = span_positions(handle.tokenizer, text, [(start, start + 1), (start, end)])
    return text, (first, last + 1)


@dataclass
class Corrupted:
    """One prompt's clean run and its corrupted runs (one per noise seed), ready for restorations."""

    handle: object
    text: str
    input_ids: torch.Tensor            # [1, T]
    subject_range: tuple[int, int]
    answer_id: int
    answer_source: str
    p_clean: float
    p_corrupt: torch.Tensor            # [S]
    clean: dict                        # kind -> [n_layers, T, d_model]
    corrupt_resid: torch.Tensor        # [S, n_layers, T, d_model], residual after each block
    corrupt_kv: list                   # per layer (keys [S, ...], values [S, ...])
    noise: torch.Tensor                # [S, n_subject_tokens, d_model]
    settings: dict
    block_tuple: bool = False
    forwards: int = 0

    @property
    def seeds(self) -> int:
        return self.noise.shape[0]


def _answer_id(handle, answer: str, where: str) -> int:
    if not isinstance(answer, str) or not answer.strip():
        raise KnoweditError(f"{where}: the answer is empty; give the true answer (e.g. 'Paris') or leave it out to "
                            "trace the model's own prediction")
    ids = handle.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    return ids[0]


def _record_hooks(hs: HookSet, a, store: dict, kinds=KINDS):
    """Record each kind's output at every layer into ``store[(kind, layer)]``, and whether blocks return
    tuples (``store["block_tuple"]``), which skipped blocks must imitate."""
    mods = {"hidden": a.block, "mlp": a.mlp, "attn": a.attn}
    for kind in kinds:
        for layer in range(a.n_layers):
            def fn(mod, args, out, kind=kind, layer=layer):
                store[(kind, layer)] = _first(out).detach().clone()
                if kind == "hidden":
                    store["block_tuple"] = isinstance(out, tuple)
            hs.post(mods[kind](layer), fn)


@torch.no_grad()
def prepare(handle, prompt: str, subject: str, answer: str | None = None, *, seeds: int = DEFAULT_SEEDS,
            noise: float = ROME_NOISE, noise_std: float | None = None, seed: int = 0,
            where: str = "request") -> Corrupted:
    """Run the clean prompt and its ``seeds`` corrupted versions, keeping what restorations need.

    ``answer``: the true answer (its first token, tokenised with a leading space, is scored); None
    scores the model's own top prediction on the clean prompt, as ROME does."""
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise KnoweditError(f"seeds: {seeds!r}; give a positive number of noise seeds (ROME uses 10, default 5)")
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise > 0:
        raise KnoweditError(f"noise: {noise!r}; give a positive multiple of the embedding std (ROME: 3)")
    if noise_std is not None and not (isinstance(noise_std, (int, float)) and noise_std > 0):
        raise KnoweditError(f"noise_std: {noise_std!r}; give a positive σ, or None for the embedding matrix's std")
    text, (a0, b0) = locate_subject(handle, prompt, subject, where)
    a = handle.adapter
    ids = handle.tokenize([text]).input_ids
    model = handle.model

    store: dict = {}
    with HookSet() as hs:
        _record_hooks(hs, a, store)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
    probs = logits.float().softmax(-1)
    if answer is None:
        answer_id, source = int(probs.argmax()), "model top prediction"
    else:
        answer_id, source = _answer_id(handle, answer, where), "given"
    clean = {k: torch.stack([store[(k, l)][0] for l in range(a.n_layers)]) for k in KINDS}
    block_tuple = bool(store.get("block_tuple", False))

    if noise_std is None:
        sigma, sigma_source = embedding_std(handle), "std of all token-embedding entries"
    else:
        sigma, sigma_source = float(noise_std), "given"
    dev, dtype = handle.device, a.embed.weight.dtype
    nz = torch.stack([torch.randn(b0 - a0, a.d_model, generator=torch.Generator().manual_seed(seed + s))
                      for s in range(seeds)]) * (noise * sigma)
    nz = nz.to(dev, dtype)

    def add_noise(mod, args, out):
        out = out.clone()
        out[:, a0:b0] += nz
        return out

    store = {}
    with HookSet() as hs:
        hs.post(a.embed, add_noise)
        _record_hooks(hs, a, store, kinds=("hidden",))
        out = model(input_ids=ids.expand(seeds, -1), use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    kv = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else \
        [(cache.key_cache[l], cache.value_cache[l]) for l in range(a.n_layers)]
    p_corrupt = out.logits[:, -1].float().softmax(-1)[:, answer_id]
    resid = torch.stack([store[("hidden", l)] for l in range(a.n_layers)], dim=1)
    settings = {"noise": float(noise), "noise_std": sigma, "noise_std_source": sigma_source, "seeds": seeds,
                "seed": seed, "answer_source": source}
    return Corrupted(handle, text, ids, (a0, b0), answer_id, source, float(probs[answer_id]), p_corrupt, clean, resid,
                     kv, nz, settings, block_tuple, forwards=2)


@contextlib.contextmanager
def _skip_blocks(blocks, value, as_tuple: bool):
    """Blocks below the first restored layer return the corrupted residual instead of computing it.
    The model's own loop still calls them (no architecture-specific re-implementation of the forward
    is needed); an instance attribute shadows the class's ``forward`` and is removed afterwards."""
    out = (value,) if as_tuple else value
    for b in blocks:
        b.forward = lambda *args, **kw: out
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _run_batch(ctx: Corrupted, items: list[Restoration], t0: int, s: int) -> torch.Tensor:
    """p(answer) for every restoration × seed of ``items``, ``[len(items), S]``, computed from layer ``s``
    and token ``t0`` on."""
    h, a = ctx.handle, ctx.handle.adapter
    S = ctx.seeds
    rows = len(items) * S
    seed_of = torch.arange(rows, device=ctx.input_ids.device) % S
    ids = ctx.input_ids[:, t0:].expand(rows, -1)
    a0, b0 = ctx.subject_range

    plan: dict = {}
    for i, restoration in enumerate(items):
        for kind, layer, pos in restoration:
            plan.setdefault((kind, layer), []).append((i, pos))
    mods = {"hidden": a.block, "mlp": a.mlp, "attn": a.attn}
    with contextlib.ExitStack() as stack:
        hs = stack.enter_context(HookSet())
        if s == 0 and t0 < b0:
            lo = max(a0, t0)
            nz = ctx.noise[seed_of][:, lo - a0:]

            def add_noise(mod, args, out):
                out = out.clone()
                out[:, lo - t0:b0 - t0] += nz
                return out
            hs.post(a.embed, add_noise)
        for (kind, layer), entries in plan.items():
            cfg = torch.tensor([i for i, _ in entries])
            pos = torch.tensor([p for _, p in entries])
            r = (cfg[:, None] * S + torch.arange(S)[None]).reshape(-1).to(seed_of.device)
            p_abs = pos.repeat_interleave(S).to(seed_of.device)
            vals = ctx.clean[kind][layer][p_abs]

            def put(mod, args, out, r=r, p=p_abs - t0, vals=vals):
                _first(out)[r, p] = vals
                return out
            hs.post(mods[kind](layer), put)
        kw = {}
        if t0 > 0:
            from transformers import DynamicCache
            cache = DynamicCache()
            for layer in [0] + list(range(max(s, 1), a.n_layers)):
                k, v = ctx.corrupt_kv[layer]
                cache.update(k[seed_of, ..., :t0, :], v[seed_of, ..., :t0, :], layer)
            kw = {_cache_kw(h.model): cache, "use_cache": True}
        else:
            kw = {"use_cache": False}
        if s > 0:
            stack.enter_context(_skip_blocks([a.block(l) for l in range(s)], ctx.corrupt_resid[seed_of, s - 1, t0:],
                                             ctx.block_tuple))
        logits = h.model(input_ids=ids, logits_to_keep=1, **kw).logits[:, -1]
    ctx.forwards += 1
    return logits.float().log_softmax(-1)[:, ctx.answer_id].exp().view(len(items), S)


@torch.no_grad()
def restored_probs(ctx: Corrupted, restorations: list[Restoration], fast: bool = True,
                   max_rows: int = MAX_ROWS, max_span: int = MAX_SPAN) -> torch.Tensor:
    """p(answer) of the corrupted run with each restoration applied, per seed: ``[n, S]``.

    ``fast=False`` runs every restoration from the first layer and token (the plain method, for
    checking the fast path)."""
    n_layers, T = ctx.handle.adapter.n_layers, ctx.input_ids.shape[1]
    out = ctx.p_corrupt.expand(len(restorations), -1).clone()
    todo = []
    for i, r in enumerate(restorations):
        for kind, layer, pos in r:
            if kind not in KINDS or not 0 <= layer < n_layers or not 0 <= pos < T:
                raise KnoweditError(f"restoration {i}: ({kind!r}, {layer}, {pos}) is not a state; kinds are "
                                    f"{KINDS}, layers 0..{n_layers - 1}, positions 0..{T - 1}")
        if r and max(p for _, _, p in r) >= ctx.subject_range[0]:   # else it restores what noise never reached
            t0 = min(p for _, _, p in r) if fast else 0
            s = min(l for _, l, _ in r) if fast else 0
            todo.append((t0, s, i))
    todo.sort()
    per_batch = max(1, max_rows // ctx.seeds)
    j = 0
    while j < len(todo):
        t0, s, _ = todo[j]
        k = j
        # one batch shares its first token and (nearly) its first layer: a row that started lower than
        # it needs would recompute corrupted layers for nothing
        while k < len(todo) and k - j < per_batch and todo[k][0] == t0 and todo[k][1] - s <= max_span:
            k += 1
        chunk = todo[j:k]
        out[[i for _, _, i in chunk]] = _run_batch(ctx, [restorations[i] for _, _, i in chunk], t0, s)
        j = k
    return out


@dataclass
class TraceResult:
    """Average indirect effects ``effects[kind][token, layer]`` for one prompt, plus what produced them."""

    prompt: str
    subject: str
    answer: str
    answer_id: int
    tokens: list[str]
    subject_range: tuple[int, int]          # [first, last + 1) in ``tokens``
    p_clean: float
    p_corrupt: float
    p_corrupt_seeds: list[float]
    effects: dict[str, np.ndarray]
    settings: dict = field(default_factory=dict)

    @property
    def last_subject(self) -> int:
        return self.subject_range[1] - 1

    def profile(self, kind: str = "mlp", position: int | None = None) -> np.ndarray:
        """Effects per layer at ``position`` (default: the subject's last token)."""
        return self.effects[kind][self.last_subject if position is None else position]

    def best_layer(self, kind: str = "mlp") -> int:
        """The layer with the largest effect of ``kind`` at the subject's last token."""
        return int(np.argmax(self.profile(kind)))

    def to_dict(self, digits: int | None = None) -> dict:
        def arr(x):
            x = np.asarray(x, dtype=float)
            return (np.round(x, digits) if digits is not None else x).tolist()
        return {"prompt": self.prompt, "subject": self.subject, "answer": self.answer, "answer_id": self.answer_id,
                "tokens": self.tokens, "subject_range": list(self.subject_range), "p_clean": self.p_clean,
                "p_corrupt": self.p_corrupt, "p_corrupt_seeds": [float(x) for x in self.p_corrupt_seeds],
                "effects": {k: arr(v) for k, v in self.effects.items()}, "settings": self.settings}

    @classmethod
    def from_dict(cls, d: dict) -> "TraceResult":
        return cls(d["prompt"], d["subject"], d["answer"], d["answer_id"], list(d["tokens"]),
                   tuple(d["subject_range"]), d["p_clean"], d["p_corrupt"], d["p_corrupt_seeds"],
                   {k: np.asarray(v, dtype=float) for k, v in d["effects"].items()}, d.get("settings", {}))


def grid(kind: str, positions, n_layers: int, window: int) -> list[tuple[int, int, Restoration]]:
    """``(position, layer, restoration)`` for every cell of one kind's heatmap."""
    base = kind.replace("_window", "")
    if base not in KINDS or (kind.endswith("_window") and base == "hidden") or kind not in GRID_KINDS:
        raise KnoweditError(f"kinds: {kind!r} is not one of {', '.join(GRID_KINDS)}")
    out = []
    for t in positions:
        for layer in range(n_layers):
            layers = window_layers(layer, window, n_layers) if kind.endswith("_window") else [layer]
            out.append((t, layer, tuple((base, l, t) for l in layers)))
    return out


def trace(handle, prompt: str, subject: str, answer: str | None = None, *, kinds=GRID_KINDS, positions=None,
          seeds: int = DEFAULT_SEEDS, noise: float = ROME_NOISE, window: int = ROME_WINDOW,
          noise_std: float | None = None, seed: int = 0, fast: bool = True, where: str = "request") -> TraceResult:
    """Causal trace of one prompt: ``effects[kind]`` is ``[tokens, layers]`` (cells not traced hold NaN).

    ``positions``: token positions to trace (default all; e.g. ``"last_subject"``); ``kinds``: a subset of
    :data:`GRID_KINDS`."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise KnoweditError(f"window: {window!r}; give a positive number of layers (ROME: 10)")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    t_start = time.perf_counter()
    ctx = prepare(handle, prompt, subject, answer, seeds=seeds, noise=noise, noise_std=noise_std, seed=seed,
                  where=where)
    n_layers, T = handle.adapter.n_layers, ctx.input_ids.shape[1]
    if positions is None:
        positions = list(range(T))
    elif isinstance(positions, str):
        if positions != "last_subject":
            raise KnoweditError(f"positions: {positions!r}; give token positions or 'last_subject'")
        positions = [ctx.subject_range[1] - 1]
    cells = {k: grid(k, positions, n_layers, window) for k in kinds}
    flat = [c for k in kinds for c in cells[k]]
    p = restored_probs(ctx, [r for _, _, r in flat], fast=fast).mean(1).cpu().numpy()
    base = float(ctx.p_corrupt.mean())
    effects, j = {}, 0
    for k in kinds:
        e = np.full((T, n_layers), np.nan)
        for t, layer, _ in cells[k]:
            e[t, layer] = p[j] - base
            j += 1
        effects[k] = e
    tok = handle.tokenizer
    settings = dict(ctx.settings, window=window, kinds=kinds, n_layers=n_layers, model=handle.name,
                    fingerprint=handle.fingerprint, forwards=ctx.forwards,
                    seconds=round(time.perf_counter() - t_start, 3))
    return TraceResult(ctx.text, subject, tok.decode([ctx.answer_id]), ctx.answer_id,
                       [tok.decode([i]) for i in ctx.input_ids[0].tolist()], ctx.subject_range, ctx.p_clean, base,
                       ctx.p_corrupt.tolist(), effects, settings)
