"""Sweeps split between processes: the case assignment, shard files merged without loss or duplicates
(sequential shards, a real 2-process torch.distributed run over gloo, a killed shard resuming), lifelong
studies split by editor, the cache lock, and bad shard specs."""
import json
import os
import runpy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import _tiny
from knowedit.circuit import Circuit
from knowedit.errors import KnoweditError
from knowedit.evaluation.editors import register_editor, unregister_editor
from knowedit.evaluation.results import ResultStore, load_records
from knowedit.evaluation.runner import run_suite
from knowedit.evaluation.shards import LAUNCH_VARS, Shard, merge, parse_shard, resolve_shard, shard_from_env
from knowedit.evaluation.suite import load_suite

from _evaluation_standin import nudge

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["Danielle Darrieux", "Jean Gabin", "Edith Piaf"]   # shards of 2 and 1 cases
RECORDS = [{"case_id": i, "prompt": f"The mother tongue of {s} is", "subject": s, "target_new": "English",
            "ground_truth": "French", "rephrase_prompt": f"{s} spoke the language",
            "locality_prompt": "Jacques Chirac is a native speaker of", "locality_ground_truth": "French"}
           for i, s in enumerate(SUBJECTS)]
TIMING = ("seconds", "edit_seconds")
# The 2-process tests fork: a spawned child would spend ~10 s importing transformers again on a loaded
# 2-core box. Each child first drops to one torch thread, as DataLoader workers do, so no OpenMP pool
# inherited from the parent is used after the fork.
needs_fork = pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(),
                                reason="the 2-process tests fork (no fork on this platform)")


def run_two(fn, *args):
    torch.multiprocessing.start_processes(fn, args=args, nprocs=2, join=True, start_method="fork")


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the runner may swallow it."""


def same(a, b) -> bool:
    """Equal records, floats to 1e-5 relative: processes running another number of threads sum
    float32 products in another order, which moves the last bits."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= 1e-5 * max(abs(a), abs(b)) + 1e-12
    return a == b


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def snapshot(d: Path):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, gpt2_tok):
    """A tiny GPT-2 saved as a directory, a suite file over 3 cases x 2 conditions that names it, and
    the records of one uninterrupted 1-process run (the reference every split run must reproduce)."""
    from knowedit import load_model
    root = tmp_path_factory.mktemp("shards")
    model_dir = root / "model"
    _tiny("gpt2", gpt2_tok).model.save_pretrained(model_dir)
    gpt2_tok.save_pretrained(model_dir)
    handle = load_model(str(model_dir))
    data = root / "cf.json"
    data.write_text(json.dumps(RECORDS))
    circ = root / "c.json"
    Circuit.from_components(handle, ["a1.h0", "m1"], task={"name": "facts"}).save(circ)
    suite = {"name": "t", "model": str(model_dir), "editors": [{"name": "nudge", "callable": "_evaluation_standin:nudge"}],
             "circuit": str(circ), "conditions": ["none", "circuit"], "metrics": ["counterfact", "easyedit", "norms"],
             "dataset": {"name": "counterfact", "path": str(data), "n": len(RECORDS)}}
    suite_file = root / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(suite))
    ref = root / "ref"
    run_suite(load_suite(suite_file), ref, handle=handle, progress=False)
    return SimpleNamespace(root=root, handle=handle, suite_file=suite_file, ref=untimed(ResultStore(ref).load()))


# (a) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_items,count", [(5, 2), (7, 3), (2, 4), (1, 1)])
def test_every_case_goes_to_exactly_one_shard_and_merge_restores_the_order(n_items, count):
    items = list(range(n_items))
    parts = [Shard(i, count).take(items) for i in range(count)]
    assert sorted(x for p in parts for x in p) == items
    recs = [[{"case_id": c, "key": f"{c}|e|{k}"} for c in p for k in ("none", "circuit")] for p in parts]
    merged = merge([(Shard(i, count), r) for i, r in enumerate(recs)], lambda r: r["case_id"], lambda r: r["key"])
    assert [r["key"] for r in merged] == [f"{c}|e|{k}" for c in items for k in ("none", "circuit")]
    # a record found twice (a copied file) is kept once: the unsharded file's copy wins
    dup = {"case_id": 0, "key": "0|e|none", "from": "unsharded"}
    again = merge([(None, [dup])] + [(Shard(i, count), r) for i, r in enumerate(recs)],
                  lambda r: r["case_id"], lambda r: r["key"])
    assert len(again) == len(merged) and again[0]["from"] == "unsharded"


