"""What ROME and MEMIT share: prefix contexts, keys at the subject's last token, and the
optimisation of the residual change δ that makes the model say the new target.

Prefix contexts follow the reference generator: texts sampled from the model itself with top-5
sampling (seeded, so the same seed gives the same prefixes), each followed by ". " and the prompt,
plus the bare prompt. ``context_template_length_params`` lists ``[length, count]`` pairs; as in ROME's
``max_out_len``, ``length`` counts the start word's tokens too, and the ``count`` prefixes of one
length cycle through the start words. ROME uses [[5, 10], [10, 10]]; MEMIT [[10, 5]].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KnoweditError
from ..models.handle import Batch
from ..hooks.hookset import HookSet
from .fields import field
from .request import EditRequest
from .subject_aligned import SuffixRunner, align, unaligned

_PREFIX_STARTS = ["The", "Therefore", "Because", "I", "You"]
_PREFIX_TOP_K = 5   # the reference generator's sampling
_prefix_cache: dict[tuple, list[list[str]]] = {}


def prefix_groups(handle, hp: dict) -> list[list[str]]:
    """``[[""], prefixes of the first length, ...]``: one group per context type, cached per model and
    settings. ``""`` is the bare prompt."""
    spec = field(hp, "context_template_length_params", list)
    seed = int(hp.get("seed", 0) or 0)
    pairs = []
    for x in spec:
        if not (isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) and v >= 0 for v in x)):
            raise KnoweditError(f"hparams: field 'context_template_length_params' holds {x!r}; "
                                "give [length, count] pairs, e.g. [[5, 10], [10, 10]]")
        pairs.append(tuple(x))
    key = (handle.fingerprint, tuple(pairs), seed)
    if key not in _prefix_cache:
        from .sampling import sample_ids
        groups = [[""]]
        for j, (length, count) in enumerate(pairs):
            if length == 0 or count == 0:
                continue
            starts = [_PREFIX_STARTS[i % len(_PREFIX_STARTS)] for i in range(count)]
            group = []
            for ids in sample_ids(handle, starts, length, seed=seed + j, top_k=_PREFIX_TOP_K, total=True):
                text = handle.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
            groups.append(group)
        _prefix_cache[key] = groups
    return _prefix_cache[key]


def prefixes(handle, hp: dict) -> list[str]:
    """``""`` (the bare prompt) followed by the sampled prefixes."""
    return [c for g in prefix_groups(handle, hp) for c in g]


def context_weights(groups: list[list[str]], per_type: bool) -> torch.Tensor:
    """Weights of the context rows in a key average, float64. ROME averages all rows alike; MEMIT
    averages within each context type and then across types, so the bare prompt weighs 1/(types)."""
    if not per_type:
        n = sum(len(g) for g in groups)
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return torch.cat([torch.full((len(g),), 1.0 / (len(g) * len(groups)), dtype=torch.float64) for g in groups])


@dataclass
class Rows:
    """Right-padded token rows for one request: prefix + prompt (+ target), plus KL rows."""

    input_ids: torch.Tensor     # [B, T]
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor   # [B] index of the subject's last token
    n_context: int              # the first n_context rows are the prefixed prompts
    target_pos: list[list[int]]  # per context row, positions predicting each target token
    target_ids: list[int]


def _subject_last(tok, text: str, end: int, where: str) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding character ``end - 1``."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    head = tok(text[:end], add_special_tokens=False)["input_ids"]
    if head and ids[:len(head)] == head:
        return ids, len(head) - 1
    for i in range(1, len(ids) + 1):  # the subject's end merged into a longer token
        if len(tok.decode(ids[:i])) >= end:
            return ids, i - 1
    raise KnoweditError(f"{where}: cannot locate the subject in {text!r}")


def build_rows(handle, req: EditRequest, contexts: list[str], with_target: bool = True,
               kl_prompts: list[str] = ()) -> Rows:
    tok = handle.tokenizer
    target = tok(" " + req.target_new, add_special_tokens=False)["input_ids"] if with_target else []
    if with_target and not target:
        raise KnoweditError(f"{req.label}: field 'target_new' tokenises to nothing")
    seqs, subj, tpos = [], [], []
    at = req.prompt.index("{}")
    for c in contexts:
        text = c + req.text
        ids, s = _subject_last(tok, text, len(c) + at + len(req.subject), req.label)
        tpos.append([len(ids) - 1 + j for j in range(len(target))])
        seqs.append(ids + target[:-1])
        subj.append(s)
    for kp in kl_prompts:
        text = kp.format(req.subject)
        ids, s = _subject_last(tok, text, kp.index("{}") + len(req.subject), req.label)
        seqs.append(ids)
        subj.append(s)
    dev = handle.device
    padded = Batch.from_ids(seqs, tok.pad_token_id, dev)
    return Rows(padded.input_ids, padded.attention_mask, torch.tensor(subj, device=dev), len(contexts), tpos, target)


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _with(o, new):
    return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new


class _Read(Exception):
    """Raised once every requested activation is read: the layers above are not needed."""


@torch.no_grad()
def read_at_subject(handle, rows: Rows, key_layers: list[int] = (), site=None) -> tuple[dict, torch.Tensor | None]:
    """Down-projection inputs at the subject's last token for ``key_layers`` (``{layer: [B, d_mlp]}``)
    and the output of module ``site`` there (``[B, d_model]``), in one forward that stops as soon as
    they are read."""
    a = handle.adapter
    idx = torch.arange(len(rows.subject_pos), device=rows.subject_pos.device)
    keys, got = {}, {}

    def done():
        if len(keys) == len(set(key_layers)) and (site is None or "v" in got):
            raise _Read

    def key_hook(layer):
        def fn(mod, args):
            keys[layer] = args[0][idx, rows.subject_pos].double()
            done()
        return fn

    def site_hook(m, args, o):
        got["v"] = _out(o)[idx, rows.subject_pos].double()
        done()

    with HookSet() as hs:
        for l in key_layers:
            hs.pre(a.mlp_out(l), key_hook(l))
        if site is not None:
            hs.post(site, site_hook)
        try:
            handle.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False,
                         logits_to_keep=1)
        except _Read:
            pass
    return keys, got.get("v")


def optimise_delta(handle, req: EditRequest, rows: Rows, site, hp: dict,
                   v0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """δ added to ``site``'s output at the subject's last token of every row, as in the reference
    implementations: the loss is the target NLL over the context rows
    + kl_factor · KL(edited ‖ original) of the next-token distribution at the subject's last token of
    the KL rows + v_weight_decay · ‖δ‖ / ‖v₀‖², with ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖ (v₀: the site output
    on the bare prompt; pass it when already read). The NLL is read at the output of layer
    ``v_loss_layer``. At most ``v_num_grad_steps`` forward passes; the loop stops early once the whole
    loss is below ``v_stop_loss``."""
    a = handle.adapter
    steps = field(hp, "v_num_grad_steps", int, lambda v: v >= 1, "at least one step")
    lr = field(hp, "v_lr", float, lambda v: v > 0)
    wd = field(hp, "v_weight_decay", float, lambda v: v >= 0)
    clamp = field(hp, "clamp_norm_factor", float, lambda v: v > 0)
    kl_factor = field(hp, "kl_factor", float, lambda v: v >= 0)
    loss_layer = field(hp, "v_loss_layer", int, lambda v: -a.n_layers <= v < a.n_layers,
                       f"the model has {a.n_layers} layers")
    loss_layer %= a.n_layers
    stop_loss = field(hp, "v_stop_loss", float, lambda v: v >= 0)
    B = rows.input_ids.shape[0]
    dev = rows.input_ids.device
    idx = torch.arange(B, device=dev)
    n_ctx = rows.n_context
    if field(hp, "cache_before_subject", bool):
        al = align(rows.input_ids, rows.attention_mask, rows.subject_pos, handle.tokenizer.pad_token_id)
    else:
        al = unaligned(rows.input_ids, rows.attention_mask)
    # one-hot of δ's column, so δ enters the graph without in-place writes
    onehot = torch.zeros(B, al.input_ids.shape[1] - al.S, 1, device=dev)
    onehot[idx, al.col(idx, rows.subject_pos)] = 1.0
    tr = torch.tensor([r for r, ps in enumerate(rows.target_pos) for _ in ps], device=dev)
    tp = al.col(tr, torch.tensor([p for ps in rows.target_pos for p in ps], device=dev))
    tid = torch.tensor([t for ps in rows.target_pos for t in rows.target_ids[:len(ps)]], device=dev)
    kl_rows = torch.arange(n_ctx, B, device=dev)
    kl_at = al.col(kl_rows, rows.subject_pos[n_ctx:])

    if v0 is None:
        _, v0_all = read_at_subject(handle, rows, site=site)
        v0 = v0_all[0]
    v0 = v0.float()
    delta = torch.zeros(a.d_model, requires_grad=True, device=dev)
    state = {}

    def add_delta(m, args, o):
        h = _out(o)
        return _with(o, h + onehot.to(h.dtype) * delta.to(h.dtype))

    def grab(m, args, o):
        state["h"] = _out(o)

    def head(h):
        return a.unembed(a.ln_final(h)).float().log_softmax(-1)

    params = [p for p in handle.model.parameters()]
    was = [p.requires_grad for p in params]
    opt = torch.optim.Adam([delta], lr=lr)
    info = {"steps": 0, "cached_columns": al.S, "step_columns": al.input_ids.shape[1] - al.S}
    try:
        for p in params:
            p.requires_grad_(False)
        run = SuffixRunner(handle.model, al)  # the cached columns, before δ's hook is in place
        with HookSet() as hs:
            hs.post(site, add_delta)  # before grab: the site may be the loss layer itself
            hs.post(a.block(loss_layer), grab)
            use_kl = len(kl_rows) > 0 and kl_factor > 0
            ref = None
            for step in range(steps):
                run()
                # one unembedding for the target and KL rows: it streams the whole vocabulary matrix
                lp = head(state["h"][torch.cat([tr, kl_rows]), torch.cat([tp, kl_at])] if use_kl
                          else state["h"][tr, tp])
                nll = -lp[:len(tr)].gather(1, tid[:, None]).sum() / n_ctx / len(rows.target_ids)
                loss = nll
                kl = torch.zeros(())
                if use_kl:
                    if ref is None:  # the first pass runs with δ = 0: the unedited distribution
                        ref = lp[len(tr):].detach()
                    # kl_div(input, target) = KL(target ‖ input): here KL(edited ‖ original)
                    kl = torch.nn.functional.kl_div(ref, lp[len(tr):], log_target=True, reduction="batchmean")
                    loss = loss + kl_factor * kl
                decay = wd * delta.norm() / v0.norm() ** 2
                loss = loss + decay
                info.update(nll=float(nll.detach()), kl=float(kl.detach()), weight_decay=float(decay.detach()),
                            loss=float(loss.detach()), steps=step)
                if info["loss"] < stop_loss or step == steps - 1:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    limit = clamp * v0.norm()
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    info["delta_norm"] = float(delta.detach().norm())
    info["v0_norm"] = float(v0.norm())
    return delta.detach().double(), info
