"""Editor hyperparameters: method defaults <- ``editors/<method>/<model>.yaml`` <- the user's file or dict.

Field names are EasyEdit's, and EasyEdit's own hparams YAML files load as they are: fields that
only locate modules or devices there (``alg_name``, ``model_name``, ``device``, ``*_module_tmp``, ...)
are ignored with a note in ``hparams["_notes"]``. Any other unknown field is an error naming it,
since a typo (``num_step``) would otherwise silently fall back to a default.
"""
from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path

from ..errors import KnoweditError

METHODS = ("rome", "memit", "alphaedit", "ft-l", "ft-m")
_ALIASES = {"ft_l": "ft-l", "ftl": "ft-l", "ft_m": "ft-m", "ftm": "ft-m", "alpha-edit": "alphaedit",
            "alpha_edit": "alphaedit"}
_ALG_NAMES = {"rome": {"ROME", "R-ROME"}, "memit": {"MEMIT"}, "alphaedit": {"ALPHAEDIT"}, "ft-l": {"FT", "FT-L"},
              "ft-m": {"FT", "FT-M"}}

# EasyEdit fields that have no meaning here: module locations come from the architecture adapter,
# the device from the model handle, statistics from knowedit's own cache.
EASYEDIT_IGNORED = {
    "alg_name", "model_name", "device", "model_parallel", "stats_dir", "layer_module_tmp", "mlp_module_tmp",
    "attn_module_tmp", "ln_f_module", "lm_head_module", "fp16", "bf16", "results_dir", "use_chat_template",
}
# EasyEdit ROME/MEMIT fields an editor here may not implement; noted rather than refused.
EASYEDIT_LOCATE_ED = {"rome": {"rewrite_module_tmp", "mom2_dtype", "context_template_length_params",
                               "fact_token", "v_loss_layer", "layer_selection", "mom2_dataset"}}
EASYEDIT_LOCATE_ED["memit"] = EASYEDIT_LOCATE_ED["rome"]
# P_loc: where EasyEdit caches its projection matrix; knowedit computes and caches P itself
EASYEDIT_LOCATE_ED["alphaedit"] = EASYEDIT_LOCATE_ED["rome"] | {"P_loc"}

# EasyEdit's R-ROME switches, read as knowedit's rome_variant
_EASYEDIT_R_ROME = ("original_implementation", "enable_random_prefix_keys", "enable_prompt_keys")

DEFAULT_MODEL_KEY = "smollm2-135m"
_TYPE_OF_NONE = {"norm_constraint": 0.0, "layers": []}  # fields whose default is "off" but whose values are numbers


def normalise_method(method: str) -> str:
    m = str(method).strip().lower()
    m = _ALIASES.get(m, m)
    if m not in METHODS:
        raise KnoweditError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return m


def method_defaults(method: str) -> dict:
    method = normalise_method(method)
    if method in ("ft-l", "ft-m"):
        from . import finetune
        return dict(finetune.FT_L_DEFAULTS if method == "ft-l" else finetune.FT_M_DEFAULTS)
    mod = editor_module(method)
    return dict(getattr(mod, f"{method.upper()}_DEFAULTS"))


def editor_module(method: str):
    """The module of ROME or MEMIT, imported on first use."""
    name = f"knowedit.editing.{method}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise KnoweditError(f"editor {method!r} is not available in this installation (no module {name}); "
                            f"use one of: ft-l, ft-m") from None


def model_key(handle_or_name) -> str:
    """``smollm2-135m`` for the default model, else the lower-cased basename of the id or path."""
    from ..models.default_model import DEFAULT_MODEL_NAME

    name = getattr(handle_or_name, "name", handle_or_name)
    if name in (None, "default", DEFAULT_MODEL_NAME):
        return DEFAULT_MODEL_KEY
    return Path(str(name).rstrip("/")).name.lower()


def editors_dir() -> Path | None:
    """The repository's ``editors/`` directory, or None when knowedit is installed without it."""
    import knowedit

    d = Path(knowedit.__file__).resolve().parents[1] / "editors"
    return d if d.is_dir() else None


def _candidates(key: str) -> list[str]:
    out = [key]
    for suffix in ("-hf", "-instruct"):
        if key.endswith(suffix):
            out.append(key[: -len(suffix)])
    return out


