"""``knowedit demo``: the main job on the default model, offline.

1. IOI on the default model and the shipped IOI circuit.
2. ROME and FT-M edits of facts the model knows, restricted to a circuit (IOI heads + MLPs m2-m6),
   its complement, a random set of equal size, or unrestricted (``evals/demo.yaml``), scored with
   both metric protocols and the collateral change of IOI and Colored Objects.
3. The Colored Objects repair by steering heads shared with IOI (when ``knowedit.reuse`` is present).
4. Tables and a self-contained ``report.html`` under ``results/demo``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .circuit import Circuit
from .errors import KnoweditError
from .tasks import ioi_task, score

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "evals" / "demo.yaml"
IOI_CIRCUIT = ROOT / "circuits" / "smollm2-135m" / "ioi.json"


def ioi_section(handle, n: int = 24, seed: int = 0) -> str:
    task = ioi_task(handle.tokenizer, n=n, seed=seed)
    ld = score(handle, task)
    lines = [f"IOI ({len(task)} prompts, seed {seed}): logit(IO) - logit(S) = {ld.mean():.2f}, "
             f"IO > S on {(ld > 0).float().mean() * 100:.0f}% of prompts"]
    if IOI_CIRCUIT.exists():
        c = Circuit.load(IOI_CIRCUIT)
        if c.model.get("fingerprint") == handle.fingerprint:
            lines.append(f"shipped IOI circuit: {len(c.heads())} of {handle.adapter.n_layers * handle.adapter.n_heads} "
                         f"heads ({', '.join(c.heads())}) + all MLPs, faithfulness {c.faithfulness:.3f} "
                         f"({c.method.get('name')}, {IOI_CIRCUIT.relative_to(ROOT)})")
    return "\n".join(lines)


def edit_section(handle, out: Path, progress: bool = True) -> Path:
    from .evaluation.runner import run_suite
    from .evaluation.suite import load_suite

    if not SUITE.exists():
        raise KnoweditError(f"{SUITE} is missing; run the demo from a knowedit checkout")
    return run_suite(load_suite(SUITE), out, handle=handle, progress=progress)


def repair_section(handle, out: Path, n: int, seed: int) -> str | None:
    try:
        from .reuse.demo import demo_repair
    except ImportError:
        return None
    text, attention = demo_repair(handle, n=n, seed=seed)
    (out / "attention.json").write_text(json.dumps(attention))
    (out / "repair.md").write_text(text + "\n")
    return text


def run_demo(handle, out="results/demo", fresh: bool = True, progress: bool = True, repair_n: int = 40,
             seed: int = 0, echo=print) -> dict:
    from .report import build_report

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    echo(ioi_section(handle, seed=seed))
    echo("\n[2/4] edits: ROME and FT-M x circuit / complement / random / none (evals/demo.yaml)")
    edit_section(handle, out, progress=progress)
    echo("\n[3/4] Colored Objects repair by steering heads shared with IOI")
    rep = repair_section(handle, out, n=repair_n, seed=seed)
    echo(rep if rep else "(knowedit.reuse is not installed in this version; skipped)")
    echo("\n[4/4] tables and report")
    paths = build_report(out, title="knowedit demo: SmolLM2-135M-Instruct")
    return paths
