"""Evaluation suites: a small YAML file naming the model, editors, mask conditions, dataset, metrics
and seed. One suite regenerates one table. See ``evals/*.yaml``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import KnoweditError
from .conditions import CONDITIONS

METRIC_GROUPS = ("counterfact", "easyedit", "perplexity", "norms", "generation", "collateral")


def resolve_path(p, suite_file: Path | None) -> Path | None:
    """A path in a suite, relative to the working directory if it exists there, else to the suite file."""
    if p is None:
        return None
    p = Path(p).expanduser()
    if p.is_absolute() or p.exists() or suite_file is None:
        return p
    return suite_file.parent / p


@dataclass
class EditorSpec:
    name: str
    hparams: dict | str | None = None
    callable: str | None = None   # "package.module:function" for editors outside knowedit


@dataclass
class Suite:
    name: str
    path: Path | None = None
    description: str = ""
    model: str | None = None
    seed: int = 0
    dataset: dict = field(default_factory=lambda: {"name": "counterfact", "n": 10})
    editors: list[EditorSpec] = field(default_factory=list)
    mode: str = "restrict"
    circuit: str | None = None
    conditions: list[str] = field(default_factory=lambda: ["none"])
    metrics: list[str] = field(default_factory=lambda: ["counterfact", "easyedit"])
    tasks: list[str] = field(default_factory=list)
    task_n: int = 24
    generation: dict = field(default_factory=lambda: {"tokens": 100, "prompts": 2})
    batch_size: int = 32

    def resolve(self, p) -> Path | None:
        return resolve_path(p, self.path)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "path"}
        d["editors"] = [e.__dict__ for e in self.editors]
        return d


_KEYS = set(Suite.__dataclass_fields__) - {"path"}


def parse_suite(data: dict, source: str = "suite") -> Suite:
    if not isinstance(data, dict):
        raise KnoweditError(f"{source}: expected a mapping of suite fields")
    unknown = set(data) - _KNOWN
    if unknown:
        raise KnoweditError(f"{source}: unknown field(s) {sorted(unknown)}; known fields are {sorted(_KNOWN)}")
    d = dict(data)
    editors = []
    for i, e in enumerate(d.pop("editors", None) or []):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict) or not e.get("name"):
            raise KnoweditError(f"{source}: editors[{i}] needs a 'name' (rome, memit, ft-l, ft-m, or a registered one)")
        extra = set(e) - {"name", "hparams", "callable"}
        if extra:
            raise KnoweditError(f"{source}: editors[{i}] has unknown field(s) {sorted(extra)}")
        editors.append(EditorSpec(**e))
    if not editors:
        raise KnoweditError(f"{source}: 'editors' is empty; name at least one editor")
    s = Suite(name=str(d.pop("name", None) or Path(source).stem), editors=editors, **d)
    for c in s.conditions:
        if c not in CONDITIONS:
            raise KnoweditError(f"{source}: condition {c!r} is unknown; use {CONDITIONS}")
    if any(c != "none" for c in s.conditions) and not s.circuit:
        raise KnoweditError(f"{source}: conditions {s.conditions} need 'circuit: PATH' (a circuit JSON file)")
    for m in s.metrics:
        if m not in METRIC_GROUPS:
            raise KnoweditError(f"{source}: metric group {m!r} is unknown; use {METRIC_GROUPS}")
    if "collateral" in s.metrics and not s.tasks:
        raise KnoweditError(f"{source}: metric group 'collateral' needs 'tasks: [...]' (e.g. ioi, colored-objects)")
    if not isinstance(s.dataset, dict) or not s.dataset.get("name"):
        raise KnoweditError(f"{source}: 'dataset' needs a 'name' (counterfact or zsre)")
    if s.mode not in ("restrict", "ablate"):  # the modes of knowedit.editing.masking
        raise KnoweditError(f"{source}: mode {s.mode!r} must be 'restrict' or 'ablate'")
    return s


_KNOWN = _KEYS


def load_suite_file(path, parse, hint: str):
    """Read a suite or study YAML file with ``parse(data, source)``; ``hint`` says where to look if it is missing."""
    path = Path(path)
    if not path.exists():
        raise KnoweditError(f"{path} does not exist; {hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise KnoweditError(f"{path}: not valid YAML ({e})") from None
    s = parse(data, str(path))
    s.path = path.resolve()
    return s


def load_suite(path) -> Suite:
    return load_suite_file(path, parse_suite, "see evals/ for the shipped suites")