def _read(path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise KnoweditError(f"hparams: {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise KnoweditError(f"hparams: {path} is not valid YAML/JSON ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KnoweditError(f"hparams: {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def _coerce(field: str, value, default, source: str):
    """Match the default's type; EasyEdit writes floats like ``5e-4`` that YAML reads as strings."""
    def bad(want):
        return KnoweditError(f"hparams {source}: field {field!r} = {value!r} should be {want}")

    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            value = float(value)
        except ValueError:
            raise bad("a number") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif isinstance(default, list):
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise bad("a list")
    return value


def _merge(hp: dict, defaults: dict, data: dict, method: str, source: str, notes: list) -> None:
    known = set(defaults)
    for field, value in data.items():
        if field == "layers" and isinstance(value, str) and value.strip().lower() == "auto":
            if method not in ("rome", "memit", "alphaedit"):
                raise KnoweditError(f"hparams {source}: layers 'auto' (the edit layer from a causal trace) exists for "
                                    f"rome, memit and alphaedit only; give {method} a list of layers")
            hp[field] = "auto"
        elif field in known:
            default = defaults[field]
            if field == "norm_constraint" and value is False:  # EasyEdit's "no constraint"
                value = None
            default = _TYPE_OF_NONE.get(field, default) if default is None else default
            hp[field] = value if default is None or value is None else _coerce(field, value, default, source)
        elif field == "alg_name":
            if str(value).upper() not in _ALG_NAMES[method]:
                raise KnoweditError(f"hparams {source}: alg_name {value!r} is not the {method} editor; "
                                    f"pass a {method} hparams file or choose the editor that matches it")
        elif method == "rome" and field in _EASYEDIT_R_ROME:
            if field == "enable_prompt_keys" and value is True:
                raise KnoweditError(f"hparams {source}: enable_prompt_keys (keys from the bare prompt only) is not "
                                    "offered; use rome_variant: rome, r-rome or hybrid")
        elif field in EASYEDIT_IGNORED or field in EASYEDIT_LOCATE_ED.get(method, ()):
            notes.append(f"{source}: ignored EasyEdit field {field!r} (no meaning in knowedit)")
        else:
            near = difflib.get_close_matches(field, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known fields: {', '.join(sorted(known))}"
            raise KnoweditError(f"hparams {source}: unknown field {field!r} for {method}{hint}")
    if method == "rome" and any(f in data for f in _EASYEDIT_R_ROME[:2]):
        # EasyEdit: original_implementation overrides the prefix-key switch
        hp["rome_variant"] = ("rome" if data.get("original_implementation") is True else
                              "r-rome" if data.get("enable_random_prefix_keys", True) is True else "rome")
        notes.append(f"{source}: EasyEdit R-ROME switches read as rome_variant {hp['rome_variant']!r}")


def load_hparams(method: str, handle_or_model_name=None, path_or_dict=None) -> dict:
    """Hyperparameters for ``method`` on a model: defaults, then ``editors/<method>/<model>.yaml``,
    then ``path_or_dict`` (a YAML/JSON file, EasyEdit's included, or a dict). ``_notes`` and
    ``_sources`` in the result say what was read and what was ignored."""
    method = normalise_method(method)
    defaults = method_defaults(method)
    hp, notes, sources = dict(defaults), [], [f"{method} defaults"]
    key = model_key(handle_or_model_name)
    d = editors_dir()
    if d is None:
        notes.append("editors/ directory not found (non-editable install); using built-in defaults")
    else:
        for k in _candidates(key):
            f = d / method / f"{k}.yaml"
            if f.exists():
                _merge(hp, defaults, _read(f), method, str(f.relative_to(d.parent)), notes)
                sources.append(str(f.relative_to(d.parent)))
                break
        else:
            notes.append(f"no editors/{method}/{key}.yaml; using the {method} defaults")
    if path_or_dict is not None:
        if isinstance(path_or_dict, dict):
            data, src = path_or_dict, "dict"
        else:
            data, src = _read(path_or_dict), str(path_or_dict)
        _merge(hp, defaults, data, method, src, notes)
        sources.append(src)
    if method in ("ft-l", "ft-m"):
        want = "prompt_last" if method == "ft-l" else "target_new"
        if hp["objective_optimization"] != want:
            other = "ft-m" if method == "ft-l" else "ft-l"
            raise KnoweditError(f"hparams: objective_optimization {hp['objective_optimization']!r} is {other}, "
                                f"not {method}; use --editor {other} or drop the field")
    hp["_notes"], hp["_sources"] = notes, sources
    return hp


def editor_kwargs(hparams: dict) -> dict:
    """The hyperparameters an editor reads (without the loader's ``_notes``/``_sources``)."""
    return {k: v for k, v in hparams.items() if not k.startswith("_")}
