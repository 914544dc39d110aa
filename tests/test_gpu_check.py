"""The GPU check script runs end to end (rehearsed on the CPU with a tiny model) and, without a GPU,
says so instead of failing, so `make gpu-check` is safe anywhere."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real check applies")
def test_without_gpu_it_explains_and_measures_nothing(capsys, tmp_path):
    assert _script().main(["--json", str(tmp_path / "g.json")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "g.json").exists()


def test_rehearsal_times_every_step(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert _script().main(["--allow-cpu", "--tiny", "--records", "4", "--memit-n", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["tiny"]
    assert set(rows) == {"EAP on IOI (nodes, 32 prompts)", "ROME, one edit (cold)", "ROME, one edit (warm)",
                         "MEMIT statistics (cached after)", "MEMIT, batch of 3", "evaluation of 4 records"}
    assert all(r["s"] > 0 for r in rows.values())
