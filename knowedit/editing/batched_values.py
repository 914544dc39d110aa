"""The optimisation of the residual change δ (ROME's v*, MEMIT's z), for one request or a batch of them.

As in the reference implementations, a request's loss is the target NLL over its context rows
+ kl_factor · KL(edited ‖ original) of the next-token distribution at the subject's last token of its
KL rows + v_weight_decay · ‖δ‖ / ‖v₀‖², with ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖ after every step (v₀: the
output of the edited site at the subject's last token of the bare prompt). The NLL is read at the output
of layer ``v_loss_layer``. At most ``v_num_grad_steps`` forward passes; a request stops once its whole
loss is below ``v_stop_loss``.

In a batch, request i has its own row δ_i, added at the subject's last token of its own rows only, and
all rows run in one forward per step. Everything else stays per request: NLL, KL against its own
unedited distribution, weight decay, clamp and early stop. The summed loss has, in δ_i, the gradient of
request i's own loss, and Adam works element by element, so δ_i is the δ it gets alone, up to the
float error of a larger batch (a batch of one computes exactly what the one-request loop did). A request that stops keeps the δ it had then:
its δ is read out, and its rows leave the batch (their cached columns are picked out of the cache,
not recomputed); its row of Adam's parameter, which momentum would still move, is never read again.
With ``cache_before_subject`` all rows of the batch share one subject column S, the latest one.

Batching saves per-forward overhead and the inefficiency of small matrix products, not arithmetic: on
a 2-core CPU, where one request's ~30 step tokens already keep a core busy, 100 CounterFact records
run about 1.5x faster batched (benchmarks/bench_batched_values.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..hooks.hookset import HookSet
from .fields import field
from .keys_values import Rows, _out, _Read, _with, read_at_subject, stack_rows
from .subject_aligned import Aligned, SuffixRunner, align, unaligned


@dataclass
class DeltaSettings:
    steps: int
    lr: float
    weight_decay: float
    clamp: float
    kl_factor: float
    loss_layer: int
    stop_loss: float
    cache: bool


def delta_settings(handle, hp: dict) -> DeltaSettings:
    n = handle.adapter.n_layers
    steps = field(hp, "v_num_grad_steps", int, lambda v: v >= 1, "at least one step")
    lr = field(hp, "v_lr", float, lambda v: v > 0)
    wd = field(hp, "v_weight_decay", float, lambda v: v >= 0)
    clamp = field(hp, "clamp_norm_factor", float, lambda v: v > 0)
    kl_factor = field(hp, "kl_factor", float, lambda v: v >= 0)
    loss_layer = field(hp, "v_loss_layer", int, lambda v: -n <= v < n, f"the model has {n} layers")
    stop_loss = field(hp, "v_stop_loss", float, lambda v: v >= 0)
    return DeltaSettings(steps, lr, wd, clamp, kl_factor, loss_layer % n, stop_loss,
                         field(hp, "cache_before_subject", bool))


@dataclass
class _Layout:
    """Where each δ enters and where the loss is read, in a batch holding the rows of requests
    ``reqs`` (indices into δ), request by request."""

    reqs: list[int]
    row_req: torch.Tensor   # [B] the request (index into δ) of each row
    onehot: torch.Tensor    # [B, W - S, 1] each row's subject column
    tr: torch.Tensor        # target tokens: row, suffix column and id
    tp: torch.Tensor
    tid: torch.Tensor
    kl_rows: torch.Tensor   # KL rows and their subject columns
    kl_at: torch.Tensor
    spans: list[tuple[int, int, int, int]]  # per request: its slices of the target tokens and KL rows


def _layout(parts: list[Rows], reqs: list[int], al: Aligned) -> _Layout:
    """The layout of ``al``, whose rows are those of ``parts[i]`` for i in ``reqs``, in that order."""
    dev = al.input_ids.device
    tr, tpos, tid, kl, row_req, spans = [], [], [], [], [], []
    for i in reqs:
        p, o = parts[i], len(row_req)
        t0, k0 = len(tr), len(kl)
        for r, ps in enumerate(p.target_pos):
            tr += [o + r] * len(ps)
            tpos += ps
            tid += p.target_ids[:len(ps)]
        kl += range(o + p.n_context, o + p.input_ids.shape[0])
        row_req += [i] * p.input_ids.shape[0]
        spans.append((t0, len(tr), k0, len(kl)))
    B = len(row_req)
    subj = torch.cat([parts[i].subject_pos for i in reqs]).to(dev)
    idx = torch.arange(B, device=dev)
    # one-hot of δ's column, so δ enters the graph without in-place writes
    onehot = torch.zeros(B, al.input_ids.shape[1] - al.S, 1, device=dev)
    onehot[idx, al.col(idx, subj)] = 1.0
    tr = torch.tensor(tr, dtype=torch.long, device=dev)
    kl = torch.tensor(kl, dtype=torch.long, device=dev)
    return _Layout(reqs, torch.tensor(row_req, device=dev), onehot, tr,
                   al.col(tr, torch.tensor(tpos, dtype=torch.long, device=dev)),
                   torch.tensor(tid, dtype=torch.long, device=dev), kl, al.col(kl, subj[kl]), spans)


@contextlib.contextmanager
def _frozen(model):
    """No parameter gradients (only δ's are needed); the flags are restored afterwards."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def optimise_deltas(handle, rows: list[Rows], site, hp: dict,
                    v0: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
    """δ for each request, ``[n, d_model]`` float64, where ``rows[i]`` are request i's rows (from
    :func:`~knowedit.editing.keys_values.build_rows`), all in one batch; and an info dict per request
    (steps, nll, kl, weight_decay and loss of its last forward, delta_norm, v0_norm, and the batch's
    cached_columns and step_columns). ``v0``: ``[n, d_model]``, the site outputs on the bare prompts,
    when already read."""
    a = handle.adapter
    s = delta_settings(handle, hp)
    n = len(rows)
    pad = handle.tokenizer.pad_token_id
    if v0 is None:   # each request's first row is its bare prompt
        _, v0 = read_at_subject(handle, rows[0] if n == 1 else stack_rows(rows, pad, lambda r: 1), site=site)
    v0 = v0[:n].float()
    batch = rows[0] if n == 1 else stack_rows(rows, pad)
    al = (align(batch.input_ids, batch.attention_mask, batch.subject_pos, pad) if s.cache
          else unaligned(batch.input_ids, batch.attention_mask))
    lay = _layout(rows, list(range(n)), al)
    delta = torch.zeros(n, a.d_model, requires_grad=True, device=al.input_ids.device)
    state = {}

    def add_delta(m, args, o):
        h = _out(o)
        # one request: a broadcast, whose gradient sums over the rows exactly as before batching
        d = delta[0] if n == 1 else delta[lay.row_req][:, None]
        return _with(o, h + lay.onehot.to(h.dtype) * d.to(h.dtype))

    def grab(m, args, o):
        state["h"] = _out(o)
        raise _Read   # the layers above the loss layer are not needed

    def head(h):
        return a.unembed(a.ln_final(h)).float().log_softmax(-1)

    infos = [{"steps": 0, "cached_columns": al.S, "step_columns": al.input_ids.shape[1] - al.S} for _ in rows]
    out = torch.zeros(n, a.d_model, dtype=torch.float64, device=delta.device)
    ref = {}   # per request: the unedited log-probabilities of its KL rows
    opt = torch.optim.Adam([delta], lr=s.lr)
    use_kl = s.kl_factor > 0 and len(lay.kl_rows) > 0
    with _frozen(handle.model):
        run = SuffixRunner(handle.model, al)  # the cached columns, before δ's hook is in place
        with HookSet() as hs:
            hs.post(site, add_delta)  # before grab: the site may be the loss layer itself
            hs.post(a.block(s.loss_layer), grab)
            for step in range(s.steps):
                try:
                    run()
                except _Read:
                    pass
                h = state.pop("h")
                # one unembedding for the target and KL rows: it streams the whole vocabulary matrix
                lp = head(h[torch.cat([lay.tr, lay.kl_rows]), torch.cat([lay.tp, lay.kl_at])] if use_kl
                          else h[lay.tr, lay.tp])
                lpk = lp[len(lay.tr):]
                losses, active = [], []
                for i, (t0, t1, k0, k1) in zip(lay.reqs, lay.spans):
                    r = rows[i]
                    nll = -lp[t0:t1].gather(1, lay.tid[t0:t1, None]).sum() / r.n_context / len(r.target_ids)
                    loss = nll
                    kl = torch.zeros(())
                    if use_kl and k1 > k0:
                        if i not in ref:  # the first pass runs with δ = 0: the unedited distribution
                            ref[i] = lpk[k0:k1].detach()
                        # kl_div(input, target) = KL(target ‖ input): here KL(edited ‖ original)
                        kl = torch.nn.functional.kl_div(ref[i], lpk[k0:k1], log_target=True, reduction="batchmean")
                        loss = loss + s.kl_factor * kl
                    decay = s.weight_decay * delta[i].norm() / v0[i].norm() ** 2
                    loss = loss + decay
                    infos[i].update(nll=float(nll.detach()), kl=float(kl.detach()),
                                    weight_decay=float(decay.detach()), loss=float(loss.detach()), steps=step)
                    if infos[i]["loss"] < s.stop_loss or step == s.steps - 1:
                        out[i] = delta[i].detach().double()
                        infos[i].update(delta_norm=float(delta[i].detach().norm()), v0_norm=float(v0[i].norm()))
                    else:
                        losses.append(loss)
                        active.append(i)
                if not active:
                    break
                opt.zero_grad()
                torch.stack(losses).sum().backward()
                opt.step()
                with torch.no_grad():
                    for i in active:
                        limit = s.clamp * v0[i].norm()
                        if delta[i].norm() > limit:
                            delta[i].mul_(limit / delta[i].norm())
                if len(active) < len(lay.reqs):   # the stopped requests' rows leave the batch
                    keep = torch.isin(lay.row_req, torch.tensor(active, device=delta.device)).nonzero()[:, 0]
                    run = run.select(keep)
                    lay = _layout(rows, active, run.al)
    return out, infos


def optimise_in_batches(handle, rows: list[Rows], site, hp: dict, batch_size: int,
                        desc: str = "δ batches") -> tuple[list[torch.Tensor], list[dict]]:
    """:func:`optimise_deltas` for many requests, ``batch_size`` at a time, in the order of ``rows``.
    Requests whose rows need about as many step columns share a batch, so little of it is padding."""
    from tqdm.auto import tqdm

    cache = delta_settings(handle, hp).cache

    def width(r):   # the columns a step runs for these rows alone
        n = r.attention_mask.sum(1)
        return int((n - r.subject_pos).max()) if cache else int(n.max()), int(n.max())

    order = sorted(range(len(rows)), key=lambda i: width(rows[i]))
    deltas, infos = [None] * len(rows), [None] * len(rows)
    for c in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        idx = order[c:c + batch_size]
        d, inf = optimise_deltas(handle, [rows[i] for i in idx], site, hp)
        for j, i in enumerate(idx):
            deltas[i], infos[i] = d[j], inf[j]
    return deltas, infos