# (b) ------------------------------------------------------------------------------------------
def test_sequential_shards_merge_to_the_one_process_records(world, tmp_path, capsys):
    from knowedit.cli.main import main
    out = tmp_path / "out"
    argv = ["eval", str(world.suite_file), "--out", str(out)]
    assert main(argv + ["--shard", "0/2"]) == 0
    assert "the last shard to finish writes the report" in capsys.readouterr().out
    assert not (out / "report.html").exists() and (out / "results.shard-0-of-2.jsonl").exists()
    assert main(argv + ["--shard", "1/2"]) == 0            # the last one in writes the report, from both files
    assert (out / "report.html").exists() and not (out / "results.jsonl").exists()
    assert same(untimed(load_records(out)), world.ref)
    summary = (out / "tables" / "summary.csv").read_text().splitlines()
    assert [line.split(",")[2] for line in summary[2:]] == [str(len(RECORDS))] * 2   # n per condition
    meta = json.loads((out / "run.json").read_text())
    assert meta["shards"] == 2 and meta["n_cases"] == len(RECORDS)
    # another split of the same directory is refused before anything loads, and changes nothing
    before = snapshot(out)
    capsys.readouterr()
    assert main(argv + ["--shard", "0/3"]) == 2 and main(argv) == 2
    err = capsys.readouterr().err
    assert "split into 2 shard(s)" in err and "--shard INDEX/2" in err
    assert snapshot(out) == before


# (c) ------------------------------------------------------------------------------------------
def _gloo_worker(rank, init_file, argv):
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from knowedit.cli.main import main
        rc = main(argv)   # the shard comes from the process group: no --shard
    finally:
        dist.destroy_process_group()
    if rc:
        raise SystemExit(rc)


@needs_fork
def test_two_processes_over_gloo_merge_to_the_one_process_records(world, tmp_path):
    out = tmp_path / "out"
    run_two(_gloo_worker, str(tmp_path / "store"), ["eval", str(world.suite_file), "--out", str(out), "--no-report"])
    assert sorted(p.name for p in out.glob("results*.jsonl")) == ["results.shard-0-of-2.jsonl",
                                                                  "results.shard-1-of-2.jsonl"]
    assert same(untimed(load_records(out)), world.ref)


# (d) ------------------------------------------------------------------------------------------
def test_a_killed_shard_resumes_its_own_file(world, tmp_path):
    suite = load_suite(world.suite_file)
    suite.editors[0].callable = None          # "nudge" as registered here
    calls = {"n": 0}

    def dying(handle, requests, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return nudge(handle, requests, **kw)

    out = tmp_path / "out"
    register_editor("nudge", dying)
    try:
        with pytest.raises(Killed):
            run_suite(suite, out, handle=world.handle, progress=False, shard=Shard(0, 2))
        part = out / "results.shard-0-of-2.jsonl"
        with open(part, "a") as f:             # a kill in the middle of a write leaves half a line
            f.write('{"key": "2|nudge|circuit", "metr')
        assert len(load_records(out)) == 2     # readers skip the half line and change nothing
        run_suite(suite, out, handle=world.handle, progress=False, shard=Shard(0, 2))
        keys = [json.loads(x)["key"] for x in part.read_text().splitlines()]
        assert keys == ["0|nudge|none", "0|nudge|circuit", "2|nudge|none", "2|nudge|circuit"] and calls["n"] == 5
        register_editor("nudge", nudge)
        run_suite(suite, out, handle=world.handle, progress=False, shard=Shard(1, 2))
    finally:
        unregister_editor("nudge")
    assert same(untimed(load_records(out)), world.ref)


# lifelong studies split by editor ----------------------------------------------------------------
def test_lifelong_shards_run_whole_editors(gpt2_tok, tmp_path):
    from knowedit.evaluation.lifelong import TIMING as LT, is_complete, run_lifelong
    from knowedit.evaluation.lifelong_checkpoint import read_rows
    from knowedit.evaluation.lifelong_suite import parse_lifelong
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS[:2]))
    fast = {"layers": [1], "mom2_dataset": "identity", "context_template_length_params": [[3, 2]],
            "v_num_grad_steps": 2, "max_update_ratio": 1e3}
    st = parse_lifelong({"study": "lifelong", "name": "t", "dataset": {"name": "counterfact", "path": str(data), "n": 2},
                         "editors": [{"name": "rome", "hparams": fast}, {"name": "rome", "label": "rome-b", "hparams": fast}],
                         "batch": 2, "checkpoint_every": 2, "tasks": [], "generation": {"tokens": 4, "prompts": 1},
                         "eval_batch_size": 8})
    h = _tiny("gpt2", gpt2_tok)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_lifelong(st, ref, handle=h, progress=False)
    assert run_lifelong(st, out, handle=h, progress=False, shard=Shard(1, 2)).name == "rows.shard-1-of-2.jsonl"
    assert {r["editor"] for r in read_rows(out)} == {"rome-b"} and not is_complete(out)
    run_lifelong(st, out, handle=h, progress=False, shard=Shard(0, 2))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in LT} for r in rows]  # noqa: E731
    assert is_complete(out) and strip(read_rows(out)) == strip(read_rows(ref))
    with pytest.raises(KnoweditError, match="split into 2 shard"):
        run_lifelong(st, out, handle=h, progress=False)


