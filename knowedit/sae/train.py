"""Training an SAE or transcoder with EleutherAI's sparsify (a TopK ``SparseCoder``).

The text comes in as token-id sequences; sparsify trains on fixed-length rows, so the sequences are
packed the way its own ``chunk_and_tokenize`` does it (joined with the end-of-text token, cut into
rows). Each row starts with a sink token (the tokenizer's BOS, else its EOS) that is excluded from
training wherever it occurs (sparsify's ``exclude_tokens``): a row's first position holds the attention
sink, whose activations (~70x the norm of the rest on SmolLM2-135M) would otherwise dominate the loss,
and a spliced SAE leaves that position alone anyway (``SAE.skip_first``).

Two ways to feed the coder (``activations=``):

* ``"cache"`` (the default): the model runs once over the distinct rows (blocks up to the site only,
  batched) and the site's activations at the kept positions are stored, float16 by default (in memory,
  or in a memory-mapped file under the cache root when larger than ``max_memory``). The coder then
  trains on minibatches of that store for as many passes as ``tokens`` asks, so a 25-pass run costs
  one model pass, not 25. The loop is sparsify's method, with sparsify's own ``SparseCoder`` (forward,
  FVU and AuxK losses, decoder renormalisation, removal of the gradient parallel to the decoder rows),
  its optimizers (``signum``: SignSGD inside a schedule-free wrapper, momentum 0.95; ``adam`` with 1,000
  warm-up steps and linear decay; ``muon``), its learning-rate defaults (signum 5e-3, adam 2e-4, each
  divided by sqrt(latents / 2^14); muon 2e-3), its seeded initialisation, its decoder-bias initialisation
  from the first minibatch's mean and its dead-latent bookkeeping (tokens since each latent last fired).
  ``shuffle="tokens"`` draws each minibatch from a fresh seeded permutation of all cached positions per
  pass; ``shuffle="rows"`` takes whole rows in exactly the order sparsify's trainer would see them.
  Training checkpoints (``checkpoint=``) resume bit-exactly.
* ``"stream"``: sparsify's own ``Trainer``, which recomputes the model's activations on every row
  (``tokens`` beyond the corpus repeats it, reshuffled each pass). Kept as the reference the cached
  loop is tested against.

sparsify's trainer changes process-wide state (it freezes the model's parameters and sets the float32
matmul precision to "high"); both are put back afterwards, so a library caller's model is as it was."""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import KnoweditError
from .load_sparsify import read_sparsify
from .sae import SAE
from .site import Site, sparsify_hookpoint

KINDS = ("sae", "transcoder")
OPTIMIZERS = ("signum", "adam", "muon")
SHUFFLES = ("tokens", "rows")
ACT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_MEMORY = 2 * 2 ** 30          # activation stores above this go to a memory-mapped file
SPARSIFY_DEAD_AFTER = 10_000_000  # sparsify's TrainConfig.dead_feature_threshold
_FP16_MAX = 65504.0


def pack(ids: list[list[int]], ctx_len: int, eos: int | None) -> list[list[int]]:
    """Concatenate sequences (separated by ``eos`` when there is one) and cut ``ctx_len``-token rows;
    the incomplete tail is dropped."""
    flat: list[int] = []
    for row in ids:
        flat.extend(row)
        if eos is not None:
            flat.append(eos)
    return [flat[i:i + ctx_len] for i in range(0, len(flat) - ctx_len + 1, ctx_len)]


def _distinct_rows(ids, ctx_len, eos, sink) -> list[list[int]]:
    rows = [[sink] + r for r in pack(ids, ctx_len - 1, eos)]
    if not rows:
        raise KnoweditError(f"training text: {sum(map(len, ids))} tokens is less than one {ctx_len}-token row; "
                            "give more text or a smaller --ctx-len")
    return rows


