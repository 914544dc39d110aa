"""The lifelong-editing study file (``study: lifelong``, e.g. ``evals/lifelong.yaml``).

Each editor is its own run on the original weights: N edits in batches of ``batch`` (the model keeps
every earlier edit), measured at edit count 0, every ``checkpoint_every`` edits and at the end.
``checkpoint_every`` must be a multiple of every editor's batch, so that each checkpoint falls
between two batches and every editor is measured at the same edit counts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KnoweditError
from .suite import load_suite_file, resolve_path

STUDY = "lifelong"
FIELDS = ("study", "name", "description", "model", "seed", "dataset", "editors", "batch", "checkpoint_every",
          "tasks", "task_n", "generation", "collapse", "eval_batch_size")
EDITOR_FIELDS = ("name", "label", "hparams", "batch", "preserve")
GENERATION_FIELDS = ("tokens", "prompts")
COLLAPSE_FIELDS = ("perplexity_ratio", "entropy_min")
# ROME's fluency measure (fluency.ngram_entropy) is close to log2(number of words) when nearly every bigram
# and trigram of a generation is new: about 5.3 bits for the default model's unedited 50-token generations
# (measured), about 6 for 100 tokens. Text that loops over a phrase of L words has about log2(L) bits, so
# below 4 bits a 50-token generation is essentially one ~16-word phrase said two or three times: degenerate.
DEFAULT_COLLAPSE = {"perplexity_ratio": 2.0, "entropy_min": 4.0}


@dataclass
class LifelongEditor:
    name: str                        # the method, as knowedit.editing.edit(method=...) knows it
    label: str                       # unique within the study: names rows, checkpoints and plot lines
    batch: int                       # edits per edit() call
    hparams: dict | str | None = None
    preserve: list | None = None     # passed through as hparams["preserve"]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LifelongSuite:
    name: str
    dataset: dict
    editors: list[LifelongEditor]
    path: Path | None = None
    description: str = ""
    model: str | None = None
    seed: int = 0
    batch: int = 100
    checkpoint_every: int = 100
    tasks: list = field(default_factory=list)
    task_n: int = 24
    generation: dict = field(default_factory=lambda: {"tokens": 50, "prompts": 5})
    collapse: dict = field(default_factory=lambda: dict(DEFAULT_COLLAPSE))
    eval_batch_size: int = 32

    @property
    def n(self) -> int:
        return int(self.dataset.get("n", 100))

    def resolve(self, p) -> Path | None:
        return resolve_path(p, self.path)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("path", "editors")}
        d["editors"] = [e.to_dict() for e in self.editors]
        return d


def _int(value, where: str, fix: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KnoweditError(f"{where}: {value!r} must be an integer >= {minimum}; {fix}")
    return value


def _mapping(value, where: str, known) -> dict:
    if not isinstance(value, dict):
        raise KnoweditError(f"{where}: expected a mapping with fields {list(known)}")
    unknown = set(value) - set(known)
    if unknown:
        raise KnoweditError(f"{where}: unknown field(s) {sorted(unknown)}; known fields are {list(known)}")
    return dict(value)


def _editor(i: int, e, default_batch: int, src: str) -> LifelongEditor:
    where = f"{src}: editors[{i}]"
    if isinstance(e, str):
        e = {"name": e}
    e = _mapping(e, where, EDITOR_FIELDS)
    if not e.get("name"):
        raise KnoweditError(f"{where}: needs a 'name' (alphaedit, memit, rome, ft-l, ft-m)")
    batch = _int(e.get("batch", default_batch), f"{where}.batch", "give the number of edits per editor call")
    hp = e.get("hparams")
    if hp is not None and not isinstance(hp, (dict, str)):
        raise KnoweditError(f"{where}.hparams: give a mapping of hyperparameters or a YAML file path")
    pres = e.get("preserve")
    if pres is not None and not isinstance(pres, list):
        raise KnoweditError(f"{where}.preserve: give a list (it is passed to the editor as hparams['preserve'])")
    return LifelongEditor(name=str(e["name"]), label=str(e.get("label") or e["name"]), batch=batch, hparams=hp,
                          preserve=pres)


def parse_lifelong(data, source: str = "suite") -> LifelongSuite:
    """A :class:`LifelongSuite` from the study file's mapping; every bad field is an error naming it."""
    src = source
    d = _mapping(data, src, FIELDS)
    if d.pop("study", None) != STUDY:
        raise KnoweditError(f"{src}: field 'study' must be '{STUDY}'")
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KnoweditError(f"{src}: seed: {seed!r} must be an integer")
    batch = _int(d.get("batch", 100), f"{src}: batch", "give the number of edits per editor call, e.g. 100")
    every = _int(d.get("checkpoint_every", 100), f"{src}: checkpoint_every",
                 "give the number of edits between measurements, e.g. 100")
    editors = [_editor(i, e, batch, src) for i, e in enumerate(d.get("editors") or [])]
    if not editors:
        raise KnoweditError(f"{src}: 'editors' is empty; name at least one editor, e.g. editors: [memit]")
    labels = [e.label for e in editors]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise KnoweditError(f"{src}: editors {dup} appear more than once; give each a distinct 'label'")
    for e in editors:
        if every % e.batch:
            raise KnoweditError(f"{src}: checkpoint_every {every} is not a multiple of editor {e.label!r}'s batch "
                                f"{e.batch}; use a multiple of {e.batch} (e.g. {e.batch * max(1, every // e.batch)}) "
                                "or a batch that divides it, so every checkpoint falls between two batches")
    ds = d.get("dataset")
    if not isinstance(ds, dict) or not ds.get("name"):
        raise KnoweditError(f"{src}: 'dataset' needs a 'name' (counterfact or zsre) and 'n'")
    _int(ds.get("n", 100), f"{src}: dataset.n", "give the number of edits to make")
    tasks = d.get("tasks") or []
    if not isinstance(tasks, list):
        raise KnoweditError(f"{src}: tasks: give a list of task names, e.g. [ioi, colored-objects]")
    from ..tasks import TASKS
    bad = [t for t in tasks if t not in TASKS or t == "custom"]
    if bad:
        raise KnoweditError(f"{src}: tasks {bad} are unknown; use some of {[t for t in TASKS if t != 'custom']}")
    gen = {"tokens": 50, "prompts": 5, **_mapping(d.get("generation", {}), f"{src}: generation", GENERATION_FIELDS)}
    _int(gen["tokens"], f"{src}: generation.tokens", "give the tokens generated per prompt", minimum=1)
    _int(gen["prompts"], f"{src}: generation.prompts", "give the number of prompts (0: no entropy)", minimum=0)
    col = {**DEFAULT_COLLAPSE, **_mapping(d.get("collapse", {}), f"{src}: collapse", COLLAPSE_FIELDS)}
    if not isinstance(col["perplexity_ratio"], (int, float)) or col["perplexity_ratio"] <= 1:
        raise KnoweditError(f"{src}: collapse.perplexity_ratio {col['perplexity_ratio']!r} must be a number > 1 "
                            "(the perplexity, as a multiple of the unedited one, that counts as collapse)")
    if col["entropy_min"] is not None and (not isinstance(col["entropy_min"], (int, float)) or col["entropy_min"] < 0):
        raise KnoweditError(f"{src}: collapse.entropy_min {col['entropy_min']!r} must be a number of bits >= 0, "
                            "or null to flag collapse by perplexity only")
    return LifelongSuite(
        name=str(d.get("name") or Path(src).stem), dataset=dict(ds), editors=editors,
        description=str(d.get("description", "")), model=d.get("model"), seed=seed, batch=batch,
        checkpoint_every=every, tasks=list(tasks),
        task_n=_int(d.get("task_n", 24), f"{src}: task_n", "give the prompts per task"),
        generation=gen, collapse=col,
        eval_batch_size=_int(d.get("eval_batch_size", 32), f"{src}: eval_batch_size",
                             "give the prompts per forward pass when measuring"))


def load_lifelong(path) -> LifelongSuite:
    return load_suite_file(path, parse_lifelong, "see evals/lifelong.yaml")


def checkpoint_counts(n: int, every: int) -> list[int]:
    """The edit counts measured: 0, every, 2·every, ... and n."""
    return sorted(set(range(0, n, every)) | {n})
