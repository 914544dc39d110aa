"""Second-moment statistics C = E[k kᵀ] of the MLP down-projection input ("keys"), per layer.

Sources (hparams ``mom2_dataset``):

* ``"model_samples"`` (the offline default): ``mom2_n_samples`` texts sampled from the model itself
  (temperature 1, KV-cached, ``mom2_sample_batch`` texts at a time), seeded by ``mom2_seed``, each
  ``mom2_sample_tokens`` tokens after a one-word start: 1000 x 128, about 125,000 tokens, by default.
  A 1,536-wide key needs far more tokens than dimensions for E[k kᵀ] to be full rank and its inverse
  meaningful. The sampled token ids are cached too, so other layers need no new sampling. The source
  is recorded with the statistics.
* a path to a text file (``.txt``: paragraphs separated by blank lines; ``.jsonl``/``.json``: records
  with a ``"text"`` field): the first ``mom2_n_samples`` texts, each cut to ``mom2_sample_tokens``.
* any other name: a Hugging Face dataset (needs the ``datasets`` package and a reachable hub).
* ``"identity"``: C = I, only when chosen explicitly (also ``mom2_adjustment: false``).

Statistics are cached under ``cache_root()/stats/<model fingerprint>/<corpus key>/`` per layer and
sample count (and the dtype the model runs in, when it is not float32), with the token count; the
fingerprint is that of the model as loaded, so statistics describe the unedited model even when
collected while an edit is applied. Keys are summed in float64 whatever the model's dtype.
Processes that share the cache (the shards of a sweep) compute each file once: the others wait on a
lock beside the corpus directory, then read it.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KnoweditError
from ..models.handle import Batch
from ..models.cache import atomic_write_bytes, cache_root, file_lock
from ..models.dtypes import dtype_name
from .fields import field

IDENTITY = "identity"
MODEL_SAMPLES = "model_samples"
_STARTS = ["The", "In", "A", "It", "This", "When", "I", "We", "There", "After", "He", "She", "One", "For",
           "On", "As"]


# The covariance fields every locate-then-edit editor accepts, with their defaults.
SETTINGS_DEFAULTS = {"mom2_adjustment": True, "mom2_dataset": MODEL_SAMPLES, "mom2_n_samples": 1000,
                     "mom2_sample_tokens": 128, "mom2_seed": 0, "mom2_dtype": "float32", "mom2_batch_size": 32,
                     "mom2_sample_batch": 250}


@dataclass
class KeyStats:
    mom2: torch.Tensor        # [d_mlp, d_mlp], float64
    n_tokens: int
    source: str
    layer: int

    @property
    def identity(self) -> bool:
        return self.source == IDENTITY

    def regularised(self, ridge: float) -> torch.Tensor:
        """C + ridge · mean(diag C) · I: a numerical safeguard (not in the papers) for statistics
        from fewer tokens than key dimensions, where C is singular."""
        if ridge <= 0 or self.identity:
            return self.mom2
        return self.mom2 + ridge * self.mom2.diagonal().mean() * torch.eye(len(self.mom2), dtype=self.mom2.dtype)


def settings(hp: dict) -> dict:
    """The covariance fields of ``hp``, validated (missing optional ones take their defaults)."""
    hp = {**SETTINGS_DEFAULTS, **hp}
    s = {
        "dataset": field(hp, "mom2_dataset", str, lambda v: bool(v.strip())),
        "n_samples": field(hp, "mom2_n_samples", int, lambda v: v > 0, "must be positive"),
        "sample_tokens": field(hp, "mom2_sample_tokens", int, lambda v: v > 1, "must be at least 2"),
        "seed": field(hp, "mom2_seed", int),
        "dtype": field(hp, "mom2_dtype", str, lambda v: v in ("float32", "float64", "float16", "bfloat16")),
        "batch_size": field(hp, "mom2_batch_size", int, lambda v: v > 0),
        "sample_batch": field(hp, "mom2_sample_batch", int, lambda v: v > 0),
    }
    if not field(hp, "mom2_adjustment", bool):
        s["dataset"] = IDENTITY
    return s


def _corpus_key(s: dict) -> str:
    d = s["dataset"]
    if d == MODEL_SAMPLES:
        return f"model_samples-seed{s['seed']}-len{s['sample_tokens']}"
    p = Path(d).expanduser()
    if p.is_file():
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        return f"file-{p.stem}-{digest}-len{s['sample_tokens']}"
    return "hf-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in d) + f"-len{s['sample_tokens']}"


def _file_texts(p: Path, n: int) -> list[str]:
    raw = p.read_text(encoding="utf-8")
    if p.suffix in (".jsonl", ".json"):
        recs = json.loads(raw) if p.suffix == ".json" else [json.loads(x) for x in raw.splitlines() if x.strip()]
        try:
            texts = [r["text"] if isinstance(r, dict) else str(r) for r in recs]
        except (KeyError, TypeError):
            raise KnoweditError(f"mom2_dataset: {p} holds records without a 'text' field") from None
    else:
        texts = [t.strip() for t in raw.split("\n\n")]
    texts = [t for t in texts if t.strip()][:n]
    if not texts:
        raise KnoweditError(f"mom2_dataset: {p} holds no text")
    return texts


def _hf_texts(name: str, n: int) -> list[str]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise KnoweditError(f"mom2_dataset: {name!r} is neither a file nor a built-in source, and loading it as a "
                            "Hugging Face dataset needs the 'datasets' package. Use 'model_samples' (offline "
                            "default), a text file path, or 'identity'") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
        return [r["text"] for r, _ in zip(ds, range(n))]
    except Exception as e:  # offline hub, unknown name, no text column
        raise KnoweditError(f"mom2_dataset: could not load Hugging Face dataset {name!r} ({type(e).__name__}: "
                            f"{e}). Offline, use 'model_samples' or a text file path") from None


def corpus_ids(handle, s: dict) -> list[list[int]]:
    """Token ids of the corpus the statistics come from."""
    from .sampling import sample_ids
    d, n, T = s["dataset"], s["n_samples"], s["sample_tokens"]
    if d == MODEL_SAMPLES:
        path = _root(handle, s) / f"corpus_n{n}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)["ids"]
        shipped = shipped_corpus(handle, s)
        if shipped is not None and shipped.exists():
            return read_ids(shipped)
        starts = [_STARTS[i % len(_STARTS)] for i in range(n)]
        ids = sample_ids(handle, starts, T, seed=s["seed"], batch_size=s["sample_batch"], total=True,
                         desc=f"sampling {n} x {T} tokens for covariance statistics (once per model)")
        buf = io.BytesIO()
        torch.save({"ids": ids}, buf)
        atomic_write_bytes(path, buf.getvalue())
        return ids
    p = Path(d).expanduser()
    texts = _file_texts(p, n) if p.is_file() else _hf_texts(d, n)
    ids = [handle.tokenizer(t, add_special_tokens=False)["input_ids"][:T] for t in texts]
    return [t for t in ids if len(t) > 0]


def shipped_corpus(handle, s: dict) -> Path | None:
    """Where the repository keeps a model's sampled corpus (``data/covariance/``), so that a fresh
    install of the default model needs no sampling; None when knowedit is installed without it."""
    import knowedit
    d = Path(knowedit.__file__).resolve().parents[1] / "data" / "covariance"
    if not d.parent.is_dir():
        return None
    return d / f"{handle.fingerprint}-{_corpus_key(s)}-n{s['n_samples']}.npz"


def write_ids(path: Path, ids: list[list[int]]) -> None:
    import numpy as np
    flat = np.array([t for row in ids for t in row], dtype=np.uint32)
    dtype = np.uint16 if flat.size == 0 or flat.max() < 2 ** 16 else np.uint32
    buf = io.BytesIO()
    np.savez_compressed(buf, tokens=flat.astype(dtype), lengths=np.array([len(r) for r in ids], dtype=np.int32))
    atomic_write_bytes(path, buf.getvalue())


def read_ids(path: Path) -> list[list[int]]:
    import numpy as np
    with np.load(path) as z:
        flat, lengths = z["tokens"].astype(np.int64), z["lengths"]
    ends = np.cumsum(lengths)
    return [flat[e - n:e].tolist() for e, n in zip(ends, lengths)]


def _root(handle, s: dict) -> Path:
    return cache_root() / "stats" / handle.fingerprint / _corpus_key(s)


def forward_tag(handle) -> str:
    """'' for a float32 model, else e.g. '-bf16'. A model run in bfloat16 gets statistics of its own keys:
    they differ from the float32 ones by under 1% (0.7% of ‖C‖ at the default model's layer 4), but an edit
    must not depend on which dtype happened to fill the cache first, and a bfloat16 checkpoint loaded in
    either dtype has one fingerprint."""
    return "" if handle.dtype == torch.float32 else f"-{dtype_name(handle.dtype)}"


def _path(handle, s: dict, layer: int) -> Path:
    return _root(handle, s) / f"layer{layer}_n{s['n_samples']}{forward_tag(handle)}.pt"


@torch.no_grad()
def collect(handle, layers: list[int], ids: list[list[int]], batch_size: int = 32) -> dict[int, tuple]:
    """Sum of k kᵀ (float64) and token count at each layer's down-projection input."""
    from tqdm.auto import tqdm

    from ..hooks.hookset import HookSet
    a = handle.adapter
    d = a.d_mlp
    sums = {l: torch.zeros(d, d, dtype=torch.float64) for l in layers}
    count = 0
    top = max(layers)

    class _Done(Exception):
        pass

    cur = {}

    def grab(layer):
        def fn(mod, args):
            x = args[0][cur["mask"]].float()  # real tokens only, [N, d_mlp]
            sums[layer].add_((x.T @ x).double().cpu())
            if layer == top:  # nothing above the top layer is needed
                raise _Done
        return fn

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    pad = handle.tokenizer.pad_token_id
    with HookSet() as hs:
        for l in layers:
            hs.pre(a.mlp_out(l), grab(l))
        for b in tqdm(batches, desc=f"covariance at layers {layers}", leave=False):
            padded = Batch.from_ids([ids[i] for i in b], pad, handle.device)
            cur["mask"] = padded.attention_mask.bool()
            try:
                handle.model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False,
                             logits_to_keep=1)
            except _Done:
                pass
            count += int(padded.attention_mask.sum())
    return {l: (sums[l], count) for l in layers}