def _row_order(n_rows: int, want: int, seed: int) -> list[int]:
    """Which distinct row is the i-th training row: passes over all rows, each reshuffled (seeded)."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < want:
        order = list(range(n_rows))
        rng.shuffle(order)
        out.extend(order[:want - len(out)])
    return out


def _rows(ids, ctx_len, eos, sink, tokens, seed) -> list[list[int]]:
    rows = _distinct_rows(ids, ctx_len, eos, sink)
    want = math.ceil(tokens / ctx_len) if tokens else len(rows)
    return [rows[i] for i in _row_order(len(rows), want, seed)]


@contextlib.contextmanager
def _quiet(quiet: bool):
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _stop_after(handle, layer: int):
    """Run only blocks 0..layer: nothing above the site changes its activations, and on a small model
    the blocks above and the unembedding cost most of a forward pass. The block list is swapped for a
    shorter one holding the same modules (so hookpoint names stay valid) and put back."""
    from torch import nn

    parent_path, _, name = handle.adapter.layers_path.rpartition(".")
    parent = handle.model.get_submodule(parent_path) if parent_path else handle.model
    full = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(full)[:layer + 1]))
    try:
        yield
    finally:
        setattr(parent, name, full)


@contextlib.contextmanager
def _process_state(model):
    """sparsify's Trainer.fit freezes the model and sets the matmul precision; undo both."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _import_sparsify():
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # sparsify announces its decoder kernel on import
            import sparsify
        return sparsify
    except ImportError as e:
        raise KnoweditError(f"training SAEs needs EleutherAI's sparsify (pip install eai-sparsify): {e}") from None


# --------------------------------------------------------------------------------------------------
# The activation store


@dataclass
class Activations:
    """The site's activations at every kept position of the distinct training rows, row after row.
    ``x`` is what the coder reads; ``y`` what it must reproduce (None for an autoencoder: ``x``)."""
    x: torch.Tensor                 # [N, d_in], float16/float32, in memory or memory-mapped
    y: torch.Tensor | None          # [N, d_out] for a transcoder
    row_ends: torch.Tensor          # [n_rows] int64: cumulative kept positions, row by row
    ctx_len: int
    rows_digest: str                # sha256 of the rows' token ids (what resumed checkpoints must match)
    seconds: float
    forwards: int                   # model forward calls spent reading (one per batch of rows)
    files: tuple = ()               # memory-mapped files backing x / y, deleted by ``close``

    @property
    def n_tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_rows(self) -> int:
        return len(self.row_ends)

    @property
    def where(self) -> str:
        return "memory-mapped file" if self.files else "memory"

    def close(self) -> None:
        self.x = self.y = None
        for f in self.files:
            with contextlib.suppress(OSError):
                os.unlink(f)
        self.files = ()