# (e) ------------------------------------------------------------------------------------------
def _stats_worker(rank, cache, corpus, counter):
    torch.set_num_threads(1)
    os.environ["KNOWEDIT_CACHE"] = cache
    from knowedit.editing import covariance

    def collect(handle, layers, ids, batch_size=32):   # a stand-in for the forward passes: counts its calls
        with open(counter, "a") as f:
            f.write(f"{rank}\n")
        arrived = [Path(cache) / f"arrived-{r}" for r in (0, 1)]
        t0 = time.time()
        while not all(p.exists() for p in arrived) and time.time() - t0 < 30:
            time.sleep(0.05)
        time.sleep(0.5)   # the other process is now waiting on the lock
        return {l: (torch.eye(4, dtype=torch.float64) * (l + 1) * len(ids), len(ids)) for l in layers}

    covariance.collect = collect
    tok = lambda text, add_special_tokens=False: {"input_ids": [1, 2, 3]}  # noqa: E731
    handle = SimpleNamespace(adapter=SimpleNamespace(d_mlp=4), fingerprint="fake", dtype=torch.float32, tokenizer=tok)
    (Path(cache) / f"arrived-{rank}").touch()
    st = covariance.key_stats(handle, [1, 2], {"mom2_dataset": corpus, "mom2_n_samples": 3})
    torch.save({l: s.mom2 for l, s in st.items()}, Path(cache) / f"got-{rank}.pt")


@needs_fork
def test_two_processes_compute_a_cached_statistic_once(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one text\n\nanother text\n\na third")
    counter = tmp_path / "calls"
    cache = tmp_path / "cache"
    cache.mkdir()
    run_two(_stats_worker, str(cache), str(corpus), str(counter))
    assert len(counter.read_text().split()) == 1
    a, b = (torch.load(cache / f"got-{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() == {1, 2} and all(torch.equal(a[k], b[k]) for k in a)


def test_the_lock_nests_within_one_process(tmp_path):
    from knowedit.models.cache import file_lock
    with file_lock(tmp_path / "x"):
        with file_lock(tmp_path / "x"):        # flock alone would wait on itself here
            pass
    assert (tmp_path / "x.lock").exists()


# (f) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [("3/2", "0-based and must be below COUNT 2"), ("2/2", "--shard 1/2"),
                                        ("a/b", "expected INDEX/COUNT"), ("2/0", "COUNT must be at least 1"),
                                        ("-1/2", "expected INDEX/COUNT"), ("1", "expected INDEX/COUNT")])
def test_bad_shard_specs_are_named(spec, match):
    with pytest.raises(KnoweditError, match=match) as e:
        parse_shard(spec)
    assert "--shard" in str(e.value)


def test_shards_from_the_launcher_environment(monkeypatch):
    assert parse_shard(" 1 / 3 ") == Shard(1, 3)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert shard_from_env({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}) == Shard(0, 2)
    assert shard_from_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}) == Shard(2, 3)   # mpirun
    assert shard_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None     # see LAUNCH_VARS
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None and shard_from_env({}) is None
    with pytest.raises(KnoweditError, match="WORLD_SIZE"):
        shard_from_env({"RANK": "0", "WORLD_SIZE": "two"})
    for k in [v for pair in LAUNCH_VARS for v in pair]:
        monkeypatch.delenv(k, raising=False)
    assert resolve_shard("0/1") is None and resolve_shard(None) is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_shard(None) == Shard(1, 2)
    with pytest.raises(KnoweditError, match="drop --shard"):
        resolve_shard("0/2")


def test_bad_shard_on_the_command_line_loads_and_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # `python -m knowedit`, as torchrun and accelerate launch start it (run in this interpreter: a new one
    # would spend seconds importing torch)
    monkeypatch.setattr(sys, "argv", ["knowedit", "eval", str(ROOT / "evals" / "demo.yaml"), "--out", str(out),
                                      "--shard", "3/2"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("knowedit", run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--shard '3/2'" in err and "0-based" in err
    assert not out.exists()
    from knowedit.cli.main import main
    # the granularity study is not split: a clear refusal, before the study loads
    assert main(["eval", str(ROOT / "evals" / "granularity.yaml"), "--out", str(out), "--shard", "0/2"]) == 2
    assert not out.exists()