def _read(p: Path, layer: int) -> KeyStats:
    blob = torch.load(p, map_location="cpu", weights_only=True)
    return KeyStats(blob["mom2"].double(), int(blob["n_tokens"]), str(blob["source"]), layer)


def key_stats(handle, layers: list[int], hp: dict) -> dict[int, KeyStats]:
    """C at each layer, from the cache when present; missing layers are collected in one pass."""
    s = settings(hp)
    d = handle.adapter.d_mlp
    if s["dataset"] == IDENTITY:
        return {l: KeyStats(torch.eye(d, dtype=torch.float64), 0, IDENTITY, l) for l in layers}
    out, missing = {}, []
    for l in layers:
        p = _path(handle, s, l)
        if p.exists():
            out[l] = _read(p, l)
        else:
            missing.append(l)
    if not missing:
        return out
    # The processes of a sweep want the same statistics: one computes them, the others wait here, then read them.
    root = _root(handle, s)
    with file_lock(root, f"waiting for another process to compute covariance statistics in {root}"):
        for l in list(missing):
            if _path(handle, s, l).exists():
                out[l] = _read(_path(handle, s, l), l)
                missing.remove(l)
        if missing:
            ids = corpus_ids(handle, s)
            source = (f"{s['dataset']} ({len(ids)} texts, seed {s['seed']}, {s['sample_tokens']} tokens each)"
                      if s["dataset"] == MODEL_SAMPLES else f"{s['dataset']} ({len(ids)} texts, key {_corpus_key(s)})")
            if forward_tag(handle):
                source += f", keys from a {dtype_name(handle.dtype)} forward"
            dtype = getattr(torch, s["dtype"])
            for l, (total, n) in collect(handle, missing, ids, s["batch_size"]).items():
                mom2 = (total / max(n, 1)).to(dtype)  # stored in mom2_dtype, as EasyEdit does
                buf = io.BytesIO()
                torch.save({"mom2": mom2, "n_tokens": n, "source": source, "layer": l, "n_samples": s["n_samples"],
                            "model": handle.fingerprint}, buf)
                atomic_write_bytes(_path(handle, s, l), buf.getvalue())
                out[l] = KeyStats(mom2.double(), n, source, l)
    return out