def _digest(rows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(torch.tensor(r, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _store(n: int, d: int, dtype: torch.dtype, spill: Path | None, tag: str) -> tuple[torch.Tensor, str | None]:
    if spill is None:
        return torch.empty(n, d, dtype=dtype), None
    import numpy as np
    spill.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"acts-{tag}-", suffix=".bin", dir=spill)
    os.close(fd)
    mm = np.memmap(path, dtype=np.float16 if dtype == torch.float16 else np.float32, mode="w+", shape=(n, d))
    return torch.from_numpy(mm), path


@torch.no_grad()
def read_activations(handle, site: Site | str, rows: list[list[int]], *, kind: str = "sae",
                     exclude: list[int] = (), batch_size: int = 16, dtype: str = "float16",
                     max_memory: int = MAX_MEMORY, spill_dir: Path | None = None,
                     progress: Callable[[str], None] | None = None) -> Activations:
    """Run the model once over ``rows`` (equal-length token-id rows; blocks up to the site only, in
    batches of ``batch_size`` rows, as sparsify's trainer runs its base model) and keep the site's
    activations at every position whose token is not in ``exclude``. Above ``max_memory`` bytes the
    store is a memory-mapped file under ``spill_dir`` (default: the cache root's ``sae-activations``)."""
    site = site if isinstance(site, Site) else Site.parse(site)
    if dtype not in ACT_DTYPES:
        raise KnoweditError(f"activation dtype: {dtype!r}; use float16 or float32")
    if not rows or len({len(r) for r in rows}) != 1:
        raise KnoweditError("read_activations: give at least one row, all of one length")
    t0 = time.perf_counter()
    a = handle.adapter
    module = a.block(site.layer) if site.kind == "r" else a.mlp(site.layer)
    ids = torch.tensor(rows, dtype=torch.long)
    keep = ~torch.isin(ids, torch.tensor(list(exclude), dtype=torch.long))
    row_ends = keep.sum(1).cumsum(0)
    n = int(row_ends[-1]) if len(row_ends) else 0
    if n == 0:
        raise KnoweditError("training text: every position is an excluded token; nothing to train on")
    d = a.d_model
    t = ACT_DTYPES[dtype]
    size = n * d * t.itemsize * (2 if kind == "transcoder" else 1)
    spill = None
    if size > max_memory:
        from ..models.cache import cache_root
        spill = Path(spill_dir) if spill_dir is not None else cache_root() / "sae-activations"
        if progress:
            progress(f"activations: {size / 2 ** 30:.1f} GiB is more than {max_memory / 2 ** 30:.1f} GiB; "
                     f"storing them in a memory-mapped file under {spill}")
    files = []
    x, f = _store(n, d, t, spill, "x")
    files += [f] if f else []
    y = None
    if kind == "transcoder":
        y, f = _store(n, d, t, spill, "y")
        files += [f] if f else []
    cur = {}

    def grab(mod, args, kwargs, out):
        out = out[0] if isinstance(out, tuple) else out
        m = cur["mask"]
        o = out[m]
        i = (args[0] if args else next(iter(kwargs.values())))[m] if kind == "transcoder" else o
        for name, v in (("input", i), ("output", o)):
            if t == torch.float16 and v.numel() and float(v.abs().max()) > _FP16_MAX:
                raise KnoweditError(f"activations at {site}: the {name} exceeds float16's range; read them "
                                    "in float32 (act_dtype='float32')")
        lo, hi = cur["lo"], cur["lo"] + o.shape[0]
        x[lo:hi] = i.to("cpu", t)
        if y is not None:
            y[lo:hi] = o.to("cpu", t)
        cur["lo"] = hi

    base = getattr(handle.model, "base_model", handle.model)
    forwards = 0
    last = time.perf_counter()
    try:
        with _stop_after(handle, site.layer):
            hook = module.register_forward_hook(grab, with_kwargs=True)
            try:
                cur["lo"] = 0
                for s in range(0, len(rows), batch_size):
                    cur["mask"] = keep[s:s + batch_size].to(handle.device)
                    base(ids[s:s + batch_size].to(handle.device))
                    forwards += 1
                    if progress and time.perf_counter() - last > 30:
                        last = time.perf_counter()
                        done = min(s + batch_size, len(rows))
                        progress(f"reading activations at {site}: {done}/{len(rows)} rows, "
                                 f"{time.perf_counter() - t0:.0f} s")
            finally:
                hook.remove()
    except BaseException:
        for f in files:
            with contextlib.suppress(OSError):
                os.unlink(f)
        raise
    assert cur["lo"] == n
    return Activations(x, y, row_ends, len(rows[0]), _digest(rows), time.perf_counter() - t0, forwards,
                       tuple(files))


# --------------------------------------------------------------------------------------------------
# Training on the store


def default_lr(optimizer: str, width: int) -> float:
    """sparsify's learning rate when none is given (``Trainer.__init__``)."""
    scale = (width / 2 ** 14) ** 0.5
    return {"signum": 5e-3 / scale, "adam": 2e-4 / scale, "muon": 2e-3}[optimizer]


class _Schedule:
    """Which cached positions each optimiser step reads."""

    def __init__(self, acts: Activations, shuffle: str, batch_size: int, tokens: int | None, seed: int):
        self.acts, self.shuffle, self.seed = acts, shuffle, seed
        ends = acts.row_ends
        self.starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        if shuffle == "rows":      # sparsify's trainer: ``batch_size`` whole rows per step, rows as _rows orders them
            want = math.ceil(tokens / acts.ctx_len) if tokens else acts.n_rows
            self.order = _row_order(acts.n_rows, want, seed)
            self.steps = math.ceil(want / batch_size)
            self.rows_per_step = batch_size
            self.sched_steps = max(want // batch_size, 1)   # sparsify's num_batches (for the LR schedules)
            self.tokens = want * acts.ctx_len               # positions read, counted as sparsify counts rows
        else:                      # ``batch_size * ctx_len`` positions per step from a reshuffled stream
            self.total = tokens or acts.n_tokens
            self.per_step = batch_size * acts.ctx_len
            self.steps = math.ceil(self.total / self.per_step)
            self.sched_steps = self.steps
            self.tokens = self.total
            self._perm = (-1, None)

    def _perm_of(self, p: int) -> torch.Tensor:
        if self._perm[0] != p:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
            self._perm = (p, torch.randperm(self.acts.n_tokens, generator=g))
        return self._perm[1]

    def index(self, step: int) -> torch.Tensor:
        if self.shuffle == "rows":
            rows = self.order[step * self.rows_per_step:(step + 1) * self.rows_per_step]
            return torch.cat([torch.arange(int(self.starts[r]), int(self.acts.row_ends[r])) for r in rows])
        n = self.acts.n_tokens
        lo, hi = step * self.per_step, min((step + 1) * self.per_step, self.total)
        parts = []
        while lo < hi:
            p, off = divmod(lo, n)
            take = min(hi - lo, n - off)
            parts.append(self._perm_of(p)[off:off + take])
            lo += take
        return torch.cat(parts)

    def passes(self, step: int) -> float:
        done = self.tokens_done(step)
        if self.shuffle == "rows":
            return done / (self.acts.n_rows * self.acts.ctx_len)
        return done / self.acts.n_tokens

    def tokens_done(self, step: int) -> int:
        if self.shuffle == "rows":
            return min(step * self.rows_per_step, len(self.order)) * self.acts.ctx_len
        return min(step * self.per_step, self.total)


def _optimizers(coder, optimizer: str, lr: float, sched_steps: int):
    """sparsify's optimizers and schedules for one coder (``Trainer.__init__``)."""
    from transformers import get_linear_schedule_with_warmup

    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD
        opt = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
        opt.train()
        return [opt], []
    if optimizer == "adam":
        adam = torch.optim.Adam([{"params": coder.parameters(), "lr": lr}])
        return [adam], [get_linear_schedule_with_warmup(adam, 1000, sched_steps)]
    from sparsify.muon import Muon
    params = list(coder.parameters())
    mats = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opts = [Muon(mats, lr=lr, ddp=False), torch.optim.Adam(rest, lr=lr)]
    return opts, [get_linear_schedule_with_warmup(opts[0], 0, sched_steps),
                  get_linear_schedule_with_warmup(opts[1], 1000, sched_steps)]


def _to_sae(coder, opts, kind: str) -> SAE:
    """The coder's weights as an SAE: for signum the schedule-free average (what sparsify's checkpoints
    hold); the training point is put back bit-exactly afterwards."""
    from schedulefree import ScheduleFreeWrapper
    sf = [o for o in opts if isinstance(o, ScheduleFreeWrapper)]
    keep = [p.detach().clone() for p in coder.parameters()] if sf else None
    for o in sf:
        o.eval()
    try:
        enc = coder.encoder
        cfg = {**coder.cfg.to_dict(), "d_in": coder.d_in}
        return SAE(W_enc=enc.weight.detach().T.clone().float().cpu(), b_enc=enc.bias.detach().clone().float().cpu(),
                   W_dec=coder.W_dec.detach().clone().float().cpu(), b_dec=coder.b_dec.detach().clone().float().cpu(),
                   activation=coder.cfg.activation, k=coder.cfg.k, b_dec_to_input=kind == "sae", kind=kind,
                   source={"format": "sparsify", "config": cfg})
    finally:
        if sf:
            with torch.no_grad():
                for p, v in zip(coder.parameters(), keep):
                    p.copy_(v)
            for o in sf:
                o.train_mode = True   # the parameters hold the training point again (ScheduleFreeWrapper.train)


def _save_state(path: Path, state: dict) -> None:
    from ..models.cache import atomic_write_bytes
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _settings(kind, k, expansion, tokens, batch_size, seed, lr, auxk_alpha, optimizer, shuffle, dead_after,
              ctx_len, rows_digest, act_dtype, key) -> dict:
    """What a training checkpoint must match to be resumed."""
    return {"kind": kind, "k": k, "expansion": expansion, "tokens": tokens, "batch_size": batch_size, "seed": seed,
            "lr": lr, "auxk_alpha": auxk_alpha, "optimizer": optimizer, "shuffle": shuffle, "dead_after": dead_after,
            "ctx_len": ctx_len, "rows": rows_digest, "act_dtype": str(act_dtype), **(key or {})}


def check_resumable(checkpoint: Path, settings: dict, state: dict | None = None) -> None:
    """An error, before any work, when ``checkpoint`` exists but comes from other settings or text."""
    if state is None:
        if not Path(checkpoint).is_file():
            return
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    old = state.get("settings", {})
    if old != settings:
        diff = sorted(k for k in set(settings) | set(old) if settings.get(k) != old.get(k))
        raise KnoweditError(f"{checkpoint}: a training checkpoint from other settings or text ({', '.join(diff)} "
                            "differ); delete it to start afresh, or rerun with the same settings to resume")


def fit_cached(acts: Activations, *, kind: str = "sae", k: int = 32, expansion: int = 16, tokens: int | None = None,
               batch_size: int = 8, seed: int = 0, lr: float | None = None, auxk_alpha: float = 0.0,
               optimizer: str = "signum", shuffle: str = "tokens", dead_after: int | None = None,
               device="cpu", checkpoint: Path | None = None, checkpoint_every: int | None = None,
               on_checkpoint: Callable[[SAE, dict], None] | None = None, log_every: int = 50_000,
               progress: Callable[[str], None] | None = None, key: dict | None = None) -> tuple[SAE, dict]:
    """Train a sparsify ``SparseCoder`` on ``acts`` (see the module docstring). ``tokens``: positions to
    train on (default: one pass). ``dead_after``: a latent that has not fired for this many training
    tokens is dead (for AuxK, when ``auxk_alpha > 0``, and for the progress lines); default one pass over
    the store, at most sparsify's 10M. ``checkpoint``: a state file written every ``checkpoint_every``
    tokens and at the end, and resumed from when present (it must come from the same settings and rows:
    ``key``); ``on_checkpoint(sae, info)`` then gets the SAE as it stands."""
    sp = _import_sparsify()
    from sparsify import SparseCoderConfig
    if optimizer not in OPTIMIZERS:
        raise KnoweditError(f"optimizer: {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if shuffle not in SHUFFLES:
        raise KnoweditError(f"shuffle: {shuffle!r}; use 'tokens' or 'rows'")
    if tokens is not None and tokens <= 0:
        raise KnoweditError(f"tokens: {tokens}; give a positive number")
    transcode = kind == "transcoder"
    d_in = acts.x.shape[1]
    sched = _Schedule(acts, shuffle, batch_size, tokens, seed)
    dead_after = dead_after or min(SPARSIFY_DEAD_AFTER, acts.n_tokens)
    settings = _settings(kind, k, expansion, tokens, batch_size, seed, lr, auxk_alpha, optimizer, shuffle,
                         dead_after, acts.ctx_len, acts.rows_digest, acts.x.dtype, key)

    torch.manual_seed(seed)   # as sparsify's Trainer seeds each coder's initialisation
    coder = sp.SparseCoder(d_in, SparseCoderConfig(k=k, expansion_factor=expansion, transcode=transcode),
                           device, dtype=torch.float32)
    width = coder.num_latents
    if k > width:
        raise KnoweditError(f"k: {k} is more than the SAE's {width} latents")
    lr_used = lr if lr is not None else default_lr(optimizer, width)
    opts, scheds = _optimizers(coder, optimizer, lr_used, sched.sched_steps)
    counts = torch.zeros(width, dtype=torch.long, device=device)   # tokens since each latent last fired
    fired = torch.zeros(width, dtype=torch.bool, device=device)
    start, seconds_before, log = 0, 0.0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        st = torch.load(checkpoint, map_location=device, weights_only=True)
        check_resumable(checkpoint, settings, st)
        coder.load_state_dict(st["coder"])
        for o, s in zip(opts, st["optimizers"]):
            o.load_state_dict(s)
        for s_, s in zip(scheds, st["schedulers"]):
            s_.load_state_dict(s)
        counts.copy_(st["counts"])
        start, seconds_before, log = st["step"], st["seconds"], st["log"]
        if progress and start < sched.steps:
            progress(f"resuming from {checkpoint} at step {start}/{sched.steps} "
                     f"({sched.tokens_done(start):,} tokens)")
    normalize = coder.cfg.normalize_decoder and not transcode
    every = max(1, round(checkpoint_every / (sched.tokens / sched.steps))) if checkpoint_every else None
    log_steps = max(1, round(log_every / (sched.tokens / sched.steps))) if log_every else None
    fvu_sum, fvu_n = 0.0, 0
    t0 = time.perf_counter()

    def info_now(step):
        return {"steps": step, "tokens_done": sched.tokens_done(step), "passes": round(sched.passes(step), 3),
                "dead_share": float((counts > dead_after).float().mean()), "dead_after": dead_after,
                "seconds": round(seconds_before + time.perf_counter() - t0, 1), "log": log}

    def save(step):
        state = {"settings": settings, "step": step, "coder": coder.state_dict(),
                 "optimizers": [o.state_dict() for o in opts], "schedulers": [s.state_dict() for s in scheds],
                 "counts": counts.cpu(), "seconds": seconds_before + time.perf_counter() - t0, "log": log}
        _save_state(Path(checkpoint), state)
        if on_checkpoint is not None:
            on_checkpoint(_to_sae(coder, opts, kind), info_now(step))

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")   # as sparsify's fit (TF32 where there is a GPU)
    try:
        for step in range(start, sched.steps):
            idx = sched.index(step)
            x = acts.x[idx].to(device, torch.float32)
            y = acts.y[idx].to(device, torch.float32) if transcode else x
            if step == 0:   # centre the pre-activations at initialisation (sparsify: first batch's mean)
                with torch.no_grad():
                    if transcode:
                        coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
                    coder.b_dec.data = y.mean(0)
            if normalize:
                coder.set_decoder_norm_to_unit_norm()
            dead = counts > dead_after if auxk_alpha > 0 else None
            out = coder(x=x, y=y, dead_mask=dead)
            fired[out.latent_indices.flatten()] = True
            (out.fvu + auxk_alpha * out.auxk_loss).backward()
            if normalize:
                coder.remove_gradient_parallel_to_decoder_directions()
            for o in opts:
                o.step()
                o.zero_grad()
            for s in scheds:
                s.step()
            with torch.no_grad():
                counts += len(idx)
                counts[fired] = 0
                fired.zero_()
            fvu_sum += float(out.fvu.detach())
            fvu_n += 1
            done = step + 1
            if log_steps and (done % log_steps == 0 or done == sched.steps):
                i = info_now(done)
                log.append({"tokens": i["tokens_done"], "fvu": round(fvu_sum / fvu_n, 4),
                            "dead_share": round(i["dead_share"], 4)})
                if progress:
                    el = i["seconds"]
                    eta = el / (done - start) * (sched.steps - done) if done > start else 0
                    progress(f"{i['tokens_done']:,}/{sched.tokens:,} tokens ({i['passes']:.2f} passes): "
                             f"FVU {fvu_sum / fvu_n:.4f}, dead {i['dead_share']:.1%} (no firing in {dead_after:,} "
                             f"tokens), {el:.0f} s, about {eta:.0f} s to go")
                fvu_sum, fvu_n = 0.0, 0
            if checkpoint is not None and every and done % every == 0 and done < sched.steps:
                save(done)
        if checkpoint is not None and start < sched.steps:
            save(sched.steps)
    finally:
        torch.set_float32_matmul_precision(precision)
    sae = _to_sae(coder, opts, kind)
    i = info_now(sched.steps)
    info = {"trainer": "knowedit loop on cached activations (sparsify SparseCoder, optimizer and method)",
            "activations": "cache", "shuffle": shuffle, "tokens": sched.tokens, "steps": sched.steps,
            "passes": i["passes"], "distinct_tokens": acts.n_tokens, "distinct_rows": acts.n_rows,
            "optimizer": optimizer, "lr": lr_used, "lr_rule": "given" if lr is not None else "sparsify default",
            "auxk_alpha": auxk_alpha, "dead_after": dead_after, "dead_share_train": round(i["dead_share"], 4),
            "train_seconds": i["seconds"], "resumed_at_step": start or None, "log": log}
    return sae, info


# --------------------------------------------------------------------------------------------------
# The entry point


def train_sae(handle, site: Site | str, ids: list[list[int]], *, kind: str = "sae", k: int = 32,
              expansion: int = 16, tokens: int | None = None, ctx_len: int = 128, batch_size: int = 8,
              seed: int = 0, lr: float | None = None, auxk_alpha: float = 0.0, quiet: bool = False,
              activations: str = "cache", shuffle: str = "tokens", optimizer: str = "signum",
              dead_after: int | None = None, act_dtype: str = "float16", max_memory: int = MAX_MEMORY,
              read_batch: int = 16, checkpoint: Path | None = None, checkpoint_every: int | None = None,
              on_checkpoint: Callable[[SAE, dict], None] | None = None, log_every: int = 50_000,
              progress: Callable[[str], None] | None = None) -> tuple[SAE, dict]:
    """Train a TopK SAE (``kind='sae'``) on the site's activations, or a transcoder of MLP L
    (``kind='transcoder'``, site ``m{L}``), on ``tokens`` tokens of ``ids`` (default: each row once).
    Returns the SAE (for signum, the schedule-free average, as sparsify's checkpoints hold it) and the
    training facts for the SAE's card. See the module docstring for ``activations`` and ``shuffle``;
    ``progress`` (default ``print`` unless ``quiet``) gets the progress lines."""
    site = site if isinstance(site, Site) else Site.parse(site)
    if kind not in KINDS:
        raise KnoweditError(f"kind: {kind!r}; use 'sae' or 'transcoder'")
    if kind == "transcoder" and site.kind != "m":
        raise KnoweditError(f"site {site}: a transcoder predicts an MLP's output from its input; give an MLP site "
                            f"such as 'm{site.layer}' (hookpoint 'layers.{site.layer}.mlp')")
    for name, v in (("k", k), ("expansion", expansion), ("ctx_len", ctx_len), ("batch_size", batch_size),
                    ("read_batch", read_batch)):
        if not isinstance(v, int) or v <= 0:
            raise KnoweditError(f"{name}: {v!r}; give a positive integer")
    if activations not in ("cache", "stream"):
        raise KnoweditError(f"activations: {activations!r}; use 'cache' or 'stream'")
    if optimizer not in OPTIMIZERS:
        raise KnoweditError(f"optimizer: {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if shuffle not in SHUFFLES:
        raise KnoweditError(f"shuffle: {shuffle!r}; use 'tokens' or 'rows'")
    if tokens is not None and (not isinstance(tokens, int) or tokens <= 0):
        raise KnoweditError(f"tokens: {tokens!r}; give a positive number of tokens")
    width = expansion * handle.adapter.d_model
    if k > width:
        raise KnoweditError(f"k: {k} is more than the SAE's {width} latents")
    sp = _import_sparsify()
    hookpoint = sparsify_hookpoint(handle, site)
    tok = handle.tokenizer
    sink = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if sink is None:
        raise KnoweditError("tokenizer: it has neither a BOS nor an EOS token to start training rows with")
    if ctx_len < 2:
        raise KnoweditError(f"ctx_len: {ctx_len}; a row needs its sink token and at least one text token")
    say = progress if progress is not None else (None if quiet else lambda m: print(m, flush=True))
    common = {"hookpoint": hookpoint, "site": str(site), "kind": kind, "k": k, "expansion": expansion,
              "width": width, "ctx_len": ctx_len, "batch_size": batch_size, "seed": seed,
              "row_start": {"token_id": sink, "token": tok.decode([sink]), "excluded": True}}
    t0 = time.perf_counter()
    if activations == "stream":
        sae, info = _train_stream(sp, handle, site, hookpoint, ids, kind, k, expansion, tokens, ctx_len,
                                  batch_size, seed, lr, auxk_alpha, optimizer, sink, quiet)
    else:
        rows = _distinct_rows(ids, ctx_len, tok.eos_token_id, sink)
        key = {"fingerprint": getattr(handle, "fingerprint", None), "hookpoint": hookpoint}
        if checkpoint is not None:   # a checkpoint from other settings is refused before the model runs
            n_kept = sum(sum(t != sink for t in r) for r in rows)
            check_resumable(checkpoint, _settings(
                kind, k, expansion, tokens, batch_size, seed, lr, auxk_alpha, optimizer, shuffle,
                dead_after or min(SPARSIFY_DEAD_AFTER, n_kept), ctx_len, _digest(rows), ACT_DTYPES.get(act_dtype), key))
        if say:
            say(f"reading the activations at {site} ({hookpoint}) once: {len(rows)} rows x {ctx_len} tokens")
        acts = read_activations(handle, site, rows, kind=kind, exclude=[sink], batch_size=read_batch,
                                dtype=act_dtype, max_memory=max_memory, progress=say)
        try:
            if say:
                say(f"read {acts.n_tokens:,} activations in {acts.seconds:.0f} s ({acts.forwards} forward calls, "
                    f"{acts.x.dtype}, in {acts.where}); training")
            sae, info = fit_cached(acts, kind=kind, k=k, expansion=expansion, tokens=tokens, batch_size=batch_size,
                                   seed=seed, lr=lr, auxk_alpha=auxk_alpha, optimizer=optimizer, shuffle=shuffle,
                                   dead_after=dead_after, device=handle.device, checkpoint=checkpoint,
                                   checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint,
                                   log_every=log_every, progress=say, key=key)
            info.update({"act_dtype": act_dtype, "act_store": acts.where, "read_seconds": round(acts.seconds, 1),
                         "read_forwards": acts.forwards, "rows": acts.n_rows})
        finally:
            acts.close()
    sae.hookpoint, sae.site = hookpoint, site
    sae.source.pop("path", None)
    info = {**common, **info, "seconds": round(time.perf_counter() - t0, 1)}
    return sae, info


def _train_stream(sp, handle, site, hookpoint, ids, kind, k, expansion, tokens, ctx_len, batch_size, seed, lr,
                  auxk_alpha, optimizer, sink, quiet) -> tuple[SAE, dict]:
    """sparsify's own Trainer, recomputing the activations for every row."""
    from datasets import Dataset

    rows = _rows(ids, ctx_len, handle.tokenizer.eos_token_id, sink, tokens, seed)
    data = Dataset.from_dict({"input_ids": rows}).with_format("torch")
    cfg = sp.TrainConfig(sp.SparseCoderConfig(k=k, expansion_factor=expansion, transcode=kind == "transcoder"),
                         batch_size=batch_size, hookpoints=[hookpoint], init_seeds=[seed], lr=lr,
                         auxk_alpha=auxk_alpha, optimizer=optimizer, exclude_tokens=[sink], log_to_wandb=False,
                         save_every=10 ** 9, run_name="run")
    # sparsify's hookpoints are relative to the base model, which is all the trainer needs to run
    base = getattr(handle.model, "base_model", handle.model)
    with tempfile.TemporaryDirectory(prefix="knowedit-sae-") as tmp, _process_state(handle.model), \
            _stop_after(handle, site.layer), _quiet(quiet):
        cfg.save_dir = tmp
        trainer = sp.Trainer(cfg, data, base)
        trainer.fit()
        sae = read_sparsify(Path(tmp) / "run" / hookpoint)
    return sae, {"trainer": "sparsify Trainer (activations recomputed for every row)", "activations": "stream",
                 "shuffle": "rows", "tokens": len(rows) * ctx_len, "rows": len(rows), "optimizer": optimizer,
                 "lr": lr if lr is not None else "sparsify default", "auxk_alpha": auxk_alpha}

